"""Usage reports: what a team, its keys and its models have used, against which limits, until when.

Read-only over the same counters admission reserves against (gateway/accounting/limits.py),
served three ways: `GET /admin/usage?team=T[&period=current|previous]` with an
admin key, `switchboard usage --policy FILE --team T`, and `Limiter.report`.
USD amounts are shown in dollars; counters hold micro-dollars.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from gateway import hierarchy
from gateway.accounting.budgets import MICROS
from gateway.accounting.shadow import tally_slices
from gateway.errors import ErrorKind, GatewayError
from gateway.state import StateStore, StoreUnavailable

if TYPE_CHECKING:
    from gateway.accounting.limits import Limiter
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
                     "limit": rule.limit, "resets_at": _iso((index + 1) * rule.window_s, dt.UTC),
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
                         "resets_at": _iso(window.resets_at, budget.period.zone),
                         "on_exhaust": budget.on_exhaust, "mode": "shadow" if budget.shadow else "enforce"})
            if budget.shadow:
                tallied.append(len(rows) - 1)
    counted = len(slices)
    slices += [tally_slices(slices[index]) for index in tallied]
    values = await hierarchy.read(store, slices)  # an organisation's counters are under another hash tag
    for index, refusals in zip(tallied, values[counted:], strict=True):
        # Requests this shadow rule would have refused in the window: served, but not in `used` (see shadow.py).
        rows[index]["would_reject"] = refusals
    for row, used in zip(rows, values[:counted], strict=True):
        row["used"] = used
        row["remaining"] = max(0, row["limit"] - used)
        if row["unit"] == "usd":
            for field in ("limit", "used", "remaining"):
                row[field] = row[field] / MICROS
    report = {"team": team, "period": period, "at": _iso(now, dt.UTC), "usage": rows}
    if (org := rules.hierarchy.organizations.get(team)) is not None:
        report["organization"] = org
    users = await hierarchy.end_user_summary(store, rules.hierarchy, team, now, period == "previous")
    if users is not None:
        report["end_users"] = users
    return report


def _iso(timestamp: float, zone: dt.tzinfo) -> str:
    return dt.datetime.fromtimestamp(timestamp, zone).isoformat(timespec="seconds")


class UsageRoute:
    """GET /admin/usage?team=T[&period=current|previous] with an admin key (`admin.keys`)."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from gateway.auth import authenticate_admin  # auth needs gateway.compiled.policy, which imports this module
        from gateway.errors import render
        from gateway.exchange import Reply
        from gateway.http.asgi import request_headers, send_json, send_reply

        services = scope["app"].state.services
        policy = services.policy()
        try:
            authenticate_admin(policy, request_headers(scope))
            query = parse_qs(scope.get("query_string", b"").decode())
            team = (query.get("team") or [""])[0]
            period = (query.get("period") or ["current"])[0]
            if period not in ("current", "previous"):
                raise GatewayError(ErrorKind.BAD_REQUEST, "period must be `current` or `previous`.", param="period")
            if team not in policy.teams:
                raise GatewayError(ErrorKind.NOT_FOUND, f"Unknown team {team!r}.", param="team",
                                   code="team_not_found")
            end_user = (query.get("end_user") or [None])[0]
            if end_user is not None and (hierarchy.valid_end_user(end_user) is None):
                raise GatewayError(ErrorKind.BAD_REQUEST, "end_user must be 1-64 characters of letters, digits "
                                   "and ._@+=/-.", param="end_user")
            limiter: Limiter | None = getattr(services, "limiter", None)
            if limiter is None:
                raise GatewayError(ErrorKind.NOT_FOUND, "Limits are not enabled on this gateway.")
            try:
                report = await limiter.report(policy, team, period, end_user)
            except StoreUnavailable as exc:
                raise GatewayError(ErrorKind.UNAVAILABLE, f"The state store is unreachable: {exc}",
                                   code="state_store_unavailable", retry_after=1.0) from exc
        except GatewayError as error:
            await send_reply(send, Reply(*render(error)))
            return
        await send_json(send, 200, report)


def print_usage(policy_path: str, team: str, period: str = "current", end_user: str | None = None) -> int:
    """`switchboard usage`: read the counters the policy's `state:` block points at and print the report."""
    import json
    import sys
    import time

    from gateway.compiled.policy import PolicyError, load_policy
    from gateway.state import open_store

    try:
        policy = load_policy(policy_path)
    except PolicyError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    if team not in policy.teams:
        sys.stderr.write(f"unknown team {team!r}; teams: {', '.join(sorted(policy.teams))}\n")
        return 1
    if end_user is not None and hierarchy.valid_end_user(end_user) is None:
        sys.stderr.write("--end-user must be 1-64 characters of letters, digits and ._@+=/-\n")
        return 1
    needed = bool(policy.rules and policy.rules.any)
    store = open_store(policy.state, policy_path=policy_path, needed=needed, read_only=True)
    if type(store).__name__ == "MemoryStore":
        sys.stderr.write("note: this policy keeps its counters in process memory (state.backend: memory); "
                         "ask the running gateway instead: GET /admin/usage?team=...\n")

    async def read() -> dict[str, Any]:
        await store.start()
        try:
            return await usage_report(store, policy, team, period, time.time(), end_user)
        finally:
            await store.close()

    try:
        report = asyncio.run(read())
    except StoreUnavailable as exc:
        sys.stderr.write(f"cannot read usage: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0
