"""Counters that admission reserves against, behind one small interface.

A `StateStore` keeps integer counters named by stable strings (team, key,
model, window), never by policy version, so editing the policy never resets
usage. It has three operations, each atomic:

- `admit(checks)`: test every check and reserve all of them, or none;
- `settle(deltas)`: add signed amounts (a refund or an extra charge) — never
  blocks the caller and never raises;
- `read(slices)`: current sums, for usage reports.

Backends: `memory` (one process, for tests and the demo), `durable` (memory
authoritative, snapshotted to SQLite off the request path), `redis` (shared by
replicas; one round trip per admission, or per lease with `state.leases`).
`open_store` builds one from the policy's `state:` block.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from gateway.policy.schema import StatePolicy

UNLIMITED = -1


_Class = TypeVar("_Class", bound=type)


def _direct_init(cls: _Class) -> _Class:
    """Give a frozen, slotted dataclass an `__init__` that stores each field through its slot's descriptor.

    The generated one stores each through `object.__setattr__(self, name, value)`, about 3x the cost; admission
    and settlement make a few checks and deltas per request. The class stays frozen: assigning a field
    afterwards still raises `FrozenInstanceError`.
    """
    fields = dataclasses.fields(cls)
    scope: dict[str, object] = {}
    params, body = [], []
    for field in fields:
        if field.default_factory is not dataclasses.MISSING or not field.init or field.kw_only:
            raise TypeError(f"{cls.__name__}.{field.name}: only plain fields and plain defaults are supported")
        scope[f"_set_{field.name}"] = cls.__dict__[field.name].__set__
        if field.default is dataclasses.MISSING:
            params.append(field.name)
        else:
            scope[f"_default_{field.name}"] = field.default
            params.append(f"{field.name}=_default_{field.name}")
        body.append(f"    _set_{field.name}(self, {field.name})")
    exec(f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body), scope)  # the fields' names only
    init = scope["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"  # type: ignore[attr-defined]
    cls.__init__ = init  # type: ignore[misc]
    return cls


@_direct_init
@dataclass(frozen=True, slots=True)
class Check:
    """One counter an admission tests and reserves against.

    The counter's value is the sum of `slices` (one key for a fixed window,
    several for a rolling one); the reservation is added to the last slice.
    Admitted when `used + amount <= limit`: reaching the limit exactly is
    allowed, one past it is not. `limit == UNLIMITED` only counts.
    """

    slices: tuple[str, ...]
    limit: int
    amount: int
    expires_at: int  # unix seconds after which the newest slice may be dropped


@_direct_init
@dataclass(frozen=True, slots=True)
class Delta:
    """A signed amount to add to one counter key at settlement."""

    key: str
    amount: int
    expires_at: int


@_direct_init
@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer to an admission: `used` holds each check's value before it."""

    admitted: bool
    used: tuple[int, ...]
    denied: int | None = None  # index of the first check that refused


class StoreUnavailable(Exception):
    """The shared store cannot be reached and the policy says to fail closed."""


class StateStore(Protocol):
    """The counters behind rate limits and budgets. Implementations must be safe on the event loop.

    A store that can admit from local leases (RedisStore with `state.leases`, gateway/state/leases.py) has
    `leasing` true and takes `admit(checks, lease=True)`; only request admission asks for it.
    """

    async def start(self) -> None: ...

    async def close(self, timeout_s: float = 5.0) -> None:
        """Write out every pending update and stop within `timeout_s`; log what could not be written."""
        ...

    async def admit(self, checks: Sequence[Check]) -> Verdict: ...

    def settle(self, deltas: Sequence[Delta]) -> None: ...

    async def read(self, slices: Sequence[Sequence[str]]) -> list[int]: ...

    async def flush(self) -> None:
        """Wait until every settlement made so far is applied (tests, shutdown)."""
        ...


def safe_key(name: str) -> str:
    """`name` as a part of a state-store key (team, model and key names are the operator's text)."""
    # Braces would change the Redis Cluster hash tag; colons the key structure.
    return name.replace("%", "%25").replace("{", "%7B").replace("}", "%7D").replace(":", "%3A")


def decide(checks: Sequence[Check], used: Sequence[int]) -> int | None:
    """Index of the first check that refuses, given each counter's current value."""
    for index, check in enumerate(checks):
        if check.limit != UNLIMITED and used[index] + check.amount > check.limit:
            return index
    return None


def open_store(config: StatePolicy, *, policy_path: str | Path | None = None, needed: bool = True,
               clock: Callable[[], float] = time.time, read_only: bool = False) -> StateStore:
    """The store a policy's `state:` block describes.

    `backend: auto` is the durable store when the policy sets any limit or
    budget (`needed`), and memory otherwise, so a gateway without limits
    writes no file.
    """
    backend = backend_for(config, needed)
    if backend == "memory":
        from gateway.state.memory import MemoryStore

        return MemoryStore(clock=clock)
    if backend == "durable":
        from gateway.state.durable import DurableStore

        return DurableStore(durable_path(config, policy_path), flush_interval_s=config.flush_interval_s,
                            clock=clock, read_only=read_only)
    from gateway.state.redis import RedisStore

    seeds = config.cluster.nodes if config.cluster is not None else ()
    url = config.url or seeds[0]
    from gateway.state.leases import LeaseSettings

    leases = config.leases
    return RedisStore(url, key_prefix=config.key_prefix, timeout_s=config.timeout_s,
                      failure_mode=config.failure_mode, retry_interval_s=config.retry_interval_s, clock=clock,
                      cluster_nodes=seeds, leases=LeaseSettings(leases.requests, leases.headroom_fraction,
                                                                leases.idle_s) if leases is not None else None)


def backend_for(config: StatePolicy, needed: bool) -> str:
    """The backend `state.backend` names, with `auto` resolved."""
    if config.backend != "auto":
        return config.backend
    return "redis" if config.url or config.cluster else ("durable" if needed else "memory")


def durable_path(config: StatePolicy, policy_path: str | Path | None) -> Path:
    """Where the durable store lives: `state.path`, relative to the policy file's directory."""
    base = Path(policy_path).resolve().parent if policy_path is not None else Path.cwd()
    if config.path:
        return base / config.path
    stem = Path(policy_path).stem if policy_path is not None else "switchboard"
    return base / f"{stem}.state.sqlite"
