"""A fake Anthropic Messages API: a real aiohttp server on loopback, speaking protocols.md section 5.

    with FakeAnthropicUpstream(require_api_key="sk-ant-test") as fake:
        fake.script(overloaded())                  # the next request gets a 529
        fake.cache_read_tokens = 2048              # reported as cache_read_input_tokens
        ...
        assert fake.last_request.json["system"][0]["text"] == "Be brief."

Replies are deterministic: ``"echo: <last user text>"``; a tool call (``tool_use``) of the chosen tool
when tools are offered and the last user turn is not a tool result; a minimal instance of the schema for
``output_config.format``; token counts are whitespace-separated words. Streams follow the documented
event order (message_start, content_block_start, ping, deltas, content_block_stop, message_delta,
message_stop) with text and tool input split over several deltas.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.native_upstream import NativeFakeUpstream
from tests.fakes.openai_upstream import Behaviour, _Exchange, _split, count_tokens, minimal_instance

MESSAGES = "/v1/messages"
TOOL_USE_ID = "toolu_fake_1"


def anthropic_error(status: int, error_type: str, message: str | None = None, *,
                    headers: Mapping[str, str] | None = None) -> Behaviour:
    """Answer ``status`` with Anthropic's error body ``{"type":"error","error":{type,message}}``."""
    return Behaviour(status=status, body=error_payload(error_type, message or f"fake {error_type}"),
                     headers=headers or {})


def overloaded() -> Behaviour:
    return anthropic_error(529, "overloaded_error", "Overloaded")


def rate_limited(retry_after: float = 7) -> Behaviour:
    return anthropic_error(429, "rate_limit_error", "Number of request tokens has exceeded your rate limit",
                           headers={"retry-after": f"{retry_after:g}"})


def error_mid_stream(after_events: int = 3, error_type: str = "overloaded_error") -> Behaviour:
    """Send ``after_events`` SSE events, then an ``event: error`` and close."""
    return Behaviour(drop_after_chunks=after_events, stream_error={"type": error_type, "message": "Overloaded"})


