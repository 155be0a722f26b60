"""The application: routes, lifespan, and the wiring of injected services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from opentelemetry.sdk.trace.export import SpanExporter
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.accounting.alerts import Alerts
from gateway.accounting.ledger import Ledger
from gateway.accounting.limits import Limiter
from gateway.accounting.shadow_spend import ShadowSpend
from gateway.accounting.usage import AccessLogSink, UsageRecorder, UsageSink
from gateway.accounting.webhooks import WebhookDispatcher
from gateway.auth import authenticate
from gateway.cache import ResponseCache
from gateway.compiled.policy import Policy
from gateway.compiled.store import PolicyStore
from gateway.errors import ErrorKind, GatewayError, render
from gateway.exchange import Exchange, Reply, Services, StreamReply
from gateway.front_doors.messages import MessagesRoute, anthropic_reply, is_anthropic_path
from gateway.front_doors.response_objects import InputItemsRoute, ResponseObjectRoute
from gateway.front_doors.responses import ResponsesRoute
from gateway.front_doors.token_count import CountTokensRoute
from gateway.http.admin_routes import AlertsRoute, MetricsRoute, SpendRoute, TargetsRoute, UsageRoute
from gateway.http.admin_surface import AdminSurfaces
from gateway.http.asgi import GatewayApp, request_headers, respond, send_json, send_reply
from gateway.http.console import RecentActivity, console_routes
from gateway.http.gate import Gate
from gateway.http.heap import settle_for_serving
from gateway.pipeline import handle_inference
from gateway.response_store import ResponseStore, open_response_store
from gateway.routing.health import Monitor
from gateway.routing.strategies import RouteState
from gateway.shadow_traffic import ShadowTraffic
from gateway.state import open_store
from gateway.telemetry.health_metrics import HealthCollector
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.traces import Telemetry
from gateway.tokens.counter import TokenCounter
from gateway.upstream.pools import UpstreamPools
from providers.base import Endpoint

log = logging.getLogger("switchboard.server")

POLICY_ENV = "SWITCHBOARD_POLICY"
ACCESS_LOG_ENV = "SWITCHBOARD_ACCESS_LOG"


class InferenceRoute:
    """ASGI endpoint for one inference operation; the pipeline does the work.

    Given the app's services when the app is built: reading them from Starlette's `app.state` on every
    request goes through a failed attribute lookup (an AttributeError made and dropped) before `State`'s
    `__getattr__` finds them.
    """

    def __init__(self, endpoint: Endpoint, services: Services) -> None:
        self.endpoint = endpoint
        self.services = services

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        services = self.services
        headers = request_headers(scope)
        endpoint = self.endpoint

        def serve(exchange: Exchange, body: bytes) -> Awaitable[Reply | StreamReply]:
            return handle_inference(services, endpoint, exchange, headers, body)

        await respond(scope, receive, send, services, serve)


class ModelsRoute:
    """GET /v1/models and /v1/models/{model}: only what the caller's team may use."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        services: Services = scope["app"].state.services
        policy = services.policy()
        try:
            caller = authenticate(policy, request_headers(scope))
        except GatewayError as error:
            await send_reply(send, Reply(*render(error)))
            return
        created = scope["app"].state.started_at
        visible = [m for name, m in policy.models.items() if caller.team.may_use(name)]
        entries = {m.name: {"id": m.name, "object": "model", "created": created, "owned_by": m.owned_by}
                   for m in visible}
        wanted = scope.get("path_params", {}).get("model")
        if wanted is None:
            await send_json(send, 200, {"object": "list", "data": list(entries.values())})
        elif wanted in entries:
            await send_json(send, 200, entries[wanted])
        else:
            error = GatewayError(ErrorKind.NOT_FOUND, f"The model `{wanted}` does not exist or you do not have "
                                 "access to it.", param="model", code="model_not_found")
            await send_reply(send, Reply(*render(error)))


async def _root(request: Request) -> Response:
    # A person who opens the gateway's address sees where to go instead of a 404.
    body = b'{"service":"switchboard","api":"/v1","console":"/ui/","health":"/healthz"}'
    return Response(body, media_type="application/json")


async def _healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


