"""OpenTelemetry traces: a SERVER span per gateway request, a CLIENT span per upstream attempt.

Spans follow the OpenTelemetry GenAI semantic conventions (`gen_ai.*`), plus a
`switchboard.*` namespace for what only the gateway knows (team, key id,
public model, route, cost; policies/README.md lists every attribute). They go
to the SDK's batch span processor, which exports on its own thread, so a slow
or dead collector costs dropped spans and one log line, never request latency.

How the pipeline uses it (the whole surface)::

    exchange.trace = services.telemetry.start(endpoint, headers, exchange)  # the request begins
    response = await exchange.trace.send(client, request, target, call)     # one upstream attempt + traceparent
    if exchange.trace.recording:                                            # an event on the SERVER span
        exchange.trace.decision("switchboard.route", route_event(...))
    exchange.trace.attempt_failed("timeout", provider)                      # an attempt failed after it began
    exchange.trace.finish(record)                                           # attributes from the usage record

The pieces, one job each: telemetry_attributes (span attributes from the
request's facts), telemetry_content (opt-in prompt/completion content and its
redaction), telemetry_decisions (the decision events' attributes),
telemetry_export (exporters and the policy's cross-checks), otlp (OTLP/HTTP).

When tracing is off `start` returns `NO_TRACE`, a shared object whose methods
do nothing, so the request path allocates nothing for tracing. Callers that
would build costly event attributes can check `exchange.trace.recording`.

Why spans are not built with the SDK's `Tracer`: a request's facts are only
known when it settles, and the SDK's live `Span` objects (attribute cleaning
and locking per attribute, a sampler call per span) cost about twice as much
CPU as building each span's attributes once and handing the finished
`ReadableSpan`s to the processor. The same `ReadableSpan` type goes to every
exporter (OTLP, console, the in-memory exporter in tests).

Sampling: `sample_ratio` of new traces (by trace id, like the SDK's
TraceIdRatioBased) or the incoming `traceparent`'s sampled flag. A trace with
a failed upstream attempt or a 5xx is exported regardless; unsampled healthy
traces cost a few ids and timestamps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from gateway.policy.schema import TracesPolicy
from gateway.telemetry.attributes import (
    GENAI_PROVIDER,
    OPERATION,
    attempt_kind_attributes,
    attempt_usage_attributes,
    error_type_of,
    record_attributes,
    request_params,
)
from gateway.telemetry.content import content_attributes, output_of_body, output_of_chunks, redact_content
from gateway.telemetry.export import LoggedExporter, build_exporter, telemetry_problems
from providers.base import Call, StreamChunk, UpstreamRequest, Usage

if TYPE_CHECKING:
    from gateway.accounting.usage import UsageRecord
    from gateway.compiled.policy import Policy, Target
    from gateway.errors import GatewayError
    from gateway.telemetry.metrics import Metrics
    from gateway.upstream.pools import UpstreamClient, UpstreamResponse

log = logging.getLogger("switchboard.telemetry")

# Re-exported: the policy loader, the app and tests import them from here.
__all__ = ["NO_TRACE", "RequestTrace", "SpanExporter", "Telemetry", "Trace", "redact_content", "telemetry_problems"]

_ROUTE_HEADER = "x-switchboard-route"
_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"([^"]{1,128})"')
_TRACEPARENT = re.compile(r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^ \t]*)?[ \t]*$")
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SCOPE = InstrumentationScope("switchboard")
_ERROR = Status(StatusCode.ERROR)
_UNSET = Status(StatusCode.UNSET)


# --- the request-side handles -----------------------------------------------------------------


class _NoTrace:
    """Tracing off: every hook is a no-op and `send` is a plain `open`."""

    __slots__ = ()
    recording = False
    trace_id: str | None = None

    def send(self, client: UpstreamClient, request: UpstreamRequest, target: Target,
             call: Call) -> Awaitable[UpstreamResponse]:
        return client.open(request)

    def decision(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        pass

    def attempt_failed(self, error_type: str, provider: str | None = None) -> None:
        pass

    def side_call(self, usage: Usage | None, cost_usd: float | None) -> None:
        pass

    def responded(self, body: bytes, response_model: str | None, finish_reasons: Sequence[str]) -> None:
        pass

    def streamed(self, chunks: Sequence[StreamChunk]) -> None:
        pass

    def failed(self, error: GatewayError, *, settled: bool) -> None:
        pass

    def finish(self, record: UsageRecord | None) -> None:
        pass


NO_TRACE = _NoTrace()


class _Untraced(_NoTrace):
    """Tracing off, metrics on: counts failed upstream attempts and requests that end unsettled."""

    __slots__ = ("_metrics",)

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def send(self, client: UpstreamClient, request: UpstreamRequest, target: Target,  # type: ignore[override]
                   call: Call) -> UpstreamResponse:
        try:
            response = await client.open(request)
        except asyncio.CancelledError:
            raise  # a timeout (reported by `attempt_failed`) or the client going away: not an upstream error
        except BaseException as exc:
            self._metrics.upstream_error(target.provider.name, error_type_of(exc))
            raise
        if response.status >= 400:
            self._metrics.upstream_error(target.provider.name, str(response.status))
        return response

    def attempt_failed(self, error_type: str, provider: str | None = None) -> None:
        if provider is not None:
            self._metrics.upstream_error(provider, error_type)

    def failed(self, error: GatewayError, *, settled: bool) -> None:
        if not settled:
            self._metrics.finished_unsettled()


class _Attempt:
    """One upstream attempt: becomes a CLIENT span when the trace is exported."""

    __slots__ = ("attributes", "end_ns", "error_type", "span_id", "start_ns")

    def __init__(self, attributes: dict[str, Any]) -> None:
        self.attributes = attributes
        self.span_id = random.getrandbits(64) or 1
        self.start_ns = time.time_ns()
        self.end_ns = 0
        self.error_type: str | None = None


class RequestTrace:
    """One traced request: the facts for its SERVER span and the CLIENT span of each upstream attempt."""

    __slots__ = ("_attempts", "_body", "_chunks", "_error", "_events", "_exchange", "_finish_reasons",
                 "_finished", "_metrics", "_open_attempt", "_operation", "_params", "_parent", "_response_body",
                 "_response_model", "_sampled", "_span_id", "_start_ns", "_trace_int", "_tracing", "trace_id")
    recording = True

    def __init__(self, tracing: _Tracing, endpoint: str, headers: Mapping[str, str], exchange: Any,
                 metrics: Metrics | None = None) -> None:
        self._tracing = tracing
        self._exchange = exchange
        self._metrics = metrics
        self._operation = OPERATION.get(endpoint, endpoint)
        parent = _remote_parent(headers) if "traceparent" in headers else None
        self._parent = parent
        if parent is not None:
            self._trace_int, self._sampled = parent.trace_id, parent.trace_flags.sampled
        else:
            self._trace_int = random.getrandbits(128) or 1
            self._sampled = tracing.samples(self._trace_int)
        self.trace_id = f"{self._trace_int:032x}"
        self._span_id = random.getrandbits(64) or 1
        # The request started before the pipeline did (body read, middleware): back-date the span.
        self._start_ns = time.time_ns() - int((time.perf_counter() - exchange.started) * 1e9)
        self._attempts: list[_Attempt] = []
        self._open_attempt: _Attempt | None = None
        self._events: list[Event] | None = None
        self._params: dict[str, Any] | None = None
        self._body: Mapping[str, Any] | None = None
        self._response_body: bytes | None = None
        self._response_model: str | None = None
        self._finish_reasons: Sequence[str] = ()
        self._chunks: Sequence[StreamChunk] | None = None
        self._error: GatewayError | None = None
        self._finished = False

    async def send(self, client: UpstreamClient, request: UpstreamRequest, target: Target,
                   call: Call) -> UpstreamResponse:
        """Open the upstream call as one attempt, propagating the trace context to the upstream."""
        if self._open_attempt is not None:
            # The previous attempt got a response but failed afterwards (e.g. a stream that died
            # before its first token) and is being retried.
            self._close(self._open_attempt, "_OTHER")
        if self._params is None:
            self._body = call.body
            self._params = request_params(call.body)
        provider = target.provider
        host, port = self._tracing.server_address(provider.settings.base_url)
        attributes = {
            "gen_ai.operation.name": self._operation,
            "gen_ai.provider.name": GENAI_PROVIDER.get(provider.settings.kind, provider.settings.kind),
            "gen_ai.request.model": call.upstream_model,
            "server.address": host,
            "switchboard.provider": provider.name,
            "switchboard.attempt": len(self._attempts) + 1,
            **self._tracing.attempt_kinds(call.upstream_model, provider.name),
            **self._params,
        }
        if port is not None:
            attributes["server.port"] = port
        if call.stream:
            attributes["gen_ai.request.stream"] = True
        attempt = _Attempt(attributes)
        self._attempts.append(attempt)
        request.headers["traceparent"] = f"00-{self.trace_id}-{attempt.span_id:016x}-{'01' if self._sampled else '00'}"
        if self._parent is not None and self._parent.trace_state:
            request.headers["tracestate"] = self._parent.trace_state.to_header()
        try:
            response = await client.open(request)
        except BaseException as exc:
            error_type = error_type_of(exc)
            self._close(attempt, error_type)
            # A cancelled call is a timeout (relabelled by `attempt_failed`) or a client gone: not counted here.
            if self._metrics is not None and error_type != "cancelled":
                self._metrics.upstream_error(provider.name, error_type)
            raise
        if response.status >= 400:
            attributes["http.response.status_code"] = response.status
            self._close(attempt, str(response.status))
            if self._metrics is not None:
                self._metrics.upstream_error(provider.name, str(response.status))
        else:
            self._open_attempt = attempt
        return response

    def decision(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        """Record a decision (admission, route, cache, retry...) as an event on the SERVER span.

        Attribute values must be str, bool, int, float or sequences of one of them.
        """
        if self._events is None:
            self._events = []
        # Attribute values are immutable in OpenTelemetry: lists become tuples, as the SDK would make them.
        # (The builders in gateway/telemetry/decisions.py already give tuples: no copy then.)
        if attributes and any(type(v) is list for v in attributes.values()):
            attributes = {k: tuple(v) if isinstance(v, list) else v for k, v in attributes.items()}
        self._events.append(Event(name, attributes or None, time.time_ns()))

    def attempt_failed(self, error_type: str, provider: str | None = None) -> None:
        """The current attempt failed after its response began, or was cut by a timeout (resilience calls this)."""
        attempt = self._open_attempt
        if attempt is not None:
            self._close(attempt, error_type)
        elif self._attempts and self._attempts[-1].error_type == "cancelled":
            attempt = self._attempts[-1]  # the timeout cancelled the call: say so instead of "cancelled"
            attempt.error_type = attempt.attributes["error.type"] = error_type
        else:
            return
        if self._metrics is not None and provider is not None:
            self._metrics.upstream_error(provider, error_type)

    def side_call(self, usage: Usage | None, cost_usd: float | None) -> None:
        """The gateway's own call for this request (a semantic-cache embedding) ended, answered or not.

        Its span ends here as a success of its own, marked `switchboard.cache_overhead` with what it used and
        cost: not the request's answering attempt, and not a failed one the next attempt would close.
        """
        attempt = self._open_attempt
        if attempt is None:  # refused or failed: `send` closed its span with the error
            return
        self._close(attempt, None)
        attributes = attempt.attributes
        attributes["switchboard.cache_overhead"] = True
        if usage is not None:
            attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
        if cost_usd is not None:
            attributes["switchboard.cost_usd"] = cost_usd

    def responded(self, body: bytes, response_model: str | None, finish_reasons: Sequence[str]) -> None:
        """What the upstream answered, for a complete (non-streamed) reply."""
        self._response_body = body
        self._response_model = response_model
        self._finish_reasons = finish_reasons

    def streamed(self, chunks: Sequence[StreamChunk]) -> None:
        """The chunks a stream relayed; read once when the trace finishes."""
        self._chunks = chunks

    def failed(self, error: GatewayError, *, settled: bool) -> None:
        """The request ends in an error; `settled=False` when no usage record will finish the trace."""
        self._error = error
        if not settled:
            if self._metrics is not None:
                self._metrics.finished_unsettled()
            self.finish(None)

    def finish(self, record: UsageRecord | None) -> None:
        """End the trace: build every attribute once, from the settled usage record, and export."""
        if self._finished:
            return
        self._finished = True
        status = record.status if record is not None else (self._error.http_status if self._error else 500)
        error_type = self._error_type(record)
        server_failed = status >= 500 or (record is not None and record.outcome == "upstream_error")
        final = self._open_attempt
        if final is not None:
            self._close(final, error_type if error_type is not None and (server_failed or status >= 400) else None)
        if not self._sampled and not server_failed and not any(a.error_type for a in self._attempts):
            return  # unsampled and healthy: nothing is built
        tracing = self._tracing
        response_id, response_model, reasons, output = self._response_facts(record)
        attributes: dict[str, Any] = {"gen_ai.operation.name": self._operation,
                                      "switchboard.request_id": self._exchange.request_id}
        name = self._operation
        if record is not None:
            attributes.update(record_attributes(record))
            if record.public_model:
                name = f"{self._operation} {record.public_model}"
            route = self._exchange.response_headers.get(_ROUTE_HEADER)
            if route:
                attributes["switchboard.route"] = route
            if tracing.records_content(record.team):
                attributes.update(content_attributes(self._body, output, tracing.redactor))
        attributes["switchboard.attempts"] = len(self._attempts)
        attributes["http.response.status_code"] = status
        if error_type is not None:
            attributes["error.type"] = error_type
        if final is not None and final.error_type is None:
            final_attributes = final.attributes
            if response_id:
                final_attributes["gen_ai.response.id"] = response_id
            if response_model:
                final_attributes["gen_ai.response.model"] = response_model
            if reasons:
                final_attributes["gen_ai.response.finish_reasons"] = reasons
            if record is not None:
                final_attributes.update(attempt_usage_attributes(record, tracing.settings, self._params))
        tracing.export(self, name, attributes, _ERROR if server_failed else _UNSET)

    def spans(self, name: str, attributes: dict[str, Any], status: Status) -> list[ReadableSpan]:
        """The finished spans: every attempt (CLIENT), then the request (SERVER)."""
        resource = self._tracing.resource
        server = SpanContext(self._trace_int, self._span_id, False, _SAMPLED,
                             self._parent.trace_state if self._parent is not None else None)
        spans = [
            ReadableSpan(name=f"{self._operation} {a.attributes['gen_ai.request.model']}",
                         context=SpanContext(self._trace_int, a.span_id, False, _SAMPLED),
                         parent=server, resource=resource, attributes=a.attributes, kind=SpanKind.CLIENT,
                         status=_ERROR if a.error_type is not None else _UNSET, start_time=a.start_ns,
                         end_time=a.end_ns, instrumentation_scope=_SCOPE)
            for a in self._attempts
        ]
        spans.append(ReadableSpan(name=name, context=server, parent=self._parent, resource=resource,
                                  attributes=attributes, events=self._events or (), kind=SpanKind.SERVER,
                                  status=status, start_time=self._start_ns, end_time=time.time_ns(),
                                  instrumentation_scope=_SCOPE))
        return spans

    def _error_type(self, record: UsageRecord | None) -> str | None:
        if self._error is not None:
            return self._error.code or self._error.kind.name.lower()
        # Other outcomes (cache_hit, client_disconnected) are not errors of the gateway or the upstream.
        if record is not None and (record.status >= 400 or record.outcome == "upstream_error"):
            return record.outcome
        return None

    def _response_facts(self, record: UsageRecord | None) -> tuple[str | None, str | None, tuple[str, ...], Any]:
        """Response id, model, finish reasons and (only when content is recorded) the output."""
        wants_output = record is not None and self._tracing.records_content(record.team)
        if self._response_body is not None:
            found = _RESPONSE_ID.search(self._response_body, 0, 512)
            output = output_of_body(self._response_body) if wants_output else None
            return (found.group(1).decode() if found else None, self._response_model,
                    tuple(self._finish_reasons), output)
        chunks = self._chunks
        if not chunks:
            return None, None, (), None
        first: Any = {}
        with contextlib.suppress(orjson.JSONDecodeError):
            first = orjson.loads(chunks[0].data)
        reasons = tuple(c.finish_reason for c in chunks if c.finish_reason)
        output = output_of_chunks(chunks) if wants_output else None
        return (first.get("id") if isinstance(first, dict) else None,
                first.get("model") if isinstance(first, dict) else None, reasons, output)

    def _close(self, attempt: _Attempt, error_type: str | None) -> None:
        if attempt is self._open_attempt:
            self._open_attempt = None
        attempt.end_ns = time.time_ns()
        if error_type is not None:
            attempt.error_type = error_type
            attempt.attributes["error.type"] = error_type


def _remote_parent(headers: Mapping[str, str]) -> SpanContext | None:
    """The caller's span from a W3C `traceparent` (and `tracestate`); None when absent or malformed."""
    match = _TRACEPARENT.match(headers.get("traceparent", ""))
    if match is None:
        return None
    version, trace_hex, span_hex, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    trace_id, span_id = int(trace_hex, 16), int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    state = headers.get("tracestate")
    return SpanContext(trace_id, span_id, True, TraceFlags(int(flags, 16) & 0xFF),
                       TraceState.from_header([state]) if state else None)


