"""The shared store for several workers or replicas: Redis, one round trip per request.

Admission is one Lua script (EVALSHA): it sums each check's slices, decides,
and reserves all or nothing, atomically on the server. Settlements are not a
round trip of their own: their deltas wait in a per-team outbox and ride along
with that team's next admission (the same script applies them first), or are
sent by a short timer (`SETTLE_DELAY_S`) when no admission comes. Until then a
counter still holds the request's reservation, which only errs on the safe side.

Keys carry the team as a `{hash tag}`, so every key one script touches lives in
the same Redis Cluster slot, and every key has an absolute expiry, so the store
does not grow without bound.

When Redis cannot be reached within `timeout_s` the policy decides:
`fail_open` serves from a local in-memory store and journals every increment
to replay when Redis returns; `fail_closed` refuses admission (503). Either
way settlements are journalled and replayed, and a background task probes
Redis until it answers again; no request waits on Redis longer than the timeout.
Every script carries a deadline in Redis's clock (the offset is measured at
each connect): a call that times out is counted locally, and if Redis only
gets to it later it skips it, so nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from gateway.state import Check, Delta, StoreUnavailable, Verdict
from gateway.state.memory import MemoryStore
from gateway.state.resp import ConnectionLost, RedisReplyError, RespClient

log = logging.getLogger("switchboard.state")

SETTLE_DELAY_S = 0.02

# KEYS: the deltas' keys, then every check's slices, flattened.
# ARGV: deadline (Redis time, ms), check count n, delta count d, then per
#       delta: amount, expires_at; then per check: slice count, limit, amount,
#       expires_at.
# Does nothing and returns -1 if it runs after the deadline: its caller has
# given up on it and counted it elsewhere. Otherwise applies the deltas and
# returns each check's used value and the 1-based index of the refusing
# check (0 = admitted, everything reserved).
_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[1]) then return -1 end
local n, d = tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, d do
  redis.call('INCRBY', KEYS[i], ARGV[2 + 2 * i])
  redis.call('EXPIREAT', KEYS[i], ARGV[3 + 2 * i])
end
local result, last, denied, k, a = {}, {}, 0, d + 1, 4 + 2 * d
local first = a
for c = 1, n do
  local count, limit, amount = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local used = 0
  for j = k, k + count - 1 do
    local v = redis.call('GET', KEYS[j])
    if v then used = used + tonumber(v) end
  end
  result[c] = used
  last[c] = k + count - 1
  if denied == 0 and limit >= 0 and used + amount > limit then denied = c end
  k = k + count
  a = a + 4
end
if denied == 0 then
  a = first
  for c = 1, n do
    if tonumber(ARGV[a + 2]) ~= 0 then
      redis.call('INCRBY', KEYS[last[c]], ARGV[a + 2])
      redis.call('EXPIREAT', KEYS[last[c]], ARGV[a + 3])
    end
    a = a + 4
  end
end
result[n + 1] = denied
return result
"""

_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()
_FAILURES = (RedisReplyError, ConnectionLost, OSError, asyncio.TimeoutError)
_Amounts = dict[str, list[int]]  # key -> [amount, expires_at]


def _tag(key: str) -> str:
    """The key's `{hash tag}` (its team): keys sent in one script must share it."""
    return key[:key.find("}") + 1]


