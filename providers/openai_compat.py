"""The OpenAI-compatible family: OpenAI itself, Groq, Mistral, Together, vLLM, SGLang, TGI, llama.cpp.

They share one wire format, so one adapter serves them all; what differs
between them is data (`CompatSpec`): default URL, parameter renames, dropped
parameters, finish reasons to normalise. The client's JSON is forwarded with
only what must change patched, and responses are passed through byte for byte
unless a spec needs to rewrite them.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel

from providers import responses_api
from providers.base import (
    Call,
    Capabilities,
    Endpoint,
    FailureKind,
    NoOptions,
    ParsedResponse,
    PayloadTranslator,
    ProviderSettings,
    StreamChunk,
    StreamTranslator,
    UpstreamFailed,
    UpstreamFailure,
    UpstreamRequest,
    Usage,
)
from providers.canonical import dump_object, error_object, load_object, stream_cut
from providers.embedding_vectors import as_requested_base64
from providers.sse import DONE
from providers.validation_errors import validation_failure_from

PATHS = {
    Endpoint.CHAT: "/chat/completions",
    Endpoint.COMPLETIONS: "/completions",
    Endpoint.EMBEDDINGS: "/embeddings",
    Endpoint.RESPONSES: "/responses",
}
# What every OpenAI-compatible server speaks; the Responses API only where a spec adds it.
ALL_ENDPOINTS = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS})
# Members as module names for the per-request paths: on Python 3.11 reading a member off its enum class is an
# unspecialized lookup through EnumType's `__getattr__` hook, ~15 times the cost of reading a global.
_CHAT, _EMBEDDINGS, _RESPONSES = Endpoint.CHAT, Endpoint.EMBEDDINGS, Endpoint.RESPONSES
WITH_RESPONSES = ALL_ENDPOINTS | {Endpoint.RESPONSES}


@dataclass(frozen=True)
class CompatSpec:
    """How one OpenAI-compatible upstream differs from OpenAI, as data."""

    kind: str
    default_base_url: str | None = None
    endpoints: frozenset[Endpoint] = ALL_ENDPOINTS
    requires_api_key: bool = False
    # Request fields renamed on the way out, e.g. Mistral's `seed` -> `random_seed`.
    renames: Mapping[str, str] = field(default_factory=dict)
    # Request fields the upstream rejects; removed rather than failing the call.
    drops: frozenset[str] = frozenset()
    # Non-standard finish reasons mapped to OpenAI's.
    finish_reasons: Mapping[str, str] = field(default_factory=dict)
    options_model: type[BaseModel] = NoOptions
    # How limits count prompts for it (gateway/tokens/counter.py FAMILIES).
    tokenizer: str = "openai"
    # The one chat field the upstream reads as the completion cap: a client's `max_tokens` or
    # `max_completion_tokens` is sent under this name (None: forwarded as sent). llama.cpp reads only
    # `max_tokens` and otherwise generates until its context is full.
    token_cap: str | None = None
    # Model-name prefixes that take the other cap field instead (OpenAI's reasoning models refuse `max_tokens`).
    token_cap_exceptions: tuple[tuple[str, str], ...] = ()
    # A stream that ends before any content and without a finish reason means the prompt did not fit the
    # context window (llama-cpp-python fails that way once the stream has started), not a dropped connection.
    empty_stream_is_overflow: bool = False
    # `[DONE]` with no finish reason before it means the server stopped the answer early: llama-cpp-python ends a
    # running stream that way when another request arrives (`interrupt_requests`, on by default).
    done_needs_finish_reason: bool = False
    # Streams go on a connection of their own (`connection: close`): llama-cpp-python closes the connection after
    # a stream that failed (a context overflow), a moment after the answer's end, when the pool already holds it
    # for the next request (the next call, e.g. the context-window fallback, then got a dropped connection).
    stream_closes_connection: bool = False
    # OpenAI's `response_format: {type: json_schema, json_schema: {schema}}` sent as `{type: json_object, schema}`:
    # llama-cpp-python knows only the latter (a 400 otherwise); llama-server takes both.
    json_schema_as_json_object: bool = False
    # Where the request id goes upstream (Capabilities.request_id_header, request_id_uuid).
    request_id_header: str | None = "x-request-id"
    request_id_uuid: bool = True


class OpenAICompatAdapter:
    """Adapter for any upstream that speaks OpenAI's wire format."""

    def __init__(self, spec: CompatSpec) -> None:
        self.spec = spec
        self.kind = spec.kind
        self.options_model = spec.options_model
        self.capabilities = Capabilities(
            endpoints=spec.endpoints,
            default_base_url=spec.default_base_url,
            requires_api_key=spec.requires_api_key,
            tokenizer=spec.tokenizer,
            request_id_header=spec.request_id_header,
            request_id_uuid=spec.request_id_uuid,
        )
        self._rewrites_responses = bool(spec.finish_reasons)

    def build_request(self, provider: ProviderSettings, call: Call) -> UpstreamRequest:
        body = dict(call.body)
        body["model"] = call.upstream_model
        if call.stream and call.endpoint in _CHAT_LIKE:
            # Always ask for usage so every stream can be settled; the gateway
            # strips the usage chunk again if the client did not ask for it.
            stream_options = dict(body.get("stream_options") or {})
            stream_options["include_usage"] = True
            body["stream_options"] = stream_options
        if call.endpoint is _CHAT:
            cap_field = token_cap_field(self.spec, call.upstream_model)
            if cap_field is not None:
                move_token_cap(body, cap_field)
            if self.spec.json_schema_as_json_object and "response_format" in body:
                body["response_format"] = json_object_format(body["response_format"])
        for old, new in self.spec.renames.items():
            if old in body:
                body[new] = body.pop(old)
        for name in self.spec.drops:
            body.pop(name, None)
        headers = {"content-type": "application/json", **provider.extra_headers}
        if provider.api_key:
            headers["authorization"] = "Bearer " + provider.api_key
        if call.stream:
            headers["accept"] = "text/event-stream"
            if self.spec.stream_closes_connection:
                headers["connection"] = "close"
        return UpstreamRequest("POST", provider.base_url + PATHS[call.endpoint], headers, dump_object(body))

    def parse_response(self, call: Call, body: bytes) -> ParsedResponse:
        if call.endpoint is _RESPONSES:
            return responses_api.parse_response(body)
        payload = load_object(body, "response body")
        choices = payload.get("choices") or ()
        reasons = tuple(str(c.get("finish_reason")) for c in choices if isinstance(c, dict))
        if self._rewrites_responses and any(r in self.spec.finish_reasons for r in reasons):
            for choice in choices:
                choice["finish_reason"] = self.spec.finish_reasons.get(
                    choice.get("finish_reason"), choice.get("finish_reason")
                )
            reasons = tuple(self.spec.finish_reasons.get(r, r) for r in reasons)
            body = orjson.dumps(payload)
        if (call.endpoint is _EMBEDDINGS and call.body.get("encoding_format") == "base64"
                and as_requested_base64(payload)):
            body = orjson.dumps(payload)
        # By position (body, usage, response_model, finish_reasons), as `usage_from_openai` builds its `Usage`.
        return ParsedResponse(body, usage_from_openai(payload.get("usage")), payload.get("model"), reasons)

    def stream_translator(self, call: Call) -> StreamTranslator:
        if call.endpoint is _RESPONSES:
            return responses_api.ResponsesStream()
        return _CompatStream(self.spec.finish_reasons, self.spec.empty_stream_is_overflow,
                             self.spec.done_needs_finish_reason)

    def classify_error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamFailure:
        return failure_from_openai_error(status, error_object(body), headers)