async def _readyz(request: Request) -> Response:
    state = request.app.state
    if state.draining:  # SIGTERM arrived: a load balancer should stop sending (gateway/http/draining.py)
        return Response(b'{"status":"draining"}', status_code=503, media_type="application/json")
    if not state.ready:
        return Response(b'{"status":"starting"}', status_code=503, media_type="application/json")
    policy: Policy = state.services.policy()
    body = f'{{"status":"ready","policy":"{policy.fingerprint}"}}'.encode()
    return Response(body, media_type="application/json")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        error = GatewayError(ErrorKind.BAD_REQUEST, f"Method {request.method} is not allowed on {request.url.path}.",
                             code="method_not_allowed", status=405)
    else:
        error = GatewayError(ErrorKind.NOT_FOUND, f"Unknown endpoint: {request.method} {request.url.path}",
                             code="unknown_url", status=exc.status_code)
    if is_anthropic_path(request.url.path):  # Anthropic SDK clients parse only Anthropic's error shape
        reply = anthropic_reply(error)
        return Response(reply.body, status_code=reply.status, headers=dict(reply.headers),
                        media_type="application/json")
    status, body, headers = render(error)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def create_app(
    store: PolicyStore,
    *,
    counter: TokenCounter | None = None,
    sinks: Sequence[UsageSink] | None = None,
    limiter: Limiter | None = None,
    span_exporter: SpanExporter | None = None,
    cache: ResponseCache | None = None,
    response_store: ResponseStore | None = None,
    serving_process: bool = False,
) -> GatewayApp:
    """Build the gateway around a policy store; everything that talks to the world is injected here.

    `serving_process`: this app owns its process (the CLI), so it may tune process-wide settings such
    as the garbage collector (gateway/http/heap.py); apps embedded in another process leave them alone.
    """
    counter = counter or TokenCounter()
    pools = UpstreamPools(counter)
    # Metrics and the ledger are usage sinks too; tracing follows the policy on every reload.
    observed = store.current
    metrics = Metrics(lambda: store.current) if observed.telemetry.metrics.enabled else None
    ledger = Ledger(observed.ledger_path, observed.ledger.flush_interval_s) if observed.ledger_path else None
    telemetry = Telemetry(span_exporter=span_exporter, metrics=metrics)
    telemetry.configure(observed)
    front_sinks = sinks if sinks is not None else [AccessLogSink()]
    activity = RecentActivity()  # the console's overview: recent request rate, errors, overhead
    shadow_spend = ShadowSpend()  # teams' shadow spend (gateway/accounting/shadow_spend.py), counted in the state store
    recorder = UsageRecorder([*front_sinks, *(sink for sink in (metrics, ledger) if sink is not None)],
                             client_requests_only=[activity], shadow_calls_only=[shadow_spend])
    if limiter is None:
        limiter = Limiter(open_store(store.current.state, policy_path=store.path, needed=bool(
            store.current.rules and store.current.rules.any)), counter, started_with=store.current)
    shadow_spend.store = limiter.store
    webhooks = WebhookDispatcher(observed.alerts)
    limiter.send_alerts_to(Alerts(webhooks, lambda: store.current))
    if metrics is not None:
        limiter.attach_metrics(metrics)
        webhooks.attach_metrics(metrics)
        metrics.registry.register(HealthCollector(lambda: store.current, limiter.store))
    services = Services(policy=lambda: store.current, pools=pools, counter=counter, recorder=recorder,
                        routes=RouteState(), limiter=limiter, telemetry=telemetry, cache=cache or ResponseCache(),
                        shadows=ShadowTraffic())
    if metrics is not None:
        services.shadows.metrics = metrics.variants  # shadow calls dropped when saturated
        metrics.watch_routes(services.routes)  # breaker states, read at scrape time
        metrics.watch_writers(ledger, [sink for sink in front_sinks if isinstance(sink, AccessLogSink)],
                              lambda: telemetry.dropped_spans)
    responses = response_store or open_response_store(observed.response_store, observed.state, policy_path=store.path)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.ready = False
        await asyncio.to_thread(counter.preload)
        if ledger is not None:
            await asyncio.to_thread(_open_ledger, ledger)
        await limiter.start()
        await responses.start()
        await webhooks.start()
        pools.prepare(store.current)
        background: set[asyncio.Task[Any]] = set()

        def applied(policy: Policy) -> None:
            pools.prepare(policy)
            grace = max(p.total_timeout_s for p in policy.providers.values())
            task = asyncio.create_task(pools.retire_unused(policy, grace))
            background.add(task)
            task.add_done_callback(background.discard)

        store.on_change(applied)
        store.on_change(telemetry.configure)
        store.on_change(limiter.policy_applied)
        monitor = Monitor(services.routes, services.policy)  # health checks and load scrapes
        monitor.apply(store.current)
        store.on_change(monitor.apply)
        store.install_sighup(asyncio.get_running_loop())
        watcher = asyncio.create_task(store.watch())
        app.state.ready = True
        if serving_process:
            settle_for_serving()
        log.info("serving policy %s (%s)", store.current.fingerprint, store.path)
        try:
            yield
        finally:
            app.state.ready = False
            watcher.cancel()
            for task in background:
                task.cancel()
            # In-flight requests have drained (uvicorn waited up to shutdown_grace_s for them). What is left is
            # flushing: settlements to the state store, ledger rows, access-log lines, spans. Each step gets
            # what remains of one more grace period, and a step that cannot finish is logged, never waited on
            # forever: a process that will not stop is killed, and then loses everything.
            await _shut_down(store.current.server.shutdown_grace_s, [
                ("health monitor", lambda left: monitor.close()),
                ("shadow calls", services.shadows.close),  # settled before the sinks they write to close
                ("upstream pools", lambda left: pools.close()),
                ("state store (settlements)", limiter.close),
                ("response store", lambda left: responses.close()),
                ("response cache", lambda left: services.cache.close()),
                ("usage sinks (ledger, access log)", lambda left: asyncio.to_thread(recorder.close, left)),
                ("span export", lambda left: asyncio.to_thread(telemetry.shutdown)),
                # Last: a receiver that is down would otherwise spend the grace the ledger needs.
                ("alert webhooks", webhooks.close),
            ])

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", InferenceRoute(Endpoint.CHAT, services), methods=["POST"]),
            Route("/v1/completions", InferenceRoute(Endpoint.COMPLETIONS, services), methods=["POST"]),
            Route("/v1/embeddings", InferenceRoute(Endpoint.EMBEDDINGS, services), methods=["POST"]),
            Route("/v1/messages", MessagesRoute(services), methods=["POST"]),
            Route("/v1/messages/count_tokens", CountTokensRoute(services), methods=["POST"]),
            Route("/v1/responses", ResponsesRoute(services, responses), methods=["POST"]),
            Route("/v1/responses/{response_id}/input_items", InputItemsRoute(), methods=["GET"]),
            Route("/v1/responses/{response_id}", ResponseObjectRoute(), methods=["GET", "DELETE"]),
            Route("/v1/models", ModelsRoute(), methods=["GET"]),
            Route("/v1/models/{model:path}", ModelsRoute(), methods=["GET"]),
            Route("/", _root, methods=["GET"]),
            Route("/healthz", _healthz, methods=["GET"]),
            Route("/readyz", _readyz, methods=["GET"]),
            Route("/admin/usage", UsageRoute(), methods=["GET"]),
            Route("/admin/targets", TargetsRoute(), methods=["GET"]),
            Route("/admin/spend", SpendRoute(ledger), methods=["GET"]),
            Route("/admin/alerts", AlertsRoute(webhooks), methods=["GET"]),
            *console_routes(ledger, activity),  # /admin/{overview,requests,budgets,policy}, /ui
            Route("/metrics", MetricsRoute(metrics), methods=["GET"]),
        ],
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.policy_store = store  # the console shows the last reload's result
    app.state.response_store = responses
    app.state.ready = False
    app.state.draining = False
    app.state.started_at = int(time.time())
    hot = {("POST", route.path): route.app for route in app.routes
           if isinstance(route, Route) and "{" not in route.path and route.path.startswith("/v1/")
           and route.methods == {"POST"}}
    gate = Gate(services.policy, telemetry, counter, metrics,
                {path: anthropic_reply for _, path in hot if is_anthropic_path(path)})
    return GatewayApp(app, hot, gate, AdminSurfaces(services.policy))


