"""OpenTelemetry traces: a SERVER span per gateway request, a CLIENT span per upstream attempt.

Spans follow the OpenTelemetry GenAI semantic conventions (`gen_ai.*`), plus a
`switchboard.*` namespace for what only the gateway knows (team, key id,
public model, route, cost; policies/README.md lists every attribute). They are
exported in batches on a thread of their own, so a slow or dead collector costs
dropped spans and one log line, never request latency.

How the pipeline uses it (the whole surface)::

    exchange.trace = services.telemetry.start(endpoint, headers, exchange)  # the request begins
    response = await exchange.trace.send(client, request, target, call)     # one upstream attempt + traceparent
    if exchange.trace.recording:                                            # an event on the SERVER span
        exchange.trace.decision("switchboard.route", route_event(...))
    exchange.trace.attempt_failed("timeout", provider)                      # an attempt failed after it began
    exchange.trace.finish(record)                                           # attributes from the usage record

The pieces, one job each: request_trace (the per-request handle the pipeline
calls), attributes (span attributes from the request's facts), content (opt-in
prompt/completion content and its redaction), decisions (the decision events'
attributes), export (exporters and the policy's cross-checks), otlp (OTLP/HTTP),
span_batches (the OTLP/HTTP path's queue and export thread).

When tracing is off `start` returns `NO_TRACE`, a shared object whose methods
do nothing, so the request path allocates nothing for tracing. Callers that
would build costly event attributes can check `exchange.trace.recording`.

Why spans are not built with the SDK's `Tracer`: a request's facts are only
known when it settles, and the SDK's live `Span` objects (attribute cleaning
and locking per attribute, a sampler call per span) cost about twice as much
CPU as building each span's attributes once. A finished trace is plain data:
on the OTLP/HTTP path (the one production runs) it is encoded from its rows
(`RequestTrace.rows`) at the end of the loop turn it ends in, and queued as bytes (`_otlp_spans`), so no span
object is built at all; every other exporter (console, OTLP/gRPC, a test's
in-memory exporter) gets the SDK's `ReadableSpan`s made of the same rows,
through the SDK's span processors (`SdkSpans`).

Sampling: `sample_ratio` of new traces (by trace id, like the SDK's
TraceIdRatioBased) or the incoming `traceparent`'s sampled flag. A trace with
a failed upstream attempt or a 5xx is exported regardless; unsampled healthy
traces cost a few ids and timestamps.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult

from gateway.policy.schema import TracesPolicy
from gateway.telemetry.attributes import GENAI_PROVIDER, attempt_kind_attributes
from gateway.telemetry.content import redact_content
from gateway.telemetry.export import LoggedExporter, build_exporter
from gateway.telemetry.otlp import OtlpHttpExporter, SpanEncoder
from gateway.telemetry.request_trace import NO_TRACE, SCOPE_NAME, NoTrace, RequestTrace, Untraced
from gateway.telemetry.span_batches import SpanBatches

if TYPE_CHECKING:
    from gateway.accounting.usage import UsageRecord
    from gateway.compiled.policy import Policy, Provider
    from gateway.telemetry.metrics import Metrics

log = logging.getLogger("switchboard.telemetry")

_ATTEMPT_BASES = 4096  # distinct attempt targets kept (operation x provider x upstream model x stream)


class SdkSpans:
    """Finished traces as the SDK's `ReadableSpan`s, handed to a span processor (console, OTLP/gRPC, tests)."""

    def __init__(self, processor: SpanProcessor) -> None:
        self.processor = processor

    def add(self, trace: RequestTrace) -> None:
        for span in trace.spans():
            self.processor.on_end(span)

    @property
    def dropped_spans(self) -> int:
        return 0  # the SDK's processor drops without counting (it logs)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.processor.force_flush(timeout_millis)

    def shutdown(self) -> None:
        self.processor.shutdown()


class EncodedTrace:
    """A finished trace as its spans' OTLP bytes (`SpanEncoder.framed_spans`): what the export queue holds."""

    __slots__ = ("data", "span_count")

    def __init__(self, span_count: int, data: bytes) -> None:
        self.span_count = span_count
        self.data = data