# --- the exporting side, built from the policy --------------------------------------------------


class _Tracing:
    """What traced requests need from one telemetry configuration: sampling, the processor, content rules."""

    def __init__(self, settings: TracesPolicy, processor: SpanProcessor, redactor: Callable[[str], str] | None) -> None:
        self.settings = settings
        self.processor = processor
        resource = {"service.name": settings.service_name}
        if settings.project:
            resource["openinference.project.name"] = settings.project  # Phoenix's project
        self.resource = Resource.create(resource)
        # Like the SDK's TraceIdRatioBased: keep a trace when its low 64 bits fall under the bound.
        self._bound = round(settings.sample_ratio * (1 << 64))
        self._content_all = "*" in settings.record_content
        self._content_teams = frozenset(settings.record_content)
        self.redactor = redactor if settings.redact_content else None
        self._addresses: dict[str, tuple[str, int | None]] = {}
        self._attempt_kinds: dict[tuple[str, str], dict[str, Any]] = {}

    def samples(self, trace_id: int) -> bool:
        return trace_id & 0xFFFFFFFFFFFFFFFF < self._bound

    def attempt_kinds(self, model: str, provider: str) -> dict[str, Any]:
        kinds = self._attempt_kinds.get((model, provider))
        if kinds is None:
            kinds = self._attempt_kinds[(model, provider)] = attempt_kind_attributes(self.settings, model, provider)
        return kinds

    def records_content(self, team: str) -> bool:
        return self._content_all or team in self._content_teams

    def server_address(self, base_url: str) -> tuple[str, int | None]:
        address = self._addresses.get(base_url)
        if address is None:
            parts = urlsplit(base_url)
            address = self._addresses[base_url] = (parts.hostname or base_url, parts.port)
        return address

    def export(self, trace: RequestTrace, name: str, attributes: dict[str, Any], status: Status) -> None:
        for span in trace.spans(name, attributes, status):
            self.processor.on_end(span)


