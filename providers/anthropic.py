"""Anthropic's Messages API (`kind: anthropic`), translated to and from OpenAI Chat Completions.

Request: system/developer messages become the top-level `system`; content
parts become content blocks; tool calls and tool results become `tool_use`
and `tool_result` blocks (tool results ride in a user turn); `response_format`
becomes `output_config.format` or a forced tool. Prompt-caching breakpoints
are placed here when the provider's options ask for them. Response and
stream events come back as OpenAI shapes (protocols.md 5.7).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from providers.base import (
    Call,
    Capabilities,
    Endpoint,
    FailureKind,
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
from providers.canonical import (
    ChunkWriter,
    bad_request,
    choice,
    completion_body,
    data_url,
    error_object,
    json_arguments,
    load_object,
    stream_cut,
    text_of,
    tool_call,
)
from providers.openai_compat import retry_after_seconds

# The name of the tool a json response_format is forced through (structured_output: tool).
STRUCTURED_TOOL = "switchboard_structured_output"
MAX_BREAKPOINTS = 4  # Anthropic refuses a request with more cache_control markers than this


class PromptCaching(BaseModel):
    """Automatic `cache_control` breakpoints (Anthropic caches the prefix up to each one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system_and_tools: bool = Field(
        True, description="Mark the end of the system prompt (or of the tools when there is no system prompt)."
    )
    last_turns: int = Field(1, ge=0, le=3, description="Also mark the last N user turns, newest first.")
    ttl: Literal["5m", "1h"] = Field("5m", description="Cache lifetime; 1h writes cost more (2x vs 1.25x).")


class AnthropicOptions(BaseModel):
    """Settings of a `kind: anthropic` provider."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    anthropic_version: str = Field("2023-06-01", description="Sent as the `anthropic-version` header.")
    default_max_tokens: int = Field(
        4096, ge=1, description="`max_tokens` when the client sets neither max_tokens nor max_completion_tokens "
        "(Anthropic requires it)."
    )
    prompt_caching: PromptCaching | None = Field(
        None, description="Place cache_control breakpoints automatically. Explicit cache_control in the request "
        "is always passed through and counts against the 4-breakpoint limit first."
    )
    structured_output: Literal["output_config", "tool"] = Field(
        "output_config", description="How response_format json_schema is honoured: Anthropic's native "
        "output_config.format, or a forced tool whose input is returned as the message content."
    )
    forward_sampling: bool = Field(
        True, description="Send temperature (clamped to 1.0) and top_p; turn off for models that reject them."
    )


_STOP_REASONS = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
    "max_tokens": "length", "model_context_window_exceeded": "length",
    "tool_use": "tool_calls", "refusal": "content_filter",
}
_ERROR_KINDS = {
    "invalid_request_error": FailureKind.BAD_REQUEST,
    "request_too_large": FailureKind.BAD_REQUEST,
    "authentication_error": FailureKind.AUTHENTICATION,
    # Billing is the operator's account, not something the caller can fix.
    "billing_error": FailureKind.PERMISSION,
    "permission_error": FailureKind.PERMISSION,
    "not_found_error": FailureKind.NOT_FOUND,
    "rate_limit_error": FailureKind.RATE_LIMITED,
    "api_error": FailureKind.UPSTREAM_ERROR,
    "overloaded_error": FailureKind.OVERLOADED,
    "timeout_error": FailureKind.TIMEOUT,
}
_STATUS_KINDS = {
    400: FailureKind.BAD_REQUEST, 401: FailureKind.AUTHENTICATION, 402: FailureKind.PERMISSION,
    403: FailureKind.PERMISSION, 404: FailureKind.NOT_FOUND, 408: FailureKind.TIMEOUT,
    413: FailureKind.BAD_REQUEST, 429: FailureKind.RATE_LIMITED, 503: FailureKind.OVERLOADED,
    504: FailureKind.TIMEOUT, 529: FailureKind.OVERLOADED,
}
_RETRY_STATUSES = frozenset({429, 503, 504, 529})
# Anthropic-only request fields a client may send through the openai SDK's extra_body.
_NATIVE_FIELDS = ("thinking", "top_k", "cache_control")


class AnthropicAdapter:
    kind = "anthropic"
    options_model = AnthropicOptions
    capabilities = Capabilities(
        endpoints=frozenset({Endpoint.CHAT}),
        default_base_url="https://api.anthropic.com/v1",
        requires_api_key=True,
        tokenizer="anthropic",
        request_id_header=None,  # the Messages API documents no client request id
    )

    def build_request(self, provider: ProviderSettings, call: Call) -> UpstreamRequest:
        options = provider.options
        assert isinstance(options, AnthropicOptions)
        body = messages_request(call.body, call.upstream_model, call.stream, options)
        headers = {"content-type": "application/json", "anthropic-version": options.anthropic_version,
                   **provider.extra_headers}
        if provider.api_key:
            headers["x-api-key"] = provider.api_key
        if call.stream:
            headers["accept"] = "text/event-stream"
        return UpstreamRequest("POST", provider.base_url + "/messages", headers, orjson.dumps(body))

    def parse_response(self, call: Call, body: bytes) -> ParsedResponse:
        payload = load_object(body, "response body")
        if payload.get("type") == "error":
            raise UpstreamFailed(_failure(502, payload, {}))
        structured = _wants_json(call.body)
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in payload.get("content") or ():
            kind = block.get("type")
            if kind == "text":
                texts.append(block.get("text") or "")
            elif kind == "tool_use":
                arguments = orjson.dumps(block.get("input") or {}).decode()
                if structured and block.get("name") == STRUCTURED_TOOL:
                    texts.append(arguments)
                else:
                    calls.append(tool_call(block.get("id") or "", block.get("name") or "", arguments))
        finish = _finish_reason(payload.get("stop_reason"), bool(calls))
        usage = usage_from_anthropic(payload.get("usage"))
        model = payload.get("model") or call.upstream_model
        out = completion_body(payload.get("id") or "msg", int(time.time()), model,
                              [choice(0, "".join(texts) if texts else None, calls, finish)], usage)
        return ParsedResponse(out, usage, model, (finish,))

    def stream_translator(self, call: Call) -> StreamTranslator:
        return _MessagesStream(call)

    def classify_error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamFailure:
        return _failure(status, error_object(body), headers)


_AS_TEXT = -1


class _MessagesStream(PayloadTranslator):
    """A Messages API stream as OpenAI chat chunks."""

    __slots__ = ("_raw_usage", "_structured", "_tool_index", "_tools_seen", "_upstream_model", "_writer", "finished")

    def __init__(self, call: Call) -> None:
        self._structured = _wants_json(call.body)
        self._upstream_model = call.upstream_model
        self._writer = ChunkWriter("msg", int(time.time()), call.upstream_model)
        self._raw_usage: dict[str, Any] = {}
        # Anthropic block index -> OpenAI tool_calls index; _AS_TEXT marks the structured-output tool.
        self._tool_index: dict[int, int] = {}
        self._tools_seen = 0
        self.finished = False

    def feed(self, data: bytes) -> Sequence[StreamChunk]:
        event = load_object(data, "stream event")
        kind = event.get("type")
        writer = self._writer
        if kind == "content_block_delta":  # the hot path: one per token batch
            delta = event.get("delta") or {}
            delta_type = delta.get("type")
            if delta_type == "text_delta":
                if delta.get("text"):
                    return (writer.delta(0, {"content": delta["text"]}),)
            elif delta_type == "input_json_delta" and delta.get("partial_json"):
                index = self._tool_index.get(event.get("index", -1))
                if index == _AS_TEXT:
                    return (writer.delta(0, {"content": delta["partial_json"]}),)
                if index is not None:
                    return (writer.delta(0, {"tool_calls": [
                        {"index": index, "function": {"arguments": delta["partial_json"]}}]}),)
        elif kind == "message_start":
            message = event.get("message") or {}
            self._writer = writer = ChunkWriter(message.get("id") or "msg", int(time.time()),
                                                message.get("model") or self._upstream_model)
            self._raw_usage.update(message.get("usage") or {})
            return (writer.delta(0, {"role": "assistant", "content": ""}),)
        elif kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                if self._structured and block.get("name") == STRUCTURED_TOOL:
                    self._tool_index[event.get("index", -1)] = _AS_TEXT
                    return ()
                self._tool_index[event.get("index", -1)] = index = self._tools_seen
                self._tools_seen += 1
                return (writer.delta(0, {"tool_calls": [{
                    "index": index, "id": block.get("id") or "", "type": "function",
                    "function": {"name": block.get("name") or "", "arguments": ""}}]}),)
            if block.get("type") == "text" and block.get("text"):
                return (writer.delta(0, {"content": block["text"]}),)
        elif kind == "message_delta":
            self._raw_usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
            stop_reason = (event.get("delta") or {}).get("stop_reason")
            return (writer.delta(0, {}, _finish_reason(stop_reason, self._tools_seen > 0)),)
        elif kind == "message_stop":
            self.finished = True
            usage = usage_from_anthropic(self._raw_usage)
            return () if usage is None else (writer.usage(usage),)
        elif kind == "error":
            raise UpstreamFailed(_failure(_status_of(event), event, {}))
        # ping, content_block_stop and unknown future events carry nothing to relay.
        return ()

    def end(self) -> Sequence[StreamChunk]:
        raise stream_cut()


# --- request -----------------------------------------------------------------------------------


def messages_request(body: Mapping[str, Any], model: str, stream: bool, options: AnthropicOptions) -> dict[str, Any]:
    """The Messages API request for an OpenAI chat request (a new dict; `body` is not modified)."""
    if (body.get("n") or 1) != 1:
        raise bad_request("n > 1 is not supported by this model", "n")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad_request("'messages' must be an array", "messages")
    system, turns = _turns(messages)
    request: dict[str, Any] = {
        "model": model,
        "max_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or options.default_max_tokens,
        "messages": turns,
    }
    if system:
        request["system"] = system
    if stream:
        request["stream"] = True
    stop = body.get("stop")
    if stop:
        request["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if options.forward_sampling:
        # OpenAI's temperature runs 0..2, Anthropic's 0..1.
        if body.get("temperature") is not None:
            request["temperature"] = min(float(body["temperature"]), 1.0)
        if body.get("top_p") is not None:
            request["top_p"] = body["top_p"]
    user = body.get("safety_identifier") or body.get("user")
    if isinstance(user, str) and user:
        request["metadata"] = {"user_id": user}
    tools = [_tool(tool, i) for i, tool in enumerate(body.get("tools") or ())]
    tool_choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls")) if tools else None
    _structured_output(body.get("response_format"), options, request, tools)
    if "tool_choice" in request:  # forced by the structured-output tool
        tool_choice = request.pop("tool_choice")
    if tools:
        request["tools"] = tools
    if tool_choice:
        request["tool_choice"] = tool_choice
    for name in _NATIVE_FIELDS:
        if name in body:
            request[name] = body[name]
    if options.prompt_caching is not None:
        place_breakpoints(request, options.prompt_caching)
    return request


def _turns(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """System blocks and user/assistant turns; consecutive turns of one role are merged."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object", "messages")
        role = message.get("role")
        if role in ("system", "developer"):
            blocks = _text_blocks(message.get("content"), where)
            _mark_last(blocks, message.get("cache_control"))
            system.extend(blocks)
            continue
        if role == "user":
            role, blocks = "user", _user_blocks(message.get("content"), where)
        elif role == "assistant":
            blocks = _assistant_blocks(message, where)
        elif role == "tool":
            role, blocks = "user", [_tool_result(message, where)]
        else:
            raise bad_request(f"{where}.role {role!r} is not supported by this model", "messages")
        _mark_last(blocks, message.get("cache_control"))
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return system, turns


