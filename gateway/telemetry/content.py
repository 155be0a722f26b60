"""Prompt and completion content on spans: opt-in per team, and redacted by default.

The content follows the GenAI conventions' `gen_ai.input.messages` /
`gen_ai.output.messages` shapes, serialized as JSON strings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from providers.base import StreamChunk

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


def content_attributes(body: Mapping[str, Any] | None, output: Any,
                       redactor: Callable[[str], str] | None) -> dict[str, str]:
    """`gen_ai.input.messages` and `gen_ai.output.messages`, passed through `redactor`."""
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


def output_of_body(body: bytes) -> Any:
    """The output messages of a whole (non-streamed) response body."""
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


def output_of_chunks(chunks: Sequence[StreamChunk]) -> Any:
    """The output message a stream's relayed chunks add up to."""
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
