"""The Responses API translated to chat and back, for providers without a native Responses endpoint.

String or item input, `instructions`, `text.format` (json_schema / json_object),
function tools and `tool_choice` map onto a chat request; the chat reply or
stream comes back as a Response object or the Responses event sequence
(protocols.md 2.3-2.5). Plain functions over data: the route
(responses.py) decides what is sent and what is kept.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.errors import ErrorKind, GatewayError
from gateway.front_doors.reframing import ChatStream
from gateway.request_checks import invalid, json_kind
from providers.sse import encode_named_event

_PASSED = ("temperature", "top_p", "parallel_tool_calls", "user", "safety_identifier", "prompt_cache_key",
           "service_tier", "top_logprobs")
_BREAKPOINT = {"type": "ephemeral"}


def _bad(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(ErrorKind.BAD_REQUEST, message, param=param, code="unsupported_parameter" if param else None)


_EXPECTED = {dict: "an object", list: "an array"}


def _typed(value: Any, expected: type, param: str) -> Any:
    """An optional field of the request: None when absent; the pipeline's 400 for a field of another JSON type
    (gateway/request_checks.py) when it is not `expected`."""
    if value is None or isinstance(value, expected):
        return value
    raise invalid(param, f"Invalid type for '{param}': expected {_EXPECTED[expected]}, but got {json_kind(value)}.")


# --- request: Responses -> chat ----------------------------------------------------------------


def chat_request(body: Mapping[str, Any], cached_items: int | None = None, *,
                 mark_end: bool = False) -> dict[str, Any]:
    """The chat request for a Responses API request.

    `cached_items`: the first input items were the previous turn's prompt, which
    that turn marked, so the message that ends them gets a prompt-cache
    breakpoint too (the provider reads that prefix from its cache); `mark_end`
    puts one at the end, where the next turn will find it.
    """
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    source = body.get("input")
    if isinstance(source, str):
        messages.append({"role": "user", "content": source})
    elif isinstance(source, list):
        for i, item in enumerate(source):
            _add_item(messages, item, i)
            if cached_items and i == cached_items - 1 and messages:
                messages[-1]["cache_control"] = _BREAKPOINT
    else:
        raise GatewayError(ErrorKind.BAD_REQUEST, "Missing required parameter: 'input'.", param="input",
                           code="missing_required_parameter")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for name in _PASSED:
        if body.get(name) is not None:
            chat[name] = body[name]
    effort = (_typed(body.get("reasoning"), dict, "reasoning") or {}).get("effort")
    if effort:
        chat["reasoning_effort"] = effort
    fmt = _typed((_typed(body.get("text"), dict, "text") or {}).get("format"), dict, "text.format") or {}
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        chat["response_format"] = {"type": "json_schema", "json_schema": spec}
    elif fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    tools = _typed(body.get("tools"), list, "tools") or []
    if tools:
        chat["tools"] = [_tool(t, i) for i, t in enumerate(tools)]
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        chat["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") == "function":
        chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    if body.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # response.completed carries the usage
    if mark_end and messages:
        messages[-1]["cache_control"] = _BREAKPOINT
    return chat


def _add_item(messages: list[dict[str, Any]], item: Any, i: int) -> None:
    if not isinstance(item, dict):
        raise _bad(f"input[{i}] must be an object", "input")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise _bad(f"input[{i}].role {role!r} is not supported", "input")
        content = item.get("content")
        if isinstance(content, list):
            parts = [_part(p, i) for p in content]
            content = "".join(p["text"] for p in parts) if role == "assistant" else parts
        messages.append({"role": role, "content": content})
    elif kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)  # parallel calls replay as one assistant turn
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else "".join(
            p.get("text", "") for p in output or () if isinstance(p, dict))
        messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
    elif kind != "reasoning":  # reasoning items cannot be replayed to other providers; dropped
        raise _bad(f"input[{i}] of type {kind!r} is not supported", "input")


def _part(part: Any, i: int) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": part.get("text") or ""}
    if kind == "refusal":
        return {"type": "text", "text": part.get("refusal") or ""}
    if kind == "input_image" and part.get("image_url"):
        image = {"url": part["image_url"]}
        if part.get("detail"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file" and part.get("file_data"):
        file = {"file_data": part["file_data"]}
        if part.get("filename"):
            file["filename"] = part["filename"]
        return {"type": "file", "file": file}
    raise _bad(f"input[{i}] content of type {kind!r} is not supported (file ids and file URLs need stored files)",
               "input")


def _tool(tool: Any, i: int) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not tool.get("name"):
        raise _bad(f"tools[{i}]: only function tools are supported", "tools")
    function = {"name": tool["name"], "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
    for name in ("description", "strict"):
        if tool.get(name) is not None:
            function[name] = tool[name]
    return {"type": "function", "function": function}


# --- response: chat -> Responses ---------------------------------------------------------------


def response(chat: Mapping[str, Any], request: Mapping[str, Any], identity: Mapping[str, Any]) -> dict[str, Any]:
    """The Response object for a chat.completion; `identity` has the gateway's id, store and previous id."""
    choice = (chat.get("choices") or [{}])[0]
    reply = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    if reply.get("content") or reply.get("refusal"):
        output.append(_message_item(_item_id(identity, 0), reply.get("content"), reply.get("refusal")))
    for call in reply.get("tool_calls") or ():
        function = call.get("function") or {}
        output.append(_call_item(call.get("id"), function.get("name"), function.get("arguments") or ""))
    return _envelope(chat, request, output, choice.get("finish_reason"), chat.get("usage"), identity)


