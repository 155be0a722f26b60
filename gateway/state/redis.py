"""The shared store for several workers or replicas: Redis, one round trip per request.

(Or, with `state.leases`, one per lease: a request admitted from this process's share of a limit's room does not
ask Redis at all; gateway/state/leases.py.)

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

Nothing is applied twice (docs/accounting.md). Every script call is an
operation with an id: a bit in a per-process, per-team bitmap
(`<prefix>{team}:ops:<process id>:<epoch>`), which the script sets, with
`SETBIT` answering whether it was already set, in the same atomic step that
applies the call. A call whose reply was lost or came too late (a stalled
event loop, a connection aborted with other commands in flight) may or may
not have been applied; it is journalled as it was, under its own id, and
replayed as it was: Redis skips it if it ran. For an admission the replay
also carries what the gateway did meanwhile (`hold`: served it from local
counters, or refused it), and the script leaves its reservation in exactly
that state, using a second bit that records whether the first run reserved.
A call that reaches Redis after its deadline (in Redis's clock, measured at
each connect) is skipped without marking its id, so its replay applies it.
Increments made while Redis was known down were never sent, so they are
merged per team into one fresh operation.

`fail_open` does not start from zero: the last value this process saw for
each counter (admission replies, its own settlements since) seeds the local
store when Redis goes away, and the leases this process held are given back
from it at once (nothing is admitted from a lease while Redis is away).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import operator
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.state import Check, Delta, StoreUnavailable, Verdict
from gateway.state.cluster import ClusterClient
from gateway.state.leases import LeaseBook, LeaseSettings, Sizing
from gateway.state.memory import MemoryStore
from gateway.state.resp import ConnectionLost, RedisReplyError, RespClient, bulk

log = logging.getLogger("switchboard.state")

SETTLE_DELAY_S = 0.02
# How long Redis remembers an operation id after the epoch's last operation: a call replayed later than
# this after Redis applied it would be applied again. Journals are replayed as soon as Redis answers.
OP_MEMORY_S = 86_400
# Operations per bitmap key (2 bits each: 8 KiB at most); a full epoch's key expires on its own.
EPOCH_OPS = 32_768
_SWEEP_EVERY = 4096  # remembered counter values between sweeps of expired ones

# KEYS: the operation's bitmap, the deltas' keys, then every check's slices, flattened.
# ARGV: deadline (Redis time, ms), the operation's bit, the bitmap's ttl, check count n, delta count d,
#       hold, then per delta: amount, expires_at; then per check: slice count, limit, amount, expires_at.
# Does nothing and returns -1 if it runs after the deadline: its caller has given up on it and will
# replay it (its id is not marked, so the replay applies). Returns -2 if the operation ran before:
# then it only moves the reservation to `hold` (1 reserved, 0 not) if the first run left it otherwise.
# Otherwise applies the deltas and returns each check's used value and the 1-based index of the
# refusing check (0 = admitted, everything reserved). hold -1: reserve if admitted (a live admission);
# 0 or 1: a replayed admission the gateway meanwhile refused or served, reserved accordingly.
_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[1]) then return -1 end
local bit, n, d, hold = tonumber(ARGV[2]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local first = 7 + 2 * d
local function reserve(sign)
  local k, a = d + 2, first
  for c = 1, n do
    local count, amount = tonumber(ARGV[a]), tonumber(ARGV[a + 2])
    if amount ~= 0 then
      redis.call('INCRBY', KEYS[k + count - 1], sign * amount)
      redis.call('EXPIREAT', KEYS[k + count - 1], ARGV[a + 3])
    end
    k = k + count
    a = a + 4
  end
end
local seen = redis.call('SETBIT', KEYS[1], bit, 1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
if seen == 1 then
  if hold >= 0 and redis.call('GETBIT', KEYS[1], bit + 1) ~= hold then
    reserve(hold == 1 and 1 or -1)
    redis.call('SETBIT', KEYS[1], bit + 1, hold)
  end
  return -2
end
for i = 1, d do
  redis.call('INCRBY', KEYS[1 + i], ARGV[5 + 2 * i])
  redis.call('EXPIREAT', KEYS[1 + i], ARGV[6 + 2 * i])
end
local result, denied, k, a = {}, 0, d + 2, first
for c = 1, n do
  local count, limit, amount = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local used = 0
  for j = k, k + count - 1 do
    local v = redis.call('GET', KEYS[j])
    if v then used = used + tonumber(v) end
  end
  result[c] = used
  if denied == 0 and limit >= 0 and used + amount > limit then denied = c end
  k = k + count
  a = a + 4
end
local admitted = denied == 0
if hold >= 0 then admitted = hold == 1 end
if admitted then
  reserve(1)
  redis.call('SETBIT', KEYS[1], bit + 1, 1)
end
result[n + 1] = denied
return result
"""

