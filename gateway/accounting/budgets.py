"""Budgets: token and USD spend per team or key over calendar or rolling periods.

A budget is two counters at most (tokens, micro-USD) per period. Calendar
periods (`daily`, `weekly` from Monday, `monthly` from the 1st) start at
midnight in the budget's IANA time zone and are named by their start date, so
a counter survives policy edits and restarts; a `rolling` window is the sum of
24 slices of `window_s / 24` seconds each. Reaching the budget exactly is
allowed; a request whose reservation would pass it is not.

USD is counted in integer micro-dollars from whatever price function the
limiter is given (gateway/accounting/pricing.py); a request without a known price counts
no USD.
"""

from __future__ import annotations

import datetime as dt
import logging
import zoneinfo
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from gateway.errors import ErrorKind, GatewayError

if TYPE_CHECKING:
    from gateway.compiled.policy import Policy, Target
    from gateway.policy.schema import PolicyDocument
    from gateway.policy.team_schema import BudgetPolicy
    from providers.base import Usage

log = logging.getLogger("switchboard.budget")

MICROS = 1_000_000
ROLLING_SLICES = 24
# Counters outlive their period by this much, so "previous period" stays readable.
_KEEP_AFTER_END_S = 35 * 86_400


@dataclass(frozen=True, slots=True)
class Window:
    """The current period: the counter slices to sum and when it resets."""

    slices: tuple[str, ...]
    start: float
    resets_at: float
    expires_at: int


