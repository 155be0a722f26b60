"""Leases: a share of a counter's headroom that one process admits from without asking Redis.

With `state.leases` set, an admission that goes to Redis reserves, on top of
the request's own amount, a lease for each limited check: up to
`leases.requests` more requests like it, and never more than
`headroom_fraction` of what the limit has left. Later requests of this process
are admitted from that lease, in the process. When a request admitted from a
lease leaves it below a quarter of a full one, a top-up is asked of Redis in
the background (one at a time per counter), so no request waits for Redis
while its lease lasts. If a lease still runs too small, the next admission
goes to Redis, uses what is left of each lease as part of its own
reservation, and asks for a new one.

A lease keeps pace with its process. The requests that looked to it for
room while its last top-up was on its way (the top-up's round trip counted
in requests, those it could not hold included: under load the round trip is
mostly the wait for the event loop's next turn, not Redis) are its pace. A
lease is topped up when less than twice its pace is left, and holds up to
four times its pace when that is more than `requests` (never more than eight
times `requests`). So a busy process stops running dry between top-ups (at
4,500 requests a second on leases of 32 requests, 62% of requests waited for
one; loadtests/README.md, round thirteen), and a quiet one keeps leases of
`requests`. The pace decays by a quarter at each top-up that saw fewer, and
a lease given back forgets it.

What this keeps and what it gives up (docs/accounting.md, "Leases"):

- A limit is never passed: a lease is reserved in Redis before anything is
  admitted from it, so every replica's counter holds every other's leases.
  A top-up is an admission of no request: Redis refuses it when the room is
  gone, and it never makes a lease larger than a new one would be.
- A refusal is exact within one process (its own unused lease counts as room),
  but a replica can refuse while another holds an unused lease: at most
  `headroom_fraction` of the room each, and a lease nobody used for `idle_s`
  is given back (a negative settlement), as every lease is on shutdown.
- Counters read by usage reports include unused leases until they are given
  back; budget alerts read what was spent, which leases never touch.
- Rate-limit headers on a request admitted from a lease show this process's
  view: the counter when it last asked Redis, plus what it admitted since.

A check that cannot refuse (`UNLIMITED`) takes no lease: a request admitted
locally counts it as a settlement, which rides with the next call to Redis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gateway.state import UNLIMITED, Check, Delta

# A lease's pace counts for at most twice `requests`: a busy process's leases hold up to 8 x `requests`.
_PACE_BOUND = 2


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    requests: int  # a lease covers this many more requests like the one that took it (more at a faster pace)
    headroom_fraction: float  # and at most this share of the room the limit had left
    idle_s: float  # a lease unused this long is given back


@dataclass(slots=True)
class _Lease:
    left: int  # reserved in Redis, not yet admitted
    expires_at: int
    low: float  # topped up below this many requests like the one admitted (a quarter of `requests`, or 2 x pace)
    reach: float  # and up to this many (`requests`, or 4 x pace)
    touched: bool = True  # used since the last sweep
    wanted: int = 0  # requests that looked to it for room, admitted from it or not, all told
    asked_at: int = 0  # `wanted` when its last top-up was asked
    pace: float = 0.0  # the most that wanted it during a top-up's round trip, decaying


@dataclass(frozen=True, slots=True)
class Sizing:
    """An admission on its way to Redis: what each check takes from its lease and asks on top of its amount."""

    sent: tuple[Check, ...]  # the checks as sent: amount - take + extra
    takes: tuple[int, ...]
    extras: tuple[int, ...]
    amounts: tuple[int, ...]  # the request's own

    @property
    def asks(self) -> bool:
        return any(self.extras)


class LeaseBook:
    """One process's leases, by each check's newest counter slice.

    `seen` is the store's last known value of each counter (Redis's, leases
    included); `give_back` settles amounts back to Redis.
    """

    def __init__(self, settings: LeaseSettings, seen: dict[str, list[int]],
                 give_back: Callable[[Sequence[Delta]], None], clock: Callable[[], float]) -> None:
        self._settings = settings
        self._seen = seen
        self._give_back = give_back
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._quarter = settings.requests / 4  # a lease is low below a quarter of `requests` requests like this one
        # (or, keeping pace with a busy process, below twice its pace: `_paced`)
        # Counters with a lease asked of Redis and not yet answered: one ask at a time each, so two requests
        # (or a request and a top-up) on their way together do not both come back with a full lease.
        self._asking: set[str] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def admit_locally(self, checks: Sequence[Check]) -> tuple[tuple[int, ...], list[Delta], bool] | None:
        """Admit from the leases: each check's used value, the unlimited checks' counts to settle and whether a
        lease is now low with no top-up on its way (`top_up`); None when some limited check's lease is missing or
        too small (or no check is limited): ask Redis."""
        # One pass, taking from each lease as it goes: a check that fails gives back what the checks before it
        # took (rare: a request seldom finds its lease short). Two passes cost a second lookup of every lease.
        leases, seen, asking = self._leases, self._seen, self._asking
        used: list[int] = []
        counted: list[Delta] = []
        leased = low = False
        for index, check in enumerate(checks):
            key = check.slices[-1]
            entry = seen.get(key)
            if entry is None:
                return self._untaken(checks[:index])
            amount = check.amount
            if check.limit == UNLIMITED:
                used.append(entry[0])
                if amount:
                    counted.append(Delta(key, amount, check.expires_at))
                continue
            lease = leases.get(key)
            if lease is None:
                return self._untaken(checks[:index])
            left = lease.left
            lease.wanted += 1  # a request it cannot hold is part of its pace too
            # The second test: settlements that charged more than was reserved can have used the room up.
            if left < amount or entry[0] - left + amount > check.limit:
                return self._untaken(checks[:index])
            used.append(entry[0] - left)
            left -= amount
            lease.left = left
            lease.touched = True
            leased = True
            if left < lease.low * amount and key not in asking:
                low = True  # (a top-up on its way is not asked again: `top_up` would find nothing to ask)
        if not leased:
            return None
        return tuple(used), counted, low

    def _untaken(self, checks: Sequence[Check]) -> None:
        """Give back to their leases what `admit_locally` took for `checks` before a later check failed."""
        leases = self._leases
        for check in checks:
            if check.limit != UNLIMITED:
                leases[check.slices[-1]].left += check.amount

    def top_up(self, checks: Sequence[Check]) -> Sizing | None:
        """After a local admission left a lease low: what to ask of Redis for these checks' leases, each back
        to its reach in requests like this one and at most `headroom_fraction` of the room, lease included; None
        when no lease needs it, its top-up is already on its way, or it could not grow by one request's worth.
        Redis admits no request with it: the checks' amounts are the top-ups (0 for the rest)."""
        leases, seen, asking = self._leases, self._seen, self._asking
        fraction = self._settings.headroom_fraction
        extras: list[int] = []
        for check in checks:
            extra = 0
            key = check.slices[-1]
            lease = leases.get(key)
            entry = seen.get(key)
            if (check.limit != UNLIMITED and check.amount > 0 and lease is not None and entry is not None
                    and key not in asking and lease.left < lease.low * check.amount):
                room = check.limit - (entry[0] - lease.left)
                extra = min(int(lease.reach * check.amount), int(room * fraction)) - lease.left
                if extra < check.amount:
                    extra = 0
                else:
                    lease.asked_at = lease.wanted
            extras.append(extra)
        if not any(extras):
            return None
        asking.update(check.slices[-1] for check, extra in zip(checks, extras, strict=True) if extra)
        sent = tuple(Check(check.slices, check.limit, extra, check.expires_at)
                     for check, extra in zip(checks, extras, strict=True))
        nothing = (0,) * len(sent)
        return Sizing(sent, nothing, tuple(extras), nothing)

    def size(self, checks: Sequence[Check], *, ask: bool = True) -> Sizing:
        """What to send for these checks: each takes what it can of its lease now and, if `ask`, asks for a
        new lease sized from this process's last view of the counter (none for a counter it has not seen)."""
        leases, seen = self._leases, self._seen
        requests, fraction = self._settings.requests, self._settings.headroom_fraction
        sent: list[Check] = []
        takes: list[int] = []
        extras: list[int] = []
        amounts: list[int] = []
        for check in checks:
            take = extra = 0
            if check.limit != UNLIMITED and check.amount > 0:
                key = check.slices[-1]
                lease = leases.get(key)
                left = lease.left if lease is not None else 0
                take = min(left, check.amount)
                if take:
                    lease.left -= take  # type: ignore[union-attr]  # take > 0 only with a lease
                entry = seen.get(key) if ask and key not in self._asking else None
                if entry is not None:
                    room = check.limit - (entry[0] - left) - check.amount
                    reach = lease.reach if lease is not None else requests
                    extra = min(int(reach * check.amount) - (left - take), int(room * fraction))
                    if extra < check.amount:  # a lease that cannot admit one more request like this one
                        extra = 0
                    else:
                        self._asking.add(key)
                        if lease is not None:
                            lease.asked_at = lease.wanted
            takes.append(take)
            extras.append(extra)
            amounts.append(check.amount)
            sent.append(check if take == extra else
                        Check(check.slices, check.limit, check.amount - take + extra, check.expires_at))
        return Sizing(tuple(sent), tuple(takes), tuple(extras), tuple(amounts))

    def worth_asking_again(self, sizing: Sizing, used: Sequence[int]) -> bool:
        """Whether Redis, refusing this sizing, may admit the request asked again, exactly: the refusal was for
        the new leases alone (others took the room since this process last looked), or a lease of this process
        grew while the request was on its way (another admission's, whose reply came first on the connection)
        and the request did not take all it needed from it."""
        leases = self._leases
        for check, take, amount in zip(sizing.sent, sizing.takes, sizing.amounts, strict=True):
            if check.limit != UNLIMITED and take < amount and (lease := leases.get(check.slices[-1])) is not None \
                    and lease.left > 0:
                return True
        return sizing.asks and all(check.limit == UNLIMITED or value + check.amount - extra <= check.limit
                                   for check, extra, value in zip(sizing.sent, sizing.extras, used, strict=True))

    def answered(self, sizing: Sizing, used: Sequence[int] | None, admitted: bool) -> tuple[int, ...]:
        """Book what Redis (or, Redis down, the local fallback) decided; return each check's used value as this
        process sees it: the counter without this process's unused lease.

        Admitted: the leases asked for are now held. Refused or given up (`used` None): what was taken from the
        leases is theirs again, as it was never released in Redis. Either way its counters may be asked for again.
        """
        leases = self._leases
        seen_as: list[int] = []
        for index, check in enumerate(sizing.sent):
            take, extra = sizing.takes[index], sizing.extras[index]
            key = check.slices[-1]
            lease = leases.get(key)
            if extra:
                self._asking.discard(key)
                if lease is not None:
                    self._paced(lease, lease.wanted - lease.asked_at)
            if used is not None:
                seen_as.append(used[index] - (lease.left if lease is not None else 0) - take)
            back = extra if admitted else take
            if not back:
                continue
            if lease is None:
                lease = leases[key] = _Lease(0, check.expires_at, self._quarter, self._settings.requests)
            lease.left += back
            lease.touched = True
        if leases and self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self._settings.idle_s, self._sweep)
        return tuple(seen_as)

    def _paced(self, lease: _Lease, wanted: int) -> None:
        """A top-up of `lease` came back, `wanted` requests after it was asked: its pace, low mark and reach."""
        pace = lease.pace * 0.75
        if wanted > pace:
            # At most `_PACE_BOUND` x `requests`: requests that never let a top-up's answer in (a burst larger
            # than the lease, a loop that never yields) would otherwise grow it without end.
            pace = min(wanted, _PACE_BOUND * self._settings.requests)
        lease.pace = pace
        lease.low = max(self._quarter, 2 * pace)
        lease.reach = max(self._settings.requests, 4 * pace)

    def give_back_all(self) -> None:
        """Return every lease (shutdown)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        leases, self._leases = self._leases, {}
        self._return(leases)

    def _sweep(self) -> None:
        """Give back the leases nobody admitted from since the last sweep."""
        self._sweeper = None
        idle: dict[str, _Lease] = {}
        for key, lease in self._leases.items():
            if lease.touched:
                lease.touched = False
            else:
                idle[key] = lease
        for key in idle:
            del self._leases[key]
        self._return(idle)
        if self._leases:
            self._sweeper = asyncio.get_running_loop().call_later(self._settings.idle_s, self._sweep)

    def _return(self, leases: dict[str, _Lease]) -> None:
        now = self._clock()
        # A lease whose counter has expired is gone with it: a negative amount would only start a new counter.
        returns = [Delta(key, -lease.left, lease.expires_at) for key, lease in leases.items()
                   if lease.left and lease.expires_at > now]
        if returns:
            self._give_back(returns)
