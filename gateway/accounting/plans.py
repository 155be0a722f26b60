"""What admission checks for one key and model (its rate rules and its budgets, every level's), as store checks,
and what a check tells the client: the refusal, the `x-ratelimit-*` headers.

Within one set of windows (this minute, this day) everything about a plan's
checks is fixed but their amounts: the counter keys, limits, expiries, the
meters and what trace events show of them. A plan builds that once per set of windows (a
`Frame`) and every request in it only fills in its own amounts.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.accounting.budgets import MICROS, exceeded
from gateway.errors import ErrorKind, GatewayError
from gateway.state import UNLIMITED, Check, Verdict, across_tags
from gateway.telemetry.decisions import AdmissionShape, admission_shape, limit_label
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


@dataclass(slots=True, eq=False)
class Plan:
    """Everything that applies to one (key, model): what admission checks.

    Built at policy load (and per request for an end user's budget); its rules never change. `frame` caches its
    checks for the current windows.
    """

    rates: tuple[RateRule, ...]
    budgets: tuple[Budget, ...]
    needs_tokens: bool
    needs_usd: bool
    shadowed: bool = False  # some rule is in shadow mode: admission looks for what it would refuse
    _frame: Frame | None = field(default=None, repr=False)

    def frame(self, now: float) -> Frame:
        """The plan's checks and meters for the windows `now` falls in, built when the first of them turns."""
        frame = self._frame
        if frame is None or not frame.start <= now < frame.end:
            frame = self._frame = build_frame(self, now, frozenset())
        return frame


@dataclass(frozen=True, slots=True)
class Meter:
    """What one check of an admission measures."""

    unit: str  # "requests", "tokens" or "usd"
    limit: int
    resets_at: float
    rule: RateRule | None = None
    budget: Budget | None = None
    window: Window | None = None
    label: str = ""  # how trace events name it (`limit_label`), made with the meter once per window

    @property
    def shadow(self) -> bool:
        owner = self.rule if self.rule is not None else self.budget
        return owner is not None and owner.shadow


@dataclass(frozen=True, slots=True)
class Frame:
    """A plan's checks in one set of windows (valid for `start <= now < end`): all but the amounts.

    `checks` holds each check with the amount of a request-count check (1) and, for token and USD checks, 0:
    `checks_for` fills those in per request and reuses the others as they are.
    """

    start: float
    end: float
    checks: tuple[Check, ...]
    meters: tuple[Meter, ...]
    # Indexes of the checks per amount, and of what the headers show: the enforced (not shadow) rate limits per
    # unit and budgets.
    token_checks: tuple[int, ...]
    usd_checks: tuple[int, ...]
    request_rates: tuple[int, ...]
    token_rates: tuple[int, ...]
    budgets: tuple[int, ...]
    # The checks' indexes per hash tag (`across_tags.tag_groups`): a team's, and its organisation's if it has one.
    tag_groups: tuple[tuple[int, ...], ...]
    # What the admission trace event shows of the meters (their labels and limits): `admission_shape(meters)`.
    admission_shape: AdmissionShape
    # What the response headers show, made with the frame: per unit of enforced rate limits (requests, then
    # tokens) its header names and a `(index, limit, limit as text, resets_at)` per limit (`rate_headers`); per
    # enforced budget a `BudgetRow` (hierarchy.budget_headers).
    rate_rows: tuple[tuple[tuple[str, str, str], tuple[tuple[int, int, str, float], ...]], ...] = ()
    budget_rows: tuple[BudgetRow, ...] = ()
    settle_rows: tuple[tuple[int, bool, str | None, bool], ...] = ()  # `settle_rows(meters)`

    def checks_for(self, tokens: int, usd: int) -> tuple[Check, ...]:
        """This request's checks: the frame's, with its token and USD amounts."""
        checks = list(self.checks)
        for index in self.token_checks:
            check = checks[index]
            checks[index] = Check(check.slices, check.limit, tokens, check.expires_at)
        for index in self.usd_checks:
            check = checks[index]
            checks[index] = Check(check.slices, check.limit, usd, check.expires_at)
        return tuple(checks)


@dataclass(frozen=True, slots=True)
class BudgetRow:
    """One enforced budget check's headers (hierarchy.budget_headers), all but what changes per request."""

    index: int
    limit: int
    limit_text: str  # tokens, or USD in dollars
    names: tuple[str, str, str]  # limit, remaining, reset
    usd: bool
    resets_at: float
    bucket: str | None  # an end-user budget's owner (the user, or the `other` bucket); None for other levels


# Budget header names per (level, unit), made once: org, team, user, key x tokens, usd.
_BUDGET_HEADERS = {(level, unit): (f"x-switchboard-budget-{level}-limit-{unit}",
                                   f"x-switchboard-budget-{level}-remaining-{unit}",
                                   f"x-switchboard-budget-{level}-reset")
                   for level in ("org", "team", "user", "key") for unit in ("tokens", "usd")}


def dollars(micros: int) -> str:
    """Micro-USD as dollars for a header: `12.5`, `0.000001`."""
    return f"{micros / MICROS:.6f}".rstrip("0").rstrip(".")


def settle_rows(meters: tuple[Meter, ...]) -> tuple[tuple[int, bool, str | None, bool], ...]:
    """What settlement reconciles: per token or USD check, `(index, counts tokens, model whose own tokens it
    counts (a team x model limit) or None, budget with soft thresholds)`; request counts stay as reserved."""
    return tuple((index, meter.unit == "tokens",
                  meter.rule.owner if meter.rule is not None and meter.rule.scope == "model" else None,
                  bool(meter.budget is not None and meter.budget.soft_thresholds))
                 for index, meter in enumerate(meters) if meter.unit != "requests")


def build_frame(plan: Plan, now: float, relaxed: frozenset[int] | set[int]) -> Frame:
    """The plan's checks and meters for the windows `now` falls in; a budget in `relaxed` (a downgrade's)
    only counts."""
    checks: list[Check] = []
    meters: list[Meter] = []
    start, end = float("-inf"), float("inf")
    for rule in plan.rates:
        index = int(now // rule.window_s)
        opens, resets = index * rule.window_s, (index + 1) * rule.window_s
        start, end = max(start, opens), min(end, resets)
        checks.append(Check((f"{rule.base}:{index}",), UNLIMITED if rule.shadow else rule.limit,
                            1 if rule.unit == "requests" else 0, resets + rule.window_s))
        meters.append(Meter(rule.unit, rule.limit, resets, rule=rule, label=limit_label(rule, None, rule.unit)))
    for budget in plan.budgets:
        window = budget.period.window(now)
        start, end = max(start, window.start), min(end, window.resets_at)
        for unit, limit, short in (("tokens", budget.tokens, "tok"), ("usd", budget.usd_micros, "usd")):
            if limit is None:
                continue
            checks.append(Check(budget.slices(short, window),
                                UNLIMITED if budget.shadow or id(budget) in relaxed else limit, 0,
                                window.expires_at))
            meters.append(Meter(unit, limit, window.resets_at, budget=budget, window=window,
                                label=limit_label(None, budget, unit)))
    rates = [i for i, meter in enumerate(meters) if meter.rule is not None and not meter.shadow]
    request_rates = tuple(i for i in rates if meters[i].unit == "requests")
    token_rates = tuple(i for i in rates if meters[i].unit == "tokens")
    budgets = tuple(i for i, meter in enumerate(meters) if meter.budget is not None and not meter.shadow)
    rate_rows = tuple((names, tuple((i, meters[i].limit, str(meters[i].limit), meters[i].resets_at) for i in indexes))
                      for indexes, names in ((request_rates, _REQUEST_HEADERS), (token_rates, _TOKEN_HEADERS))
                      if indexes)
    budget_rows = []
    for i in budgets:
        meter, budget = meters[i], meters[i].budget
        assert budget is not None
        usd = meter.unit == "usd"
        budget_rows.append(BudgetRow(i, meter.limit, dollars(meter.limit) if usd else str(meter.limit),
                                     _BUDGET_HEADERS[(budget.scope, meter.unit)], usd, meter.resets_at,
                                     budget.owner if budget.scope == "user" else None))
    return Frame(start, end, tuple(checks), tuple(meters),
                 token_checks=tuple(i for i, meter in enumerate(meters) if meter.unit == "tokens"),
                 usd_checks=tuple(i for i, meter in enumerate(meters) if meter.unit == "usd"),
                 request_rates=request_rates, token_rates=token_rates, budgets=budgets,
                 tag_groups=across_tags.tag_groups(checks), admission_shape=admission_shape(meters),
                 rate_rows=rate_rows, budget_rows=tuple(budget_rows),
                 settle_rows=settle_rows(tuple(meters)))


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


def rate_headers(frame: Frame, checks: tuple[Check, ...], verdict: Verdict, now: float,
                 into: dict[str, str] | None = None) -> dict[str, str]:
    """`x-ratelimit-*` for the request and token rate limits with the least room left (shadow limits left out:
    they must not make clients slow down), added to `into` (by default a new dict)."""
    headers: dict[str, str] = {} if into is None else into
    used, admitted = verdict.used, verdict.admitted
    last, text = -1.0, ""
    for (limit_name, remaining_name, reset_name), rows in frame.rate_rows:
        least = -1
        for index, limit, limit_text, resets_at in rows:
            remaining = limit - used[index] - (checks[index].amount if admitted else 0)
            if remaining < 0:
                remaining = 0
            if least < 0 or remaining < least:
                least, shown, reset = remaining, limit_text, resets_at
        if reset != last:  # the request and token limits of a minute reset together
            last, text = reset, go_duration(reset - now)
        headers[limit_name] = shown
        headers[remaining_name] = str(least)
        headers[reset_name] = text
    return headers


_REQUEST_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")
_TOKEN_HEADERS = ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")