class RedisStore:
    def __init__(self, url: str, *, key_prefix: str = "switchboard:", timeout_s: float = 0.25,
                 failure_mode: str = "fail_open", retry_interval_s: float = 0.5,
                 clock: Callable[[], float] = time.time) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must not contain { or } (the team is the Redis Cluster hash tag)")
        self.url = url
        self._prefix = key_prefix
        self._timeout = timeout_s
        self._fail_open = failure_mode == "fail_open"
        self._retry_interval = retry_interval_s
        self._clock = clock
        # One pipelined connection (gateway/state/resp.py); no client-side
        # retries: a failed call is answered by the failure policy at once.
        self._client = RespClient(url, connect_timeout_s=timeout_s)
        self._local = MemoryStore(clock=clock)
        self._outbox: dict[str, _Amounts] = {}  # settlements not yet sent, by team tag
        self._journal: _Amounts = {}  # increments Redis has not seen while it was unreachable
        self._healthy = True
        self._outage_started = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._skew_s = 0.0
        self._up = asyncio.Event()
        self._up.set()

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def wait_until_healthy(self) -> None:
        """Return once Redis is in use again (after an outage, when the journal is replayed)."""
        await self._up.wait()

    async def start(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._measure_skew()
        except _FAILURES as exc:
            self._went_down(exc)

    async def close(self) -> None:
        await self.flush()
        if self._probe is not None:
            self._probe.cancel()
        if self._journal:
            log.error("closing with %d counter updates Redis never received (it was unreachable)",
                      len(self._journal))
        await self._client.close()

    async def flush(self) -> None:
        self._send_outbox()
        while self._sending:
            await asyncio.gather(*list(self._sending), return_exceptions=True)

    async def admit(self, checks: Sequence[Check]) -> Verdict:
        if self._healthy:
            tag = _tag(checks[0].slices[0]) if checks else ""
            riders = self._outbox.pop(tag, None) if all(_tag(c.slices[0]) == tag for c in checks) else None
            keys: list[str] = []
            args: list[Any] = [len(checks), len(riders) if riders else 0]  # the deadline goes first in _run
            if riders:
                for key, (amount, expires) in riders.items():
                    keys.append(self._prefix + key)
                    args.extend((amount, expires))
            for check in checks:
                keys.extend(self._prefix + key for key in check.slices)
                args.extend((len(check.slices), check.limit, check.amount, check.expires_at))
            try:
                result = await self._run(keys, args)
            except _FAILURES as exc:
                if riders:
                    self._merge(self._journal, riders.items())
                self._went_down(exc)
            else:
                denied = int(result[-1])
                used = tuple(int(value) for value in result[:-1])
                return Verdict(denied == 0, used, denied - 1 if denied else None)
        if not self._fail_open:
            raise StoreUnavailable("the rate-limit state store (Redis) is unreachable")
        verdict = self._local.admit_now(checks)
        if verdict.admitted:
            self._merge(self._journal, ((c.slices[-1], (c.amount, c.expires_at)) for c in checks))
        return verdict

    def settle(self, deltas: Sequence[Delta]) -> None:
        deltas = [d for d in deltas if d.amount]
        if not deltas:
            return
        if not self._healthy:
            self._local.settle(deltas)
            self._merge(self._journal, ((d.key, (d.amount, d.expires_at)) for d in deltas))
            return
        for delta in deltas:
            self._merge(self._outbox.setdefault(_tag(delta.key), {}), [(delta.key, (delta.amount, delta.expires_at))])
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(SETTLE_DELAY_S, self._send_outbox)

    async def read(self, slices: Sequence[Sequence[str]]) -> list[int]:
        keys = [self._prefix + key for group in slices for key in group]
        try:
            async with asyncio.timeout(self._timeout * 4):
                values = await self._client.call("MGET", *keys) if keys else []
        except _FAILURES as exc:
            raise StoreUnavailable(f"Redis is unreachable: {exc}") from exc
        totals, index = [], 0
        for group in slices:
            totals.append(sum(int(v) for v in values[index:index + len(group)] if v is not None))
            index += len(group)
        return totals

    async def _run(self, keys: list[str], args: list[Any], timeout_s: float | None = None) -> Any:
        """Run the script within `timeout_s`; Redis skips it if it only gets to it later."""
        timeout_s = timeout_s or self._timeout
        deadline = int((time.time() + self._skew_s + timeout_s) * 1000)
        async with asyncio.timeout(timeout_s):
            try:
                result = await self._client.call("EVALSHA", _SHA, len(keys), *keys, deadline, *args)
            except RedisReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                # First call on this server (or after a restart or SCRIPT FLUSH): EVAL caches it.
                result = await self._client.call("EVAL", _SCRIPT, len(keys), *keys, deadline, *args)
        if result == -1:
            raise TimeoutError("Redis ran the call after its deadline and skipped it")
        return result

    async def _measure_skew(self) -> None:
        """How far Redis's clock is ahead of ours, so script deadlines are in Redis time.

        Redis read its clock somewhere between our `before` and `after`; taking
        `after` errs towards deadlines that pass early, never late, so Redis
        never runs a call its caller has already given up on.
        """
        seconds, micros = await self._client.call("TIME")
        after = time.time()
        self._skew_s = int(seconds) + int(micros) / 1e6 - after

    def _send_outbox(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        outbox, self._outbox = self._outbox, {}
        loop = asyncio.get_running_loop()
        for amounts in outbox.values():
            task = loop.create_task(self._send(amounts))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, amounts: _Amounts) -> None:
        keys = [self._prefix + key for key in amounts]
        args: list[Any] = [0, len(amounts)]
        for amount, expires in amounts.values():
            args.extend((amount, expires))
        try:
            await self._run(keys, args, self._timeout * 4)
        except _FAILURES as exc:
            self._merge(self._journal, amounts.items())
            self._went_down(exc)

    @staticmethod
    def _merge(into: _Amounts, items: Iterable[tuple[str, Sequence[int]]]) -> None:
        for key, (amount, expires) in items:
            if not amount:
                continue
            entry = into.get(key)
            if entry is None:
                into[key] = [amount, expires]
            else:
                entry[0] += amount
                entry[1] = max(entry[1], expires)

    def _went_down(self, exc: BaseException) -> None:
        # Drop the connection: commands Redis has not read yet die with it
        # instead of running late, after their callers were told they failed.
        self._client.abort()
        if self._healthy:
            self._healthy = False
            self._up.clear()
            self._outage_started = self._clock()
            mode = "serving with local per-process counters (fail_open)" if self._fail_open else \
                "refusing requests with 503 (fail_closed)"
            log.error("RATE-LIMIT STATE STORE DOWN: Redis %s unreachable (%s: %s); %s until it returns",
                      _safe_url(self.url), type(exc).__name__, exc, mode)
        for amounts in self._outbox.values():
            self._merge(self._journal, amounts.items())
        self._outbox.clear()
        if self._probe is None or self._probe.done():
            with contextlib.suppress(RuntimeError):
                self._probe = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        """Probe Redis until it answers, replay the journal, then switch back."""
        while True:
            await asyncio.sleep(self._retry_interval)
            try:
                async with asyncio.timeout(self._timeout):
                    await self._measure_skew()
                await self._replay()
            except _FAILURES:
                continue
            break
        self._healthy = True
        self._up.set()
        self._local = MemoryStore(clock=self._clock)
        log.warning("rate-limit state store back: Redis %s reachable again after %.1fs; local counts reconciled",
                    _safe_url(self.url), self._clock() - self._outage_started)

    async def _replay(self) -> None:
        while self._journal:
            journal, self._journal = self._journal, {}
            by_tag: dict[str, _Amounts] = {}
            for key, entry in journal.items():
                by_tag.setdefault(_tag(key), {})[key] = entry
            try:
                for tag, amounts in list(by_tag.items()):
                    await self._run([self._prefix + key for key in amounts],
                                    [0, len(amounts), *(v for entry in amounts.values() for v in entry)],
                                    self._timeout * 4)
                    del by_tag[tag]
            except _FAILURES:
                for amounts in by_tag.values():
                    self._merge(self._journal, amounts.items())
                raise


def _safe_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return scheme + sep + rest.rpartition("@")[2]
