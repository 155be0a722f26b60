"""Stored Responses API responses, so `previous_response_id`, GET, DELETE and input_items work on every provider.

A `ResponseStore` keeps one record per response: the Response object as the
client received it and its context, the input items the model was given (the
earlier turns included). Continuing a conversation reads one record, so an
evicted or expired older turn never breaks continuing from a newer one, and a
write is one atomic put: a record is there whole or not at all.

Every record belongs to a team (the size cap and expiry are the team's) and an
owner (the team, or one key of it, by policy). A lookup names both: a record of
another owner is not found, exactly as an id that never existed.

Backends: `sqlite` (embedded, the default; its I/O runs on one worker thread,
never on the event loop) and `redis` (shared by replicas; one round trip per
operation). `open_response_store` builds one from the policy's `response_store:`.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from gateway.policy.schema import ResponseStorePolicy, StatePolicy

_ID = re.compile(r"^resp_[0-9a-f]{48}$")


def new_response_id() -> str:
    """A gateway response id: `resp_` and 192 random bits, so no caller can guess another's."""
    return "resp_" + secrets.token_hex(24)


def is_response_id(value: object) -> bool:
    """Whether `value` has the shape of a gateway response id (anything else is unknown without a lookup)."""
    return isinstance(value, str) and _ID.match(value) is not None


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """One stored response: `response` and `context` are JSON (an object and a list of input items)."""

    id: str
    team: str
    owner: str
    created_at: float
    response: bytes
    context: bytes


class ResponseStoreUnavailable(Exception):
    """The store cannot be reached or failed; the client gets 503 response_store_unavailable."""


class ResponseStore(Protocol):
    """Where responses are kept. Every method is safe on the event loop and bounded by the store's timeout."""

    @property
    def healthy(self) -> bool:
        """False for a while after a failure: requests that need the store are refused before any upstream call."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def put(self, record: StoredResponse, ttl_s: float, max_bytes: int) -> bool:
        """Keep `record` for `ttl_s`, evicting the team's oldest records beyond `max_bytes`; False when the
        record alone is larger than `max_bytes` (then nothing is kept)."""
        ...

    async def get(self, team: str, owner: str, response_id: str) -> StoredResponse | None: ...

    async def delete(self, team: str, owner: str, response_id: str) -> bool: ...


class Outages:
    """Remembers a store failure for `retry_interval_s`, so requests meanwhile fail fast."""

    def __init__(self, retry_interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = retry_interval_s
        self._clock = clock
        self._until = 0.0

    @property
    def healthy(self) -> bool:
        return self._clock() >= self._until

    def failed(self) -> None:
        self._until = self._clock() + self._interval


def open_response_store(config: ResponseStorePolicy, state: StatePolicy, *,
                        policy_path: str | Path | None = None) -> ResponseStore:
    """The store a policy's `response_store:` block describes."""
    if config.backend == "redis":
        from gateway.response_store.redis import RedisResponseStore

        url = config.url or state.url
        assert url is not None  # the schema requires one
        return RedisResponseStore(url, key_prefix=config.key_prefix, timeout_s=config.timeout_s,
                                  retry_interval_s=config.retry_interval_s)
    from gateway.response_store.sqlite import SqliteResponseStore

    return SqliteResponseStore(sqlite_path(config, policy_path), timeout_s=config.timeout_s,
                               retry_interval_s=config.retry_interval_s)


def sqlite_path(config: ResponseStorePolicy, policy_path: str | Path | None) -> Path:
    """`response_store.path`, relative to the policy file's directory, or `<policy name>.responses.sqlite`."""
    base = Path(policy_path).resolve().parent if policy_path is not None else Path.cwd()
    if config.path:
        return base / config.path
    stem = Path(policy_path).stem if policy_path is not None else "switchboard"
    return base / f"{stem}.responses.sqlite"
