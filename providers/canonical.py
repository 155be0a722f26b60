"""Building canonical (OpenAI Chat Completions) shapes, for adapters that translate.

Pass-through adapters forward the upstream's own bytes; the native adapters
(Anthropic, Gemini) build responses and stream chunks from parsed upstream
data instead, and share these small builders so every translated reply has
exactly the shape the openai SDK expects (protocols.md 1.5 and 1.6).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import orjson

from providers.base import FailureKind, StreamChunk, UpstreamFailed, UpstreamFailure, Usage

_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(?:;[\w=-]+)*;base64,", re.ASCII)


def usage_json(usage: Usage) -> dict[str, Any]:
    """The OpenAI `usage` object; `cache_write_tokens` is kept so cost can price cache writes."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens,
                                  "cache_write_tokens": usage.cache_write_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def choice(index: int, text: str | None, tool_calls: list[dict[str, Any]], finish_reason: str) -> dict[str, Any]:
    """One non-streamed choice; `content` is null only when there is no text at all."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason}


def completion_body(response_id: str, created: int, model: str, choices: list[dict[str, Any]],
                    usage: Usage | None) -> bytes:
    body: dict[str, Any] = {"id": response_id, "object": "chat.completion", "created": created, "model": model,
                            "choices": choices}
    if usage is not None:
        body["usage"] = usage_json(usage)
    return orjson.dumps(body)


class ChunkWriter:
    """Encodes the chunks of one stream; they share `id`, `created` and `model`."""

    __slots__ = ("_head",)

    def __init__(self, response_id: str, created: int, model: str) -> None:
        self._head = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model}

    def delta(self, index: int, delta: Mapping[str, Any], finish_reason: str | None = None) -> StreamChunk:
        payload = {**self._head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                              "finish_reason": finish_reason}]}
        return StreamChunk(orjson.dumps(payload), finish_reason=finish_reason)

    def usage(self, usage: Usage) -> StreamChunk:
        payload = {**self._head, "choices": [], "usage": usage_json(usage)}
        return StreamChunk(orjson.dumps(payload), usage=usage, usage_only=True)


def text_of(content: Any) -> str:
    """The text of a message `content`: a string, or the text parts of a part list joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 payload) of a `data:` URL, or None for any other URL."""
    match = _DATA_URL.match(url)
    if match is None:
        return None
    return match.group(1) or "application/octet-stream", url[match.end():]


def json_arguments(arguments: Any, where: str) -> Any:
    """A tool call's `arguments` JSON string, decoded; native APIs want the object."""
    if isinstance(arguments, (dict, list)):
        return arguments
    if not arguments:
        return {}
    try:
        return orjson.loads(arguments)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"{where} is not valid JSON", where) from exc


def bad_request(message: str, param: str | None = None) -> UpstreamFailed:
    """A request the adapter cannot translate: the client gets a 400 and can fix it."""
    return UpstreamFailed(UpstreamFailure(FailureKind.BAD_REQUEST, 400, message, code="unsupported_value",
                                          param=param))


def malformed(detail: str) -> UpstreamFailed:
    return UpstreamFailed(UpstreamFailure(FailureKind.UPSTREAM_ERROR, 502,
                                          f"the upstream sent a malformed response: {detail}"))


def stream_cut() -> UpstreamFailed:
    return UpstreamFailed(UpstreamFailure(FailureKind.CONNECTION, 502,
                                          "the upstream stream ended before completing"))


def error_object(body: bytes) -> dict[str, Any]:
    """An upstream error body as a JSON object: {} when it is empty, not JSON or not an object."""
    try:
        payload = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        return {}
    return payload if isinstance(payload, dict) else {}


def load_object(data: bytes, what: str) -> dict[str, Any]:
    """Decode an upstream JSON object or fail as a malformed response."""
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise malformed(f"{what} is not JSON") from exc
    if not isinstance(payload, dict):
        raise malformed(f"{what} is not a JSON object")
    return payload


# --- integers beyond 64 bits -----------------------------------------------------------------------
# orjson reads an integer beyond 64 bits as a float (-29893437512638976000 became -2.9893437512638976e+19 on
# the way upstream) and refuses to write one. A request that has one is read again with the standard library,
# which keeps it exact as a `BigInt`, and written with the integer's own digits.

_INT64 = 2**63
# Fields whose values OpenAI's schema makes strings or token ids; the rest of a request is small to check.
_UNCHECKED = frozenset({"messages", "input", "prompt", "contents", "instructions"})


class BigInt(int):
    """An integer outside orjson's 64-bit range, kept exact."""


def lost_integers(payload: Mapping[str, Any]) -> bool:
    """Whether orjson may have turned an integer beyond 64 bits of this request into a float."""
    for key, value in payload.items():  # a loop, not any(): most fields are strings, and skip the call
        if value.__class__ in _MAY_HOLD_FLOATS and key not in _UNCHECKED and _has_huge_float(value):
            return True
    return False


_MAY_HOLD_FLOATS = (float, dict, list)  # what orjson decodes; the other types cannot hold a float


def _has_huge_float(value: Any) -> bool:
    if isinstance(value, float):
        return abs(value) >= _INT64
    if isinstance(value, dict):
        return any(_has_huge_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_huge_float(v) for v in value)
    return False


def _parse_int(text: str) -> int:
    value = int(text)
    return BigInt(value) if not -_INT64 <= value < 2**64 else value


def load_exact(body: bytes) -> Any:
    """JSON with every integer exact (the slow path, for requests `lost_integers` flagged)."""
    return json.loads(body, parse_int=_parse_int)


def _as_digits(value: Any) -> orjson.Fragment:
    if isinstance(value, BigInt):
        return orjson.Fragment(str(int(value)).encode())
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dump_object(value: Any) -> bytes:
    """JSON bytes of a request body, integers beyond 64 bits written digit for digit."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: only a BigInt gets here from a decoded request
        return orjson.dumps(value, default=_as_digits, option=orjson.OPT_PASSTHROUGH_SUBCLASS)