class Telemetry:
    """The app's tracing, (re)built from the policy's `telemetry.traces` section, and its metrics hooks.

    `span_exporter` (tests) replaces the policy's exporter, is called synchronously
    as each request finishes, and turns tracing on even when the policy says `none`.
    """

    def __init__(self, *, span_exporter: SpanExporter | None = None,
                 redactor: Callable[[str], str] = redact_content, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self._untraced: _NoTrace = NO_TRACE if metrics is None else _Untraced(metrics)
        self._span_exporter = span_exporter
        self._redactor = redactor
        self._tracing: _Tracing | None = None
        self._configured: TracesPolicy | None = None

    @property
    def enabled(self) -> bool:
        return self._tracing is not None

    def configure(self, policy: Policy) -> None:
        """Apply the policy's settings; a change replaces the exporter (the old one drains in the background)."""
        settings = policy.telemetry.traces
        if self._configured is not None and settings == self._configured:
            return
        previous = self._tracing
        self._configured = settings
        self._tracing = self._build(settings)
        # An injected exporter outlives the configurations that use it: shutting the old processor down would stop it.
        if previous is not None and self._span_exporter is None:
            threading.Thread(target=previous.processor.shutdown, name="otel-shutdown", daemon=True).start()

    def start(self, endpoint: str, headers: Mapping[str, str], exchange: Any) -> RequestTrace | _NoTrace:
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
        return tracing.processor.force_flush(int(timeout_s * 1000)) if tracing is not None else True

    def shutdown(self) -> None:
        """Flush and stop the exporter (blocking; call it off the event loop)."""
        tracing, self._tracing = self._tracing, None
        if tracing is not None:
            tracing.processor.shutdown()

    def _build(self, settings: TracesPolicy) -> _Tracing | None:
        if self._span_exporter is not None:
            return _Tracing(settings, SimpleSpanProcessor(self._span_exporter), self._redactor)
        if settings.exporter == "none":
            return None
        batch = settings.batch
        processor = BatchSpanProcessor(
            LoggedExporter(build_exporter(settings), settings.exporter), max_queue_size=batch.max_queue_size,
            schedule_delay_millis=batch.schedule_delay_ms, max_export_batch_size=batch.max_export_batch_size,
            export_timeout_millis=batch.export_timeout_ms)
        log.info("tracing on: exporter %s, sample ratio %s", settings.exporter, settings.sample_ratio)
        return _Tracing(settings, processor, self._redactor)


Trace = RequestTrace | _NoTrace
"""What `Exchange.trace` holds: a live request trace, or a no-op one."""
