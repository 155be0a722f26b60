"""The semantic index in Redis, so every replica sharing the cache's Redis finds every replica's questions.

Plain Redis 7, no modules: each partition is one sorted set whose members are
`entry key + the question's vector as packed float32`, scored by the entry's
expiry (milliseconds of the cache clock). A lookup fetches the `candidates`
live members that expire last — the most recently stored — in one
ZREVRANGEBYSCORE, and compares them in-process; a write trims the set to that
bound and drops what has expired, so a partition never holds more than
`candidates` vectors and Redis deletes it once its newest entry has expired.

The trade-off against a vector database: a question is only compared with the
`candidates` newest of its partition, so an older match can be missed (a miss,
never a wrong answer beyond what the threshold allows).
"""

from __future__ import annotations

import asyncio
import logging
import operator
from array import array
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.cache.keys import KEY_BYTES

log = logging.getLogger("switchboard.cache")

# Candidates scored between two yields to the event loop: ~0.3 ms of arithmetic for 1536-dim vectors.
_SLICE = 8


class SharedSemanticIndex:
    """Entry keys by their question's vector, in Redis; lookups and writes never raise (Redis down = no match)."""

    def __init__(self, client: aioredis.Redis, key_prefix: str, candidates: int, timeout_s: float,
                 clock: Callable[[], float]) -> None:
        self._client = client
        self._prefix = key_prefix.encode() + b"sem:"
        self._candidates = candidates
        self._timeout = timeout_s
        self._clock = clock
        self._writes: set[asyncio.Task[None]] = set()
        self._warned = False

    def _key(self, partition: bytes) -> bytes:
        return self._prefix + partition.hex().encode()

    async def find(self, partition: bytes, vector: list[float], threshold: float, now: float
                   ) -> tuple[bytes, float] | None:
        """The closest live entry at or above `threshold` among the partition's newest, with its similarity."""
        try:
            async with asyncio.timeout(self._timeout):
                members = await self._client.zrevrangebyscore(self._key(partition), "+inf", f"({int(now * 1000)}",
                                                              start=0, num=self._candidates)
        except (RedisError, OSError, TimeoutError) as exc:
            self._unreachable(exc)
            return None
        best, best_score = None, threshold
        width = len(vector) * 4
        for done, member in enumerate(members, 1):
            if len(member) - KEY_BYTES != width:
                continue  # another embedding model's vector (the policy changed)
            candidate = array("f")
            candidate.frombytes(member[KEY_BYTES:])
            score = sum(map(operator.mul, candidate, vector))
            if score >= best_score:
                best, best_score = member[:KEY_BYTES], score
            if done % _SLICE == 0:
                await asyncio.sleep(0)  # long scans must not hold up other requests
        return None if best is None else (best, best_score)

    def add(self, partition: bytes, key: bytes, vector: list[float], expires_at: float) -> None:
        """Record the question of entry `key` (written in the background, like the entry itself)."""
        task = asyncio.get_running_loop().create_task(self._write(partition, key, vector, expires_at))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def discard(self, key: bytes) -> None:
        pass  # members leave by expiry or by the per-partition bound

    async def _write(self, partition: bytes, key: bytes, vector: list[float], expires_at: float) -> None:
        name = self._key(partition)
        ttl_ms = max(1, int((expires_at - self._clock()) * 1000))
        try:
            async with asyncio.timeout(self._timeout):
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.zadd(name, {key + array("f", vector).tobytes(): int(expires_at * 1000)})
                    pipe.zremrangebyscore(name, "-inf", int(self._clock() * 1000))
                    pipe.zremrangebyrank(name, 0, -self._candidates - 1)
                    # The set lives as long as its longest-lived member: set a TTL if none, extend it if longer.
                    pipe.pexpire(name, ttl_ms, nx=True)
                    pipe.pexpire(name, ttl_ms, gt=True)
                    await pipe.execute()
            self._warned = False
        except (RedisError, OSError, TimeoutError) as exc:
            self._unreachable(exc)

    async def close(self) -> None:
        """Give pending writes a moment to land."""
        if self._writes:
            await asyncio.wait(self._writes, timeout=1.0)

    def _unreachable(self, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning("response cache: Redis unreachable for the semantic index (%s); exact matching only",
                        type(exc).__name__)