def _text_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if isinstance(content, list):
        return [_with_cache(part, {"type": "text", "text": part.get("text") or ""})
                for part in content if isinstance(part, dict) and part.get("type") == "text" and part.get("text")]
    if content is None:
        return []
    raise bad_request(f"{where}.content must be a string or an array of parts", "messages")


def _user_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        return _text_blocks(content, where)
    blocks = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if part.get("text"):
                blocks.append(_with_cache(part, {"type": "text", "text": part["text"]}))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise bad_request(f"{where}.content[{j}].image_url.url must be a string", "messages")
            inline = data_url(url)
            source = ({"type": "base64", "media_type": inline[0], "data": inline[1]} if inline
                      else {"type": "url", "url": url})
            blocks.append(_with_cache(part, {"type": "image", "source": source}))
        elif kind == "file" and isinstance(part.get("file"), dict) and part["file"].get("file_data"):
            inline = data_url(part["file"]["file_data"])
            if inline is None:
                raise bad_request(f"{where}.content[{j}].file.file_data must be a data: URL", "messages")
            source = {"type": "base64", "media_type": inline[0], "data": inline[1]}
            blocks.append(_with_cache(part, {"type": "document", "source": source}))
        else:
            raise bad_request(f"{where}.content[{j}] of type {kind!r} is not supported by this model", "messages")
    return blocks