_SHA = hashlib.sha1(_SCRIPT.encode()).hexdigest()
# A call's command up to its key count: EVALSHA and the script's hash, or (the script not cached) EVAL and the script.
_EVALSHA = f"$7\r\nEVALSHA\r\n{bulk(_SHA)}"
_EVAL = f"$4\r\nEVAL\r\n{bulk(_SCRIPT)}"
_SHAPES_MEMORY = 4096  # distinct admissions' shapes (plans x windows) kept encoded
_KEYS_MEMORY = 65_536  # keys kept encoded
_INTS_MEMORY = 8192  # integers kept encoded
_FAILURES = (RedisReplyError, ConnectionLost, OSError, asyncio.TimeoutError)
_Amounts = dict[str, list[int]]  # key -> [amount, expires_at]
_ALREADY_APPLIED = -2
# Top-ups a request whose lease ran out waits for before asking Redis itself. Bounded: a request larger than the
# requests a lease is sized for may never fit in one (tests/test_state_leases.py, "larger than any lease").
_TOP_UPS_WAITED = 4


_amount = operator.attrgetter("amount")


class _Keys(dict[str, str]):
    """Keys as RESP bulk strings with the store's prefix, made on first use; bounded (cleared when full)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def __missing__(self, key: str) -> str:
        if len(self) >= _KEYS_MEMORY:
            self.clear()
        text = self[key] = bulk(self.prefix + key)
        return text


class _IntTexts(dict[int, str]):
    """Integers as RESP bulk strings, made on first use; bounded (cleared when full)."""

    def __missing__(self, number: int) -> str:
        if len(self) >= _INTS_MEMORY:
            self.clear()
        text = str(number)
        encoded = self[number] = f"${len(text)}\r\n{text}\r\n"
        return encoded


_INT_TEXTS = _IntTexts()
_static = operator.attrgetter("slices", "limit", "expires_at")  # what a `_Shape` is looked up by


def _tag(key: str) -> str:
    """The key's `{hash tag}` (its team): keys sent in one script must share it."""
    return key[:key.find("}") + 1]


@dataclass(slots=True)
class _Shape:
    """What a script call sends for a set of checks except their amounts, encoded once.

    Within a plan's windows (gateway/accounting/plans.py) every admission of a key and model has the same
    checks but for their amounts: the same keys, limits and expiries. Their ~25 of a call's ~45 arguments are
    encoded the first time and reused; a call only encodes its amounts and the arguments of its own.
    """

    tag: str  # the first key's hash tag
    one_tag: bool  # every check is under that tag
    keys: str  # every check's slices, prefixed, as RESP bulk strings
    key_count: int
    argv: str  # per check: slice count, limit, `%s` for its amount, expires_at (no other `%`: numbers only)
    lasts: tuple[str, ...]  # each check's newest slice (`_remember`)
    expiries: tuple[int, ...]


@dataclass(slots=True)
class _Op:
    """One script call, with the id Redis knows it by: its deltas, and an admission's checks."""

    tag: str
    ops_key: str  # the bitmap, without the store's prefix
    bit: int  # 2 bits: ran, reserved
    deltas: _Amounts
    checks: tuple[Check, ...] = ()
    hold: int = -1  # -1 decide (live admission); 0/1 leave the reservation released/held (replay)
    shape: _Shape | None = None  # the checks' (`RedisStore._shape`), when known


