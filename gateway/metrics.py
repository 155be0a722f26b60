"""Prometheus metrics, served at GET /metrics.

Almost everything is updated in one place: `Metrics.record`, the usage sink
that sees every settled request. The few facts a usage record cannot carry
have explicit hooks: `upstream_error` (per failed upstream attempt, called by
the trace handle around each upstream call), `rejected` (for admission: rate
limits and budgets) and the in-flight count. Label children are cached per
label combination, so a request costs a dict lookup and a handful of
increments. Circuit-breaker state is not updated per request at all: a
collector reads it from the routing state when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from gateway.usage import UsageRecord

if TYPE_CHECKING:
    from gateway.routing import RouteState

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
# The OpenTelemetry GenAI client metrics' buckets (semantic conventions, gen-ai-metrics.md).
_GENAI_TOKEN_BUCKETS = tuple(4.0 ** i for i in range(14))
_GENAI_DURATION_BUCKETS = tuple(0.01 * 2 ** i for i in range(14))
_GENAI_LABELS = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")
_OPERATION = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}
_REQUEST_LABELS = ("team", "model", "provider", "status")
_MODEL_LABELS = ("team", "model", "provider")
# switchboard_circuit_breaker_state values.
_BREAKER_VALUE = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


class Metrics:
    """The gateway's Prometheus metrics, in a registry of their own (no global state)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or CollectorRegistry(auto_describe=False)
        self.requests = Counter("switchboard_requests", "Requests settled, by team, public model, provider and "
                                "HTTP status.", _REQUEST_LABELS, registry=registry)
        self.duration = Histogram("switchboard_request_duration_seconds", "Time from request to last byte.",
                                  _REQUEST_LABELS, buckets=_LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("switchboard_time_to_first_token_seconds", "Streams: time to the first content "
                              "chunk.", _MODEL_LABELS, buckets=_LATENCY_BUCKETS, registry=registry)
        self.overhead = Histogram("switchboard_overhead_seconds", "Time spent in the gateway itself (not waiting "
                                  "on upstreams).", ("team", "model"), buckets=_OVERHEAD_BUCKETS, registry=registry)
        self.tokens = Counter("switchboard_tokens", "Tokens by type: input (cached included), cached_input, "
                              "output.", (*_MODEL_LABELS, "type"), registry=registry)
        self.cost = Counter("switchboard_cost_usd", "Cost of the usage in USD, by the price table.",
                            _MODEL_LABELS, registry=registry)
        self.upstream_errors = Counter("switchboard_upstream_errors", "Failed upstream attempts (retried ones "
                                       "included), by provider and type (HTTP status or failure kind).",
                                       ("provider", "type"), registry=registry)
        self.rejections = Counter("switchboard_rejections", "Requests refused by admission (rate limits, "
                                  "budgets), by team, scope and reason.", ("team", "scope", "reason"),
                                  registry=registry)
        self.stream_outcomes = Counter("switchboard_stream_outcomes", "How streams ended (completed, "
                                       "client_disconnected, upstream_error).", ("team", "model", "outcome"),
                                       registry=registry)
        # The GenAI conventions' client metrics, under their Prometheus names.
        self.genai_tokens = Histogram("gen_ai_client_token_usage", "GenAI semconv: billable tokens per request "
                                      "(gen_ai.client.token.usage).", (*_GENAI_LABELS, "gen_ai_token_type"),
                                      buckets=_GENAI_TOKEN_BUCKETS, registry=registry)
        self.genai_duration = Histogram("gen_ai_client_operation_duration_seconds", "GenAI semconv: operation "
                                        "duration (gen_ai.client.operation.duration).", (*_GENAI_LABELS, "error_type"),
                                        buckets=_GENAI_DURATION_BUCKETS, registry=registry)
        self.cache_requests = Counter("switchboard_cache_requests", "Requests to models with caching on, by "
                                      "result: hit, miss or bypass.", ("team", "model", "result"), registry=registry)
        self.cache_tokens = Counter("switchboard_cache_tokens", "Tokens served from the response cache (what the "
                                    "hits would have used).", ("team", "model"), registry=registry)
        self.cache_saved = Counter("switchboard_cache_cost_saved_usd", "What cache hits would have cost in USD, "
                                   "at the price of the model's first target.", ("team", "model"), registry=registry)
        self._cache_children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        self._started = 0
        self._finished = 0
        in_flight = Gauge("switchboard_requests_in_flight", "Inference requests being served.", registry=registry)
        in_flight.set_function(lambda: max(0, self._started - self._finished))
        self._children: dict[tuple[str, ...], tuple[Any, ...]] = {}

    def started(self) -> None:
        """An inference request began (paired with its usage record, or `finished_unsettled`)."""
        self._started += 1

    def finished_unsettled(self) -> None:
        """A request ended without a usage record (e.g. refused before authentication)."""
        self._finished += 1

    def record(self, record: UsageRecord) -> None:
        """The usage sink: everything about a settled request, in one place."""
        self._finished += 1
        provider = record.provider or "none"
        key = (record.team, record.public_model, provider, str(record.status), record.upstream_model or "",
               record.endpoint)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = self._new_children(key, record)
        (requests, duration, ttft, overhead, tokens_in, tokens_cached, tokens_out, cost, genai_in, genai_out,
         genai_duration) = children
        requests.inc()
        duration.observe(record.duration_ms / 1000)
        overhead.observe(record.overhead_ms / 1000)
        if record.time_to_first_token_ms is not None:
            ttft.observe(record.time_to_first_token_ms / 1000)
        usage = record.usage
        if usage is not None:
            tokens_in.inc(usage.prompt_tokens)
            tokens_out.inc(usage.completion_tokens)
            if usage.cached_tokens:
                tokens_cached.inc(usage.cached_tokens)
        if genai_duration is not None:  # the request reached an upstream: a GenAI client operation
            genai_duration.observe(record.duration_ms / 1000)
            if usage is not None:
                genai_in.observe(usage.prompt_tokens)
                genai_out.observe(usage.completion_tokens)
        if record.cost_usd:
            cost.inc(record.cost_usd)
        if record.stream:
            self.stream_outcomes.labels(record.team, record.public_model, record.outcome).inc()
        if record.cache is not None:
            self._cached(record)

    def _cached(self, record: UsageRecord) -> None:
        key = (record.team, record.public_model, record.cache or "")
        children = self._cache_children.get(key)
        if children is None:
            children = self._cache_children[key] = (self.cache_requests.labels(*key),
                                                    self.cache_tokens.labels(*key[:2]),
                                                    self.cache_saved.labels(*key[:2]))
        requests, tokens, saved = children
        requests.inc()
        if record.cache_tokens:
            tokens.inc(record.cache_tokens)
        if record.cost_saved_usd:
            saved.inc(record.cost_saved_usd)

    def watch_routes(self, routes: RouteState) -> None:
        """Expose every target's circuit-breaker state, read from `routes` at scrape time."""
        self.registry.register(_BreakerCollector(routes))

    def upstream_error(self, provider: str, error_type: str) -> None:
        """One failed upstream attempt."""
        self.upstream_errors.labels(provider, error_type).inc()

    def rejected(self, team: str, scope: str, reason: str) -> None:
        """Admission refused a request: `scope` is team/key/model, `reason` e.g. rate_limit or budget."""
        self.rejections.labels(team, scope, reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (blocking: call it in a thread)."""
        return generate_latest(self.registry)

    def _new_children(self, key: tuple[str, ...], record: UsageRecord) -> tuple[Any, ...]:
        team, model, provider, status, upstream_model, endpoint = key
        genai = (_OPERATION.get(endpoint, endpoint), provider, upstream_model or model)
        # Requests that reached no upstream are not GenAI client operations.
        genai_duration = (self.genai_duration.labels(*genai, "" if int(status) < 400 else status)
                          if upstream_model else None)
        return (
            self.requests.labels(*key[:4]), self.duration.labels(*key[:4]), self.ttft.labels(team, model, provider),
            self.overhead.labels(team, model), self.tokens.labels(team, model, provider, "input"),
            self.tokens.labels(team, model, provider, "cached_input"),
            self.tokens.labels(team, model, provider, "output"), self.cost.labels(team, model, provider),
            self.genai_tokens.labels(*genai, "input"), self.genai_tokens.labels(*genai, "output"), genai_duration,
        )


class _BreakerCollector(Collector):
    """switchboard_circuit_breaker_state per target (0 closed, 1 half-open, 2 open), read when scraped.

    Runs in the scrape's worker thread: it only reads the routing state (a
    list copy of the targets, then each breaker's state), never changes it.
    """

    def __init__(self, routes: RouteState) -> None:
        self._routes = routes

    def collect(self) -> Iterator[Metric]:
        routes = self._routes
        now = routes.clock()
        states = GaugeMetricFamily("switchboard_circuit_breaker_state", "Circuit breaker of each target: 0 closed, "
                                   "1 half-open, 2 open.", labels=("provider", "model", "base_url"))
        healthy = GaugeMetricFamily("switchboard_target_healthy", "1 when the target passes its active health "
                                    "checks (or has none), 0 when they fail.", labels=("provider", "model", "base_url"))
        trips = GaugeMetricFamily("switchboard_circuit_breaker_trips", "Trips of each target's breaker since it "
                                  "last recovered.", labels=("provider", "model", "base_url"))
        for state in routes.states():
            provider, base_url, model = state.key
            labels = (provider, model, base_url)
            states.add_metric(labels, _BREAKER_VALUE[state.breaker.state(now).value])
            healthy.add_metric(labels, 1.0 if state.healthy else 0.0)
            trips.add_metric(labels, float(state.breaker.trips))
        yield states
        yield healthy
        yield trips


class MetricsRoute:
    """GET /metrics: the Prometheus text format (unauthenticated, like most scrape targets; 404 when disabled)."""

    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        import asyncio

        metrics = self._metrics
        if metrics is None:
            status, body, content_type = 404, b'{"error":{"message":"Metrics are disabled.","type":' \
                b'"invalid_request_error","param":null,"code":"metrics_disabled"}}', "application/json"
        else:
            status, body, content_type = 200, await asyncio.to_thread(metrics.render), metrics.content_type
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
