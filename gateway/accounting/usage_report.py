"""Usage reports: what a team, its keys and its models have used, against which limits, until when.

Read-only over the same counters admission reserves against (gateway/accounting/limits.py),
served three ways: `GET /admin/usage?team=T[&period=current|previous]` with an
admin key, `switchboard usage --policy FILE --team T`, and `Limiter.report`.
USD amounts are shown in dollars; counters hold micro-dollars.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from gateway.accounting import hierarchy
from gateway.accounting.budgets import MICROS
from gateway.accounting.shadow import tally_slices
from gateway.accounting.shadow_spend import shadow_spend
from gateway.state import StateStore, across_tags
from gateway.timestamps import iso_time

if TYPE_CHECKING:
    from gateway.compiled.policy import Policy


async def usage_report(store: StateStore, policy: Policy, team: str, period: str, now: float,
                       end_user: str | None = None) -> dict[str, Any]:
    """Usage, limits and what remains for a team, its keys and its models, its organisation, its `other`
    end-user bucket and, when `end_user` is given, that end user; KeyError for an unknown team."""
    rules = policy.rules
    if rules is None or team not in policy.teams:
        raise KeyError(team)
    rows: list[dict[str, Any]] = []
    slices: list[tuple[str, ...]] = []
    tallied: list[int] = []  # shadow rows: their would-refuse counters are read after the others
    rates = [*rules.team_rates.get(team, ())]
    for key_id in rules.team_keys.get(team, ()):
        rates += rules.key_rates.get(key_id, ())
    rates += [r for (t, _), group in rules.model_rates.items() if t == team for r in group]
    for rule in rates:
        index = int(now // rule.window_s) - (1 if period == "previous" else 0)
        slices.append((f"{rule.base}:{index}",))
        rows.append({"scope": rule.scope, "owner": rule.owner, "limit_type": rule.label, "unit": rule.unit,
                     "limit": rule.limit, "resets_at": iso_time((index + 1) * rule.window_s, dt.UTC),
                     "mode": "shadow" if rule.shadow else "enforce"})
        if rule.shadow:
            tallied.append(len(rows) - 1)
    budgets = [rules.team_budgets.get(team)] + [rules.key_budgets.get(k) for k in rules.team_keys.get(team, ())]
    budgets += hierarchy.report_budgets(rules.hierarchy, team, end_user)
    for budget in (b for b in budgets if b is not None):
        window = budget.period.previous(now) if period == "previous" else budget.period.window(now)
        for unit, limit in (("tokens", budget.tokens), ("usd", budget.usd_micros)):
            if limit is None:
                continue
            slices.append(budget.slices("tok" if unit == "tokens" else "usd", window))
            rows.append({"scope": budget.scope, "owner": budget.owner,
                         "limit_type": f"{budget.period.describe()} budget", "unit": unit, "limit": limit,
                         "resets_at": iso_time(window.resets_at, budget.period.zone),
                         "on_exhaust": budget.on_exhaust, "mode": "shadow" if budget.shadow else "enforce"})
            if budget.shadow:
                tallied.append(len(rows) - 1)
    counted = len(slices)
    slices += [tally_slices(slices[index]) for index in tallied]
    values = await across_tags.read(store, slices)  # an organisation's counters are under another hash tag
    for index, refusals in zip(tallied, values[counted:], strict=True):
        # Requests this shadow rule would have refused in the window: served, but not in `used` (see shadow.py).
        rows[index]["would_reject"] = refusals
    for row, used in zip(rows, values[:counted], strict=True):
        row["used"] = used
        row["remaining"] = max(0, row["limit"] - used)
        if row["unit"] == "usd":
            for field in ("limit", "used", "remaining"):
                row[field] = row[field] / MICROS
    report = {"team": team, "period": period, "at": iso_time(now, dt.UTC), "usage": rows}
    if any(plan.shadow is not None for plan in policy.experiments.values()):
        report["shadow_spend"] = await shadow_spend(store, team, period, now)  # not in any budget's `used`
    if (org := rules.hierarchy.organizations.get(team)) is not None:
        report["organization"] = org
    users = await hierarchy.end_user_summary(store, rules.hierarchy, team, now, period == "previous")
    if users is not None:
        report["end_users"] = users
    return report


