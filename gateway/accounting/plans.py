"""What admission checks for one key and model (its rate rules and its budgets, every level's), as store checks,
and what a check tells the client: the refusal, the `x-ratelimit-*` headers."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.accounting.budgets import exceeded
from gateway.errors import ErrorKind, GatewayError
from gateway.state import UNLIMITED, Check, Verdict
from gateway.timestamps import go_duration, iso_time

if TYPE_CHECKING:
    from gateway.accounting.budgets import Budget, Window

_LABELS = {("requests", 60): "requests per minute", ("tokens", 60): "tokens per minute",
           ("requests", 86_400): "requests per day", ("tokens", 86_400): "tokens per day"}


@dataclass(frozen=True, slots=True)
class RateRule:
    """One rate limit of one scope: `limit` requests or tokens per fixed window."""

    scope: str  # "team", "key" or "model"
    owner: str  # team name, key id or model name
    team: str
    unit: str  # "requests" or "tokens"
    window_s: int
    limit: int
    base: str  # counter key prefix, hash-tagged by team
    shadow: bool = False  # mode: shadow: counted and reported, never refusing (gateway/accounting/shadow.py)

    @property
    def label(self) -> str:
        return _LABELS[(self.unit, self.window_s)]

    @property
    def who(self) -> str:
        if self.scope == "team":
            return f"team {self.team}"
        if self.scope == "key":
            return f"key {self.owner} (team {self.team})"
        return f"model {self.owner} for team {self.team}"


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything that applies to one (key, model): what admission checks."""

    rates: tuple[RateRule, ...]
    budgets: tuple[Budget, ...]
    needs_tokens: bool
    needs_usd: bool
    shadowed: bool = False  # some rule is in shadow mode: admission looks for what it would refuse


@dataclass(frozen=True, slots=True)
class Meter:
    """What one check of an admission measures."""

    unit: str  # "requests", "tokens" or "usd"
    limit: int
    resets_at: float
    rule: RateRule | None = None
    budget: Budget | None = None
    window: Window | None = None

    @property
    def shadow(self) -> bool:
        owner = self.rule if self.rule is not None else self.budget
        return owner is not None and owner.shadow


def checks_for(plan: Plan, now: float, tokens: int, usd: int,
            relaxed: set[int]) -> tuple[tuple[Check, ...], tuple[Meter, ...]]:
    checks: list[Check] = []
    meters: list[Meter] = []
    for rule in plan.rates:
        index = int(now // rule.window_s)
        end = (index + 1) * rule.window_s
        checks.append(Check((f"{rule.base}:{index}",), UNLIMITED if rule.shadow else rule.limit,
                            1 if rule.unit == "requests" else tokens, end + rule.window_s))
        meters.append(Meter(rule.unit, rule.limit, end, rule=rule))
    for budget in plan.budgets:
        window = budget.period.window(now)
        for unit, limit, amount, short in (("tokens", budget.tokens, tokens, "tok"),
                                           ("usd", budget.usd_micros, usd, "usd")):
            if limit is None:
                continue
            checks.append(Check(budget.slices(short, window),
                                UNLIMITED if budget.shadow or id(budget) in relaxed else limit, amount,
                                window.expires_at))
            meters.append(Meter(unit, limit, window.resets_at, budget=budget, window=window))
    return tuple(checks), tuple(meters)


def refusal(meter: Meter, check: Check, used: int, now: float) -> GatewayError:
    if meter.budget is not None:
        assert meter.window is not None
        return exceeded(meter.budget, meter.unit, meter.limit, used, check.amount, meter.window, now)
    rule = meter.rule
    assert rule is not None
    wait = max(0.001, meter.resets_at - now)
    if check.amount > rule.limit:
        # Never admissible, however long the client waits.
        return GatewayError(ErrorKind.RATE_LIMITED, f"Request too large for {rule.who} on {rule.label}: limit "
                            f"{rule.limit}, requested {check.amount}. Lower max_tokens or the prompt.",
                            code="rate_limit_exceeded", retry_after=wait, headers={"x-should-retry": "false"})
    return GatewayError(ErrorKind.RATE_LIMITED, f"Rate limit reached for {rule.who} on {rule.label}: limit "
                        f"{rule.limit}, used {used}, requested {check.amount}. Resets in {go_duration(wait)} "
                        f"(at {iso_time(meter.resets_at, dt.UTC)}).", code="rate_limit_exceeded", retry_after=wait)


def rate_headers(meters: tuple[Meter, ...], checks: tuple[Check, ...], verdict: Verdict,
                  now: float) -> dict[str, str]:
    """`x-ratelimit-*` for the request and token rate limits with the least room left."""
    headers: dict[str, str] = {}
    for unit, suffix in (("requests", "requests"), ("tokens", "tokens")):
        tightest: tuple[int, int, float] | None = None
        for index, meter in enumerate(meters):
            if meter.rule is None or meter.unit != unit or meter.rule.shadow:
                continue  # a shadow limit must not make clients slow down
            taken = checks[index].amount if verdict.admitted else 0
            remaining = max(0, meter.limit - verdict.used[index] - taken)
            if tightest is None or remaining < tightest[1]:
                tightest = (meter.limit, remaining, meter.resets_at)
        if tightest is not None:
            headers[f"x-ratelimit-limit-{suffix}"] = str(tightest[0])
            headers[f"x-ratelimit-remaining-{suffix}"] = str(tightest[1])
            headers[f"x-ratelimit-reset-{suffix}"] = go_duration(tightest[2] - now)
    return headers
