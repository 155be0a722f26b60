"""Where entries live: an in-process LRU bounded in bytes, or Redis with a TTL.

Both answer `get` with the entry or None and never raise: a cache that cannot
be read is a miss, not a failed request. Freshness against the rule's TTL is
judged by the caller with its (injectable) clock; Redis also expires keys by
itself so it never fills up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.cache.entry import Entry
from gateway.cache.plan import StoreSpec

log = logging.getLogger("switchboard.cache")


class Backend(Protocol):
    async def get(self, key: bytes) -> Entry | None: ...

    def put(self, key: bytes, entry: Entry, ttl_s: float, replace: bool, done: Callable[[], None]) -> None:
        """Store `entry` (only if no fresh one exists unless `replace`); call `done` once written or failed."""

    def delete(self, key: bytes) -> None: ...

    async def close(self) -> None: ...


class MemoryBackend:
    """An LRU of entries whose total size stays within `max_bytes`."""

    def __init__(self, max_bytes: int, clock: Callable[[], float] = time.time) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[Entry, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: bytes) -> Entry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        entry, expires = found
        if self._clock() >= expires:
            self.delete(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: Entry, ttl_s: float, replace: bool, done: Callable[[], None]) -> None:
        try:
            existing = self._entries.get(key)
            if existing is not None and not replace and self._clock() < existing[1]:
                return
            size = entry.size
            if size > self.max_bytes:
                return
            self.delete(key)
            self._entries[key] = (entry, entry.created + ttl_s)
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, (old, _) = self._entries.popitem(last=False)
                self.bytes -= old.size
        finally:
            done()

    def delete(self, key: bytes) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self.bytes -= found[0].size

    async def close(self) -> None:
        self._entries.clear()
        self.bytes = 0


class RedisBackend:
    """Entries as Redis strings under `key_prefix`, written off the request path and expired by Redis."""

    def __init__(self, spec: StoreSpec, pool_size: int = 64) -> None:
        self._prefix = spec.key_prefix.encode()
        self._timeout = spec.timeout_s
        self._client = aioredis.Redis.from_url(spec.url, max_connections=pool_size, socket_timeout=spec.timeout_s,
                                               socket_connect_timeout=spec.timeout_s)
        self._writes: set[asyncio.Task[None]] = set()
        self._warned = False

    @property
    def client(self) -> aioredis.Redis:
        """The connection pool, shared with this store's semantic index."""
        return self._client

    async def get(self, key: bytes) -> Entry | None:
        try:
            async with asyncio.timeout(self._timeout):
                raw = await self._client.get(self._prefix + key.hex().encode())
        except (RedisError, OSError, TimeoutError) as exc:
            self._unreachable(exc)
            return None
        return Entry.decode(raw) if raw is not None else None

    def put(self, key: bytes, entry: Entry, ttl_s: float, replace: bool, done: Callable[[], None]) -> None:
        task = asyncio.get_running_loop().create_task(self._write(key, entry, ttl_s, replace))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        task.add_done_callback(lambda _: done())

    async def _write(self, key: bytes, entry: Entry, ttl_s: float, replace: bool) -> None:
        try:
            await self._client.set(self._prefix + key.hex().encode(), entry.encode(), px=max(1, int(ttl_s * 1000)),
                                   nx=not replace)
            self._warned = False
        except (RedisError, OSError, TimeoutError) as exc:
            self._unreachable(exc)

    def delete(self, key: bytes) -> None:
        pass  # Redis expires entries itself

    async def close(self) -> None:
        if self._writes:
            await asyncio.wait(self._writes, timeout=1.0)
        await self._client.aclose()

    def _unreachable(self, exc: BaseException) -> None:
        # Once per outage, not once per request.
        if not self._warned:
            self._warned = True
            log.warning("response cache: Redis unreachable (%s); serving without it", type(exc).__name__)


def open_backend(spec: StoreSpec, clock: Callable[[], float]) -> Backend:
    if spec.kind == "redis":
        return RedisBackend(spec)
    return MemoryBackend(spec.max_bytes, clock)
