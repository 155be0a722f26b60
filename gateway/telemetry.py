"""OpenTelemetry traces: a SERVER span per gateway request, a CLIENT span per upstream attempt.

Spans follow the OpenTelemetry GenAI semantic conventions (`gen_ai.*`), plus a
`switchboard.*` namespace for what only the gateway knows (team, key id,
public model, route, cost; policies/README.md lists every attribute). They go
to the SDK's batch span processor, which exports on its own thread, so a slow
or dead collector costs dropped spans and one log line, never request latency.

How the pipeline uses it (the whole surface)::

    exchange.trace = services.telemetry.start(endpoint, headers, exchange)  # the request begins
    response = await exchange.trace.send(client, request, target, call)     # one upstream attempt + traceparent
    exchange.trace.decision("switchboard.route", {"chosen": "..."})         # an event on the SERVER span
    exchange.trace.finish(record)                                           # attributes from the usage record

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
import importlib.util
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
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from gateway.policy_schema import PolicyDocument, TracesPolicy
from providers.base import Call, StreamChunk, UpstreamFailed, UpstreamRequest

if TYPE_CHECKING:
    from gateway.errors import GatewayError
    from gateway.metrics import Metrics
    from gateway.policy import Policy, Target
    from gateway.upstream import UpstreamClient, UpstreamResponse
    from gateway.usage import UsageRecord

log = logging.getLogger("switchboard.telemetry")

_OPERATION = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings",
              "responses": "chat"}
# gen_ai.provider.name values from the GenAI conventions; self-hosted kinds use their own name.
_GENAI_PROVIDER = {"openai": "openai", "anthropic": "anthropic", "gemini": "gcp.gemini",
                   "vertex_ai": "gcp.vertex_ai", "azure": "azure.ai.openai", "azure_openai": "azure.ai.openai",
                   "mistral": "mistral_ai", "groq": "groq", "together": "together_ai", "bedrock": "aws.bedrock"}
_REQUEST_PARAMS = (("temperature", "gen_ai.request.temperature"), ("top_p", "gen_ai.request.top_p"),
                   ("top_k", "gen_ai.request.top_k"), ("frequency_penalty", "gen_ai.request.frequency_penalty"),
                   ("presence_penalty", "gen_ai.request.presence_penalty"), ("seed", "gen_ai.request.seed"))
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

    def attempt_failed(self, error_type: str) -> None:
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
        except BaseException as exc:
            self._metrics.upstream_error(target.provider.name, _error_type(exc))
            raise
        if response.status >= 400:
            self._metrics.upstream_error(target.provider.name, str(response.status))
        return response

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
        self._operation = _OPERATION.get(endpoint, endpoint)
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
            self._params = _request_params(call.body)
        provider = target.provider
        host, port = self._tracing.server_address(provider.settings.base_url)
        attributes = {
            "gen_ai.operation.name": self._operation,
            "gen_ai.provider.name": _GENAI_PROVIDER.get(provider.settings.kind, provider.settings.kind),
            "gen_ai.request.model": call.upstream_model,
            "server.address": host,
            "switchboard.provider": provider.name,
            "switchboard.attempt": len(self._attempts) + 1,
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
            error_type = _error_type(exc)
            self._close(attempt, error_type)
            if self._metrics is not None:
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
        frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in attributes.items()} if attributes else None
        self._events.append(Event(name, frozen, time.time_ns()))

    def attempt_failed(self, error_type: str) -> None:
        """The current attempt failed after its response began (retry layers call this)."""
        if self._open_attempt is not None:
            self._close(self._open_attempt, error_type)

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
            attributes.update(_record_attributes(record))
            if record.public_model:
                name = f"{self._operation} {record.public_model}"
            route = self._exchange.response_headers.get(_ROUTE_HEADER)
            if route:
                attributes["switchboard.route"] = route
            if tracing.records_content(record.team):
                attributes.update(_content_attributes(self._body, output, tracing.redactor))
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
                final_attributes.update(_attempt_usage_attributes(record))
                if tracing.openinference:
                    final_attributes.update(_openinference_attributes(record, self._params, response_model))
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
            output = _output_of_body(self._response_body) if wants_output else None
            return (found.group(1).decode() if found else None, self._response_model,
                    tuple(self._finish_reasons), output)
        chunks = self._chunks
        if not chunks:
            return None, None, (), None
        first: Any = {}
        with contextlib.suppress(orjson.JSONDecodeError):
            first = orjson.loads(chunks[0].data)
        reasons = tuple(c.finish_reason for c in chunks if c.finish_reason)
        output = _output_of_chunks(chunks) if wants_output else None
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


def _attempt_usage_attributes(record: UsageRecord) -> dict[str, Any]:
    """What the successful attempt's CLIENT span repeats from the record: usage, TTFT and cost."""
    attributes: dict[str, Any] = {}
    usage = record.usage
    if usage is not None:
        attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
        attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
    if record.time_to_first_token_ms is not None:
        attributes["gen_ai.response.time_to_first_chunk"] = record.time_to_first_token_ms / 1000
    if record.cost_usd is not None:
        attributes["switchboard.cost_usd"] = record.cost_usd
        attributes["switchboard.price_version"] = record.price_version
    return attributes


