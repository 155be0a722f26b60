"""Scrape-time gauges that dashboards and alerts divide by: budget sizes and periods, state-store health.

Read from the live policy and the state store when Prometheus scrapes, in the
scrape's worker thread; nothing is updated per request. With these, a budget's
burn rate is a PromQL expression over `switchboard_cost_usd_total` (see
deploy/prometheus/alerts.yaml) without the gateway reading its counters back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from gateway.accounting.budgets import Budget
    from gateway.compiled.policy import Policy


class HealthCollector(Collector):
    def __init__(self, policy: Callable[[], Policy], store: Any, clock: Callable[[], float] = time.time) -> None:
        self._policy = policy
        self._store = store
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        labels = ("team", "scope", "owner")
        limit = GaugeMetricFamily("switchboard_budget_limit_usd", "USD budget per period, from the policy.",
                                  labels=labels)
        tokens = GaugeMetricFamily("switchboard_budget_limit_tokens", "Token budget per period, from the policy.",
                                   labels=labels)
        period = GaugeMetricFamily("switchboard_budget_period_seconds", "Length of the budget's current period "
                                   "(calendar periods vary: a month is 28-31 days).", labels=labels)
        rules = self._policy().rules
        now = self._clock()
        if rules is not None:
            for budget in (*rules.team_budgets.values(), *rules.key_budgets.values(),
                           *rules.hierarchy.policy_budgets()):
                names = (budget.team, budget.scope, budget.owner)
                if budget.usd_micros is not None:
                    limit.add_metric(names, budget.usd_micros / 1_000_000)
                if budget.tokens is not None:
                    tokens.add_metric(names, float(budget.tokens))
                period.add_metric(names, _period_seconds(budget, now))
        yield limit
        yield tokens
        yield period
        store = self._store
        up = GaugeMetricFamily("switchboard_state_store_up", "1 while the rate-limit and budget store answers; 0 "
                               "while the gateway counts locally (fail_open) or refuses (fail_closed).",
                               labels=("backend",))
        # Only the Redis store can be down; the in-process stores are always up.
        up.add_metric((type(store).__name__.removesuffix("Store").lower(),),
                      1.0 if getattr(store, "healthy", True) else 0.0)
        yield up


def _period_seconds(budget: Budget, now: float) -> float:
    period = budget.period
    if period.kind == "rolling":
        return float(period.window_s or 0)
    window = period.window(now)  # the current calendar day, week or month
    return float(window.resets_at - window.start)
