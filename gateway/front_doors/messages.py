"""`POST /v1/messages`: an Anthropic-compatible front door onto any provider the policy routes to.

Anthropic SDK clients and tools built on it (coding agents) send Messages API
requests; the virtual key may come as `x-api-key` or `Authorization: Bearer`.
Replies, streams (Anthropic's event sequence) and errors (Anthropic's error
shape) go back in Anthropic's format whichever provider served the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from gateway.auth import authenticate
from gateway.errors import GatewayError, render
from gateway.exchange import Exchange, Reply, Services, StreamReply
from gateway.front_doors.reframing import ChatStream, reframed
from gateway.http.asgi import request_headers, respond
from gateway.pipeline import decode_object, handle_inference
from providers.base import Endpoint
from providers.sse import encode_named_event

_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                 "function_call": "tool_use", "content_filter": "refusal"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


class TranslationError(Exception):
    """A Messages request that has no chat equivalent; the client gets a 400."""


class MessagesRoute:
    """ASGI endpoint for POST /v1/messages.

    Given the app's services when the app is built, as `InferenceRoute` is: reading them from Starlette's
    `app.state` on every request goes through a failed attribute lookup (an AttributeError made and dropped).
    """

    def __init__(self, services: Services) -> None:
        self.services = services

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        services = self.services
        headers = request_headers(scope)

        async def serve(exchange: Exchange, raw: bytes) -> Reply | StreamReply:
            try:
                authenticate(services.policy(), headers)  # 401 before anything is said of the body
            except GatewayError as error:
                return _anthropic_error(*render(error))
            try:
                chat = orjson.dumps(chat_request(_load(raw)))
            except TranslationError as exc:
                return Reply(400, _error_body("invalid_request_error", str(exc)), {})
            except orjson.JSONEncodeError:  # more than 255 levels deep: no upstream request can carry it
                return Reply(400, _error_body("invalid_request_error", "The request is nested too deeply."), {})
            except (AttributeError, TypeError, KeyError, ValueError):
                # A field of the wrong JSON type where the translation reads it (found by fuzzing,
                # tests/test_fuzz_endpoints.py): the client's mistake, not a gateway failure.
                return Reply(400, _error_body("invalid_request_error", "The request body does not follow the "
                                              "Messages API: a field has the wrong type."), {})
            reply = await handle_inference(services, Endpoint.CHAT, exchange, headers, chat)
            if isinstance(reply, StreamReply):
                return StreamReply(reply.headers, message_events(reply.events))
            if reply.status >= 400:
                return _anthropic_error(reply.status, reply.body, dict(reply.headers))
            return Reply(reply.status, orjson.dumps(message(orjson.loads(reply.body))), reply.headers)

        await respond(scope, receive, send, services, serve, refused=lambda reply: _anthropic_error(
            reply.status, reply.body, dict(reply.headers)))


def _load(raw: bytes) -> dict[str, Any]:
    try:
        return decode_object(raw)
    except GatewayError as exc:  # answered in Anthropic's error shape, like every other bad request here
        raise TranslationError(exc.message) from exc


# --- request: Messages -> chat -----------------------------------------------------------------


def chat_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAI chat request for a Messages API request."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise TranslationError("messages: Field required")
    if not messages:
        raise TranslationError("messages: at least one message is required")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": []}
    system = body.get("system")
    if isinstance(system, str) and system:
        chat["messages"].append({"role": "system", "content": system})
    elif isinstance(system, list) and system:
        _check_blocks(system, "system")
        chat["messages"].append({"role": "system", "content": [_text_part(b) for b in system]})
    elif system is not None and not isinstance(system, str | list):
        raise TranslationError("system: Input should be a valid string or a list of content blocks")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
            raise TranslationError(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        _check_blocks(turn.get("content"), f"messages.{i}.content")
        chat["messages"].extend(_user(turn["content"], i) if turn["role"] == "user" else [_assistant(turn, i)])
    if body.get("max_tokens") is not None:
        chat["max_tokens"] = body["max_tokens"]
    for name in ("temperature", "top_p", "top_k"):
        if body.get(name) is not None:
            chat[name] = body[name]
    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise TranslationError("metadata: Input should be a valid dictionary")
    user_id = (metadata or {}).get("user_id")
    if user_id:
        chat["user"] = user_id
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # message_delta carries the final usage
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise TranslationError("tools: Input should be a valid list")
    if tools:
        chat["tools"] = [_tool(t, i) for i, t in enumerate(tools)]
    choice = body.get("tool_choice")
    if choice is not None and not isinstance(choice, dict):
        raise TranslationError("tool_choice: Input should be a valid dictionary")
    if isinstance(choice, dict):
        mapped = {"auto": "auto", "any": "required", "none": "none"}.get(choice.get("type"))
        chat["tool_choice"] = mapped or {"type": "function", "function": {"name": choice.get("name")}}
        if choice.get("disable_parallel_tool_use"):
            chat["parallel_tool_calls"] = False
    fmt = (body.get("output_config") or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": fmt.get("schema") or {}}}
    return chat


def _check_blocks(content: Any, where: str) -> None:
    """Content is a string or a list of blocks, each an object with a string `type`, as Anthropic validates it."""
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise TranslationError(f"{where}: Input should be a valid string or a list of content blocks")
    for j, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise TranslationError(f"{where}.{j}: Input should be a content block (an object with a 'type')")
        if block["type"] == "text" and not isinstance(block.get("text"), str):
            raise TranslationError(f"{where}.{j}.text: Input should be a valid string")


def _text_part(block: Mapping[str, Any]) -> dict[str, Any]:
    part = {"type": "text", "text": block.get("text") or ""}
    if block.get("cache_control"):
        part["cache_control"] = block["cache_control"]
    return part


def _user(content: Any, i: int) -> list[dict[str, Any]]:
    """One user turn: tool results become tool messages (first, as Anthropic orders them), the rest one message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type")
        if kind == "tool_result":
            result = block.get("content")
            text = result if isinstance(result, str) else "".join(
                b.get("text", "") for b in result or () if b.get("type") == "text")
            out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
        elif kind == "text":
            parts.append(_text_part(block))
        elif kind in ("image", "document"):
            source = block.get("source") or {}
            if source.get("type") == "base64":
                url = f"data:{source.get('media_type')};base64,{source.get('data')}"
            elif source.get("type") == "url":
                url = source.get("url")
            else:
                raise TranslationError(f"messages.{i}: {kind} source type {source.get('type')!r} is not supported")
            parts.append({"type": "image_url", "image_url": {"url": url}} if kind == "image"
                         else {"type": "file", "file": {"file_data": url}})
        else:
            raise TranslationError(f"messages.{i}: content block type {kind!r} is not supported")
    if parts:
        out.append({"role": "user", "content": parts})
    return out


