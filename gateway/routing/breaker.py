"""A circuit breaker for one target: closed -> open -> half-open -> closed.

The breaker trips after `consecutive_failures` failures in a row, or when the
failure share over the last `window_s` reaches `failure_rate` (once at least
`min_requests` were seen). It then stays open for a cooldown that doubles on
each trip that follows without a recovery in between, and finally lets exactly
one probe through (half-open): its success closes the breaker, its failure
re-opens it with the longer cooldown.

The window is counted in tenths of `window_s`: constant work and memory per
request, where keeping every outcome held 150,000 entries at 5,000 req/s and
summed them all on each failure.

Not every failure is the target's. A 5xx the upstream *answered* may be its
verdict on one malformed request (servers answer bad input with a 500), and one
team's bad requests must not eject a target for every team. Such failures are
counted with the team that sent them, and open the breaker only once failures
in the window came from at least `min_callers` teams, or once a request that
failed here succeeded on another target (`confirm`: the target's fault after
all). Connection errors, timeouts, overload and rate-limit answers are the
target's whatever the request, and count fully.

Time comes from the caller (`now`), so tests drive it with a plain number.
"""

from __future__ import annotations

from enum import StrEnum

from gateway.policy.model_schema import CircuitBreakerPolicy


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# The states as module names, for the per-request paths: on Python 3.11 reading a member off its enum class
# (`BreakerState.CLOSED`) is an unspecialized attribute lookup through EnumType's `__getattr__` hook, ~15 times
# the cost of reading a global.
_CLOSED, _OPEN, _HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class CircuitBreaker:
    """Failure bookkeeping and ejection state of one target."""

    __slots__ = ("_callers", "_confirmed_until", "_consecutive", "_open_until", "_outcomes", "_probing", "_state",
                 "cooldown_s", "trips")

    def __init__(self) -> None:
        self._state = _CLOSED
        self._consecutive = 0
        self._outcomes = _RateWindow()
        self._open_until = 0.0
        self._probing = False
        # Teams whose answered failures fall in the window: team -> time of its latest (bounded, see _note_caller).
        self._callers: dict[str, float] = {}
        # Until then a failure here counts as the target's own (a failure not tied to a caller, or confirmed).
        self._confirmed_until = 0.0
        self.cooldown_s = 0.0
        self.trips = 0

    def state(self, now: float) -> BreakerState:
        """The state as a request arriving at `now` sees it (open turns half-open once cooled down)."""
        if self._state is _OPEN and now >= self._open_until:
            return _HALF_OPEN
        return self._state

    def allows(self, now: float) -> bool:
        """Whether a request may be sent now; a half-open breaker admits one probe at a time."""
        state = self._state  # `state(now)` spelled out: asked for every target of every request
        if state is _CLOSED:
            return True
        if state is _OPEN and now < self._open_until:
            return False
        return not self._probing  # half-open, or open and cooled down (which `state(now)` calls half-open)

    def reopens_in(self, now: float) -> float:
        """Seconds until an open breaker lets a probe through (0 when it already would)."""
        return max(0.0, self._open_until - now) if self._state is _OPEN else 0.0

    def on_attempt(self, now: float) -> None:
        """A request is being sent; in half-open it becomes the probe."""
        state = self._state  # as `state(now)` sees it, spelled out: every attempt asks
        if state is not _CLOSED and (state is _HALF_OPEN or now >= self._open_until):
            self._state = _HALF_OPEN
            self._probing = True

    def on_abandon(self) -> None:
        """The request was cancelled before an outcome; a probe slot is given back."""
        self._probing = False

    def on_success(self, now: float, settings: CircuitBreakerPolicy) -> None:
        if self._state is _HALF_OPEN:
            # Recovered: the next trip starts again from the base cooldown.
            self._state = _CLOSED
            self._probing = False
            self.trips = 0
            self._outcomes.clear()
        self._consecutive = 0
        self._outcomes.note(now, False, settings.window_s)

    def on_failure(self, now: float, settings: CircuitBreakerPolicy, caller: str | None = None) -> None:
        """A failed attempt; `caller` is the team whose request got an answered 5xx (None: the target's fault)."""
        if caller is None:
            self._confirmed_until = now + settings.window_s
        else:
            self._note_caller(caller, now, settings)
        if self._state is _HALF_OPEN:
            if self._blames_target(now, settings):
                self._trip(now, settings)
            else:  # the probe's own request was bad: the target answered, let the next request probe
                self._probing = False
            return
        if self._state is _OPEN:
            return  # a straggler that started before the trip
        self._consecutive += 1
        self._outcomes.note(now, True, settings.window_s)
        self._judge(now, settings)

    def confirm(self, now: float, settings: CircuitBreakerPolicy) -> None:
        """A request that failed here with an answered 5xx succeeded on another target: the failure was ours."""
        self._confirmed_until = now + settings.window_s
        if self._state is _CLOSED:
            self._judge(now, settings)

    def _judge(self, now: float, settings: CircuitBreakerPolicy) -> None:
        total, failures = self._outcomes.counts(now)
        by_rate = total >= settings.min_requests and failures / total >= settings.failure_rate
        if (self._consecutive >= settings.consecutive_failures or by_rate) and self._blames_target(now, settings):
            self._trip(now, settings)

    def _blames_target(self, now: float, settings: CircuitBreakerPolicy) -> bool:
        if now < self._confirmed_until:
            return True
        horizon = now - settings.window_s
        return sum(1 for at in self._callers.values() if at >= horizon) >= settings.min_callers

    def _note_caller(self, caller: str, now: float, settings: CircuitBreakerPolicy) -> None:
        callers = self._callers
        if caller not in callers and len(callers) >= 64:  # bounded: drop the teams outside the window
            horizon = now - settings.window_s
            for name in [n for n, at in callers.items() if at < horizon]:
                del callers[name]
            if len(callers) >= 64:
                return  # 64 distinct teams failing within one window already blame the target
        callers[caller] = now

    def _trip(self, now: float, settings: CircuitBreakerPolicy) -> None:
        self.trips += 1
        self.cooldown_s = min(settings.max_cooldown_s, settings.cooldown_s * 2 ** (self.trips - 1))
        self._state = _OPEN
        self._open_until = now + self.cooldown_s
        self._probing = False
        self._consecutive = 0
        self._outcomes.clear()
        self._callers.clear()
        self._confirmed_until = 0.0


