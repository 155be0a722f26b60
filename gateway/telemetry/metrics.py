"""Prometheus metrics, served at GET /metrics.

Almost everything is updated in one place: `Metrics.record`, the usage sink
that sees every settled request. The few facts a usage record cannot carry
have explicit hooks: `upstream_error` (per failed upstream attempt, called by
the trace handle around each upstream call), `rejected` (for admission: rate
limits and budgets), `unauthenticated` (keys refused, by reason) and the
in-flight count.

Label values come only from the policy (its teams, models, providers and
targets) or from small closed vocabularies (statuses, outcomes): a model name
a client invents is counted as `other`, so no client can grow the registry.
Token and cost series exist only for requests that used tokens. Label children are cached per
label combination, so a request costs a dict lookup and a handful of
increments. Circuit-breaker state is not updated per request at all: a
collector reads it from the routing state when Prometheus scrapes.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from gateway.telemetry.experiments_metrics import VariantMetrics
from gateway.telemetry.histograms import LATENCY_BUCKETS, Histogram, cumulative_buckets

if TYPE_CHECKING:
    from gateway.accounting.ledger import Ledger
    from gateway.accounting.usage import AccessLogSink, UsageRecord
    from gateway.compiled.policy import Policy
    from gateway.routing.strategies import RouteState

# The one label value for anything a client named that the policy does not know.
OTHER = "other"
# Outcomes and error codes are the gateway's or an upstream's words; anything else, or more distinct
# values than a dashboard could use, is `other`.
_WORD = re.compile(r"^[a-z0-9_.\-]{1,48}$")
_MAX_OUTCOMES = 64

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

    def __init__(self, policy: Callable[[], Policy], registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or CollectorRegistry(auto_describe=False)
        self._policy = policy
        self._outcomes: set[str] = set()
        self.upstream_errors = Counter("switchboard_upstream_errors", "Failed upstream attempts (retried ones "
                                       "included), by provider and type (HTTP status or failure kind).",
                                       ("provider", "type"), registry=registry)
        self.rejections = Counter("switchboard_rejections", "Requests refused by admission (rate limits, "
                                  "budgets), by team, scope and reason.", ("team", "scope", "reason"),
                                  registry=registry)
        # Per-request series are plain numbers aggregated here and turned into metric families only when
        # scraped: prometheus_client's labelled children (a lock and a method call per update) cost ~10 µs
        # of event-loop CPU per request; this costs ~2.
        self._series: dict[tuple[str, ...], _Series] = {}
        self._stream_outcomes: dict[tuple[str, str, str], int] = {}
        # (team, tag key, tag value) -> [requests, input tokens, output tokens, cost]: values are allow-listed.
        self._tagged: dict[tuple[str, str, str], list[float]] = {}
        self.variants = VariantMetrics()  # models with experiments (gateway/telemetry/experiments_metrics.py)
        registry.register(self.variants)
        registry.register(_UsageCollector(self))
        self.cache_requests = Counter("switchboard_cache_requests", "Requests to models with caching on, by "
                                      "result: hit, miss or bypass.", ("team", "model", "result"), registry=registry)
        self.cache_tokens = Counter("switchboard_cache_tokens", "Tokens served from the response cache (what the "
                                    "hits would have used).", ("team", "model"), registry=registry)
        self.cache_saved = Counter("switchboard_cache_cost_saved_usd", "What cache hits would have cost in USD, "
                                   "at the price of the model's first target.", ("team", "model"), registry=registry)
        self._cache_children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        self._started = 0
        self._finished = 0
        self.auth_rejections = Counter("switchboard_auth_rejections", "Requests refused before their body was "
                                       "read because the key was missing, unknown or disabled, by reason.",
                                       ("reason",), registry=registry)
        in_flight = Gauge("switchboard_requests_in_flight", "Inference requests being served.", registry=registry)
        in_flight.set_function(lambda: max(0, self._started - self._finished))

    def started(self) -> None:
        """An inference request began (paired with its usage record, or `finished_unsettled`)."""
        self._started += 1

    def finished_unsettled(self) -> None:
        """A request ended without a usage record (e.g. refused before authentication)."""
        self._finished += 1

    def model_label(self, name: str) -> str:
        """`name` when the live policy defines that public model, else `other`."""
        return name if name in self._policy().models else OTHER

    def outcome_label(self, outcome: str) -> str:
        """A bounded vocabulary of outcomes: the first `_MAX_OUTCOMES` well-formed words seen, then `other`."""
        if outcome in self._outcomes:
            return outcome
        if _WORD.match(outcome) is None or len(self._outcomes) >= _MAX_OUTCOMES:
            return OTHER
        self._outcomes.add(outcome)
        return outcome

    def unauthenticated(self, reason: str) -> None:
        """A request refused for its key (never labelled by the key itself)."""
        self.auth_rejections.labels(self.outcome_label(reason)).inc()

    def record(self, record: UsageRecord) -> None:
        """The usage sink: everything about a settled request, in one place."""
        self._finished += 1
        # `model_label` and `Histogram.observe` written out in place: this runs for every request, and each Python
        # call costs about as much as the work it does (one bisect and two additions per observation).
        model = record.public_model
        if model not in self._policy().models:
            model = OTHER
        if record.variant is not None:
            self.variants.record(record, model)
            if record.variant == "shadow":  # a mirrored call, not a client's request: its own series only
                return
        # team, provider and upstream model come from the policy the request was served on. The status is kept as
        # the int it is and made a label's text when scraped (`str()` per request cost more than the lookup).
        key = (record.team, model, record.provider or "none", record.status, record.upstream_model or "",
               record.endpoint)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series()
        series.requests += 1
        value = record.duration_ms / 1000
        histogram = series.duration
        histogram.counts[bisect_left(LATENCY_BUCKETS, value)] += 1
        histogram.total += value
        value = record.overhead_ms / 1000
        histogram = series.overhead
        histogram.counts[bisect_left(_OVERHEAD_BUCKETS, value)] += 1
        histogram.total += value
        if record.time_to_first_token_ms is not None:
            value = record.time_to_first_token_ms / 1000
            histogram = series.ttft
            histogram.counts[bisect_left(LATENCY_BUCKETS, value)] += 1
            histogram.total += value
        usage = record.usage
        if usage is not None:
            series.billed = True
            tokens = usage.prompt_tokens
            series.input_tokens += tokens
            histogram = series.genai_input
            histogram.counts[bisect_left(_GENAI_TOKEN_BUCKETS, tokens)] += 1
            histogram.total += tokens
            tokens = usage.completion_tokens
            series.output_tokens += tokens
            histogram = series.genai_output
            histogram.counts[bisect_left(_GENAI_TOKEN_BUCKETS, tokens)] += 1
            histogram.total += tokens
            series.cached_tokens += usage.cached_tokens
        if record.cost_usd:
            series.cost_usd += record.cost_usd
        if record.stream:
            outcome = (record.team, model, self.outcome_label(record.outcome))
            self._stream_outcomes[outcome] = self._stream_outcomes.get(outcome, 0) + 1
        if record.cache is not None:
            self._cached(record, model)
        if record.tags:
            self._count_tags(record)

    def _count_tags(self, record: UsageRecord) -> None:
        usage = record.usage
        for key, value in record.tags:
            counts = self._tagged.get((record.team, key, value))
            if counts is None:
                counts = self._tagged[(record.team, key, value)] = [0, 0, 0, 0.0]
            counts[0] += 1
            if usage is not None:
                counts[1] += usage.prompt_tokens
                counts[2] += usage.completion_tokens
            if record.cost_usd:
                counts[3] += record.cost_usd

    def _cached(self, record: UsageRecord, model: str) -> None:
        key = (record.team, model, record.cache or "")
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

    def watch_writers(self, ledger: Ledger | None, access_logs: Sequence[AccessLogSink],
                      dropped_spans: Callable[[], int] = lambda: 0) -> None:
        """Expose the background writers' backlog and losses, read from them at scrape time."""
        self.registry.register(_WriterCollector(ledger, tuple(access_logs), dropped_spans))

    def upstream_error(self, provider: str, error_type: str) -> None:
        """One failed upstream attempt."""
        self.upstream_errors.labels(provider, error_type).inc()

    def rejected(self, team: str, scope: str, reason: str) -> None:
        """Admission refused a request: `scope` is team/key/model, `reason` e.g. rate_limit or budget."""
        self.rejections.labels(team, scope, reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (blocking: call it in a thread)."""
        return generate_latest(self.registry)


class _Series:
    """Everything counted for one (team, model, provider, status, upstream model, endpoint).

    Each histogram's bounds are the module's constants `Metrics.record` bisects with: change them together.
    """

    __slots__ = ("billed", "cached_tokens", "cost_usd", "duration", "genai_input", "genai_output", "input_tokens",
                 "output_tokens", "overhead", "requests", "ttft")

    def __init__(self) -> None:
        self.requests = 0
        self.billed = False  # some request of this series reported usage: only then has it token/cost series
        self.input_tokens = self.cached_tokens = self.output_tokens = 0
        self.cost_usd = 0.0
        self.duration = Histogram(LATENCY_BUCKETS)
        self.overhead = Histogram(_OVERHEAD_BUCKETS)
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.genai_input = Histogram(_GENAI_TOKEN_BUCKETS)
        self.genai_output = Histogram(_GENAI_TOKEN_BUCKETS)


class _UsageCollector(Collector):
    """Turns the aggregated series into metric families at scrape time (in the scrape's worker thread).

    `list(dict.items())` copies under the GIL, so the event loop may go on
    adding series while a scrape reads a snapshot of them.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        series = list(self._metrics._series.items())
        requests = CounterMetricFamily("switchboard_requests", "Requests settled, by team, public model, provider "
                                       "and HTTP status.", labels=_REQUEST_LABELS)
        tokens = CounterMetricFamily("switchboard_tokens", "Tokens by type: input (cached included), cached_input, "
                                     "output.", labels=(*_MODEL_LABELS, "type"))
        cost = CounterMetricFamily("switchboard_cost_usd", "Cost of the usage in USD, by the price table.",
                                   labels=_MODEL_LABELS)
        counts: dict[tuple[str, ...], float] = {}
        token_counts: dict[tuple[str, ...], float] = {}
        costs: dict[tuple[str, ...], float] = {}
        duration: dict[tuple[str, ...], list[Histogram]] = {}
        ttft: dict[tuple[str, ...], list[Histogram]] = {}
        overhead: dict[tuple[str, ...], list[Histogram]] = {}
        genai_tokens: dict[tuple[str, ...], list[Histogram]] = {}
        genai_duration: dict[tuple[str, ...], list[Histogram]] = {}
        for (team, model, provider, status, upstream_model, endpoint), one in series:
            status_label = str(status)
            request_labels, model_labels = (team, model, provider, status_label), (team, model, provider)
            counts[request_labels] = counts.get(request_labels, 0) + one.requests
            duration.setdefault(request_labels, []).append(one.duration)
            overhead.setdefault((team, model), []).append(one.overhead)
            genai = (_OPERATION.get(endpoint, endpoint), provider, upstream_model)
            if upstream_model:  # requests that reached no upstream are not GenAI client operations
                genai_duration.setdefault((*genai, "" if status < 400 else status_label), []).append(
                    one.duration)
            if not one.billed:  # a failed request creates no zero-valued token, cost or token-usage series
                continue
            for kind, value in (("input", one.input_tokens), ("cached_input", one.cached_tokens),
                                ("output", one.output_tokens)):
                token_counts[(*model_labels, kind)] = token_counts.get((*model_labels, kind), 0) + value
            costs[model_labels] = costs.get(model_labels, 0.0) + one.cost_usd
            if one.ttft.total or any(one.ttft.counts):
                ttft.setdefault(model_labels, []).append(one.ttft)
            if upstream_model:
                genai_tokens.setdefault((*genai, "input"), []).append(one.genai_input)
                genai_tokens.setdefault((*genai, "output"), []).append(one.genai_output)
        for labels, value in counts.items():
            requests.add_metric(labels, value)
        for labels, value in token_counts.items():
            tokens.add_metric(labels, value)
        for labels, value in costs.items():
            cost.add_metric(labels, value)
        yield requests
        yield tokens
        yield cost
        yield _histogram_family("switchboard_request_duration_seconds", "Time from request to last byte.",
                                _REQUEST_LABELS, duration)
        yield _histogram_family("switchboard_time_to_first_token_seconds", "Streams: time to the first content "
                                "chunk.", _MODEL_LABELS, ttft)
        yield _histogram_family("switchboard_overhead_seconds", "Time spent in the gateway itself (not waiting on "
                                "upstreams).", ("team", "model"), overhead)
        yield _histogram_family("gen_ai_client_token_usage", "GenAI semconv: billable tokens per request "
                                "(gen_ai.client.token.usage).", (*_GENAI_LABELS, "gen_ai_token_type"), genai_tokens)
        yield _histogram_family("gen_ai_client_operation_duration_seconds", "GenAI semconv: operation duration "
                                "(gen_ai.client.operation.duration).", (*_GENAI_LABELS, "error_type"),
                                genai_duration)
        outcomes = CounterMetricFamily("switchboard_stream_outcomes", "How streams ended (completed, "
                                       "client_disconnected, upstream_error).", labels=("team", "model", "outcome"))
        for labels, value in list(self._metrics._stream_outcomes.items()):
            outcomes.add_metric(labels, value)
        yield outcomes
        yield from _tag_families(list(self._metrics._tagged.items()))


def _tag_families(tagged: list[tuple[tuple[str, str, str], list[float]]]) -> Iterator[Metric]:
    """Requests, tokens and cost by cost attribution tag (gateway/accounting/tags.py); a request counts once per tag."""
    labels = ("team", "tag", "value")
    requests = CounterMetricFamily("switchboard_tag_requests", "Requests settled, by team and allow-listed "
                                   "request tag (unlisted values count as `other`).", labels=labels)
    tokens = CounterMetricFamily("switchboard_tag_tokens", "Tokens by team, request tag and type (input, output).",
                                 labels=(*labels, "type"))
    cost = CounterMetricFamily("switchboard_tag_cost_usd", "Cost in USD by team and request tag.", labels=labels)
    for key, (count, input_tokens, output_tokens, usd) in tagged:
        requests.add_metric(key, count)
        tokens.add_metric((*key, "input"), input_tokens)
        tokens.add_metric((*key, "output"), output_tokens)
        cost.add_metric(key, usd)
    yield requests
    yield tokens
    yield cost


def _histogram_family(name: str, documentation: str, labels: tuple[str, ...],
                      groups: dict[tuple[str, ...], list[Histogram]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for label_values, histograms in groups.items():
        bounds = histograms[0].bounds
        counts, totals = [0] * (len(bounds) + 1), [0.0]
        for histogram in histograms:
            histogram.merge_into(counts, totals)
        family.add_metric(label_values, cumulative_buckets(bounds, counts), totals[0])
    return family


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


# --- background writers (issue 13: nothing lost silently) -----------------------------------------


class _WriterCollector(Collector):
    """Rows the ledger has not stored yet and has lost; access-log lines waiting and dropped; spans dropped.

    Read from the writers' own counters when scraped (plain ints, read under the GIL), so writing costs
    nothing extra. `switchboard_ledger_rows_lost_total` should stay 0: a row is only lost when the spill
    file beside the ledger is full or cannot be written.
    """

    def __init__(self, ledger: Ledger | None, access_logs: tuple[AccessLogSink, ...],
                 dropped_spans: Callable[[], int]) -> None:
        self._ledger = ledger
        self._access_logs = access_logs
        self._dropped_spans = dropped_spans

    def collect(self) -> Iterator[Metric]:
        if self._ledger is not None:
            yield GaugeMetricFamily("switchboard_ledger_rows_waiting", "Settled requests not yet stored in the "
                                    "usage ledger (queued, being written, or spilled while SQLite refused them).",
                                    value=self._ledger.waiting)
            yield CounterMetricFamily("switchboard_ledger_rows_lost", "Usage ledger rows neither SQLite nor the "
                                      "spill file could take (should stay 0).", value=self._ledger.lost)
        if self._access_logs:
            yield GaugeMetricFamily("switchboard_access_log_lines_waiting", "Access-log lines not yet written.",
                                    value=sum(sink.waiting for sink in self._access_logs))
            yield CounterMetricFamily("switchboard_access_log_lines_dropped", "Access-log lines dropped: the "
                                      "stream failed (e.g. a closed pipe) or too many lines waited.",
                                      value=sum(sink.dropped for sink in self._access_logs))
        yield CounterMetricFamily("switchboard_trace_spans_dropped", "Spans the trace exporter dropped: its queue "
                                  "was full (a slow collector) or their batch's export failed.",
                                  value=self._dropped_spans())
