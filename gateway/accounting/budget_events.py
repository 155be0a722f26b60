"""Budget soft thresholds and exhaustion: noticed at admission and settlement, reported once per period.

A threshold is about money spent, so it is checked against what requests have
settled, not against the budget's counter: that also holds what requests in
flight reserved, and gives back what they do not use. Each settlement of a
budget with soft thresholds also adds what it used to a twin of the counter
(`settled_key`); when the counter says a threshold may be crossed, the twin is
read, off the request path, and decides. While the counter is past a threshold
the spend has not reached, the budget is armed: every settlement, and a timer,
read the twin until the threshold is reported (docs/accounting.md).

Each process remembers the marks it has reported, so the store is asked at most
once per mark; the store then decides, with one atomic reservation of a
1-limit counter, which replica reports it, so an event fires once between
them. Reporting (the log line, the webhook alert, the metric) happens off the
request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.accounting import hierarchy
from gateway.accounting.budgets import EXHAUSTED, THRESHOLD, Budget, ThresholdEvent
from gateway.state import Check, StateStore, StoreUnavailable, Verdict

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from gateway.accounting.budgets import Window

log = logging.getLogger("switchboard.limits")

SETTLED = ":settled"
# While a budget is armed (its counter past a threshold its spend has not reached), how often a process reads
# its spend again without a settlement of its own: the crossing may be settled by another replica.
ARMED_POLL_S = 0.5
# The shortest time between two reads of one budget's spend by one process: while armed under load, every
# settlement asks for one, and each read also sends the settlements waiting to ride along with admissions.
LOOK_EVERY_S = 0.05
_MAX_MARKS = 100_000  # marks of past periods are forgotten past this; the store still answers once per period


class BudgetEvents:
    """The budget events of one process: which it has seen, and the reports in flight."""

    def __init__(self, store: StateStore, on_event: Callable[[ThresholdEvent], None]) -> None:
        self._store = store
        self._on_event = on_event
        # Also told of each event fired (the webhook alerts, gateway/accounting/alerts.py).
        self.alert: Callable[[ThresholdEvent], None] | None = None
        self._metric: Any = None
        self._marks: set[str] = set()
        # Budgets whose settled spend is being read, by (base, unit, newest slice), each with the signal that
        # another settlement came (or a drain): the read is then done again.
        self._looking: dict[tuple[str, str, str], asyncio.Event] = {}
        self._armed: set[tuple[str, str, str]] = set()  # budgets every settlement looks at (`_look`)
        self._polling: set[tuple[str, str, str]] = set()  # armed looks waiting to read again
        self._draining = False
        self.armed_poll_s = ARMED_POLL_S
        self._tasks: set[asyncio.Task[Any]] = set()

    def count_in(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter

        self._metric = Counter(
            "switchboard_budget_thresholds", "Budget soft thresholds crossed (once per period and budget).",
            ("team", "scope", "owner", "unit", "threshold"), registry=registry)

    def crossed(self, budget: Budget | None, window: Window | None, unit: str, limit: int, counted: int,
                slices: tuple[str, ...]) -> None:
        """A request settled against `budget`, whose counter held `counted` with it (what others had settled or
        reserved when it was admitted, plus what it used): when that reaches a soft threshold not yet reported
        here, look at what has been settled (the twins of `slices`) and report each threshold it reached."""
        assert budget is not None and window is not None
        look = (budget.base, unit, window.slices[-1])
        if look not in self._armed:
            for threshold in budget.soft_thresholds:
                if counted < math.ceil(threshold * limit):
                    return
                if self._mark(budget, unit, threshold, window) not in self._marks:
                    break
            else:
                return  # every threshold it reached is reported
        again = self._looking.get(look)
        if again is not None:
            again.set()  # the look under way reads again when it is done: this settlement may be later
            return
        again = self._looking[look] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(
            self._look(look, again, budget, window, unit, limit, counted, slices))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def exhausted(self, budget: Budget | None, window: Window | None, unit: str, limit: int, amount: int,
                  used: int) -> None:
        """A budget refused (or, in shadow mode, would have refused) a request: report it once per period.

        Not for a request larger than the whole budget: that one says nothing about what is left, and reporting
        it would use up the period's one exhaustion alert before the budget is spent.
        """
        assert budget is not None and window is not None
        if amount > limit:
            return
        mark = f"{budget.base}:{unit}:exhausted:{window.slices[-1]}"
        if self._first_here(mark):
            self._fire_once(window.expires_at, ThresholdEvent(
                budget.scope, budget.owner, budget.team, unit, 1.0, limit, used, window.start,
                window.resets_at, EXHAUSTED, budget.shadow, budget.notify, mark))

    async def drain(self) -> None:
        """Wait for the reports in flight (shutdown, tests); an armed budget's look reads once more and stops
        (the budget stays armed: its next settlement looks again)."""
        self._draining = True
        try:
            while self._tasks:
                for look in self._polling:
                    self._looking[look].set()
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
        finally:
            self._draining = False

    async def _look(self, look: tuple[str, str, str], again: asyncio.Event, budget: Budget, window: Window,
                    unit: str, limit: int, counted: int, slices: tuple[str, ...]) -> None:
        """Read what the budget's requests have settled this period and report the thresholds it reached.

        While the counter is at or past a threshold the settled spend has not reached, requests in flight hold
        the difference, and the settlement that crosses it may not see it coming (it was admitted before others
        settled): the budget stays armed, and every settlement looks, until the threshold is reported or the
        counter falls back under it. That settlement may be another replica's, whose budget is not armed: so
        while armed, the look also reads again every `armed_poll_s`.
        """
        twins = [settled_key(key) for key in slices]
        loop = asyncio.get_running_loop()
        read_at = -math.inf
        try:
            while True:
                if (wait := read_at + LOOK_EVERY_S - loop.time()) > 0 and not self._draining:
                    await asyncio.sleep(wait)
                again.clear()
                read_at = loop.time()
                try:
                    await self._store.flush()  # this settlement's own share, which waits to ride along otherwise
                    spent, counter = await self._store.read([twins, slices])
                except StoreUnavailable:
                    # A store that cannot answer: the counter's figure (an alert early rather than never).
                    spent = counter = counted
                armed = False
                for threshold in budget.soft_thresholds:
                    at = math.ceil(threshold * limit)
                    mark = self._mark(budget, unit, threshold, window)
                    if spent >= at:
                        if self._first_here(mark):
                            self._fire_once(window.expires_at, ThresholdEvent(
                                budget.scope, budget.owner, budget.team, unit, threshold, limit, spent,
                                window.start, window.resets_at, THRESHOLD, budget.shadow, budget.notify, mark))
                    else:  # not spent yet: armed while what is held in flight could still take it there
                        armed = counter >= at and mark not in self._marks
                        break
                if armed:
                    if len(self._armed) > _MAX_MARKS:
                        self._armed.clear()
                    self._armed.add(look)
                else:
                    self._armed.discard(look)
                if again.is_set():
                    continue  # a settlement came during the read: it may not be in it
                if not armed or self._draining:
                    return
                self._polling.add(look)
                try:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.armed_poll_s):
                            await again.wait()
                finally:
                    self._polling.discard(look)
        finally:
            del self._looking[look]

    @staticmethod
    def _mark(budget: Budget, unit: str, threshold: float, window: Window) -> str:
        return f"{budget.base}:{unit}:soft{threshold:g}:{window.slices[-1]}"

    def _first_here(self, mark: str) -> bool:
        """True the first time this process sees `mark`: only then is the store asked whether to report it."""
        if mark in self._marks:
            return False
        if len(self._marks) > _MAX_MARKS:
            self._marks.clear()
        self._marks.add(mark)
        return True

    def _fire_once(self, expires_at: int, event: ThresholdEvent) -> None:
        """Report `event` unless another replica already did (the store decides), off the request path."""
        task = asyncio.get_running_loop().create_task(self._claim(event.mark, expires_at, event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _claim(self, mark: str, expires_at: int, event: ThresholdEvent) -> None:
        # A store that cannot answer lets every replica report it: an alert twice rather than never.
        try:
            verdict = await self._store.admit([Check((mark,), 1, 1, expires_at)])
        except StoreUnavailable:
            verdict = Verdict(True, (0,))
        if not verdict.admitted:
            log.info("budget %s %s of %s already reported by another replica", event.kind, event.threshold, mark)
            return
        self._on_event(event)
        if self.alert is not None:
            self.alert(event)
        if self._metric is not None:
            # An end user's id is the client's: never a label (the team and the level say enough).
            owner = event.owner if event.scope != "user" or event.owner == hierarchy.OTHER else "end_user"
            self._metric.labels(event.team, event.scope, owner, event.unit,
                                f"{event.threshold:g}" if event.kind == THRESHOLD else event.kind).inc()


def settled_key(key: str) -> str:
    """The twin of a budget's counter slice `key` that holds only what requests settled (same team hash tag)."""
    return key + SETTLED