class Tracing:
    """What traced requests need from one telemetry configuration: sampling, where spans go, content rules."""

    def __init__(self, settings: TracesPolicy, resource: Resource, sink: SpanBatches | SdkSpans,
                 redactor: Callable[[str], str] | None) -> None:
        self.settings = settings
        self.resource = resource
        self.sink = sink  # where finished traces go: `SpanBatches` for OTLP/HTTP, else `SdkSpans`
        # Like the SDK's TraceIdRatioBased: keep a trace when its low 64 bits fall under the bound.
        self._bound = round(settings.sample_ratio * (1 << 64))
        self._content_all = "*" in settings.record_content
        self._content_teams = frozenset(settings.record_content)
        self.redactor = redactor if settings.redact_content else None
        # An attempt's attributes that follow from its target alone, by (operation, provider, upstream model,
        # stream). Bounded: on pass-through routes the upstream model is the client's text.
        # Keyed by the provider's identity (a reload makes new ones; hashing one would hash its settings), which
        # the entry keeps alive and checks, so a recycled id never matches.
        self._attempt_bases: dict[tuple[str, int, str, bool], tuple[Provider, dict[str, Any]]] = {}

    def samples(self, trace_id: int) -> bool:
        return trace_id & 0xFFFFFFFFFFFFFFFF < self._bound

    def keeps(self, record: UsageRecord | None) -> str | None:
        """Why an unsampled, healthy trace is kept anyway (tail sampling): "slow", "expensive", or None."""
        if record is None:
            return None
        slow, costly = self.settings.keep_slower_than_ms, self.settings.keep_costlier_than_usd
        if slow is not None and record.duration_ms >= slow:
            return "slow"
        if costly is not None and record.cost_usd is not None and record.cost_usd >= costly:
            return "expensive"
        return None

    def records_content(self, team: str) -> bool:
        return self._content_all or team in self._content_teams

    def attempt_base(self, operation: str, provider: Provider, upstream_model: str, stream: bool) -> dict[str, Any]:
        """The attributes an attempt's CLIENT span takes from its target (copy before adding to them)."""
        key = (operation, id(provider), upstream_model, stream)
        cached = self._attempt_bases.get(key)
        if cached is not None and cached[0] is provider:
            return cached[1]
        settings = provider.settings
        parts = urlsplit(settings.base_url)
        base = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": GENAI_PROVIDER.get(settings.kind, settings.kind),
            "gen_ai.request.model": upstream_model,
            "server.address": parts.hostname or settings.base_url,
            "switchboard.provider": provider.name,
            **attempt_kind_attributes(self.settings, upstream_model, provider.name),
        }
        if parts.port is not None:
            base["server.port"] = parts.port
        if stream:
            base["gen_ai.request.stream"] = True
        if len(self._attempt_bases) >= _ATTEMPT_BASES:
            self._attempt_bases.clear()
        self._attempt_bases[key] = (provider, base)
        return base

    def export(self, trace: RequestTrace) -> None:
        self.sink.add(trace)