def _record_attributes(record: UsageRecord) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.request.model": record.public_model,
        "switchboard.team": record.team,
        "switchboard.key_id": record.key_id,
        "switchboard.model": record.public_model,
        "switchboard.outcome": record.outcome,
        "switchboard.stream": record.stream,
        "switchboard.overhead_ms": round(record.overhead_ms, 3),
    }
    if record.stream:
        attributes["gen_ai.request.stream"] = True
    if record.provider is not None:
        attributes["switchboard.provider"] = record.provider
    if record.upstream_model is not None:
        attributes["switchboard.upstream_model"] = record.upstream_model
    usage = record.usage
    if usage is not None:
        attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
        attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
        if usage.cache_write_tokens:
            attributes["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_write_tokens
        if usage.reasoning_tokens:
            attributes["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
        attributes["switchboard.usage_estimated"] = usage.estimated
    if record.time_to_first_token_ms is not None:
        attributes["switchboard.ttft_ms"] = round(record.time_to_first_token_ms, 3)
        attributes["gen_ai.response.time_to_first_chunk"] = record.time_to_first_token_ms / 1000
    if record.cost_usd is not None:
        attributes["switchboard.cost_usd"] = record.cost_usd
        attributes["gen_ai.usage.cost_usd"] = record.cost_usd
    if record.price_version is not None:
        attributes["switchboard.price_version"] = record.price_version
    cache = getattr(record, "cache", None)  # set by the response cache (gateway/cache/) when it is in use
    if cache:
        attributes["switchboard.cache"] = cache
    return attributes


def _request_params(body: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, attribute in _REQUEST_PARAMS:
        value = body.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            params[attribute] = value
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(max_tokens, int):
        params["gen_ai.request.max_tokens"] = max_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        params["gen_ai.request.stop_sequences"] = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        params["gen_ai.request.stop_sequences"] = tuple(stop)
    choices = body.get("n")
    if isinstance(choices, int) and choices != 1:
        params["gen_ai.request.choice.count"] = choices
    return params


def _openinference_attributes(record: UsageRecord, params: Mapping[str, Any] | None,
                              response_model: str | None) -> dict[str, Any]:
    """OpenInference (`llm.*`) attributes, so Arize Phoenix shows model, tokens and cost natively."""
    attributes: dict[str, Any] = {"openinference.span.kind": "LLM",
                                  "llm.model_name": response_model or record.upstream_model or record.public_model}
    if record.provider:
        attributes["llm.provider"] = record.provider
    if params:
        attributes["llm.invocation_parameters"] = orjson.dumps(
            {k.removeprefix("gen_ai.request."): v for k, v in params.items()}).decode()
    usage = record.usage
    if usage is not None:
        attributes["llm.token_count.prompt"] = usage.prompt_tokens
        attributes["llm.token_count.completion"] = usage.completion_tokens
        attributes["llm.token_count.total"] = usage.total_tokens
        attributes["llm.token_count.prompt_details.cache_read"] = usage.cached_tokens
    if record.cost_usd is not None:
        attributes["llm.cost.total"] = record.cost_usd
    return attributes


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, UpstreamFailed):
        return exc.failure.kind.value
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return type(exc).__qualname__


# --- content (opt-in per team) ---------------------------------------------------------------

_SECRETS = re.compile(
    r"sk-[A-Za-z0-9_\-]{8,}"                       # OpenAI-style API keys
    r"|AIza[0-9A-Za-z_\-]{20,}"                     # Google API keys
    r"|AKIA[0-9A-Z]{16}"                            # AWS access key ids
    r"|(?i:bearer)\s+[A-Za-z0-9._\-~+/=]{8,}"       # bearer tokens
    r"|[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}"  # email addresses
    r"|\b(?:\d[ \-]?){12,18}\d\b"                   # card-like numbers (13-19 digits)
)


def redact_content(text: str) -> str:
    """The default redaction hook: masks API keys, bearer tokens, emails and card numbers."""
    return _SECRETS.sub("[redacted]", text)


def _content_attributes(body: Mapping[str, Any] | None, output: Any,
                        redactor: Callable[[str], str] | None) -> dict[str, str]:
    attributes: dict[str, str] = {}
    if body is not None:
        messages = body.get("messages")
        source = _semconv_messages(messages) if isinstance(messages, list) else body.get("prompt", body.get("input"))
        if source is not None:
            attributes["gen_ai.input.messages"] = orjson.dumps(source).decode()
    if output is not None:
        attributes["gen_ai.output.messages"] = orjson.dumps(output).decode()
    if redactor is not None:
        attributes = {key: redactor(value) for key, value in attributes.items()}
    return attributes


def _semconv_messages(messages: list[Any]) -> list[dict[str, Any]]:
    converted = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        parts: list[dict[str, Any]] = []
        content = message.get("content")
        if isinstance(content, str):
            parts.append({"type": "text", "content": content})
        elif isinstance(content, list):
            parts.extend({"type": "text", "content": p.get("text", "")} for p in content
                         if isinstance(p, dict) and p.get("type") == "text")
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            parts.append({"type": "tool_call", "id": call.get("id"), "name": function.get("name"),
                          "arguments": function.get("arguments")})
        converted.append({"role": message.get("role"), "parts": parts})
    return converted


def _output_of_body(body: bytes) -> Any:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    outputs = []
    for choice in payload.get("choices") or ():
        message = choice.get("message") or {}
        text = message.get("content") if message else choice.get("text")
        outputs.append({"role": "assistant", "parts": [{"type": "text", "content": text or ""}],
                        "finish_reason": choice.get("finish_reason")})
    return outputs


def _output_of_chunks(chunks: Sequence[StreamChunk]) -> Any:
    texts: list[str] = []
    for chunk in chunks:
        try:
            payload = orjson.loads(chunk.data)
        except orjson.JSONDecodeError:
            continue
        for choice in payload.get("choices") or ():
            delta = choice.get("delta") or {}
            piece = delta.get("content") if delta else choice.get("text")
            if piece:
                texts.append(piece)
    return [{"role": "assistant", "parts": [{"type": "text", "content": "".join(texts)}]}]


# --- the exporting side, built from the policy --------------------------------------------------


class _Tracing:
    """What traced requests need from one telemetry configuration: sampling, the processor, content rules."""

    def __init__(self, settings: TracesPolicy, processor: SpanProcessor, redactor: Callable[[str], str] | None) -> None:
        self.settings = settings
        self.processor = processor
        self.resource = Resource.create({"service.name": settings.service_name})
        # Like the SDK's TraceIdRatioBased: keep a trace when its low 64 bits fall under the bound.
        self._bound = round(settings.sample_ratio * (1 << 64))
        self.openinference = settings.openinference
        self._content_all = "*" in settings.record_content
        self._content_teams = frozenset(settings.record_content)
        self.redactor = redactor if settings.redact_content else None
        self._addresses: dict[str, tuple[str, int | None]] = {}

    def samples(self, trace_id: int) -> bool:
        return trace_id & 0xFFFFFFFFFFFFFFFF < self._bound

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
        if previous is not None:
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
            _LoggedExporter(_exporter(settings), settings.exporter), max_queue_size=batch.max_queue_size,
            schedule_delay_millis=batch.schedule_delay_ms, max_export_batch_size=batch.max_export_batch_size,
            export_timeout_millis=batch.export_timeout_ms)
        log.info("tracing on: exporter %s, sample ratio %s", settings.exporter, settings.sample_ratio)
        return _Tracing(settings, processor, self._redactor)


def _exporter(settings: TracesPolicy) -> SpanExporter:
    timeout_s = settings.batch.export_timeout_ms / 1000
    if settings.exporter == "otlp_http":
        from gateway.otlp import OtlpHttpExporter

        return OtlpHttpExporter(settings.endpoint or "http://localhost:4318/v1/traces", settings.headers, timeout_s)
    if settings.exporter == "otlp_grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
            OTLPSpanExporter as GrpcSpanExporter,
        )

        # The exporter logs every failed batch itself; _LoggedExporter logs once per outage instead.
        logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").setLevel(logging.CRITICAL)
        endpoint = settings.endpoint or "localhost:4317"
        return GrpcSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"),  # type: ignore[no-any-return]
                                headers=tuple(settings.headers.items()), timeout=timeout_s)
    return ConsoleSpanExporter()