def _item_id(identity: Mapping[str, Any], index: int) -> str:
    """An output item id unique to this response (input_items pages by id)."""
    return f"{str(identity['id']).removeprefix('resp_')}_{index}"


def _envelope(chat: Mapping[str, Any], request: Mapping[str, Any], output: list[dict[str, Any]],
              finish_reason: Any, chat_usage: Any, identity: Mapping[str, Any],
              status: str | None = None) -> dict[str, Any]:
    incomplete = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(finish_reason)
    tools = request.get("tools") or []
    return {
        "id": identity["id"], "object": "response",
        "created_at": chat.get("created") or int(time.time()), "model": chat.get("model"),
        "status": status or ("incomplete" if incomplete else "completed"),
        "incomplete_details": {"reason": incomplete} if incomplete and not status else None,
        "error": None, "instructions": request.get("instructions"), "output": output,
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "tool_choice": request.get("tool_choice", "auto"), "tools": tools,
        "text": request.get("text") or {"format": {"type": "text"}},
        "temperature": request.get("temperature"), "top_p": request.get("top_p"),
        "max_output_tokens": request.get("max_output_tokens"), "metadata": request.get("metadata") or {},
        "store": identity["store"], "previous_response_id": identity["previous_response_id"],
        "usage": _usage(chat_usage),
    }


