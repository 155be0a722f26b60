"""A circuit breaker for one target: closed -> open -> half-open -> closed.

The breaker trips after `consecutive_failures` failures in a row, or when the
failure share over the last `window_s` reaches `failure_rate` (once at least
`min_requests` were seen). It then stays open for a cooldown that doubles on
each trip that follows without a recovery in between, and finally lets exactly
one probe through (half-open): its success closes the breaker, its failure
re-opens it with the longer cooldown.

Time comes from the caller (`now`), so tests drive it with a plain number.
"""

from __future__ import annotations

from collections import deque
from enum import StrEnum

from gateway.policy_schema import CircuitBreakerPolicy


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Failure bookkeeping and ejection state of one target."""

    __slots__ = ("_consecutive", "_open_until", "_outcomes", "_probing", "_state", "cooldown_s", "trips")

    def __init__(self) -> None:
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        # (time, failed) per finished request inside the rate window.
        self._outcomes: deque[tuple[float, bool]] = deque()
        self._open_until = 0.0
        self._probing = False
        self.cooldown_s = 0.0
        self.trips = 0

    def state(self, now: float) -> BreakerState:
        """The state as a request arriving at `now` sees it (open turns half-open once cooled down)."""
        if self._state is BreakerState.OPEN and now >= self._open_until:
            return BreakerState.HALF_OPEN
        return self._state

    def allows(self, now: float) -> bool:
        """Whether a request may be sent now; a half-open breaker admits one probe at a time."""
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        return state is BreakerState.HALF_OPEN and not self._probing

    def reopens_in(self, now: float) -> float:
        """Seconds until an open breaker lets a probe through (0 when it already would)."""
        return max(0.0, self._open_until - now) if self._state is BreakerState.OPEN else 0.0

    def on_attempt(self, now: float) -> None:
        """A request is being sent; in half-open it becomes the probe."""
        if self.state(now) is BreakerState.HALF_OPEN:
            self._state = BreakerState.HALF_OPEN
            self._probing = True

    def on_abandon(self) -> None:
        """The request was cancelled before an outcome; a probe slot is given back."""
        self._probing = False

    def on_success(self, now: float, settings: CircuitBreakerPolicy) -> None:
        if self._state is BreakerState.HALF_OPEN:
            # Recovered: the next trip starts again from the base cooldown.
            self._state = BreakerState.CLOSED
            self._probing = False
            self.trips = 0
            self._outcomes.clear()
        self._consecutive = 0
        self._note(now, False, settings)

    def on_failure(self, now: float, settings: CircuitBreakerPolicy) -> None:
        if self._state is BreakerState.HALF_OPEN:
            self._trip(now, settings)
            return
        if self._state is BreakerState.OPEN:
            return  # a straggler that started before the trip
        self._consecutive += 1
        self._note(now, True, settings)
        failures = sum(failed for _, failed in self._outcomes)
        by_rate = len(self._outcomes) >= settings.min_requests and failures / len(self._outcomes) >= (
            settings.failure_rate
        )
        if self._consecutive >= settings.consecutive_failures or by_rate:
            self._trip(now, settings)

    def _note(self, now: float, failed: bool, settings: CircuitBreakerPolicy) -> None:
        outcomes = self._outcomes
        outcomes.append((now, failed))
        horizon = now - settings.window_s
        while outcomes and outcomes[0][0] < horizon:
            outcomes.popleft()

    def _trip(self, now: float, settings: CircuitBreakerPolicy) -> None:
        self.trips += 1
        self.cooldown_s = min(settings.max_cooldown_s, settings.cooldown_s * 2 ** (self.trips - 1))
        self._state = BreakerState.OPEN
        self._open_until = now + self.cooldown_s
        self._probing = False
        self._consecutive = 0
        self._outcomes.clear()