class Period:
    """Maps a time to its period; caches the current one until it ends."""

    def __init__(self, kind: str, timezone: str = "UTC", window_s: int | None = None) -> None:
        self.kind = kind
        self.zone = zoneinfo.ZoneInfo(timezone)
        self.window_s = window_s
        self._cached: Window | None = None

    def window(self, now: float) -> Window:
        cached = self._cached
        if cached is not None and cached.start <= now < cached.resets_at:
            return cached
        window = self._rolling(now) if self.kind == "rolling" else self._calendar(now)
        self._cached = window
        return window

    def previous(self, now: float) -> Window:
        """The period before the current one (usage reports)."""
        current = self.window(now)
        if self.kind == "rolling":
            return self._rolling(now - (self.window_s or 0))
        return self._calendar(current.start - 1)

    def describe(self) -> str:
        if self.kind == "rolling":
            return f"rolling {_duration_words(self.window_s or 0)}"
        return self.kind

    def _calendar(self, now: float) -> Window:
        local = dt.datetime.fromtimestamp(now, self.zone)
        day = local.date()
        if self.kind == "daily":
            start, end, name = day, day + dt.timedelta(days=1), f"d{day.isoformat()}"
        elif self.kind == "weekly":
            start = day - dt.timedelta(days=day.weekday())
            end, name = start + dt.timedelta(days=7), f"w{start.isoformat()}"
        else:
            start = day.replace(day=1)
            end = (start + dt.timedelta(days=32)).replace(day=1)
            name = f"m{start.isoformat()[:7]}"
        start_ts = dt.datetime.combine(start, dt.time(), self.zone).timestamp()
        end_ts = dt.datetime.combine(end, dt.time(), self.zone).timestamp()
        return Window((name,), start_ts, end_ts, int(end_ts) + _KEEP_AFTER_END_S)

    def _rolling(self, now: float) -> Window:
        length = self.window_s or 86_400
        slice_s = max(1, length // ROLLING_SLICES)
        current = int(now // slice_s)
        count = -(-length // slice_s)
        slices = tuple(f"r{slice_s}:{index}" for index in range(current - count + 1, current + 1))
        start, end = current * slice_s, (current + 1) * slice_s
        return Window(slices, start, end, end + length)


@dataclass(frozen=True, slots=True)
class Budget:
    """One scope's budget, built at policy load."""

    scope: str  # "team" or "key"
    owner: str  # team name or key id
    team: str
    base: str  # counter key prefix, hash-tagged by team
    period: Period
    tokens: int | None
    usd_micros: int | None
    on_exhaust: str
    downgrade_to: str | None
    soft_thresholds: tuple[float, ...]
    hard_stop_streams: bool = False
    shadow: bool = False  # mode: shadow: counted and reported, never refusing (gateway/accounting/shadow.py)
    notify: tuple[str, ...] = ()  # webhooks told of its thresholds and exhaustion (gateway/accounting/alerts.py)

    @property
    def who(self) -> str:
        return owner_words(self.scope, self.owner, self.team)

    def slices(self, unit: str, window: Window) -> tuple[str, ...]:
        return tuple(f"{self.base}:{unit}:{name}" for name in window.slices)


def owner_words(scope: str, owner: str, team: str) -> str:
    """How messages name a budget's owner at each level of the hierarchy (gateway/accounting/hierarchy.py)."""
    if scope == "team":
        return f"team {team}"
    if scope == "org":
        return f"organization {owner}"
    if scope == "user":
        if owner == "other":  # gateway.accounting.hierarchy.OTHER: a reserved id, so no user is ever named so
            return f"the end users of team {team} beyond end_users.max_tracked (shared bucket `other`)"
        return f"end user {owner} (team {team})"
    return f"key {owner} (team {team})"


def budget_problems(document: PolicyDocument, path: tuple[Any, ...], budget: BudgetPolicy,
                    teams: Sequence[str]) -> list[tuple[tuple[Any, ...], str]]:
    """What a budget names that the schema cannot check: its `downgrade_to` model, which every team it counts
    (`teams`) must be allowed to use, and its `notify` webhooks. One rule for team, key, organisation and end-user
    budgets alike."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    target = budget.downgrade_to
    if target is not None and target not in document.models:
        problems.append(((*path, "downgrade_to"), f"unknown model {target!r}"))
    elif target is not None:
        for team in teams:
            allowed = document.teams[team].models
            if "*" not in allowed and target not in allowed:
                problems.append(((*path, "downgrade_to"), f"team {team!r} may not use model {target!r}; add it "
                                 f"to teams.{team}.models"))
    defined = document.alerts.webhooks
    for index, name in enumerate(budget.notify):
        if name not in defined:
            known = ", ".join(sorted(defined)) or "none; add them under alerts.webhooks"
            problems.append(((*path, "notify", index), f"unknown webhook {name!r}; defined: {known}"))
    return problems


def build_budget(config: BudgetPolicy, scope: str, owner: str, team: str, base: str) -> Budget:
    return Budget(
        scope=scope, owner=owner, team=team, base=base,
        period=Period(config.period, config.timezone, config.window_s),
        tokens=config.tokens,
        usd_micros=None if config.usd is None else round(config.usd * MICROS),
        on_exhaust=config.on_exhaust, downgrade_to=config.downgrade_to,
        soft_thresholds=tuple(config.soft_thresholds),
        hard_stop_streams=config.hard_stop_streams,
        shadow=config.mode == "shadow", notify=tuple(config.notify),
    )


def policy_cost(policy: Policy, target: Target, usage: Usage) -> float | None:
    """USD for `usage` on `target`, from the policy's price book (gateway/accounting/pricing.py); None when unpriced."""
    price = policy.prices.price_of(target)
    return price.cost(usage) if price is not None else None


CostFunction = Callable[["Policy", "Target", "Usage"], "float | None"]


def exceeded(budget: Budget, unit: str, limit: int, used: int, amount: int, window: Window,
             now: float) -> GatewayError:
    """429 `budget_exceeded`: not retryable until the period resets, and the body says which budget."""
    resets = dt.datetime.fromtimestamp(window.resets_at, budget.period.zone).isoformat()
    what = "USD" if unit == "usd" else "token"
    shown = (lambda v: f"${v / MICROS:.6f}".rstrip("0").rstrip(".")) if unit == "usd" else str
    message = (f"Budget exceeded for {budget.who}: {budget.period.describe()} {what} budget limit "
               f"{shown(limit)}, used {shown(used)}, this request needs up to {shown(amount)}. "
               f"It resets at {resets}.")
    return GatewayError(ErrorKind.BUDGET_EXCEEDED, message, code="budget_exceeded",
                        retry_after=max(1.0, window.resets_at - now), headers={"x-should-retry": "false"})


THRESHOLD = "threshold"
EXHAUSTED = "exhausted"


@dataclass(frozen=True, slots=True)
class ThresholdEvent:
    """A soft threshold crossed, or the budget exhausted (a request refused), reported once per period per budget."""

    scope: str
    owner: str
    team: str
    unit: str
    threshold: float  # the fraction crossed; 1.0 for exhaustion
    limit: int
    used: int
    period_start: float
    period_end: float = 0.0
    kind: str = THRESHOLD  # or EXHAUSTED
    shadow: bool = False  # the budget is in shadow mode: exhaustion means it would have refused
    notify: tuple[str, ...] = ()
    # The claim key of this firing in the state store: the same on every replica, so it names the alert.
    mark: str = ""

    def as_log(self) -> dict[str, Any]:
        return {"event": f"budget_{self.kind}", "scope": self.scope, "owner": self.owner, "team": self.team,
                "unit": self.unit, "threshold": self.threshold, "limit": self.limit, "used": self.used,
                "mode": "shadow" if self.shadow else "enforce",
                "period_start": dt.datetime.fromtimestamp(self.period_start, dt.UTC).isoformat()}


def log_threshold(event: ThresholdEvent) -> None:
    log.warning(orjson.dumps(event.as_log()).decode())


def _duration_words(seconds: int) -> str:
    if seconds % 86_400 == 0:
        return f"{seconds // 86_400}d"
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    return f"{seconds}s"


# --- hard_stop_streams ---------------------------------------------------------------------------

# The relay's cheap count of generated text: one token per this many UTF-8 bytes, at least one per
# chunk that carries text. Near tiktoken for English prose (~4 bytes/token); under-counts CJK and code
# by up to ~25%; settlement recounts exactly, so only where the cut falls depends on it.
BYTES_PER_TOKEN = 4


@dataclass(slots=True)
class StreamAllowance:
    """Completion tokens a stream may relay before it crosses a hard budget (`hard_stop_streams`).

    Computed once at admission from the counters it already read: the budget's
    limit minus everything counted (in-flight reservations included) minus this
    request's prompt. The relay then counts generated text locally (see
    `BYTES_PER_TOKEN`) and stops before the chunk that would pass it: no store
    access per chunk.
    """

    tokens: int
    budget: Budget
    unit: str
    limit: int
    resets_at: float
    spent: int = 0

    def take(self, data: bytes) -> bool:
        """Count one chunk's generated text; False if relaying it would pass the allowance."""
        size = _generated_bytes(data)
        if not size:
            return True
        cost = max(1, size // BYTES_PER_TOKEN)
        if self.spent + cost > self.tokens:
            return False
        self.spent += cost
        return True

    def error(self) -> GatewayError:
        """The in-band error that ends the stream: which budget, its limit, when it resets."""
        budget = self.budget
        resets = dt.datetime.fromtimestamp(self.resets_at, budget.period.zone).isoformat()
        limit = f"${self.limit / MICROS:.6f}".rstrip("0").rstrip(".") if self.unit == "usd" else str(self.limit)
        what = "USD" if self.unit == "usd" else "token"
        return GatewayError(ErrorKind.BUDGET_EXCEEDED,
                            f"Budget exceeded for {budget.who} mid-stream: {budget.period.describe()} {what} "
                            f"budget limit {limit} reached, so the stream was cut after about {self.spent} "
                            f"completion tokens (hard_stop_streams). It resets at {resets}.",
                            code="budget_exceeded")


def _generated_bytes(data: bytes) -> int:
    """UTF-8 bytes of generated text in one canonical chunk (chat, completions or Responses event)."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return 0
    if not isinstance(event, dict):
        return 0
    if isinstance(delta := event.get("delta"), str):  # Responses API `*.delta` events
        return len(delta.encode())
    size = 0
    choices = event.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        if isinstance(text := choice.get("text"), str):  # legacy completions
            size += len(text.encode())
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            continue
        for key in ("content", "refusal", "reasoning_content", "reasoning"):
            if isinstance(value := delta.get(key), str):
                size += len(value.encode())
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(arguments := function.get("arguments"), str):
                size += len(arguments.encode())
    return size
