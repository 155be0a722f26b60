"""The console's own JSON feeds, also served as admin endpoints for scripts.

- `GET /admin/overview`: requests/s, error rate, overhead p50/p99 (this process, recent minutes) and the
  cost of the current UTC day (ledger).
- `GET /admin/requests?limit=N`: the newest ledger rows, each with a link to its trace when
  `admin.console.trace_url` is set.
- `GET /admin/budgets`: every budget of every team, used and remaining in the current period.
- `GET /admin/policy`: the serving policy's fingerprint and what the last reload did.

Spend, usage and targets are the existing /admin/spend, /admin/usage and /admin/targets.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping
from typing import Any

from gateway.accounting.ledger import Ledger, open_ledger
from gateway.compiled.policy import Policy
from gateway.errors import ErrorKind, GatewayError
from gateway.exchange import Services
from gateway.http.admin_routes import AdminRoute, LedgerRoute
from gateway.http.console.activity import RecentActivity
from gateway.state import StoreUnavailable
from gateway.timestamps import iso_time

_REQUEST_COLUMNS = ("request_id", "ts", "team", "key_id", "endpoint", "public_model", "provider", "upstream_model",
                    "stream", "status", "outcome", "prompt_tokens", "completion_tokens", "cost_usd", "duration_ms",
                    "ttft_ms", "trace_id", "cache")


class OverviewFeed(AdminRoute):
    def __init__(self, activity: RecentActivity, ledger: Ledger | None) -> None:
        self._activity = activity
        self._ledger = ledger

    async def answer(self, scope: dict[str, Any], services: Services, policy: Policy,
                     query: Mapping[str, str]) -> Any:
        overview = self._activity.summary()
        overview["day"] = dt.datetime.now(dt.UTC).date().isoformat()
        ledger = self._ledger
        overview["cost_today_usd"] = None if ledger is None else await asyncio.to_thread(
            _day_cost, ledger, overview["day"])
        overview["policy"] = policy.fingerprint
        return overview


class RequestsFeed(LedgerRoute):
    async def answer(self, scope: dict[str, Any], services: Services, policy: Policy,
                     query: Mapping[str, str]) -> Any:
        ledger = self.ledger()
        limit = query.get("limit", str(policy.console.recent_requests))
        if not limit.isdigit() or not 1 <= int(limit) <= 1000:
            raise GatewayError(ErrorKind.BAD_REQUEST, "limit must be a number from 1 to 1000.", param="limit")
        rows = await asyncio.to_thread(_newest_rows, ledger, int(limit))
        template = policy.console.trace_url
        for row in rows:
            trace = row["trace_id"]
            row["trace_url"] = template.replace("{trace_id}", trace) if template and trace else None
        return {"object": "list", "data": rows}


class BudgetsFeed(AdminRoute):
    async def answer(self, scope: dict[str, Any], services: Services, policy: Policy,
                     query: Mapping[str, str]) -> Any:
        limiter = services.limiter
        rules = policy.rules
        budgets: list[dict[str, Any]] = []
        teams = [t for t in policy.teams if rules is not None and (
            t in rules.team_budgets or any(k in rules.key_budgets for k in rules.team_keys.get(t, ()))
            or t in rules.hierarchy.org_budgets or t in rules.hierarchy.end_users)]
        for team in sorted(teams):
            try:
                report = await limiter.report(policy, team, "current")
            except StoreUnavailable as exc:
                raise GatewayError(ErrorKind.UNAVAILABLE, f"The state store is unreachable: {exc}",
                                   code="state_store_unavailable", retry_after=1.0) from exc
            for row in report["usage"]:
                if row["limit_type"].endswith("budget"):
                    burned = row["used"] / row["limit"] if row["limit"] else 1.0
                    budgets.append({"team": team, **row, "burned": round(burned, 4)})
        return {"object": "list", "data": budgets}


class PolicyFeed(AdminRoute):
    async def answer(self, scope: dict[str, Any], services: Services, policy: Policy,
                     query: Mapping[str, str]) -> Any:
        last = scope["app"].state.policy_store.last_reload
        return {
            "fingerprint": policy.fingerprint, "source": policy.source,
            "last_reload": {"at": iso_time(last.at), "result": last.result, "fingerprint": last.fingerprint,
                            "problems": list(last.problems)},
            "providers": len(policy.providers), "models": len(policy.models), "teams": len(policy.teams),
            "keys": len(policy.keys), "trace_url": policy.console.trace_url,
        }



def _day_cost(ledger: Ledger, day: str) -> float:
    ledger.flush()
    if not ledger.path.exists():  # created with the first request
        return 0.0
    connection = open_ledger(ledger.path)
    try:
        (total,) = connection.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM usage WHERE day = ?", (day,)).fetchone()
    finally:
        connection.close()
    return round(total, 10)


def _newest_rows(ledger: Ledger, limit: int) -> list[dict[str, Any]]:
    ledger.flush()
    if not ledger.path.exists():
        return []
    connection = open_ledger(ledger.path)
    try:
        rows = connection.execute(f"SELECT {', '.join(_REQUEST_COLUMNS)} FROM usage ORDER BY ts DESC, rowid DESC "
                                  "LIMIT ?", (limit,)).fetchall()
    finally:
        connection.close()
    return [{**dict(zip(_REQUEST_COLUMNS, row, strict=True)), "at": iso_time(row[1])} for row in rows]