class _CompatStream(PayloadTranslator):
    """An OpenAI-compatible stream: chunks relayed byte for byte, only the ones that matter decoded.

    Parsing every chunk would dominate a stream's CPU cost; only chunks that
    carry usage, a finish reason or an error are decoded (found by byte search).
    """

    __slots__ = ("_answered", "_events", "_finish_reasons", "_overflow_if_empty", "_unanswered_done_is_cut",
                 "finished")

    def __init__(self, finish_reasons: Mapping[str, str], overflow_if_empty: bool = False,
                 done_needs_finish_reason: bool = False) -> None:
        self._finish_reasons = finish_reasons
        self._overflow_if_empty = overflow_if_empty
        self._unanswered_done_is_cut = done_needs_finish_reason
        self._answered = False  # a finish reason was seen
        self._events = 0
        self.finished = False

    def feed(self, data: bytes) -> Sequence[StreamChunk]:
        self._events += 1
        if data == DONE:
            if self._unanswered_done_is_cut and not self._answered:
                raise UpstreamFailed(UpstreamFailure(
                    FailureKind.OVERLOADED, 503, "the upstream stopped the stream before the answer's end (`[DONE]` "
                    "without a finish reason), as llama-cpp-python does when another request arrives"))
            self.finished = True
            return ()
        if _nothing_to_read(data):
            return (StreamChunk(data),)
        return (self._decoded(data),)

    def feed_all(self, payloads: Sequence[bytes]) -> list[StreamChunk]:
        # Most reads carry only content deltas: one scan of the whole read finds that, and its payloads are
        # relayed as they are. A read with the end, usage, an error or a finish reason goes event by event from
        # its last events that have something to read, back to the first that has not: the content deltas before
        # those (a fast upstream's whole answer can be one read) are judged by one scan too, when it finds nothing
        # in them; else the whole read goes event by event.
        joined = b"".join(payloads)
        if DONE not in joined and _nothing_to_read(joined):
            self._events += len(payloads)
            return [StreamChunk(data) for data in payloads]
        tail = len(payloads)
        while tail and (payloads[tail - 1] == DONE or not _nothing_to_read(payloads[tail - 1])):
            tail -= 1
        if tail < 2:  # nothing, or a single event, before them: no scan to save
            return super().feed_all(payloads)
        head = b"".join(payloads[:tail])
        if DONE in head or not _nothing_to_read(head):
            return super().feed_all(payloads)
        self._events += tail
        out = [StreamChunk(data) for data in payloads[:tail]]
        out += super().feed_all(payloads[tail:])
        return out

    def end(self) -> Sequence[StreamChunk]:
        # OpenAI-compatible streams always end with [DONE]; without it the
        # answer may be incomplete, and the client must not be told otherwise.
        if self._overflow_if_empty and self._events <= 1:  # at most the role announcement
            raise UpstreamFailed(UpstreamFailure(
                FailureKind.CONTEXT_LENGTH, 400, "the upstream ended the stream before any content and without a "
                "finish reason, as it does when the prompt does not fit its context window",
                code="context_length_exceeded", param="messages", error_type="invalid_request_error"))
        raise stream_cut()

    def _decoded(self, data: bytes) -> StreamChunk:
        payload = load_object(data, "stream event")
        if "error" in payload and "choices" not in payload:
            raise UpstreamFailed(failure_from_openai_error(502, payload, {}))
        choices = payload.get("choices") or []
        finish_reason = None
        for choice in choices:
            reason = choice.get("finish_reason")
            if reason:
                mapped = self._finish_reasons.get(reason, reason)
                if mapped != reason:
                    choice["finish_reason"] = mapped
                    data = orjson.dumps(payload)
                finish_reason = mapped
                self._answered = True
        usage = usage_from_openai(payload.get("usage"))
        return StreamChunk(data, usage=usage, usage_only=usage is not None and not choices,
                           finish_reason=finish_reason)


