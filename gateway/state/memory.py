"""The in-process store: a dict of counters with absolute expiry times.

Authoritative for one process only; the durable store builds on it. Every
operation is a few dict lookups done synchronously on the event loop, so it
is atomic with respect to other requests without any lock on the hot path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from gateway.state import UNLIMITED, Check, Delta, Verdict

_SWEEP_EVERY = 4096  # admissions between sweeps of expired counters


class MemoryStore:
    """Counters in a dict: `key -> [value, expires_at]`."""

    # One call may test counters of several hash tags atomically (gateway/accounting/hierarchy.py `reserve`); a Redis
    # Cluster cannot, so RedisStore does not say so.
    atomic_across_tags = True

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._values: dict[str, list[int]] = {}
        # Keys changed since the last snapshot; only the durable store reads it,
        # from its flusher thread, hence the lock (uncontended on the request path).
        self._dirty: set[str] = set()
        self._lock = threading.Lock()
        self._until_sweep = _SWEEP_EVERY

    async def start(self) -> None:
        return None

    async def close(self, timeout_s: float = 5.0) -> None:
        return None

    async def flush(self) -> None:
        return None

    async def admit(self, checks: Sequence[Check]) -> Verdict:
        return self.admit_now(checks)

    def settle(self, deltas: Sequence[Delta]) -> None:
        now = self._clock()
        add = self._add
        with self._lock:
            for delta in deltas:
                if delta.amount:
                    add(delta.key, delta.amount, delta.expires_at, now)

    async def read(self, slices: Sequence[Sequence[str]]) -> list[int]:
        return self.read_now(slices)

    def admit_now(self, checks: Sequence[Check]) -> Verdict:
        """Test and reserve every check, or none of them."""
        now = self._clock()
        with self._lock:
            values, dirty = self._values, self._dirty  # under the lock: the durable store's flusher swaps `_dirty`
            # `_sum`, `decide` and `_add` inlined: a request admits through here with a few checks each.
            sums = []
            denied = None
            for index, check in enumerate(checks):
                total = 0
                for key in check.slices:
                    entry = values.get(key)
                    if entry is not None:
                        if entry[1] <= now:
                            del values[key]
                            dirty.add(key)
                        else:
                            total += entry[0]
                sums.append(total)
                if denied is None and check.limit != UNLIMITED and total + check.amount > check.limit:
                    denied = index
            used = tuple(sums)
            if denied is None:
                for check in checks:
                    amount, expires_at = check.amount, check.expires_at
                    if amount == 0 or expires_at <= now:
                        continue
                    key = check.slices[-1]
                    entry = values.get(key)
                    if entry is None or entry[1] <= now:
                        values[key] = [amount, expires_at]
                    else:
                        entry[0] += amount
                        if expires_at > entry[1]:
                            entry[1] = expires_at
                    dirty.add(key)
            self._until_sweep -= 1
            if self._until_sweep <= 0:
                self._sweep(now)
        return Verdict(denied is None, used, denied)

    def read_now(self, slices: Sequence[Sequence[str]]) -> list[int]:
        now = self._clock()
        with self._lock:
            return [self._sum(keys, now) for keys in slices]

    def snapshot_changes(self) -> list[tuple[str, int, int]]:
        """Rows changed since the last call, as `(key, value, expires_at)`; value 0 means deleted."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            return [(key, *self._values.get(key, (0, 0))) for key in dirty]  # type: ignore[misc]

    def rows(self) -> list[tuple[str, int, int]]:
        """Every live counter as `(key, value, expires_at)`."""
        now = self._clock()
        with self._lock:
            return [(key, value, expires) for key, (value, expires) in self._values.items() if expires > now]

    def load(self, rows: Sequence[tuple[str, int, int]]) -> None:
        """Replace the counters with `rows` (at startup, before serving)."""
        now = self._clock()
        with self._lock:
            self._values = {key: [value, expires] for key, value, expires in rows if expires > now}

    def _sum(self, keys: Sequence[str], now: float) -> int:
        total = 0
        for key in keys:
            entry = self._values.get(key)
            if entry is not None:
                if entry[1] <= now:
                    del self._values[key]
                    self._dirty.add(key)
                else:
                    total += entry[0]
        return total

    def _add(self, key: str, amount: int, expires_at: int, now: float) -> None:
        if amount == 0 or expires_at <= now:
            return
        entry = self._values.get(key)
        if entry is None or entry[1] <= now:
            self._values[key] = [amount, expires_at]
        else:
            entry[0] += amount
            entry[1] = max(entry[1], expires_at)
        self._dirty.add(key)

    def _sweep(self, now: float) -> None:
        self._until_sweep = _SWEEP_EVERY
        expired = [key for key, (_, expires) in self._values.items() if expires <= now]
        for key in expired:
            del self._values[key]
            self._dirty.add(key)