def _assistant(turn: Mapping[str, Any], i: int) -> dict[str, Any]:
    content = turn.get("content")
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts = [b.get("text") or "" for b in content if b.get("type") == "text"]
    calls = [{"id": b.get("id"), "type": "function",
              "function": {"name": b.get("name"), "arguments": orjson.dumps(b.get("input") or {}).decode()}}
             for b in content if b.get("type") == "tool_use"]
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tool(tool: Any, i: int) -> dict[str, Any]:
    if not isinstance(tool, dict):
        raise TranslationError(f"tools.{i}: Input should be a valid dictionary")
    if not isinstance(tool.get("name"), str) or not tool["name"] or tool.get("type") not in (None, "custom"):
        raise TranslationError(f"tools.{i}: tool type {tool.get('type')!r} is not supported")
    if tool.get("input_schema") is not None and not isinstance(tool["input_schema"], dict):
        raise TranslationError(f"tools.{i}.input_schema: Input should be a valid dictionary")
    function = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
    if tool.get("description"):
        function["description"] = tool["description"]
    out: dict[str, Any] = {"type": "function", "function": function}
    if tool.get("cache_control"):
        out["cache_control"] = tool["cache_control"]
    return out


# --- response: chat -> Messages ----------------------------------------------------------------


def message(chat: Mapping[str, Any]) -> dict[str, Any]:
    """The Messages API response for a chat.completion."""
    choice = (chat.get("choices") or [{}])[0]
    reply = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if reply.get("content"):
        content.append({"type": "text", "text": reply["content"]})
    for call in reply.get("tool_calls") or ():
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                        "input": _arguments(function.get("arguments"))})
    return {"id": _message_id(chat.get("id")), "type": "message", "role": "assistant", "model": chat.get("model"),
            "content": content, "stop_reason": _STOP_REASONS.get(choice.get("finish_reason"), "end_turn"),
            "stop_sequence": None, "usage": usage(chat.get("usage"))}


def usage(raw: Any) -> dict[str, int]:
    """Anthropic usage: `input_tokens` excludes the cached and cache-written tokens OpenAI counts in the prompt."""
    raw = raw if isinstance(raw, dict) else {}
    details = raw.get("prompt_tokens_details") or {}
    cached = int(details.get("cached_tokens") or 0)
    written = int(details.get("cache_write_tokens") or 0)
    return {"input_tokens": max(0, int(raw.get("prompt_tokens") or 0) - cached - written),
            "cache_creation_input_tokens": written, "cache_read_input_tokens": cached,
            "output_tokens": int(raw.get("completion_tokens") or 0)}