def _assistant_blocks(message: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    blocks = _text_blocks(message.get("content"), where)
    for k, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") or {}
        blocks.append({
            "type": "tool_use", "id": call.get("id") or f"toolu_{k}", "name": function.get("name") or "",
            "input": json_arguments(function.get("arguments"), f"{where}.tool_calls[{k}].function.arguments"),
        })
    return blocks


def _tool_result(message: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not message.get("tool_call_id"):
        raise bad_request(f"{where}.tool_call_id is required", "messages")
    return {"type": "tool_result", "tool_use_id": message["tool_call_id"],
            "content": text_of(message.get("content"))}


def _with_cache(part: Mapping[str, Any], block: dict[str, Any]) -> dict[str, Any]:
    """Carry an explicit `cache_control` on a content part over to its block."""
    if part.get("cache_control"):
        block["cache_control"] = part["cache_control"]
    return block


def _mark_last(blocks: list[dict[str, Any]], cache_control: Any) -> None:
    # A message-level cache_control (LiteLLM's convention) marks the message's last block.
    if cache_control and blocks:
        blocks[-1]["cache_control"] = cache_control


def _tool(tool: Any, index: int) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict) or not function.get("name"):
        raise bad_request(f"tools[{index}] must be a function tool with a name", "tools")
    out = {"name": function["name"],
           "input_schema": function.get("parameters") or {"type": "object", "properties": {}}}
    if function.get("description"):
        out["description"] = function["description"]
    if tool.get("cache_control"):
        out["cache_control"] = tool["cache_control"]
    return out


def _tool_choice(choice_: Any, parallel: Any) -> dict[str, Any] | None:
    if choice_ is None:
        mapped: dict[str, Any] | None = {"type": "auto"} if parallel is False else None
    elif choice_ == "auto":
        mapped = {"type": "auto"}
    elif choice_ == "none":
        return {"type": "none"}
    elif choice_ == "required":
        mapped = {"type": "any"}
    elif isinstance(choice_, dict) and choice_.get("type") == "function":
        mapped = {"type": "tool", "name": (choice_.get("function") or {}).get("name")}
    elif isinstance(choice_, dict) and choice_.get("type") == "allowed_tools":
        mode = (choice_.get("allowed_tools") or {}).get("mode")
        mapped = {"type": "any" if mode == "required" else "auto"}
    else:
        raise bad_request("unsupported tool_choice", "tool_choice")
    if mapped is not None and parallel is False:
        mapped["disable_parallel_tool_use"] = True
    return mapped


def _structured_output(response_format: Any, options: AnthropicOptions, request: dict[str, Any],
                       tools: list[dict[str, Any]]) -> None:
    if not isinstance(response_format, dict) or response_format.get("type") in (None, "text"):
        return
    if response_format.get("type") == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") or {"type": "object"}
        if options.structured_output == "output_config":
            request["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
            return
    elif response_format.get("type") == "json_object":
        # Anthropic has no JSON mode; a tool taking any object gives the same guarantee.
        schema = {"type": "object"}
    else:
        raise bad_request("unsupported response_format type", "response_format")
    tools.append({"name": STRUCTURED_TOOL, "description": "Give the answer as this tool's input.",
                  "input_schema": schema})
    request["tool_choice"] = {"type": "tool", "name": STRUCTURED_TOOL}


def _wants_json(body: Mapping[str, Any]) -> bool:
    response_format = body.get("response_format")
    return isinstance(response_format, dict) and response_format.get("type") in ("json_schema", "json_object")


def place_breakpoints(request: dict[str, Any], caching: PromptCaching) -> None:
    """Add cache_control markers after system+tools and on the last user turns, within the limit.

    Explicit markers from the client count first; automatic ones fill what is
    left, in order of value: the shared prefix, then the newest turns.
    """
    system = request.get("system") or []
    tools = request.get("tools") or []
    turns = request.get("messages") or []
    used = sum(1 for block in (*tools, *system, *(b for t in turns for b in t["content"]))
               if "cache_control" in block) + ("cache_control" in request)
    candidates: list[dict[str, Any]] = []
    if caching.system_and_tools and (system or tools):
        # The cache prefix runs tools -> system -> messages, so the end of the
        # system prompt covers the tools too.
        candidates.append(system[-1] if system else tools[-1])
    if caching.last_turns:
        user_turns = [t for t in reversed(turns) if t["role"] == "user"][: caching.last_turns]
        candidates.extend(t["content"][-1] for t in user_turns)
    marker: dict[str, Any] = {"type": "ephemeral"}
    if caching.ttl != "5m":
        marker["ttl"] = caching.ttl
    for block in candidates[: max(0, MAX_BREAKPOINTS - used)]:
        block.setdefault("cache_control", marker)


# --- response ----------------------------------------------------------------------------------


def usage_from_anthropic(raw: Any) -> Usage | None:
    """Canonical usage: Anthropic's input_tokens excludes cached tokens, OpenAI's prompt_tokens includes them."""
    if not isinstance(raw, dict):
        return None
    cache_read = int(raw.get("cache_read_input_tokens") or 0)
    cache_write = int(raw.get("cache_creation_input_tokens") or 0)
    return Usage(
        prompt_tokens=int(raw.get("input_tokens") or 0) + cache_read + cache_write,
        completion_tokens=int(raw.get("output_tokens") or 0),
        cached_tokens=cache_read,
        cache_write_tokens=cache_write,
    )


def _finish_reason(stop_reason: Any, has_tool_calls: bool) -> str:
    reason = _STOP_REASONS.get(stop_reason or "end_turn", "stop")
    if reason == "tool_calls" and not has_tool_calls:
        return "stop"  # the only tool used was the structured-output one
    return reason


def _status_of(event: Mapping[str, Any]) -> int:
    kind = (event.get("error") or {}).get("type")
    return {"overloaded_error": 529, "rate_limit_error": 429, "timeout_error": 504}.get(kind, 502)


def _failure(status: int, payload: Mapping[str, Any], headers: Mapping[str, str]) -> UpstreamFailure:
    error = payload.get("error") if isinstance(payload.get("error"), dict) else {}
    error_type = error.get("type")
    # Retryable statuses decide on their own; otherwise the error type is the more precise signal.
    kind = _STATUS_KINDS[status] if status in _RETRY_STATUSES else _ERROR_KINDS.get(error_type)
    kind = kind or _STATUS_KINDS.get(status)
    if kind is None:
        kind = FailureKind.UPSTREAM_ERROR if status >= 500 else FailureKind.BAD_REQUEST
    message = str(error.get("message") or f"upstream returned HTTP {status}")
    code = None
    if kind is FailureKind.BAD_REQUEST and "prompt is too long" in message:
        kind, code = FailureKind.CONTEXT_LENGTH, "context_length_exceeded"
    elif kind is FailureKind.RATE_LIMITED:
        code = "rate_limit_exceeded"
    return UpstreamFailure(kind=kind, status=status, message=message, code=code,
                           retry_after=retry_after_seconds(headers))