class Telemetry:
    """The app's tracing, (re)built from the policy's `telemetry.traces` section, and its metrics hooks.

    `span_exporter` (tests) replaces the policy's exporter, is called synchronously
    as each request finishes, and turns tracing on even when the policy says `none`.
    """

    def __init__(self, *, span_exporter: SpanExporter | None = None,
                 redactor: Callable[[str], str] = redact_content, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self._untraced: NoTrace = NO_TRACE if metrics is None else Untraced(metrics)
        self._span_exporter = span_exporter
        self._redactor = redactor
        self._tracing: Tracing | None = None
        self._configured: TracesPolicy | None = None
        self._dropped_before = 0  # spans dropped by the exporters of earlier configurations

    @property
    def enabled(self) -> bool:
        return self._tracing is not None

    @property
    def dropped_spans(self) -> int:
        """Spans dropped since the start: the export queue was full (a slow or dead collector) or an export failed."""
        tracing = self._tracing
        return self._dropped_before + (tracing.sink.dropped_spans if tracing is not None else 0)

    def configure(self, policy: Policy) -> None:
        """Apply the policy's settings; a change replaces the exporter (the old one drains in the background)."""
        settings = policy.telemetry.traces
        if self._configured is not None and settings == self._configured:
            return
        previous = self._tracing
        self._configured = settings
        self._tracing = self._build(settings)
        if previous is not None:
            # What the old exporter drops while it drains, after this, is not counted: it exports what it holds.
            self._dropped_before += previous.sink.dropped_spans
        # An injected exporter outlives the configurations that use it: shutting the old processor down would stop it.
        if previous is not None and self._span_exporter is None:
            threading.Thread(target=previous.sink.shutdown, name="otel-shutdown", daemon=True).start()

    def start(self, endpoint: str, headers: Mapping[str, str], exchange: Any) -> RequestTrace | NoTrace:
        """The request's trace handle: a `RequestTrace` when tracing is on, else a no-op one."""
        metrics = self.metrics
        if metrics is not None:
            metrics.started()
        tracing = self._tracing
        if tracing is None:
            return self._untraced
        return RequestTrace(tracing, endpoint, headers, exchange, metrics)

    def force_flush(self, timeout_s: float = 5.0) -> bool:
        tracing = self._tracing
        return tracing.sink.force_flush(int(timeout_s * 1000)) if tracing is not None else True

    def shutdown(self) -> None:
        """Flush and stop the exporter (blocking; call it off the event loop)."""
        tracing, self._tracing = self._tracing, None
        if tracing is not None:
            tracing.sink.shutdown()

    def _build(self, settings: TracesPolicy) -> Tracing | None:
        if self._span_exporter is None and settings.exporter == "none":
            return None
        attributes = {"service.name": settings.service_name}
        if settings.project:
            attributes["openinference.project.name"] = settings.project  # Phoenix's project
        resource = Resource.create(attributes)
        batch = settings.batch
        sink: SpanBatches | SdkSpans
        if self._span_exporter is not None:
            sink = SdkSpans(SimpleSpanProcessor(self._span_exporter))
        elif settings.exporter == "otlp_http":
            sink = _otlp_spans(settings, resource)
        else:
            sink = SdkSpans(BatchSpanProcessor(
                LoggedExporter(build_exporter(settings), settings.exporter), max_queue_size=batch.max_queue_size,
                schedule_delay_millis=batch.schedule_delay_ms, max_export_batch_size=batch.max_export_batch_size,
                export_timeout_millis=batch.export_timeout_ms))
        log.info("tracing on: exporter %s, sample ratio %s", settings.exporter, settings.sample_ratio)
        return Tracing(settings, resource, sink, self._redactor)


def _otlp_spans(settings: TracesPolicy, resource: Resource) -> SpanBatches:
    """OTLP/HTTP: finished traces encoded on the event loop, those of a loop turn together at its end
    (gateway/telemetry/span_batches.py), queued as bytes for the export thread, which only joins a batch into one
    request and posts it.

    Why not encode on the export thread: a batch there (~18 µs a trace, ~5 ms for a full batch of 512 spans)
    takes the GIL from the loop every switch interval (gateway/http/heap.py) for as long, so every request in
    that window is served at half speed or less: at 500 requests a second, the gateway's tail latency
    (loadtests/README.md, round nine). On the loop the same work comes in slices of one loop turn's traces. A
    trace the queue has no room for is dropped (and counted) before it is encoded: a dead collector costs no
    encoding.
    """
    exporter = build_exporter(settings)
    assert isinstance(exporter, OtlpHttpExporter)
    logged = LoggedExporter(exporter, settings.exporter)
    attributes = dict(resource.attributes)  # read per batch: a plain dict, not the SDK's bounded mapping
    encoder = SpanEncoder()  # the loop's own: the exporter's, on the export thread, is another (memos are unlocked)

    def encoded(trace: RequestTrace) -> EncodedTrace:
        return EncodedTrace(trace.span_count, encoder.framed_spans(trace.rows()))

    def send(traces: Sequence[EncodedTrace]) -> bool:
        return logged.logged(exporter.export_encoded, [trace.data for trace in traces], attributes,
                             SCOPE_NAME) is SpanExportResult.SUCCESS

    batch = settings.batch
    return SpanBatches(send, max_queue=batch.max_queue_size, max_batch=batch.max_export_batch_size,
                       delay_s=batch.schedule_delay_ms / 1000, close_exporter=exporter.shutdown,
                       queued_as=encoded)  # type: ignore[arg-type]


"""What `Exchange.trace` holds: a live request trace, or a no-op one."""