def _arguments(arguments: Any) -> Any:
    try:
        return orjson.loads(arguments or "{}")
    except orjson.JSONDecodeError:
        return {}


def _message_id(chat_id: Any) -> str:
    text = str(chat_id or "")
    return text if text.startswith("msg_") else "msg_" + text


def message_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Anthropic stream events for the pipeline's chat stream."""
    return reframed(chunks, _MessageStream())


class _MessageStream(ChatStream):
    """Turns chat chunks into Messages API events, one `data:` payload at a time.

    Text and each tool call become content blocks in order; the finish reason
    and usage (which OpenAI sends last) go into `message_delta` before
    `message_stop`. An in-band error becomes an `error` event.
    """

    def __init__(self) -> None:
        super().__init__()
        self._open_block: int | None = None
        self._blocks = 0
        self._tool_blocks: dict[int, int] = {}  # OpenAI tool_calls index -> block index
        self._started = False
        self._finish: str | None = None
        self._usage: Any = None

    def failed(self, error: Mapping[str, Any]) -> list[bytes]:
        return [_event("error", {"type": "error", "error": {
            "type": _ERROR_TYPES.get(_status_of(error), "api_error"), "message": error.get("message")}})]

    def chunk(self, chunk: Mapping[str, Any]) -> list[bytes]:
        out: list[bytes] = []
        if not self._started:
            self._started = True
            out.append(_event("message_start", {"type": "message_start", "message": {
                "id": _message_id(chunk.get("id")), "type": "message", "role": "assistant", "content": [],
                "model": chunk.get("model"), "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0}}}))
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self._open_block is None or self._open_block in self._tool_blocks.values():
                    self._open(out, {"type": "text", "text": ""})
                out.append(_event("content_block_delta", {
                    "type": "content_block_delta", "index": self._open_block,
                    "delta": {"type": "text_delta", "text": delta["content"]}}))
            for call in delta.get("tool_calls") or ():
                function = call.get("function") or {}
                if call.get("index") not in self._tool_blocks:
                    self._open(out, {"type": "tool_use", "id": call.get("id"), "name": function.get("name"),
                                     "input": {}})
                    self._tool_blocks[call.get("index")] = self._blocks - 1
                if function.get("arguments"):
                    out.append(_event("content_block_delta", {
                        "type": "content_block_delta", "index": self._tool_blocks[call.get("index")],
                        "delta": {"type": "input_json_delta", "partial_json": function["arguments"]}}))
            self._finish = choice.get("finish_reason") or self._finish
        return out

    def _open(self, out: list[bytes], block: dict[str, Any]) -> None:
        """Close the open content block, if any, and start the next one."""
        if self._open_block is not None:
            out.append(_event("content_block_stop", {"type": "content_block_stop", "index": self._open_block}))
        self._open_block, self._blocks = self._blocks, self._blocks + 1
        out.append(_event("content_block_start", {"type": "content_block_start", "index": self._open_block,
                                                  "content_block": block}))

    def closing(self) -> list[bytes]:
        out: list[bytes] = []
        if self._open_block is not None:
            out.append(_event("content_block_stop", {"type": "content_block_stop", "index": self._open_block}))
        out.append(_event("message_delta", {"type": "message_delta",
                                            "delta": {"stop_reason": _STOP_REASONS.get(self._finish, "end_turn"),
                                                      "stop_sequence": None},
                                            "usage": usage(self._usage)}))
        out.append(_event("message_stop", {"type": "message_stop"}))
        return out


def _status_of(error: Mapping[str, Any]) -> int:
    code = error.get("code")
    if code in ("upstream_overloaded",):
        return 503
    if code in ("upstream_timeout",):
        return 504
    if error.get("type") == "rate_limit_error":
        return 429
    return 500


def _event(name: str, payload: Mapping[str, Any]) -> bytes:
    return encode_named_event(name, orjson.dumps(payload))


# --- errors ------------------------------------------------------------------------------------


def _error_body(error_type: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": error_type, "message": message}})


def anthropic_reply(error: GatewayError) -> Reply:
    """A gateway error as Anthropic's error shape, for routes under the Anthropic front door."""
    return _anthropic_error(*render(error))


def is_anthropic_path(path: str) -> bool:
    """Whether a path is under the Anthropic front door, where even a 404 must be in Anthropic's shape."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def _anthropic_error(status: int, body: bytes, headers: dict[str, str]) -> Reply:
    """The gateway's OpenAI-shaped error, reshaped as Anthropic's (status and headers kept)."""
    try:
        message_text = orjson.loads(body)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message_text = "error"
    error_type = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return Reply(status, _error_body(error_type, message_text), headers)
