"""OpenAI's Responses API wire format, for upstreams that serve it natively (OpenAI, vLLM).

Used by the OpenAI-compatible adapter when a call's endpoint is
`Endpoint.RESPONSES`: bodies and events pass through byte for byte; only what
the gateway must know is read from them — usage from the Response object (or
the terminal event of a stream, protocols.md 2.4), and whether the stream
really finished. A stream without a terminal event is cut short, never a
complete answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from providers.base import (
    FailureKind,
    ParsedResponse,
    PayloadTranslator,
    StreamChunk,
    UpstreamFailed,
    UpstreamFailure,
    Usage,
)
from providers.canonical import load_object, stream_cut
from providers.sse import DONE

# Terminal events carry the full Response, usage included; `response.failed` is a
# proper ending too (its usage is still settled) and is relayed, not raised.
_TERMINAL = (b'"type":"response.completed"', b'"type":"response.incomplete"', b'"type":"response.failed"')
_ERROR = b'"type":"error"'
_INCOMPLETE_REASONS = {"max_output_tokens": "length", "content_filter": "content_filter"}
_ERROR_CODES = {
    "rate_limit_exceeded": FailureKind.RATE_LIMITED,
    "context_length_exceeded": FailureKind.CONTEXT_LENGTH,
    "invalid_prompt": FailureKind.BAD_REQUEST,
}


def usage_from_responses(raw: Any) -> Usage | None:
    """Canonical usage from a Responses `usage` object (input/output tokens and their details)."""
    if not isinstance(raw, dict):
        return None
    input_details = raw.get("input_tokens_details") or {}
    output_details = raw.get("output_tokens_details") or {}
    return Usage(
        prompt_tokens=int(raw.get("input_tokens") or 0),
        completion_tokens=int(raw.get("output_tokens") or 0),
        cached_tokens=int(input_details.get("cached_tokens") or 0),
        cache_write_tokens=int(input_details.get("cache_write_tokens") or 0),
        reasoning_tokens=int(output_details.get("reasoning_tokens") or 0),
    )


def finish_reason(response: Mapping[str, Any]) -> str:
    """The chat-style finish reason of a Response object, for records and traces."""
    status = response.get("status")
    if status == "incomplete":
        reason = (response.get("incomplete_details") or {}).get("reason")
        return _INCOMPLETE_REASONS.get(reason, "length")
    if status == "failed":
        return "error"
    output = response.get("output") or ()
    if any(isinstance(item, dict) and item.get("type") == "function_call" for item in output):
        return "tool_calls"
    return "stop"


def parse_response(body: bytes) -> ParsedResponse:
    """A Response object, passed through untouched with its usage read."""
    payload = load_object(body, "response body")
    return ParsedResponse(
        body=body,
        usage=usage_from_responses(payload.get("usage")),
        response_model=payload.get("model"),
        finish_reasons=(finish_reason(payload),),
    )


class ResponsesStream(PayloadTranslator):
    """Relay Responses events; decode only the terminal one (usage) and `error` (raised).

    Event types are found by byte search: inside JSON strings quotes are escaped,
    so `"type":"response.completed"` can only be a key and its value.
    """

    __slots__ = ("finished",)

    def __init__(self) -> None:
        self.finished = False

    def feed(self, data: bytes) -> Sequence[StreamChunk]:
        if data == DONE:  # not sent by OpenAI, harmless if an engine sends it
            return self.end()
        if any(marker in data for marker in _TERMINAL):
            response = load_object(data, "stream event").get("response") or {}
            self.finished = True  # the terminal event ends the answer; nothing after it matters
            return (StreamChunk(data, usage=usage_from_responses(response.get("usage")),
                                finish_reason=finish_reason(response)),)
        if _ERROR in data:
            raise UpstreamFailed(_stream_failure(load_object(data, "stream event")))
        return (StreamChunk(data),)

    def end(self) -> Sequence[StreamChunk]:
        raise stream_cut()


def _stream_failure(event: Mapping[str, Any]) -> UpstreamFailure:
    code = event.get("code")
    code = str(code) if code is not None else None
    message = event.get("message")
    return UpstreamFailure(
        kind=_ERROR_CODES.get(code or "", FailureKind.UPSTREAM_ERROR),
        status=502,
        message=str(message) if message else "the upstream reported an error mid-stream",
        code=code,
        param=event.get("param") if isinstance(event.get("param"), str) else None,
    )