def _open_ledger(ledger: Ledger) -> None:
    """Open the usage ledger before serving: a file the gateway cannot write stops the start, since every billed
    request goes there (failing the first request instead would serve the rest unrecorded)."""
    try:
        ledger.open()
    except (OSError, sqlite3.Error) as exc:
        log.error("usage ledger %s cannot be opened: %s", ledger.path, exc)
        raise


async def _shut_down(grace_s: float, steps: Sequence[tuple[str, Callable[[float], Awaitable[Any]]]]) -> None:
    """Run each shutdown step in order within `grace_s` in all, giving each the seconds left; log the ones that
    fail or run out of time."""
    deadline = time.monotonic() + max(grace_s, 1.0)
    for name, step in steps:
        left = max(0.1, deadline - time.monotonic())
        try:
            async with asyncio.timeout(left + 0.5):  # the step's own timeout first, so it can say what it lost
                await step(left)
        except TimeoutError:
            log.error("shutdown: %s did not finish within the grace period; its pending work is lost", name)
        except Exception:
            log.exception("shutdown: %s failed", name)


def app_from_environment() -> GatewayApp:
    """Factory for `uvicorn --factory` worker processes: the CLI passes the policy path in the environment."""
    sinks = [AccessLogSink()] if os.environ.get(ACCESS_LOG_ENV, "1") == "1" else []
    return create_app(PolicyStore(os.environ[POLICY_ENV]), sinks=sinks, serving_process=True)
