"""Learned prefix ownership shared by gateway replicas through Redis (`routing.kv_aware.shared_table`).

The home rule (gateway/routing/kv_scoring.py) keeps a conversation on one replica
across gateways without any shared state, as long as it stays home. When load
moves it elsewhere, only the gateway that moved it knows; with `shared_table`
every gateway appends what it routed - model, the prompt's first and last block
hashes, the replica - to one Redis stream, `<state.key_prefix>kv-owners`, and
reads everyone else's entries into its own holder tables. Routing never waits
on Redis: records leave in batches every `_FLUSH_S`, arrive through a blocking
XREAD, and a gateway that has not read an entry yet falls back to the home
rule. The stream is trimmed to about `_STREAM_LEN` batches; a gateway starting
up reads what is there. Redis down: each gateway learns alone until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.routing.holders import holder_table

if TYPE_CHECKING:
    from gateway.compiled.policy import Policy
    from gateway.routing.strategies import RouteState, TargetKey

log = logging.getLogger("switchboard.routing")

SHARE_KEY = ("kv-share",)  # where the running sharer is found in RouteState.tables
_FLUSH_S = 0.05
_STREAM_LEN = 20_000
_OUTBOX = 10_000  # records waiting to be sent; the oldest are dropped when Redis is slow
_RETRY_S = 1.0


class SharedOwnership:
    """Sends this gateway's routing records to the stream and applies the other gateways' ones."""

    def __init__(self, states: RouteState, policy: Callable[[], Policy], url: str, key_prefix: str) -> None:
        self._states = states
        self._policy = policy
        self._client = aioredis.Redis.from_url(url)
        self._stream = (key_prefix + "kv-owners").encode()
        self._me = os.urandom(8).hex()  # this process, to skip its own records when reading
        self._outbox: deque[list[Any]] = deque(maxlen=_OUTBOX)
        self._tasks = [asyncio.create_task(self._send()), asyncio.create_task(self._receive())]
        self.url = url
        self.received = 0
        states.tables[SHARE_KEY] = self

    def offer(self, model: str, hashes: Sequence[bytes], holder: TargetKey) -> None:
        """Queue one routing decision (called on the request path: no I/O here)."""
        if hashes:
            self._outbox.append([model, list(holder), [hashes[0].hex(), hashes[-1].hex()]])

    async def close(self) -> None:
        if self._states.tables.get(SHARE_KEY) is self:
            del self._states.tables[SHARE_KEY]
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._client.aclose()

    async def _send(self) -> None:
        while True:
            await asyncio.sleep(_FLUSH_S)
            if not self._outbox:
                continue
            batch = list(self._outbox)
            self._outbox.clear()
            try:
                await self._client.xadd(self._stream, {b"g": self._me, b"r": orjson.dumps(batch)},
                                        maxlen=_STREAM_LEN, approximate=True)
            except (RedisError, OSError) as error:
                log.warning("cannot share prefix ownership through Redis: %s", error)
                await asyncio.sleep(_RETRY_S)

    async def _receive(self) -> None:
        last = b"0-0"
        while True:
            try:
                answer = await self._client.xread({self._stream: last}, count=500, block=1000)
            except (RedisError, OSError) as error:
                log.warning("cannot read shared prefix ownership from Redis: %s", error)
                await asyncio.sleep(_RETRY_S)
                continue
            sizes = _table_sizes(self._policy())
            for _, entries in answer or ():
                for entry_id, fields in entries:
                    last = entry_id
                    if fields.get(b"g", b"").decode() == self._me:
                        continue
                    for model, holder, hashes in orjson.loads(fields[b"r"]):
                        size = sizes.get(model)
                        if size is not None:
                            holder_table(self._states, model, size).record(
                                [bytes.fromhex(h) for h in hashes], tuple(holder))
                            self.received += 1


def _table_sizes(policy: Policy) -> dict[str, int]:
    """The models that share their tables, with their table sizes."""
    return {name: model.plan.config.routing.kv_aware.table_size for name, model in policy.models.items()
            if model.plan.config.routing.strategy == "kv-aware" and model.plan.config.routing.kv_aware.shared_table}


def wanted_url(policy: Policy) -> str | None:
    """The Redis to share through, when any model asks for it."""
    return policy.state.url if _table_sizes(policy) else None
