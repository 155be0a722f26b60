"""One request's trace: the handle the pipeline records facts on, turned into spans when the request settles.

`RequestTrace` collects what happens (upstream attempts, decisions, the reply)
as plain data and builds the SERVER and CLIENT spans once at `finish`;
`NO_TRACE` is the shared do-nothing handle when tracing is off, and `Untraced`
the one that still feeds the metrics' attempt counts. The tracer that hands
them out is gateway/telemetry/traces.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from gateway.telemetry.attributes import (
    OPERATION,
    attempt_usage_attributes,
    error_type_of,
    record_attributes,
    request_params,
)
from gateway.telemetry.content import content_attributes, output_of_body, output_of_chunks
from providers.base import Call, StreamChunk, UpstreamRequest, Usage

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource

    from gateway.accounting.usage import UsageRecord
    from gateway.compiled.policy import Target
    from gateway.errors import GatewayError
    from gateway.telemetry.metrics import Metrics
    from gateway.telemetry.otlp import SpanRow
    from gateway.upstream.pools import UpstreamClient, UpstreamResponse


if TYPE_CHECKING:
    from gateway.telemetry.traces import Tracing

_ROUTE_HEADER = "x-switchboard-route"
_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"([^"]{1,128})"')
_TRACEPARENT = re.compile(r"^[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^ \t]*)?[ \t]*$")
SCOPE_NAME = "switchboard"
_SCOPE = InstrumentationScope(SCOPE_NAME)
_SAMPLED_FLAGS = TraceFlags.SAMPLED  # every exported span is sampled (or kept by the tail rule, as if it were)
_UNSET_CODE, _ERROR_CODE = 0, 2  # OTLP's STATUS_CODE_UNSET and STATUS_CODE_ERROR
_STATUSES = {_UNSET_CODE: Status(StatusCode.UNSET), _ERROR_CODE: Status(StatusCode.ERROR)}
_CLIENT, _SERVER = SpanKind.CLIENT, SpanKind.SERVER


# --- the request-side handles -----------------------------------------------------------------


class NoTrace:
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

    def traceparent(self) -> str | None:
        return None

    def finish(self, record: UsageRecord | None) -> None:
        pass


NO_TRACE = NoTrace()


class Untraced(NoTrace):
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

    __slots__ = ("_attempts", "_attributes", "_body", "_chunks", "_end_ns", "_error", "_events", "_exchange",
                 "_finish_reasons", "_finished", "_metrics", "_name", "_open_attempt", "_operation", "_params",
                 "_parent", "_response_body", "_response_model", "_sampled", "_span_id", "_start_ns",
                 "_status_code", "_trace_int", "_tracing", "span_count", "trace_id")
    recording = True

    def __init__(self, tracing: Tracing, endpoint: str, headers: Mapping[str, str], exchange: Any,
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
        self._events: list[tuple[str, Mapping[str, Any] | None, int]] | None = None  # (name, attributes, time)
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
        # The target's part is shared (copied here); then this attempt's number and the request's parameters.
        attributes = {**self._tracing.attempt_base(self._operation, provider, call.upstream_model, call.stream),
                      "switchboard.attempt": len(self._attempts) + 1, **self._params}
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
        if attributes and list in map(type, attributes.values()):
            attributes = {k: tuple(v) if isinstance(v, list) else v for k, v in attributes.items()}
        self._events.append((name, attributes or None, time.time_ns()))

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

    def traceparent(self) -> str:
        """A W3C traceparent naming this request's SERVER span, for a call made on its behalf (a shadow call)."""
        return f"00-{self.trace_id}-{self._span_id:016x}-{'01' if self._sampled else '00'}"

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
        tracing = self._tracing
        kept = None
        if not self._sampled and not server_failed and not any(a.error_type for a in self._attempts):
            kept = tracing.keeps(record)
            if kept is None:
                return  # unsampled, healthy, fast and cheap: nothing is built
        content = record is not None and tracing.records_content(record.team)
        response_id, response_model, reasons, output = self._response_facts(content)
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
            if content:
                attributes.update(content_attributes(self._body, output, tracing.redactor))
        attributes["switchboard.attempts"] = len(self._attempts)
        if kept is not None:  # outside the sample, kept by the tail rule (its upstream was told "unsampled")
            attributes["switchboard.trace.kept"] = kept
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
        self._name, self._attributes = name, attributes
        self._status_code = _ERROR_CODE if server_failed else _UNSET_CODE
        self._end_ns = time.time_ns()
        self.span_count = len(self._attempts) + 1  # one per attempt, and the request's: what the export queue counts
        # A sink may keep the trace as it is (an SDK processor's queue holds its spans, a test's sink the trace):
        # what only building its attributes needed goes now, so a kept trace holds no request or reply body (or
        # the exchange, and all it holds) alive. The OTLP/HTTP sink encodes it at the end of this loop turn and keeps
        # only the bytes.
        self._exchange = self._body = self._response_body = self._chunks = None
        tracing.export(self)

    def rows(self) -> list[SpanRow]:
        """The finished spans as rows (gateway/telemetry/otlp.py's `SpanRow`): every attempt (CLIENT), then the
        request (SERVER). Read when the trace is exported (`Tracing.export`), after it is finished."""
        trace_id, server_id, operation = self._trace_int, self._span_id, self._operation
        rows: list[SpanRow] = [
            (trace_id, a.span_id, _SAMPLED_FLAGS, None, server_id, False,
             f"{operation} {a.attributes['gen_ai.request.model']}", _CLIENT, a.start_ns, a.end_ns, a.attributes, (),
             _UNSET_CODE if a.error_type is None else _ERROR_CODE, None)
            for a in self._attempts
        ]
        parent = self._parent
        rows.append((trace_id, server_id, _SAMPLED_FLAGS, parent.trace_state if parent is not None else None,
                     parent.span_id if parent is not None else None, parent is not None and parent.is_remote,
                     self._name, _SERVER, self._start_ns, self._end_ns, self._attributes, self._events or (),
                     self._status_code, None))
        return rows

    def spans(self) -> list[ReadableSpan]:
        """The finished spans as the SDK's `ReadableSpan`s, for exporters other than the OTLP encoder (the
        console, OTLP/gRPC, a test's in-memory exporter): the same rows."""
        return [readable_span(row, self._tracing.resource) for row in self.rows()]

    def _error_type(self, record: UsageRecord | None) -> str | None:
        if self._error is not None:
            return self._error.code or self._error.kind.name.lower()
        # Other outcomes (cache_hit, client_disconnected) are not errors of the gateway or the upstream.
        if record is not None and (record.status >= 400 or record.outcome == "upstream_error"):
            return record.outcome
        return None

    def _response_facts(self, wants_output: bool) -> tuple[str | None, str | None, tuple[str, ...], Any]:
        """Response id, model, finish reasons and (only when content is recorded) the output."""
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


def readable_span(row: SpanRow, resource: Resource) -> ReadableSpan:
    """A row as the SDK's `ReadableSpan` (status descriptions are not used by the gateway's rows)."""
    (trace_id, span_id, trace_flags, state, parent_id, parent_remote, name, kind, start, end, attributes, events,
     code, _) = row
    parent = None
    if parent_id is not None:
        parent = SpanContext(trace_id, parent_id, parent_remote, TraceFlags(trace_flags),
                             state if parent_remote else None)
    return ReadableSpan(name=name, context=SpanContext(trace_id, span_id, False, TraceFlags(trace_flags), state),
                        parent=parent, resource=resource, attributes=attributes,
                        events=[Event(*event) for event in events], kind=kind, status=_STATUSES[code],
                        start_time=start, end_time=end, instrumentation_scope=_SCOPE)


# --- the exporting side, built from the policy --------------------------------------------------


Trace = RequestTrace | NoTrace
