"""Per-variant metrics of the models with experiments (gateway/routing/experiments.py), for comparing them live.

Fed by `Metrics.record` with the settled records that carry a variant, so a
model without experiments pays one `is None` test. Labels are bounded: the
model is one the policy defines (the caller maps anything else to `other`),
the variant is control, canary or shadow, the status an HTTP status.
Shadow calls are counted here only: they are not requests any client made,
so the per-team request, token and cost series leave them out (their cost
is the team's shadow spend, gateway/shadow_traffic.py).

As in gateway/telemetry/metrics.py, each request only adds to plain numbers
(prometheus_client's labelled children cost 12.6 µs per experiment request
here, this 0.5); the families are built when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.telemetry.histograms import LATENCY_BUCKETS, Histogram, cumulative_buckets

if TYPE_CHECKING:
    from gateway.accounting.usage import UsageRecord


_LABELS = ("model", "variant")


class _Variant:
    """Everything counted for one (model, variant)."""

    __slots__ = ("cost_usd", "duration", "errors", "input_tokens", "output_tokens", "statuses", "ttft")

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self.duration = Histogram(LATENCY_BUCKETS)
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.input_tokens = self.output_tokens = 0
        self.cost_usd = 0.0


class VariantMetrics(Collector):
    """Requests, errors, latency, TTFT, tokens and cost per (model, variant); shadow calls dropped per model."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], _Variant] = {}
        self._dropped: dict[str, int] = {}

    def record(self, record: UsageRecord, model: str) -> None:
        variant = record.variant
        assert variant is not None
        series = self._series.get((model, variant))
        if series is None:
            series = self._series[(model, variant)] = _Variant()
        series.statuses[record.status] = series.statuses.get(record.status, 0) + 1
        if record.status >= 400 or record.outcome != "completed":
            series.errors += 1
        series.duration.observe(record.duration_ms / 1000)
        if record.time_to_first_token_ms is not None:
            series.ttft.observe(record.time_to_first_token_ms / 1000)
        usage = record.usage
        if usage is not None:
            series.input_tokens += usage.prompt_tokens
            series.output_tokens += usage.completion_tokens
        if record.cost_usd:
            series.cost_usd += record.cost_usd

    def dropped(self, model: str) -> None:
        """A request sampled for shadow traffic that was not mirrored: the model's shadow calls were at the bound."""
        self._dropped[model] = self._dropped.get(model, 0) + 1

    def collect(self) -> Iterator[Metric]:
        series = list(self._series.items())  # a copy under the GIL: the loop may add series meanwhile
        requests = CounterMetricFamily("switchboard_variant_requests", "Requests to models with experiments, by "
                                       "variant (control, canary, shadow) and HTTP status.",
                                       labels=(*_LABELS, "status"))
        errors = CounterMetricFamily("switchboard_variant_errors", "Requests of a variant that failed (status >= "
                                     "400 or an answer that did not complete).", labels=_LABELS)
        duration = HistogramMetricFamily("switchboard_variant_request_duration_seconds", "Time from request to "
                                         "last byte, by variant.", labels=_LABELS)
        ttft = HistogramMetricFamily("switchboard_variant_time_to_first_token_seconds", "Streams: time to the "
                                     "first content chunk, by variant.", labels=_LABELS)
        tokens = CounterMetricFamily("switchboard_variant_tokens", "Tokens by variant and type (input, output).",
                                     labels=(*_LABELS, "type"))
        cost = CounterMetricFamily("switchboard_variant_cost_usd", "Cost in USD by variant (shadow: the teams' "
                                   "shadow spend).", labels=_LABELS)
        for labels, one in series:
            for status, count in list(one.statuses.items()):
                requests.add_metric((*labels, str(status)), count)
            errors.add_metric(labels, one.errors)
            duration.add_metric(labels, cumulative_buckets(LATENCY_BUCKETS, one.duration.counts), one.duration.total)
            if one.ttft.total or any(one.ttft.counts):
                ttft.add_metric(labels, cumulative_buckets(LATENCY_BUCKETS, one.ttft.counts), one.ttft.total)
            tokens.add_metric((*labels, "input"), one.input_tokens)
            tokens.add_metric((*labels, "output"), one.output_tokens)
            cost.add_metric(labels, one.cost_usd)
        dropped = CounterMetricFamily("switchboard_shadow_dropped", "Requests sampled for shadow traffic but not "
                                      "mirrored: the model's shadow calls were at max_concurrent.", labels=("model",))
        for model, count in list(self._dropped.items()):
            dropped.add_metric((model,), count)
        yield from (requests, errors, duration, ttft, tokens, cost, dropped)
