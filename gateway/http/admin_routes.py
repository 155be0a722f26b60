"""The operator's JSON routes under /admin and GET /metrics: HTTP around reports the domain modules compute.

Every /admin route answers only an admin key (`admin.keys`; gateway/auth.py)
and turns a `GatewayError` into OpenAI's error shape; what is behind the path
is one call into the concern that owns the data. Which listener serves these
paths: gateway/http/admin_surface.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from gateway.accounting.hierarchy import valid_end_user
from gateway.accounting.ledger import Ledger
from gateway.accounting.spend import GROUPINGS, is_grouping, parse_since, render_report, spend
from gateway.auth import authenticate_admin
from gateway.errors import ErrorKind, GatewayError, render
from gateway.exchange import Reply, Services
from gateway.http.asgi import request_headers, send_json, send_reply
from gateway.routing.health import targets_report
from gateway.state import StoreUnavailable

if TYPE_CHECKING:
    from gateway.accounting.webhooks import WebhookDispatcher
    from gateway.compiled.policy import Policy
    from gateway.telemetry.metrics import Metrics


class AdminRoute:
    """An admin-key GET whose `answer` returns a JSON-serialisable body, or (bytes, content type).

    Every /admin route and console feed is one: the key check and the error shape live here once."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        services: Services = scope["app"].state.services
        policy = services.policy()
        try:
            authenticate_admin(policy, request_headers(scope))
            query = {key: values[0] for key, values in parse_qs(scope.get("query_string", b"").decode()).items()}
            body = await self.answer(scope, services, policy, query)
        except GatewayError as error:
            await send_reply(send, Reply(*render(error)))
            return
        if isinstance(body, tuple):
            await _send_bytes(send, 200, *body)
        else:
            await send_json(send, 200, body)

    async def answer(self, scope: dict[str, Any], services: Services, policy: Policy,
                     query: Mapping[str, str]) -> Any:
        raise NotImplementedError


class UsageRoute(AdminRoute):
    """GET /admin/usage?team=T[&period=current|previous][&end_user=U]: a team's usage against its limits and
    budgets, its organisation's and its end users'."""

    async def answer(self, scope: dict[str, Any], services: Services, policy: Policy,
                     query: Mapping[str, str]) -> Any:
        team, period = query.get("team", ""), query.get("period", "current")
        if period not in ("current", "previous"):
            raise GatewayError(ErrorKind.BAD_REQUEST, "period must be `current` or `previous`.", param="period")
        if team not in policy.teams:
            raise GatewayError(ErrorKind.NOT_FOUND, f"Unknown team {team!r}.", param="team", code="team_not_found")
        end_user = query.get("end_user")
        if end_user is not None and valid_end_user(end_user) is None:
            raise GatewayError(ErrorKind.BAD_REQUEST, "end_user must be 1-64 characters of letters, digits and "
                               "._@+=/-.", param="end_user")
        if services.limiter is None:
            raise GatewayError(ErrorKind.NOT_FOUND, "Limits are not enabled on this gateway.")
        try:
            return await services.limiter.report(policy, team, period, end_user)
        except StoreUnavailable as exc:
            raise GatewayError(ErrorKind.UNAVAILABLE, f"The state store is unreachable: {exc}",
                               code="state_store_unavailable", retry_after=1.0) from exc


class TargetsRoute(AdminRoute):
    """GET /admin/targets: every target's breaker state, in-flight count, latency EWMA and errors."""

    async def answer(self, scope: dict[str, Any], services: Services, policy: Policy,
                     query: Mapping[str, str]) -> Any:
        return targets_report(policy, services.routes)


class LedgerRoute(AdminRoute):
    """An admin route over the usage ledger: 404 `ledger_not_configured` when the policy keeps none."""

    def __init__(self, ledger: Ledger | None) -> None:
        self._ledger = ledger

    def ledger(self) -> Ledger:
        if self._ledger is None:
            raise GatewayError(ErrorKind.NOT_FOUND, "No usage ledger is configured (set `ledger.path`).",
                               code="ledger_not_configured")
        return self._ledger


class SpendRoute(LedgerRoute):
    """GET /admin/spend?by=team|model|key|day|organization|end_user|tag:<key>&since=...&until=...&format=json|csv.

    From the ledger."""

    async def answer(self, scope: dict[str, Any], services: Services, policy: Policy,
                     query: Mapping[str, str]) -> Any:
        ledger = self.ledger()
        by, fmt = query.get("by", "team"), query.get("format", "json")
        if fmt not in ("json", "csv"):
            raise GatewayError(ErrorKind.BAD_REQUEST, "format must be json or csv.", param="format")
        try:
            since = parse_since(query.get("since"))
            until = parse_since(query["until"]) if query.get("until") else None
        except ValueError as exc:
            raise GatewayError(ErrorKind.BAD_REQUEST, str(exc), param="since") from exc
        if not is_grouping(by):
            raise GatewayError(ErrorKind.BAD_REQUEST, f"by must be one of {GROUPINGS}.", param="by")

        def report() -> list[dict[str, Any]]:
            ledger.flush()
            return spend(ledger.path, by, since, until)

        rows = await asyncio.to_thread(report)
        if fmt == "csv":
            return render_report(rows, fmt).encode(), b"text/csv; charset=utf-8"
        return render_report(rows, fmt).encode(), b"application/json"


class AlertsRoute(AdminRoute):
    """GET /admin/alerts: the delivery queue, drops, and recent deliveries with their failures."""

    def __init__(self, dispatcher: WebhookDispatcher) -> None:
        self._dispatcher = dispatcher

    async def answer(self, scope: dict[str, Any], services: Services, policy: Policy,
                     query: Mapping[str, str]) -> Any:
        return self._dispatcher.recent()


class MetricsRoute:
    """GET /metrics: the Prometheus text format (404 when disabled); who may read it: gateway/http/admin_surface.py."""

    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        metrics = self._metrics
        if metrics is None:
            await send_reply(send, Reply(*render(GatewayError(ErrorKind.NOT_FOUND, "Metrics are disabled.",
                                                              code="metrics_disabled"))))
            return
        await _send_bytes(send, 200, await asyncio.to_thread(metrics.render), metrics.content_type.encode())


async def _send_bytes(send: Any, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