def _nothing_to_read(data: bytes) -> bool:
    """Whether stream bytes (one event or a whole read) carry no error object and no non-null finish reason or usage.

    Quotes inside JSON strings are escaped, so these byte counts see keys only; an event for which this holds
    is relayed undecoded.
    """
    return (b'{"error"' not in data
            and data.count(b'"finish_reason"') == data.count(b'"finish_reason":null')
            + data.count(b'"finish_reason": null')
            and data.count(b'"usage"') == data.count(b'"usage":null') + data.count(b'"usage": null'))


_CHAT_LIKE = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS})  # take stream_options.include_usage
_CAP_FIELDS = ("max_completion_tokens", "max_tokens")


def token_cap_field(spec: CompatSpec, upstream_model: str) -> str | None:
    """The chat cap field `upstream_model` reads on this kind, or None when it reads both."""
    for prefix, name in spec.token_cap_exceptions:
        if upstream_model.startswith(prefix):
            return name
    return spec.token_cap


def move_token_cap(body: dict[str, Any], name: str) -> None:
    """Send the client's cap under `name` only; `max_completion_tokens` wins if both are set, as in admission."""
    cap = next((body[n] for n in _CAP_FIELDS if body.get(n) is not None), None)
    for other in _CAP_FIELDS:
        body.pop(other, None)
    if cap is not None:
        body[name] = cap


