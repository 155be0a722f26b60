"""Budget soft thresholds and exhaustion: noticed at admission and settlement, reported once per period.

Each process remembers the marks it has seen, so the store is asked at most
once per mark; the store then decides, with one atomic reservation of a
1-limit counter, which replica reports it, so an event fires once between
them. Reporting (the log line, the webhook alert, the metric) happens off the
request path.
"""

from __future__ import annotations

import asyncio
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
        self._tasks: set[asyncio.Task[Any]] = set()

    def count_in(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter

        self._metric = Counter(
            "switchboard_budget_thresholds", "Budget soft thresholds crossed (once per period and budget).",
            ("team", "scope", "owner", "unit", "threshold"), registry=registry)

    def crossed(self, budget: Budget | None, window: Window | None, unit: str, limit: int, after: int) -> None:
        """A settlement brought `budget` to `after`: report each soft threshold it has reached this period."""
        assert budget is not None and window is not None
        for threshold in budget.soft_thresholds:
            if after < math.ceil(threshold * limit):
                break
            mark = f"{budget.base}:{unit}:soft{threshold:g}:{window.slices[-1]}"
            if self._first_here(mark):
                self._fire_once(window.expires_at, ThresholdEvent(
                    budget.scope, budget.owner, budget.team, unit, threshold, limit, after,
                    window.start, window.resets_at, THRESHOLD, budget.shadow, budget.notify, mark))

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
        """Wait for the reports in flight (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

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