def _message_item(chat_id: Any, text: str | None, refusal: str | None = None,
                  status: str = "completed") -> dict[str, Any]:
    content = []
    if text is not None:
        content.append({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
    if refusal:
        content.append({"type": "refusal", "refusal": refusal})
    return {"type": "message", "id": "msg_" + str(chat_id or ""), "role": "assistant", "status": status,
            "content": content}


def _call_item(call_id: Any, name: Any, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": "fc_" + str(call_id or ""), "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _usage(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        return None
    prompt_details = raw.get("prompt_tokens_details") or {}
    completion_details = raw.get("completion_tokens_details") or {}
    return {"input_tokens": raw.get("prompt_tokens") or 0,
            "input_tokens_details": {"cached_tokens": prompt_details.get("cached_tokens") or 0},
            "output_tokens": raw.get("completion_tokens") or 0,
            "output_tokens_details": {"reasoning_tokens": completion_details.get("reasoning_tokens") or 0},
            "total_tokens": raw.get("total_tokens") or 0}


class _Events:
    """Builds the numbered Responses events of one stream."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return encode_named_event(kind, orjson.dumps(payload))


class ResponseStream(ChatStream):
    """Turns chat chunks into Responses events, one `data:` payload at a time.

    Text becomes a message item, each tool call a function_call item, in the
    order they start; every item is closed with its `done` events before
    `response.completed`, which carries the full output and the usage.
    """

    def __init__(self, request: Mapping[str, Any], identity: Mapping[str, Any]) -> None:
        super().__init__()
        self._request = request
        self._identity = identity
        self.final: dict[str, Any] | None = None
        self._event = _Events()
        self._head: dict[str, Any] = {}
        self._output: list[dict[str, Any]] = []  # items in output order; open ones are still growing
        self._text_at: int | None = None  # output index of the open message item
        self._calls: dict[int, int] = {}  # chat tool_calls index -> output index
        self._finish: str | None = None
        self._usage: Any = None

    def failed(self, error: Mapping[str, Any]) -> list[bytes]:
        return [self._event("error", code=error.get("code"), message=error.get("message"), param=error.get("param"))]

    def failure(self, error: GatewayError) -> bytes:
        return self.failed({"code": error.code, "message": error.message, "param": error.param})[0]

    def chunk(self, chunk: Mapping[str, Any]) -> list[bytes]:
        event, output = self._event, self._output
        out: list[bytes] = []
        if not self._head:
            self._head = {"id": chunk.get("id"), "created": chunk.get("created"), "model": chunk.get("model")}
            started = _envelope(self._head, self._request, [], None, None, self._identity, status="in_progress")
            out.append(event("response.created", response=started))
            out.append(event("response.in_progress", response=started))
        self._usage = chunk.get("usage") or self._usage
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            self._finish = choice.get("finish_reason") or self._finish
            if delta.get("content"):
                if self._text_at is None:
                    self._text_at = text_at = len(output)
                    item = _message_item(_item_id(self._identity, text_at), None, status="in_progress")
                    output.append(item)
                    out.append(event("response.output_item.added", output_index=text_at, item=item))
                    item["content"].append({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
                    out.append(event("response.content_part.added", item_id=item["id"], output_index=text_at,
                                     content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
                item = output[self._text_at]
                item["content"][0]["text"] += delta["content"]
                out.append(event("response.output_text.delta", item_id=item["id"], output_index=self._text_at,
                                 content_index=0, delta=delta["content"], logprobs=[]))
            for call in delta.get("tool_calls") or ():
                function = call.get("function") or {}
                if call.get("index") not in self._calls:
                    if self._text_at is not None:
                        out += _close(event, output, self._text_at)
                        self._text_at = None
                    self._calls[call.get("index")] = len(output)
                    item = _call_item(call.get("id"), function.get("name"), "", status="in_progress")
                    output.append(item)
                    out.append(event("response.output_item.added", output_index=len(output) - 1, item=dict(item)))
                at = self._calls[call.get("index")]
                if function.get("arguments"):
                    output[at]["arguments"] += function["arguments"]
                    out.append(event("response.function_call_arguments.delta", item_id=output[at]["id"],
                                     output_index=at, delta=function["arguments"]))
        return out

    def closing(self) -> list[bytes]:
        """Every open item closed; the terminal event waits in `final` for `terminal()`."""
        out: list[bytes] = []
        for at, item in enumerate(self._output):
            if item["status"] == "in_progress":
                out += _close(self._event, self._output, at)
        self.final = _envelope(self._head, self._request, self._output, self._finish, self._usage, self._identity)
        return out

    def terminal(self) -> bytes:
        final = self.final
        assert final is not None
        return self._event("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                           response=final)


def _close(event: _Events, output: list[dict[str, Any]], at: int) -> list[bytes]:
    item = output[at]
    item["status"] = "completed"
    if item["type"] == "function_call":
        return [event("response.function_call_arguments.done", item_id=item["id"], output_index=at,
                      name=item["name"], arguments=item["arguments"]),
                event("response.output_item.done", output_index=at, item=item)]
    part = item["content"][0]
    return [event("response.output_text.done", item_id=item["id"], output_index=at, content_index=0,
                  text=part["text"], logprobs=[]),
            event("response.content_part.done", item_id=item["id"], output_index=at, content_index=0, part=part),
            event("response.output_item.done", output_index=at, item=item)]
