"""The records a request's steps share: what the app provides, and what one request has learned so far.

Every step of the journey (gateway/pipeline.py) reads and writes these; they
hold each concern's handle but none of its logic, so any step can take them
without importing the steps it does not call. The types they name from the
layers above are for annotations only.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.telemetry.request_trace import NO_TRACE, Trace
from providers.base import Endpoint

if TYPE_CHECKING:
    from gateway.accounting.limits import Limiter
    from gateway.accounting.settlement import Settlement
    from gateway.accounting.usage import UsageRecorder
    from gateway.cache import ResponseCache
    from gateway.compiled.policy import KeyEntry, Policy
    from gateway.routing.strategies import RouteState
    from gateway.shadow_traffic import ShadowTraffic
    from gateway.telemetry.traces import Telemetry
    from gateway.tokens.counter import TokenCounter
    from gateway.upstream.pools import UpstreamPools


# The 80 low bits of a UUIDv7 are random but for the version (4 bits at 76) and the RFC 4122 variant (2 at 62).
_RANDOM_BITS = ((1 << 80) - 1) & ~(0xF << 76) & ~(0x3 << 62)
_VERSION_AND_VARIANT = (0x7 << 76) | (0x2 << 62)


def new_gateway_id() -> str:
    """A UUIDv7: 48 bits of Unix milliseconds, then 74 random bits.

    The ledger's key for the request. Made here, never taken from a client, so
    no tenant can name (and so erase or shadow) another tenant's row; time-ordered,
    so ledger inserts append to the index instead of landing all over it.
    """
    return _uuid7(os.urandom(10))


def _uuid7(random: bytes) -> str:
    """The UUIDv7 of now and 10 random bytes (74 of their bits used), as canonical text."""
    milliseconds = time.time_ns() // 1_000_000
    value = (milliseconds << 80) | (int.from_bytes(random) & _RANDOM_BITS) | _VERSION_AND_VARIANT
    # The 8-4-4-4-12 hex digits from the bytes' own hex with a dash every two bytes (the first one dropped) and one
    # more dash: the same text as formatting the int and slicing it five times, for ~3,000 instructions less.
    raw = value.to_bytes(16)
    return raw[:10].hex("-", 2).replace("-", "", 1) + "-" + raw[10:].hex()


class GatewayIds:
    """`new_gateway_id`s whose random bits are cut from 4 KiB of `os.urandom` at a time; one per app.

    `os.urandom` gives up the GIL for its system call, and under load another thread (the span exporter, the
    ledger writer) takes it while the request waits to get it back: ~46 µs a call on average in a profile of the
    full policy at 2,000 requests (the call itself takes ~0.5 µs). Reading 409 ids' worth at once makes that one
    wait per 409 requests. The bytes are as unguessable as before; a forked child draws its own (`_pid`).
    """

    _POOL = 4090  # 409 ids of 10 bytes

    def __init__(self) -> None:
        self._pool = b""
        self._at = self._POOL
        self._pid = 0

    def __call__(self) -> str:
        at = self._at
        if at >= self._POOL or self._pid != os.getpid():
            self._pool, self._pid, at = os.urandom(self._POOL), os.getpid(), 0
        self._at = at + 10
        return _uuid7(self._pool[at:at + 10])



@dataclass(frozen=True, slots=True)
class Services:
    """What the pipeline needs from the app, injected once at startup."""

    policy: Callable[[], Policy]
    pools: UpstreamPools
    counter: TokenCounter
    recorder: UsageRecorder
    # Target state (in-flight, latency, breakers) for the app's lifetime, across policy reloads.
    routes: RouteState
    # Traces (gateway/telemetry/traces.py); off unless the policy or the app factory turns them on.
    telemetry: Telemetry
    # Rate limits and budgets (gateway/accounting/limits.py); None when the app runs without a state store.
    limiter: Limiter | None
    # Response caching (gateway/cache/): stores and in-flight requests, across policy reloads.
    cache: ResponseCache
    # Shadow calls in flight (gateway/shadow_traffic.py), bounded per model, across policy reloads.
    shadows: ShadowTraffic
    clock: Callable[[], float] = time.perf_counter


@dataclass(slots=True)
class Exchange:
    """Per-request bookkeeping: identity, where the time went, and the settlement its owner closes."""

    request_id: str  # the client's x-request-id when it sent a well-formed one: echoed and forwarded, never a key
    started: float
    # The gateway's own id for the request: unguessable, the ledger's key (gateway/accounting/settlement.py).
    gateway_id: str = field(default_factory=new_gateway_id)
    # The policy snapshot and caller the gate authenticated from the headers, when a gate did (gateway/http/gate.py).
    # These two come right after `started`: `respond` passes all four by position (keywords, when calling a class,
    # are packed into a dict and unpacked again).
    authenticated: tuple[Policy, KeyEntry] | None = None
    upstream_wait_s: float = 0.0
    response_headers: dict[str, str] = field(default_factory=dict)
    # The request's spans (gateway/telemetry/traces.py); NO_TRACE when tracing is off.
    trace: Trace = NO_TRACE
    settlement: Settlement = field(init=False)

    def overhead_ms(self, now: float) -> float:
        return max(0.0, (now - self.started - self.upstream_wait_s) * 1000)


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class StreamReply:
    headers: Mapping[str, str]
    events: AsyncIterator[bytes]


@dataclass(slots=True)
class InferenceRequest:
    endpoint: Endpoint
    body: Mapping[str, Any]
    model: str
    stream: bool
    client_wants_usage: bool