class _LoggedExporter(SpanExporter):
    """Wraps an exporter so an unreachable collector is one log line per outage, not one per batch."""

    def __init__(self, inner: SpanExporter, name: str) -> None:
        self._inner = inner
        self._name = name
        self._failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception:  # an exporter bug must not kill the export thread
            log.debug("span exporter raised", exc_info=True)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.FAILURE and not self._failing:
            self._failing = True
            log.warning("span export (%s) is failing; spans are being dropped until it recovers", self._name)
        elif result is SpanExportResult.SUCCESS and self._failing:
            self._failing = False
            log.info("span export (%s) recovered", self._name)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def telemetry_problems(document: PolicyDocument) -> list[tuple[tuple[str | int, ...], str]]:
    """Cross-references of the `telemetry:` section, as (YAML path, message) pairs for the policy loader."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    traces = document.telemetry.traces
    for index, team in enumerate(traces.record_content):
        if team != "*" and team not in document.teams:
            problems.append((("telemetry", "traces", "record_content", index),
                             f"unknown team {team!r}; defined: " + ", ".join(sorted(document.teams))))
    if traces.exporter == "otlp_grpc" and not _importable("opentelemetry.exporter.otlp.proto.grpc"):
        problems.append((("telemetry", "traces", "exporter"),
                         "otlp_grpc needs the package opentelemetry-exporter-otlp-proto-grpc (or use otlp_http)"))
    if traces.exporter == "otlp_http" and traces.endpoint and not traces.endpoint.startswith(("http://", "https://")):
        problems.append((("telemetry", "traces", "endpoint"), "must be an http:// or https:// URL"))
    return problems


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


Trace = RequestTrace | _NoTrace
"""What `Exchange.trace` holds: a live request trace, or a no-op one."""
