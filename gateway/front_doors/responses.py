"""`POST /v1/responses`: the OpenAI Responses API, served by translating to chat for any provider.

Models served only by upstreams with the Responses API (OpenAI, vLLM) are passed
through natively instead (responses_passthrough.py); everything below is the
translation for the rest.

String or item input, `instructions`, `text.format` (json_schema / json_object),
function tools and `tool_choice` map onto a chat request; the chat reply or
stream comes back as a Response object or the Responses event sequence
(protocols.md 2.3-2.5). Stored conversation state is not kept, so
`previous_response_id`, `conversation` and `background` are refused with a 400.
Errors are OpenAI-shaped already and pass through unchanged.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from gateway.asgi import request_headers, respond
from gateway.errors import ErrorKind, GatewayError, render
from gateway.front_doors.reframing import ChatStream, reframed
from gateway.front_doors.responses_passthrough import refuse_stateful, relay_events, serves_natively
from gateway.pipeline import Exchange, Reply, Services, StreamReply, decode_object, handle_inference
from providers.base import Endpoint
from providers.sse import encode_named_event

_UNSUPPORTED = ("previous_response_id", "conversation", "background")
_PASSED = ("temperature", "top_p", "parallel_tool_calls", "user", "safety_identifier", "prompt_cache_key",
           "service_tier", "top_logprobs")


class ResponsesRoute:
    """ASGI endpoint for POST /v1/responses."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        services: Services = scope["app"].state.services
        headers = request_headers(scope)

        async def serve(exchange: Exchange, raw: bytes) -> Reply | StreamReply:
            try:
                request = decode_object(raw)
                native = serves_natively(services.policy(), request)  # OpenAI, vLLM: passed through as is
                if native:
                    refuse_stateful(request)
                body = raw if native else orjson.dumps(chat_request(request))
            except GatewayError as error:
                return Reply(*render(error))
            except orjson.JSONEncodeError:  # more than 255 levels deep: no upstream request can carry it
                return Reply(*render(GatewayError(ErrorKind.BAD_REQUEST, "The request is nested too deeply.",
                                                  param="input", code="nesting_too_deep")))
            reply = await handle_inference(services, Endpoint.RESPONSES if native else Endpoint.CHAT, exchange,
                                           headers, body)
            if isinstance(reply, StreamReply):
                events = relay_events(reply.events) if native else response_events(reply.events, request)
                return StreamReply(reply.headers, events)
            if native or reply.status >= 400:
                return reply
            return Reply(reply.status, orjson.dumps(response(orjson.loads(reply.body), request)), reply.headers)

        await respond(scope, receive, send, serve)


def _bad(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(ErrorKind.BAD_REQUEST, message, param=param, code="unsupported_parameter" if param else None)


# --- request: Responses -> chat ----------------------------------------------------------------


def chat_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """The chat request for a Responses API request."""
    for name in _UNSUPPORTED:
        if body.get(name):
            raise _bad(f"'{name}' is not supported by this gateway: it keeps no response state; "
                       "send the whole conversation as `input` instead.", name)
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    source = body.get("input")
    if isinstance(source, str):
        messages.append({"role": "user", "content": source})
    elif isinstance(source, list):
        for i, item in enumerate(source):
            _add_item(messages, item, i)
    else:
        raise GatewayError(ErrorKind.BAD_REQUEST, "Missing required parameter: 'input'.", param="input",
                           code="missing_required_parameter")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for name in _PASSED:
        if body.get(name) is not None:
            chat[name] = body[name]
    effort = (body.get("reasoning") or {}).get("effort")
    if effort:
        chat["reasoning_effort"] = effort
    fmt = (body.get("text") or {}).get("format") or {}
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        chat["response_format"] = {"type": "json_schema", "json_schema": spec}
    elif fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    tools = body.get("tools") or []
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


def response(chat: Mapping[str, Any], request: Mapping[str, Any]) -> dict[str, Any]:
    """The Response object for a chat.completion."""
    choice = (chat.get("choices") or [{}])[0]
    reply = choice.get("message") or {}
    output: list[dict[str, Any]] = []
    if reply.get("content") or reply.get("refusal"):
        output.append(_message_item(chat.get("id"), reply.get("content"), reply.get("refusal")))
    for call in reply.get("tool_calls") or ():
        function = call.get("function") or {}
        output.append(_call_item(call.get("id"), function.get("name"), function.get("arguments") or ""))
    return _envelope(chat, request, output, choice.get("finish_reason"), chat.get("usage"))


def _envelope(chat: Mapping[str, Any], request: Mapping[str, Any], output: list[dict[str, Any]],
              finish_reason: Any, chat_usage: Any, status: str | None = None) -> dict[str, Any]:
    incomplete = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(finish_reason)
    tools = request.get("tools") or []
    return {
        "id": "resp_" + str(chat.get("id") or ""), "object": "response",
        "created_at": chat.get("created") or int(time.time()), "model": chat.get("model"),
        "status": status or ("incomplete" if incomplete else "completed"),
        "incomplete_details": {"reason": incomplete} if incomplete and not status else None,
        "error": None, "instructions": request.get("instructions"), "output": output,
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "tool_choice": request.get("tool_choice", "auto"), "tools": tools,
        "text": request.get("text") or {"format": {"type": "text"}},
        "temperature": request.get("temperature"), "top_p": request.get("top_p"),
        "max_output_tokens": request.get("max_output_tokens"), "metadata": request.get("metadata") or {},
        "store": False, "usage": _usage(chat_usage),
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


def response_events(chunks: AsyncIterator[bytes], request: Mapping[str, Any]) -> AsyncIterator[bytes]:
    """The Responses event sequence for the pipeline's chat stream."""
    return reframed(chunks, _ResponseStream(request))


class _ResponseStream(ChatStream):
    """Turns chat chunks into Responses events, one `data:` payload at a time.

    Text becomes a message item, each tool call a function_call item, in the
    order they start; every item is closed with its `done` events before
    `response.completed`, which carries the full output and the usage.
    """

    def __init__(self, request: Mapping[str, Any]) -> None:
        super().__init__()
        self._request = request
        self._event = _Events()
        self._head: dict[str, Any] = {}
        self._output: list[dict[str, Any]] = []  # items in output order; open ones are still growing
        self._text_at: int | None = None  # output index of the open message item
        self._calls: dict[int, int] = {}  # chat tool_calls index -> output index
        self._finish: str | None = None
        self._usage: Any = None

    def failed(self, error: Mapping[str, Any]) -> list[bytes]:
        return [self._event("error", code=error.get("code"), message=error.get("message"), param=error.get("param"))]

    def chunk(self, chunk: Mapping[str, Any]) -> list[bytes]:
        event, output = self._event, self._output
        out: list[bytes] = []
        if not self._head:
            self._head = {"id": chunk.get("id"), "created": chunk.get("created"), "model": chunk.get("model")}
            started = _envelope(self._head, self._request, [], None, None, status="in_progress")
            out.append(event("response.created", response=started))
            out.append(event("response.in_progress", response=started))
        self._usage = chunk.get("usage") or self._usage
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            self._finish = choice.get("finish_reason") or self._finish
            if delta.get("content"):
                if self._text_at is None:
                    self._text_at = text_at = len(output)
                    item = _message_item(f"{self._head['id']}_{text_at}", None, status="in_progress")
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
        out: list[bytes] = []
        for at, item in enumerate(self._output):
            if item["status"] == "in_progress":
                out += _close(self._event, self._output, at)
        final = _envelope(self._head, self._request, self._output, self._finish, self._usage)
        out.append(self._event("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                               response=final))
        return out


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
