"""The shared response store: Redis, one round trip per operation, for several workers or replicas.

A record is one Redis string holding the whole record (owner, Response,
context) with the team's TTL, so it is there whole or not at all. Each team has
an index (a sorted set of its ids by expiry, a hash of their sizes and a byte
counter) that the put script uses to drop expired entries and evict the oldest
beyond the team's cap, atomically. Every key carries the team as a `{hash tag}`,
so one script's keys share a Redis Cluster slot.

When Redis does not answer within `timeout_s` the request gets 503 and, for
`retry_interval_s`, so does every request that needs the store, before any
upstream call is made.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import orjson

from gateway.response_store import Outages, ResponseStoreUnavailable, StoredResponse
from gateway.state.resp import ConnectionLost, RedisReplyError, RespClient

log = logging.getLogger("switchboard.responses")

# KEYS: record, index (zset id -> expiry ms), sizes (hash id -> bytes), byte counter.
# ARGV: id, record, ttl ms, cap bytes, record key prefix (the record key without the id).
# Returns 1 when stored; evicts the team's oldest records first when the cap needs it.
_PUT = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local size, ttl, cap = string.len(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local function drop(id)
  local s = redis.call('HGET', KEYS[3], id)
  if s then
    redis.call('HDEL', KEYS[3], id)
    redis.call('DECRBY', KEYS[4], s)
  end
  redis.call('ZREM', KEYS[2], id)
  redis.call('DEL', ARGV[5] .. id)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do drop(id) end
local total = tonumber(redis.call('GET', KEYS[4]) or '0') + size
while total > cap do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then break end
  total = total - tonumber(redis.call('HGET', KEYS[3], oldest[1]) or '0')
  drop(oldest[1])
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], size)
redis.call('INCRBY', KEYS[4], size)
for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], ttl) end
return 1
"""
# KEYS: as _PUT. ARGV: id, record key prefix. Returns 1 when a record was deleted.
_DELETE = """
local existed = redis.call('DEL', KEYS[1])
local s = redis.call('HGET', KEYS[3], ARGV[1])
if s then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('DECRBY', KEYS[4], s)
end
redis.call('ZREM', KEYS[2], ARGV[1])
return existed
"""
_SHAS = {script: hashlib.sha1(script.encode()).hexdigest() for script in (_PUT, _DELETE)}
_FAILURES = (RedisReplyError, ConnectionLost, OSError, TimeoutError)


class RedisResponseStore:
    def __init__(self, url: str, *, key_prefix: str = "switchboard:responses:", timeout_s: float = 1.0,
                 retry_interval_s: float = 1.0) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must not contain { or } (the team is the Redis Cluster hash tag)")
        self.url = url
        self._prefix = key_prefix
        self._timeout = timeout_s
        self._outages = Outages(retry_interval_s)
        self._client = RespClient(url, connect_timeout_s=timeout_s)

    @property
    def healthy(self) -> bool:
        return self._outages.healthy

    async def start(self) -> None:
        try:
            await self._call("PING")
        except ResponseStoreUnavailable:
            log.error("response store (Redis) unreachable at startup; requests that need it get 503")

    async def close(self) -> None:
        await self._client.close()

    async def put(self, record: StoredResponse, ttl_s: float, max_bytes: int) -> bool:
        body = orjson.dumps({"owner": record.owner, "created_at": record.created_at,
                             "response": orjson.Fragment(record.response), "context": orjson.Fragment(record.context)})
        if len(body) > max_bytes:
            return False
        keys = self._keys(record.team, record.id)
        await self._script(_PUT, keys, record.id, body, max(1, int(ttl_s * 1000)), max_bytes,
                           keys[0][: -len(record.id)])
        return True

    async def get(self, team: str, owner: str, response_id: str) -> StoredResponse | None:
        raw = await self._call("GET", self._keys(team, response_id)[0])
        if raw is None:
            return None
        stored = orjson.loads(raw)
        if stored.get("owner") != owner:
            return None  # another owner's record answers exactly as an unknown id
        return StoredResponse(response_id, team, owner, stored["created_at"], orjson.dumps(stored["response"]),
                              orjson.dumps(stored["context"]))

    async def delete(self, team: str, owner: str, response_id: str) -> bool:
        if await self.get(team, owner, response_id) is None:
            return False
        keys = self._keys(team, response_id)
        return bool(await self._script(_DELETE, keys, response_id, keys[0][: -len(response_id)]))

    def _keys(self, team: str, response_id: str) -> list[str]:
        base = f"{self._prefix}{{{team}}}:"
        return [f"{base}r:{response_id}", f"{base}index", f"{base}sizes", f"{base}bytes"]

    async def _script(self, script: str, keys: list[str], *args: Any) -> Any:
        try:
            return await self._call("EVALSHA", _SHAS[script], len(keys), *keys, *args)
        except ResponseStoreUnavailable as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self._call("EVAL", script, len(keys), *keys, *args)  # first use on this server: cached now

    async def _call(self, *command: Any) -> Any:
        try:
            async with asyncio.timeout(self._timeout):
                return await self._client.call(*command)
        except RedisReplyError as exc:
            if str(exc).startswith("NOSCRIPT"):
                raise ResponseStoreUnavailable(str(exc)) from exc
            self._failed(exc)
            raise ResponseStoreUnavailable(str(exc)) from exc
        except _FAILURES as exc:
            self._failed(exc)
            raise ResponseStoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def _failed(self, exc: BaseException) -> None:
        # Drop the connection: a command Redis has not read yet dies with it instead of running late.
        self._client.abort()
        if self._outages.healthy:
            log.error("RESPONSE STORE DOWN: Redis unreachable (%s: %s); requests that need it get 503",
                      type(exc).__name__, exc)
        self._outages.failed()
