"""Recent traffic in process memory: requests/s, error rate and gateway overhead for the console's overview.

A usage sink: the event loop writes one slot per settled request into a fixed ring of arrays, and the
figures are computed only when an admin asks for them. Each process reports its own traffic (with
several workers, each console request is answered by one of them).
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable
from typing import Any

from gateway.accounting.usage import UsageRecord

RATE_WINDOW_S = 60.0  # requests/s is averaged over the last minute
WINDOW_S = 300.0  # error rate and overhead percentiles cover the last five minutes
_MAX_KEPT = 200_000  # bounds memory (3.6 MB, spent at startup) whatever the traffic; past it the window is shorter


class RecentActivity:
    """Keeps (time, status, overhead) of recent requests in a fixed ring and summarizes them on demand.

    The ring is three preallocated arrays (8 + 2 + 8 bytes a slot), so its memory is spent once at startup and
    does not grow with traffic. A deque of tuples cost ~120 bytes per request kept: filling it grew a busy
    replica's RSS by ~24 MiB over its first 200,000 requests (loadtests/README.md, "Memory soak").

    Given clients' requests only (the app registers it with `UsageRecorder`'s `client_requests_only`): a shadow
    call (gateway/shadow_traffic.py) is no traffic of the gateway's clients.
    """

    def __init__(self, clock: Callable[[], float] = time.time, capacity: int = _MAX_KEPT) -> None:
        self._clock = clock
        self._capacity = capacity
        self._times = array("d", bytes(8 * capacity))
        self._statuses = array("H", bytes(2 * capacity))
        self._overheads = array("d", bytes(8 * capacity))
        self._written = 0

    def record(self, record: UsageRecord) -> None:
        slot = self._written % self._capacity  # the oldest slot once the ring is full
        self._times[slot] = self._clock()
        self._statuses[slot] = record.status
        self._overheads[slot] = record.overhead_ms
        self._written += 1

    def summary(self) -> dict[str, Any]:
        now = self._clock()
        kept = min(self._written, self._capacity)
        recent = [entry for entry in zip(self._times[:kept], self._statuses[:kept], self._overheads[:kept],
                                         strict=True)
                  if entry[0] >= now - WINDOW_S]
        last_minute = sum(1 for entry in recent if entry[0] >= now - RATE_WINDOW_S)
        overheads = sorted(entry[2] for entry in recent)
        return {
            "window_s": WINDOW_S,
            "requests": len(recent),
            "requests_per_s": round(last_minute / RATE_WINDOW_S, 3),
            "error_rate": _share(recent, lambda status: status >= 500),
            "client_error_rate": _share(recent, lambda status: 400 <= status < 500),
            "overhead_ms": {"p50": _percentile(overheads, 0.50), "p99": _percentile(overheads, 0.99)},
        }


def _share(entries: list[tuple[float, int, float]], matches: Callable[[int], bool]) -> float | None:
    if not entries:
        return None
    return round(sum(1 for entry in entries if matches(entry[1])) / len(entries), 4)


def _percentile(ordered: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an ascending list; None when empty."""
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * fraction // 1))  # ceil(n * fraction), at least the first
    return round(ordered[int(rank) - 1], 3)