_BUCKETS = 10


class _RateWindow:
    """Requests and failures over the last window, in `_BUCKETS` time buckets reused round-robin."""

    __slots__ = ("_failures", "_numbers", "_totals", "_width")

    def __init__(self) -> None:
        self._width = 0.0
        self._numbers = [-1] * _BUCKETS  # the absolute bucket number each slot counts
        self._totals = [0] * _BUCKETS
        self._failures = [0] * _BUCKETS

    def note(self, now: float, failed: bool, window_s: float) -> None:
        width = window_s / _BUCKETS
        if width != self._width:  # a new policy's window: start counting afresh
            self.clear()
            self._width = width
        number = int(now // width)
        slot = number % _BUCKETS
        if self._numbers[slot] != number:
            self._numbers[slot], self._totals[slot], self._failures[slot] = number, 0, 0
        self._totals[slot] += 1
        if failed:
            self._failures[slot] += 1

    def counts(self, now: float) -> tuple[int, int]:
        """(requests, failures) in the buckets of the window ending at `now`."""
        if not self._width:
            return 0, 0
        oldest = int(now // self._width) - _BUCKETS + 1
        total = failures = 0
        for number, count, failed in zip(self._numbers, self._totals, self._failures, strict=True):
            if number >= oldest:
                total += count
                failures += failed
        return total, failures

    def clear(self) -> None:
        self._numbers = [-1] * _BUCKETS
        self._totals = [0] * _BUCKETS
        self._failures = [0] * _BUCKETS
