"""Per-variant metrics of the models with experiments (gateway/experiments.py), for comparing them live.

Fed by `Metrics.record` with the settled records that carry a variant, so a
model without experiments pays one `is None` test. Labels are bounded: the
model is one the policy defines (the caller maps anything else to `other`),
the variant is control, canary or shadow, the status an HTTP status.
Shadow calls are counted here only: they are not requests any client made,
so the per-team request, token and cost series leave them out (their cost
is the team's shadow spend, gateway/shadow_traffic.py).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway.usage import UsageRecord

_LABELS = ("model", "variant")
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class VariantMetrics:
    """Requests, errors, latency, TTFT, tokens and cost per (model, variant); shadow calls dropped per model."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("switchboard_variant_requests", "Requests to models with experiments, by "
                                "variant (control, canary, shadow) and HTTP status.", (*_LABELS, "status"),
                                registry=registry)
        self.errors = Counter("switchboard_variant_errors", "Requests of a variant that failed (status >= 400 "
                              "or a stream that did not complete).", _LABELS, registry=registry)
        self.duration = Histogram("switchboard_variant_request_duration_seconds", "Time from request to last "
                                  "byte, by variant.", _LABELS, buckets=_LATENCY_BUCKETS, registry=registry)
        self.ttft = Histogram("switchboard_variant_time_to_first_token_seconds", "Streams: time to the first "
                              "content chunk, by variant.", _LABELS, buckets=_LATENCY_BUCKETS, registry=registry)
        self.tokens = Counter("switchboard_variant_tokens", "Tokens by variant and type (input, output).",
                              (*_LABELS, "type"), registry=registry)
        self.cost = Counter("switchboard_variant_cost_usd", "Cost in USD by variant (shadow: the teams' shadow "
                            "spend).", _LABELS, registry=registry)
        self.shadow_dropped = Counter("switchboard_shadow_dropped", "Requests sampled for shadow traffic but not "
                                      "mirrored: the model's shadow calls were at max_concurrent.", ("model",),
                                      registry=registry)

    def record(self, record: UsageRecord, model: str) -> None:
        variant = record.variant
        assert variant is not None
        labels = (model, variant)
        self.requests.labels(model, variant, str(record.status)).inc()
        if record.status >= 400 or record.outcome != "completed":
            self.errors.labels(*labels).inc()
        self.duration.labels(*labels).observe(record.duration_ms / 1000)
        if record.time_to_first_token_ms is not None:
            self.ttft.labels(*labels).observe(record.time_to_first_token_ms / 1000)
        usage = record.usage
        if usage is not None:
            self.tokens.labels(model, variant, "input").inc(usage.prompt_tokens)
            self.tokens.labels(model, variant, "output").inc(usage.completion_tokens)
        if record.cost_usd:
            self.cost.labels(*labels).inc(record.cost_usd)

    def dropped(self, model: str) -> None:
        self.shadow_dropped.labels(model).inc()