class RedisStore:
    def __init__(self, url: str, *, key_prefix: str = "switchboard:", timeout_s: float = 0.25,
                 failure_mode: str = "fail_open", retry_interval_s: float = 0.5,
                 clock: Callable[[], float] = time.time, cluster_nodes: Sequence[str] = (),
                 leases: LeaseSettings | None = None) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must not contain { or } (the team is the Redis Cluster hash tag)")
        self.url = url
        self._where = "Redis Cluster " + ", ".join(map(_safe_url, cluster_nodes)) if cluster_nodes else \
            "Redis " + _safe_url(url)  # for logs
        self._prefix = key_prefix
        self._timeout = timeout_s
        self._fail_open = failure_mode == "fail_open"
        self._retry_interval = retry_interval_s
        self._clock = clock
        # One pipelined connection (gateway/state/resp.py), or one per master of a Redis Cluster
        # (`cluster_nodes`, the seeds; gateway/state/cluster.py: same calls, routed by the team's slot). No
        # retries of a call that may have run: a failed call is answered by the failure policy at once.
        self._client: RespClient | ClusterClient = (
            ClusterClient(cluster_nodes, connect_timeout_s=timeout_s) if cluster_nodes
            else RespClient(url, connect_timeout_s=timeout_s))
        self._local = MemoryStore(clock=clock)
        self._outbox: dict[str, _Amounts] = {}  # settlements not yet sent, by team tag
        self._journal: _Amounts = {}  # increments never sent: made while Redis was known to be down
        self._uncertain: list[_Op] = []  # calls that may or may not have been applied, replayed under their ids
        # Operation ids: a random process id, and a sequence number per team (dense bitmaps per team).
        self._process = secrets.token_hex(8)
        self._sequence: dict[str, int] = {}
        # The last value seen for each counter (key -> [value, expires_at]), to seed fail_open's local store.
        self._seen: dict[str, list[int]] = {}
        # Settlements counted in `_seen` that Redis has not confirmed applying (key -> amount): in the outbox, or
        # in a call not answered yet. A reply to an admission sent before them does not include them (`_remember`).
        self._unconfirmed: dict[str, int] = {}
        # Shares of counters' headroom this process admits from without a round trip (`state.leases`).
        self._leases = LeaseBook(leases, self._seen, self.settle, clock) if leases is not None else None
        # Encoded once and reused (`_run`): admissions' shapes by their checks' keys, limits and expiries, and
        # keys as RESP bulk strings, prefixed. Both bounded: cleared when full.
        self._shapes: dict[tuple[tuple[tuple[str, ...], int, int], ...], _Shape] = {}
        self._wire = _Keys(key_prefix)
        self._until_sweep = _SWEEP_EVERY
        self._healthy = True
        self._closing = False
        self._outage_started = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._sending: dict[asyncio.Task[None], _Op] = {}  # settlements on their way to Redis (`_send_op`)
        self._top_up_of: dict[str, asyncio.Task[None]] = {}  # lease top-ups on their way, by counter (`_top_up`)
        self._skew_s = 0.0
        self._up = asyncio.Event()
        self._up.set()

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def leasing(self) -> bool:
        """Whether request admission may ask for leases (`admit(checks, lease=True)`; gateway/state/leases.py)."""
        return self._leases is not None

    @property
    def unsent(self) -> int:
        """Counter updates Redis has not (certainly) received: journalled increments and uncertain calls."""
        return len(self._journal) + len(self._uncertain)

    async def wait_until_healthy(self) -> None:
        """Return once Redis is in use again (after an outage, when the journal is replayed)."""
        await self._up.wait()

    async def start(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._measure_skew()
        except _FAILURES as exc:
            self._went_down(exc)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Send every pending settlement and replay the journal, within `timeout_s`; log what is left.

        Also logs when the caller's own deadline cancels it first.
        """
        self._closing = True  # no new probe or lease top-up: close replays itself, below
        if self._probe is not None:
            self._probe.cancel()
        try:
            with contextlib.suppress(TimeoutError, *_FAILURES):
                async with asyncio.timeout(timeout_s):
                    # Top-ups first: a lease granted after the give-back would stay counted until its window ends.
                    # `gather`, not `wait`: cut short by a deadline, it cancels them and waits while each replays
                    # itself as refused, so the replays are among the sends counted below, not sent after the log.
                    await asyncio.gather(*set(self._top_up_of.values()), return_exceptions=True)
                    self._give_back_leases()
                    await self.flush()
                    if self._journal or self._uncertain:
                        await self._measure_skew()
                        await self._replay()
        finally:
            for task in self._top_up_of.values():
                task.cancel()
            # Settlements still waiting for their reply (a Redis that hangs): it may or may not apply them. Counted
            # and named with the rest, not left in tasks the closing loop would drop without a word.
            for task, op in self._sending.items():
                if not task.done():  # (one that is done has confirmed its settlement, or counted it uncertain)
                    task.cancel()
                    self._uncertain.append(op)
            self._sending.clear()
            self._give_back_leases()  # (if the deadline came first) journalled with the rest of the outbox
            if self._timer is not None:
                self._timer.cancel()
            self._journal_outbox()
            self._log_unsent()
            self._client.abort()

    def _give_back_leases(self) -> None:
        if self._leases is not None:
            self._leases.give_back_all()

    def _give_back_leases_if_down(self) -> None:
        """While Redis is away nothing is admitted from a lease, and the local counters hold every lease this
        process had: give them back, to the local counters at once (their room is this process's own) and through
        the journal to Redis. Kept, they would make the local refusal come a lease early until they idled out."""
        if not self._healthy:
            self._give_back_leases()

    def _log_unsent(self) -> None:
        if not (self._journal or self._uncertain):
            return
        keys = {*self._journal, *(key for op in self._uncertain for key in op.deltas),
                *(c.slices[-1] for op in self._uncertain for c in op.checks)}
        log.error("closing with counter updates Redis never received or may not have applied: %d journalled "
                  "increments and %d unconfirmed calls, on keys %s", len(self._journal), len(self._uncertain),
                  ", ".join(sorted(keys)[:20]) + (" ..." if len(keys) > 20 else ""))

    async def flush(self) -> None:
        """Send the pending settlements and wait until Redis has answered every one on its way.

        A caller that gives up waiting (its own timeout, its client gone) leaves the sends running: `asyncio.wait`
        does not cancel what it waits for, as `gather` would, and a send cancelled before it ran was a settlement
        lost without a trace."""
        self._send_outbox()
        while self._sending:
            await asyncio.wait(list(self._sending))

    async def admit(self, checks: Sequence[Check], lease: bool = False) -> Verdict:
        """Admit against Redis; with `lease` and `state.leases` set, from this process's leases when they
        suffice (gateway/state/leases.py), else through Redis, taking new ones."""
        book = self._leases
        if not (lease and book is not None and self._healthy):
            return await self._admit(checks)
        local = book.admit_locally(checks)
        waited = 0
        while local is None and waited < _TOP_UPS_WAITED and (
                pending := {task for check in checks if (task := self._top_up_of.get(check.slices[-1])) is not None}):
            # A lease ran out while its top-up is on its way (requests that came faster than a round trip):
            # waiting for it is the round trip this request would make anyway, without a call of its own. In a
            # burst, the requests one top-up wakes can use it all before the last of them runs: that one waits for
            # the next top-up (started by those before it) instead of calling Redis, up to `_TOP_UPS_WAITED` times.
            await asyncio.wait(pending)
            if not self._healthy:  # the top-up found Redis gone: no lease is admitted from while it is
                return await self._admit(checks)
            local = book.admit_locally(checks)
            waited += 1
        if local is not None:
            used, counted, low = local
            if counted:
                self.settle(counted)
            if low and not self._closing:
                self._top_up(book, checks)
            return Verdict(True, used)
        sizing = book.size(checks)
        try:
            verdict = await self._admit(sizing.sent)
            if not verdict.admitted and book.worth_asking_again(sizing, verdict.used):
                book.answered(sizing, None, False)
                sizing = book.size(checks, ask=False)  # takes what the leases hold now
                verdict = await self._admit(sizing.sent)
        except BaseException:
            book.answered(sizing, None, False)  # nothing reserved: the call is replayed as refused
            self._give_back_leases_if_down()
            raise
        used = book.answered(sizing, verdict.used, verdict.admitted)
        self._give_back_leases_if_down()
        return Verdict(verdict.admitted, used, verdict.denied)

    def _top_up(self, book: LeaseBook, checks: Sequence[Check]) -> None:
        sizing = book.top_up(checks)
        if sizing is None:
            return
        task = asyncio.get_running_loop().create_task(self._ask_top_up(book, sizing))
        keys = [check.slices[-1] for check, extra in zip(sizing.sent, sizing.extras, strict=True) if extra]
        self._top_up_of.update(dict.fromkeys(keys, task))

        def done(task: asyncio.Task[None]) -> None:
            for key in keys:  # unless a newer top-up of the key took its place
                if self._top_up_of.get(key) is task:
                    del self._top_up_of[key]
        task.add_done_callback(done)

    async def _ask_top_up(self, book: LeaseBook, sizing: Sizing) -> None:
        """Ask Redis for a lease top-up off the request path; refused or failed, the leases stay as they are
        (a failure is the outage `_admit` records; cancelled, the call is replayed as refused)."""
        try:
            verdict = await self._admit(sizing.sent)
        except StoreUnavailable:
            book.answered(sizing, None, False)
            return
        except BaseException:
            book.answered(sizing, None, False)
            raise
        book.answered(sizing, verdict.used, verdict.admitted)
        self._give_back_leases_if_down()  # granted by the local counters as Redis went away

    async def _admit(self, checks: Sequence[Check]) -> Verdict:
        if self._healthy:
            shape = self._shape(checks)
            riders = self._outbox.pop(shape.tag, None) if shape.one_tag else None
            op = self._new_op(shape.tag, riders or {}, tuple(checks), shape)
            try:
                result = await self._run(op)
            except asyncio.CancelledError:
                # The caller gave up (its client left) after the call may have reached Redis, and will settle
                # nothing: replay it at once as refused, so whatever it reserved is given back (its riders
                # still count). Sent after it on the same connection, Redis runs it after the original.
                op.hold = 0
                self._send_op(op)
                raise
            except _FAILURES as exc:
                # Redis may have run it: journal it under its id, with what this process does instead.
                self._went_down(exc)
                verdict = self._local.admit_now(checks) if self._fail_open else None
                op.hold = 1 if verdict is not None and verdict.admitted else 0
                self._uncertain.append(op)
                if verdict is None:
                    raise StoreUnavailable("the rate-limit state store (Redis) is unreachable") from exc
                return verdict
            denied = int(result[-1])
            used = tuple(map(int, result[:-1]))
            if riders and self._healthy:
                self._confirm(riders)  # applied before the checks: in `used`
            self._remember(shape, checks, used, denied == 0)
            if denied == 0 and not self._healthy:
                # Redis reserved it, but another call's failure took the store down while this reply was on
                # its way (another cluster node, or a timeout): the local counters started without it.
                self._local.settle([Delta(c.slices[-1], c.amount, c.expires_at) for c in checks])
            return Verdict(denied == 0, used, denied - 1 if denied else None)
        if not self._fail_open:
            raise StoreUnavailable("the rate-limit state store (Redis) is unreachable")
        verdict = self._local.admit_now(checks)
        if verdict.admitted:
            self._merge(self._journal, ((c.slices[-1], (c.amount, c.expires_at)) for c in checks))
        return verdict

    def settle(self, deltas: Sequence[Delta]) -> None:
        if not self._healthy:
            self._settle_locally([d for d in deltas if d.amount])
            return
        seen, outbox, unconfirmed = self._seen, self._outbox, self._unconfirmed
        added = False
        # `_add` and `_tag` inlined: a request settles a few deltas, each through here.
        for delta in deltas:
            amount = delta.amount
            if not amount:
                continue
            key = delta.key
            entry = seen.get(key)
            if entry is not None:
                entry[0] += amount
            unconfirmed[key] = unconfirmed.get(key, 0) + amount
            tag = key[:key.find("}") + 1]
            amounts = outbox.get(tag)
            if amounts is None:
                amounts = outbox[tag] = {}
            entry = amounts.get(key)
            if entry is None:
                amounts[key] = [amount, delta.expires_at]
            else:
                entry[0] += amount
                if delta.expires_at > entry[1]:
                    entry[1] = delta.expires_at
            added = True
        if added and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(SETTLE_DELAY_S, self._on_timer)

    def _settle_locally(self, deltas: list[Delta]) -> None:
        """Redis is known to be down: count in the local store and journal for the replay."""
        seen = self._seen
        for delta in deltas:
            entry = seen.get(delta.key)
            if entry is not None:
                entry[0] += delta.amount
        self._local.settle(deltas)
        self._merge(self._journal, ((d.key, (d.amount, d.expires_at)) for d in deltas))

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

    def _new_op(self, tag: str, deltas: _Amounts, checks: tuple[Check, ...] = (), shape: _Shape | None = None) -> _Op:
        sequence = self._sequence.get(tag, 0)
        self._sequence[tag] = sequence + 1
        epoch, index = divmod(sequence, EPOCH_OPS)
        return _Op(tag, f"{tag}:ops:{self._process}:{epoch}", 2 * index, deltas, checks, -1, shape)

    def _shape(self, checks: Sequence[Check]) -> _Shape:
        """The checks' `_Shape`: looked up by their keys, limits and expiries, encoded on first use."""
        key = tuple(map(_static, checks))
        shape = self._shapes.get(key)
        if shape is None:
            if len(self._shapes) >= _SHAPES_MEMORY:
                self._shapes.clear()
            tag = _tag(checks[0].slices[0]) if checks else ""
            prefix = self._prefix
            shape = self._shapes[key] = _Shape(
                tag, all(_tag(check.slices[0]) == tag for check in checks),
                "".join([bulk(prefix + slice_key) for check in checks for slice_key in check.slices]),
                sum(len(check.slices) for check in checks),
                "".join([f"{bulk(str(len(check.slices)))}{bulk(str(check.limit))}%s{bulk(str(check.expires_at))}"
                         for check in checks]),
                tuple(check.slices[-1] for check in checks), tuple(check.expires_at for check in checks))
        return shape

    async def _run(self, op: _Op, timeout_s: float | None = None) -> Any:
        """Run the operation's script within `timeout_s`; Redis skips it if it only gets to it later.

        KEYS: the operation's bitmap, the deltas' keys, every check's slices; ARGV: the deadline, the
        operation's bit and the rest of `_SCRIPT`'s layout. Built as one str from the checks' `_Shape` and
        the call's own numbers, encoded once.
        """
        timeout_s = timeout_s or self._timeout
        checks, deltas = op.checks, op.deltas
        shape = op.shape or self._shape(checks)
        deadline = str(int((time.time() + self._skew_s + timeout_s) * 1000))
        bit = str(op.bit)
        keys = [self._wire[op.ops_key], *map(self._wire.__getitem__, deltas)]
        # The rest repeat from call to call (expiries, counts, a request check's 1): looked up in C.
        numbers = [OP_MEMORY_S, len(checks), len(deltas), op.hold, *itertools.chain.from_iterable(deltas.values())]
        texts = _INT_TEXTS.__getitem__
        key_count = str(len(keys) + shape.key_count)
        body = "".join([f"${len(key_count)}\r\n{key_count}\r\n", *keys, shape.keys,
                        f"${len(deadline)}\r\n{deadline}\r\n${len(bit)}\r\n{bit}\r\n", *map(texts, numbers),
                        shape.argv % tuple(map(texts, map(_amount, checks)))])
        header = f"*{5 + len(keys) + shape.key_count + len(numbers) + 4 * len(checks)}\r\n"
        route = self._prefix + op.ops_key  # a Redis Cluster's node is chosen by the first key
        send = self._client.send_within
        try:
            result = await send(timeout_s, route, (header + _EVALSHA + body).encode())
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            # First call on this server (or after a restart or SCRIPT FLUSH): EVAL caches it.
            result = await send(timeout_s, route, (header + _EVAL + body).encode())
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

    def _remember(self, shape: _Shape, checks: Sequence[Check], used: Sequence[int], admitted: bool) -> None:
        """Keep each counter's value as this admission left it (its newest slice holds a rolling sum), plus the
        settlements this process made that Redis had not applied when it ran: they are in `_seen` already, and
        dropping them would leave it high until the key's next reply (seeding fail_open's counters high, so a
        team would be refused early through an outage)."""
        seen = self._seen
        values: Iterable[int] = map(operator.add, used, map(_amount, checks)) if admitted else used
        if unconfirmed := self._unconfirmed:
            values = [value + unconfirmed.get(key, 0) for value, key in zip(values, shape.lasts, strict=False)]
        seen.update(zip(shape.lasts, map(list, zip(values, shape.expiries, strict=False)), strict=False))
        self._until_sweep -= 1
        if self._until_sweep <= 0:
            self._until_sweep = _SWEEP_EVERY
            now = self._clock()
            for key in [key for key, (_, expires) in seen.items() if expires <= now]:
                del seen[key]

    def _on_timer(self) -> None:
        self._timer = None
        if self._outbox:  # admissions may have taken every delta along
            outbox, self._outbox = self._outbox, {}
            for tag, amounts in outbox.items():
                self._send_op(self._new_op(tag, amounts))

    def _send_outbox(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        outbox, self._outbox = self._outbox, {}
        for tag, amounts in outbox.items():
            self._send_op(self._new_op(tag, amounts))

    def _send_op(self, op: _Op) -> None:
        task = asyncio.get_running_loop().create_task(self._send(op))
        self._sending[task] = op
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.pop(task, None)

    async def _send(self, op: _Op) -> None:
        try:
            await self._run(op, self._timeout * 4)
        except _FAILURES as exc:
            self._uncertain.append(op)
            self._went_down(exc)
        else:
            if self._healthy:
                self._confirm(op.deltas)

    def _confirm(self, deltas: _Amounts) -> None:
        """Redis has applied these settlements: later replies include them."""
        unconfirmed = self._unconfirmed
        for key, (amount, _) in deltas.items():
            left = unconfirmed.get(key, 0) - amount
            if left:
                unconfirmed[key] = left
            else:
                unconfirmed.pop(key, None)

    @staticmethod
    def _merge(into: _Amounts, items: Iterable[tuple[str, Sequence[int]]]) -> None:
        for key, (amount, expires) in items:
            _add(into, key, amount, expires)

    def _journal_outbox(self) -> None:
        for amounts in self._outbox.values():
            self._merge(self._journal, amounts.items())
        self._outbox.clear()

    def _went_down(self, exc: BaseException) -> None:
        # Drop the connection: commands Redis has not read yet die with it
        # instead of running late, after their callers were told they failed.
        self._client.abort()
        if self._healthy:
            self._healthy = False
            self._up.clear()
            self._outage_started = self._clock()
            # Every settlement not confirmed is journalled or in an unanswered call, replayed when Redis is back;
            # until then `_seen` is not used (the local store is), and it is rebuilt from the local store after.
            self._unconfirmed.clear()
            # Start from what this process last saw, not from zero (docs/accounting.md states the bound).
            now = self._clock()
            self._local.load([(key, value, expires) for key, (value, expires) in self._seen.items() if expires > now])
            self._give_back_leases_if_down()
            mode = "serving with local per-process counters (fail_open)" if self._fail_open else \
                "refusing requests with 503 (fail_closed)"
            log.error("RATE-LIMIT STATE STORE DOWN: %s unreachable (%s: %s); %s until it returns",
                      self._where, type(exc).__name__, exc, mode)
        self._journal_outbox()
        if not self._closing and (self._probe is None or self._probe.done()):
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
        # What this process counted during the outage is the latest it knows of those counters (its seed plus
        # its own increments, now replayed): the next outage starts from there.
        for key, value, expires in self._local.rows():
            self._seen[key] = [value, expires]
        self._local = MemoryStore(clock=self._clock)
        log.warning("rate-limit state store back: %s reachable again after %.1fs; local counts reconciled",
                    self._where, self._clock() - self._outage_started)

    async def _replay(self) -> None:
        """Send the journal and the unconfirmed calls, each under its own id, oldest first."""
        while self._journal or self._uncertain:
            if self._journal:
                journal, self._journal = self._journal, {}
                by_tag: dict[str, _Amounts] = {}
                for key, entry in journal.items():
                    by_tag.setdefault(_tag(key), {})[key] = entry
                # Never sent, so never applied: one fresh operation per team.
                self._uncertain.extend(self._new_op(tag, amounts) for tag, amounts in by_tag.items())
            op = self._uncertain[0]
            await self._run(op, self._timeout * 4)  # a failure leaves it first in line, under the same id
            self._uncertain.remove(op)


def _add(into: _Amounts, key: str, amount: int, expires: int) -> None:
    """Add `amount` to `key`'s pending amount, which expires with the later of the two."""
    if not amount:
        return
    entry = into.get(key)
    if entry is None:
        into[key] = [amount, expires]
    else:
        entry[0] += amount
        entry[1] = max(entry[1], expires)


def _safe_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return scheme + sep + rest.rpartition("@")[2]