def json_object_format(response_format: Any) -> Any:
    """`{type: json_schema, json_schema: {schema}}` as `{type: json_object, schema}`; any other value as it is."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return response_format
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return {"type": "json_object", "schema": schema} if isinstance(schema, dict) else {"type": "json_object"}


def usage_from_openai(raw: Any) -> Usage | None:
    """Canonical usage from an OpenAI-shaped `usage` object."""
    if not isinstance(raw, dict):
        return None
    prompt_details = raw.get("prompt_tokens_details") or {}
    completion_details = raw.get("completion_tokens_details") or {}
    # By position, once per response: calling a class with keywords packs them into a dict for `__init__` and
    # unpacks them again, which costs more than the construction itself. Each line names its field.
    return Usage(
        int(raw.get("prompt_tokens") or 0),  # prompt_tokens
        int(raw.get("completion_tokens") or 0),  # completion_tokens
        int(prompt_details.get("cached_tokens") or 0),  # cached_tokens
        int(prompt_details.get("cache_write_tokens") or 0),  # cache_write_tokens
        int(completion_details.get("reasoning_tokens") or 0),  # reasoning_tokens
    )


_STATUS_KINDS = {
    400: FailureKind.BAD_REQUEST,
    401: FailureKind.AUTHENTICATION,
    403: FailureKind.PERMISSION,
    404: FailureKind.NOT_FOUND,
    408: FailureKind.TIMEOUT,
    413: FailureKind.BAD_REQUEST,
    422: FailureKind.BAD_REQUEST,
    429: FailureKind.RATE_LIMITED,
    503: FailureKind.OVERLOADED,
    504: FailureKind.TIMEOUT,
    529: FailureKind.OVERLOADED,
}
_CODE_KINDS = {
    "context_length_exceeded": FailureKind.CONTEXT_LENGTH,
    "content_filter": FailureKind.CONTENT_FILTER,
    "content_policy_violation": FailureKind.CONTENT_FILTER,
}


# Where a Python server's error text turns into a traceback or a source location (a frame on a line of its own).
_TRACEBACK = re.compile(r'Traceback \(most recent call last\)|\n\s*File "[^"\n]*", line \d+')
# llama.cpp's server reports a prompt longer than its context as `type: exceed_context_size_error` (code 400).
_OVERFLOW_TYPES = frozenset({"exceed_context_size_error"})


def failure_from_openai_error(status: int, payload: Mapping[str, Any], headers: Mapping[str, str]) -> UpstreamFailure:
    """Classify an OpenAI-shaped error body (`{"error": {message, type, code, param}}`)."""
    error = payload.get("error")
    if isinstance(error, str):
        # vLLM and llama.cpp sometimes answer `{"error": "..."}` or `{"message": ...}`.
        error = {"message": error}
    elif not isinstance(error, dict):
        error = {"message": payload.get("message") or payload.get("detail")}
    message = error.get("message")
    refused = validation_failure_from(status, payload, message, retry_after_seconds(headers))
    if refused is not None:
        return refused
    code = error.get("code")
    code = str(code) if code is not None and code != status else None  # llama.cpp repeats the status as `code`
    if error.get("type") in _OVERFLOW_TYPES:
        code = "context_length_exceeded"
    kind = _CODE_KINDS.get(code or "") or _STATUS_KINDS.get(status)
    if kind is None:
        kind = FailureKind.UPSTREAM_ERROR if status >= 500 else FailureKind.BAD_REQUEST
    if message and status >= 500:
        message = _TRACEBACK.split(str(message), 1)[0].rstrip()  # the server's files are none of the client's business
    return UpstreamFailure(
        kind=kind,
        status=status,
        message=str(message) if message else f"upstream returned HTTP {status}",
        code=code,
        param=error.get("param") if isinstance(error.get("param"), str) else None,
        error_type=error.get("type") if isinstance(error.get("type"), str) else None,
        retry_after=retry_after_seconds(headers),
    )


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return max(0.0, email.utils.mktime_tz(parsed) - time.time())


# Request ids: OpenAI takes any ASCII id up to 512 characters as `X-Client-Request-Id`; the hosted
# APIs below document none, so none is sent; self-hosted servers get `x-request-id` as a UUID.
OPENAI = CompatSpec(kind="openai", default_base_url="https://api.openai.com/v1", requires_api_key=True,
                    endpoints=WITH_RESPONSES, request_id_header="x-client-request-id", request_id_uuid=False,
                    # o-series and gpt-5 models refuse `max_tokens` ("use max_completion_tokens instead").
                    token_cap_exceptions=tuple((p, "max_completion_tokens") for p in ("o1", "o3", "o4", "gpt-5")))
OPENAI_COMPATIBLE = CompatSpec(kind="openai_compatible")
GROQ = CompatSpec(
    kind="groq",
    default_base_url="https://api.groq.com/openai/v1",
    requires_api_key=True,
    drops=frozenset({"logit_bias"}),
    tokenizer="open_weights",
    request_id_header=None,
)
MISTRAL = CompatSpec(
    kind="mistral",
    default_base_url="https://api.mistral.ai/v1",
    requires_api_key=True,
    renames={"seed": "random_seed"},
    finish_reasons={"model_length": "length"},
    tokenizer="open_weights",
    token_cap="max_tokens",
    request_id_header=None,
)
TOGETHER = CompatSpec(kind="together", default_base_url="https://api.together.xyz/v1", requires_api_key=True,
                      tokenizer="open_weights", token_cap="max_tokens", request_id_header=None)
# vLLM serves POST /v1/responses itself (protocols.md 8.1), so Responses requests pass through.
VLLM = CompatSpec(kind="vllm", endpoints=WITH_RESPONSES, tokenizer="open_weights")
SGLANG = CompatSpec(kind="sglang", tokenizer="open_weights")
TGI = CompatSpec(kind="tgi", endpoints=frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS}), tokenizer="open_weights",
                 token_cap="max_tokens")
# llama-cpp-python's server reads only `max_tokens` (2,032 tokens generated under max_completion_tokens: 5)
# and validates `x-request-id` as a UUID.
LLAMACPP = CompatSpec(kind="llamacpp", tokenizer="open_weights", token_cap="max_tokens",
                      empty_stream_is_overflow=True, done_needs_finish_reason=True, stream_closes_connection=True,
                      json_schema_as_json_object=True)

SPECS = (OPENAI, OPENAI_COMPATIBLE, GROQ, MISTRAL, TOGETHER, VLLM, SGLANG, TGI, LLAMACPP)