def error_payload(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": "req_fake"}


def _frame(event: Mapping[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


class FakeAnthropicUpstream(NativeFakeUpstream):
    """Fake ``POST /v1/messages``; ``base_url`` (…/v1) is what a `kind: anthropic` provider points at."""

    def routes(self) -> list[tuple[str, str, str, Any]]:
        return [("POST", MESSAGES, MESSAGES, self._messages)]

    def stream_error_frame(self, error: dict[str, Any]) -> bytes:
        return _frame({"type": "error", "error": error})

    async def _messages(self, request: web.Request, exchange: _Exchange, body: Any,
                        behaviour: Behaviour) -> web.StreamResponse:
        problem = self._problem(request, body)
        if problem is not None:
            return problem
        blocks, stop_reason = _reply(body, behaviour.content)
        output = sum(count_tokens(b.get("text") or orjson.dumps(b.get("input")).decode()) for b in blocks)
        usage = {
            "input_tokens": _prompt_words(body),
            "cache_creation_input_tokens": self.cache_write_tokens,
            "cache_read_input_tokens": self.cache_read_tokens,
            "output_tokens": output,
        }
        message = {"id": self._new_id("msg"), "type": "message", "role": "assistant", "model": body["model"],
                   "content": blocks, "stop_reason": stop_reason, "stop_sequence": None, "usage": usage}
        if not body.get("stream"):
            return await self._respond_json(request, message, behaviour)
        chunks = self.stream_chunks if behaviour.stream_chunks is None else behaviour.stream_chunks
        return await self._stream(request, exchange, _events(message, chunks), behaviour)

    def _problem(self, request: web.Request, body: Any) -> web.Response | None:
        if self.api_key is not None and request.headers.get("x-api-key") != self.api_key:
            return _error(401, "authentication_error", "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return _error(400, "invalid_request_error", "anthropic-version: header is required")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "invalid_request_error", "messages: Field required")
        if not isinstance(body.get("max_tokens"), int):
            return _error(400, "invalid_request_error", "max_tokens: Field required")
        if not isinstance(body.get("model"), str):
            return _error(400, "invalid_request_error", "model: Field required")
        return None


def _error(status: int, error_type: str, message: str) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(error_payload(error_type, message)),
                        content_type="application/json")


def _reply(body: Mapping[str, Any], override: str | None) -> tuple[list[dict[str, Any]], str]:
    turns = body["messages"]
    last_user = next((t for t in reversed(turns) if t.get("role") == "user"), {"content": ""})
    user_text = _text(last_user.get("content"))
    content = last_user.get("content")
    answered_tool = isinstance(content, list) and any(b.get("type") == "tool_result" for b in content)
    tool = _chosen_tool(body, answered_tool)
    if tool is not None and override is None:
        schema = tool.get("input_schema") or {}
        required = [name for name in schema.get("required", []) if name != "echo"]
        arguments = minimal_instance(schema) if required else {"echo": user_text}
        return [{"type": "tool_use", "id": TOOL_USE_ID, "name": tool["name"], "input": arguments}], "tool_use"
    fmt = (body.get("output_config") or {}).get("format") or {}
    if override is not None:
        text = override
    elif fmt.get("type") == "json_schema":
        text = orjson.dumps(minimal_instance(fmt.get("schema") or {})).decode()
    elif answered_tool:
        text = "echo: tool said " + " ".join(_text(b.get("content")) for b in last_user["content"]
                                             if b.get("type") == "tool_result")
    else:
        text = f"echo: {user_text}"
    words = text.split(" ")
    if len(words) > body["max_tokens"]:
        return [{"type": "text", "text": " ".join(words[: body["max_tokens"]])}], "max_tokens"
    for stop in body.get("stop_sequences") or ():
        if stop in text:
            return [{"type": "text", "text": text[: text.index(stop)]}], "stop_sequence"
    return [{"type": "text", "text": text}], "end_turn"


def _chosen_tool(body: Mapping[str, Any], answered_tool: bool) -> Mapping[str, Any] | None:
    tools = body.get("tools") or []
    choice = body.get("tool_choice") or {"type": "auto"}
    if not tools or choice.get("type") == "none":
        return None
    if choice.get("type") == "tool":
        return next((t for t in tools if t["name"] == choice.get("name")), tools[0])
    if answered_tool and choice.get("type") == "auto":
        return None
    return tools[0]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _prompt_words(body: Mapping[str, Any]) -> int:
    system = body.get("system")
    words = count_tokens(system if isinstance(system, str) else _text(system))
    for turn in body["messages"]:
        content = turn.get("content")
        words += count_tokens(_text(content))
        if isinstance(content, list):
            words += sum(count_tokens(_text(b.get("content"))) for b in content if b.get("type") == "tool_result")
    return words


def _events(message: Mapping[str, Any], chunks: int) -> Iterator[bytes]:
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None,
             "usage": {**usage, "output_tokens": 1}}
    yield _frame({"type": "message_start", "message": start})
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            yield _frame({"type": "content_block_start", "index": index,
                          "content_block": {"type": "text", "text": ""}})
            yield _frame({"type": "ping"})
            for piece in _split(block["text"], chunks):
                if piece:
                    yield _frame({"type": "content_block_delta", "index": index,
                                  "delta": {"type": "text_delta", "text": piece}})
        else:
            yield _frame({"type": "content_block_start", "index": index,
                          "content_block": {"type": "tool_use", "id": block["id"], "name": block["name"],
                                            "input": {}}})
            # Anthropic's partial JSON has spaces after separators, unlike compact JSON.
            arguments = orjson.dumps(block["input"]).decode().replace('":', '": ').replace(',"', ', "')
            yield _frame({"type": "content_block_delta", "index": index,
                          "delta": {"type": "input_json_delta", "partial_json": ""}})
            for piece in _split(arguments, chunks):
                if piece:
                    yield _frame({"type": "content_block_delta", "index": index,
                                  "delta": {"type": "input_json_delta", "partial_json": piece}})
        yield _frame({"type": "content_block_stop", "index": index})
    yield _frame({"type": "message_delta", "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                  "usage": {"output_tokens": usage["output_tokens"]}})
    yield _frame({"type": "message_stop"})
