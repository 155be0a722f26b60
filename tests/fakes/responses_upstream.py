"""A fake upstream that also serves the OpenAI Responses API (`POST /v1/responses`), as OpenAI and vLLM do.

Everything of FakeOpenAIUpstream (chat, completions, embeddings, scripted
`Behaviour`s, recording) is inherited; `/v1/responses` answers in the
Responses wire format of protocols.md section 2: a Response object, or the
typed event sequence (`event:` line + `data:` with `type` and
`sequence_number`) ending in `response.completed`/`response.incomplete` with
the usage, and no `[DONE]`. Replies are the same deterministic ones as chat
(`"echo: <last user text>"`, minimal schema instances, one tool call).

`sorted_keys=True` writes every JSON object with its keys sorted, as vLLM does
when it serialises the SDK's pydantic models (`type` last). `cached_tokens`
adds that many cached input tokens to every reply's usage, on chat too.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.openai_upstream import (
    _CHAT,
    _COMPLETIONS,
    _EMBEDDINGS,
    _HEALTH,
    _MODELS,
    TOOL_CALL_ID,
    Behaviour,
    FakeOpenAIUpstream,
    _chat_reply,
    _close,
    _Exchange,
    _json_response,
    _prompt_tokens,
    _split,
    error_body,
)

RESPONSES = "/v1/responses"
_INFERENCE = frozenset({_CHAT, _COMPLETIONS, _EMBEDDINGS, RESPONSES})


class FakeResponsesUpstream(FakeOpenAIUpstream):
    """FakeOpenAIUpstream plus `/v1/responses`; see the module docstring."""

    def __init__(self, *, sorted_keys: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sorted_keys = sorted_keys
        self.cached_tokens = 0

    def reset(self) -> None:
        super().reset()
        self.cached_tokens = 0

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(RESPONSES, self._wrap(RESPONSES, self._responses))
        app.router.add_post(_CHAT, self._wrap(_CHAT, self._chat))
        app.router.add_post(_COMPLETIONS, self._wrap(_COMPLETIONS, self._completions))
        app.router.add_post(_EMBEDDINGS, self._wrap(_EMBEDDINGS, self._embeddings))
        app.router.add_get(_MODELS, self._wrap(_MODELS, self._list_models))
        app.router.add_get(_HEALTH, self._wrap(_HEALTH, self._health))
        app.router.add_route("*", "/{tail:.*}", self._wrap(None, self._not_found))
        return app

    def _next_behaviour(self, path: str) -> Behaviour:
        with self._lock:
            for i, behaviour in enumerate(self._script):
                if behaviour.path == path or (behaviour.path is None and path in _INFERENCE):
                    del self._script[i]
                    return behaviour
        return Behaviour()

    def _dumps(self, payload: Any) -> bytes:
        return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS if self.sorted_keys else 0)

    # -- cached tokens on chat replies --

    async def _respond_json(self, request: web.Request, payload: Any, behaviour: Behaviour) -> web.StreamResponse:
        if isinstance(payload, dict) and payload.get("object") == "chat.completion":
            _add_cached(payload["usage"], self.cached_tokens)
        return await super()._respond_json(request, payload, behaviour)

    async def _stream(self, request: web.Request, exchange: _Exchange, frames: Iterator[bytes],
                      behaviour: Behaviour) -> web.StreamResponse:
        if exchange.path != RESPONSES:
            return await super()._stream(request, exchange, self._with_cached(frames), behaviour)
        exchange.streaming = True
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "Cache-Control": "no-cache", "x-request-id": self._new_id("req")})
        await response.prepare(request)
        for frame in frames:
            if behaviour.drop_after_chunks is not None and exchange.chunks_sent >= behaviour.drop_after_chunks:
                if behaviour.stream_error is not None:
                    error = {"type": "error", "sequence_number": exchange.chunks_sent,
                             "code": behaviour.stream_error.get("code") or "server_error",
                             "message": behaviour.stream_error.get("message"), "param": None}
                    await response.write(b"event: error\ndata: " + self._dumps(error) + b"\n\n")
                _close(request)
                return response
            await response.write(frame)
            exchange.chunks_sent += 1
        return response

    def _with_cached(self, frames: Iterator[bytes]) -> Iterator[bytes]:
        for frame in frames:
            if self.cached_tokens and b'"choices":[],"usage":' in frame:
                payload = orjson.loads(frame[6:])
                _add_cached(payload["usage"], self.cached_tokens)
                frame = b"data: " + orjson.dumps(payload) + b"\n\n"
            yield frame

    # -- /v1/responses --

    async def _responses(self, request: web.Request, exchange: _Exchange, body: dict[str, Any],
                         behaviour: Behaviour) -> web.StreamResponse:
        if body.get("input") is None:
            return _json_response(400, error_body(400, "Missing required parameter: 'input'."))
        if body.get("previous_response_id"):
            return _json_response(400, error_body(400, "Previous response not found (fake upstream)"))
        chat = _as_chat(body)
        reply = _chat_reply(chat, behaviour.content)
        prompt = _prompt_tokens(chat)
        usage = {"input_tokens": prompt + self.cached_tokens,
                 "input_tokens_details": {"cached_tokens": self.cached_tokens},
                 "output_tokens": reply.tokens, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": prompt + self.cached_tokens + reply.tokens}
        number = self._new_id("resp").rsplit("fake", 1)[-1]
        head = {"id": f"resp_fake{number}", "object": "response", "created_at": int(time.time()),
                "model": body.get("model", "fake-model"), "error": None,
                "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
                "parallel_tool_calls": body.get("parallel_tool_calls", True), "metadata": body.get("metadata") or {},
                "temperature": body.get("temperature"), "top_p": body.get("top_p"), "tools": body.get("tools") or [],
                "tool_choice": body.get("tool_choice", "auto"), "store": body.get("store", True),
                "text": body.get("text") or {"format": {"type": "text"}}}
        if reply.text is None:
            item = {"type": "function_call", "id": f"fc_fake{number}", "call_id": TOOL_CALL_ID,
                    "name": reply.tool_name, "arguments": reply.arguments, "status": "completed"}
        else:
            item = {"type": "message", "id": f"msg_fake{number}", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": reply.text, "annotations": [], "logprobs": []}]}
        incomplete = reply.finish_reason == "length"
        final = {**head, "status": "incomplete" if incomplete else "completed",
                 "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                 "output": [item], "usage": usage}
        if not body.get("stream"):
            return await self._respond_json(request, final, behaviour)
        chunks = self.stream_chunks if behaviour.stream_chunks is None else behaviour.stream_chunks
        started = {**head, "status": "in_progress", "incomplete_details": None, "output": [], "usage": None}
        return await self._stream(request, exchange, self._events(started, item, final, chunks), behaviour)

    def _events(self, started: dict[str, Any], item: dict[str, Any], final: dict[str, Any],
                chunks: int) -> Iterator[bytes]:
        sequence = itertools.count()

        def event(kind: str, **fields: Any) -> bytes:
            payload = {"type": kind, "sequence_number": next(sequence), **fields}
            return b"event: " + kind.encode() + b"\ndata: " + self._dumps(payload) + b"\n\n"

        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        ids = {"item_id": item["id"], "output_index": 0}
        if item["type"] == "function_call":
            yield event("response.output_item.added", output_index=0, item={**item, "arguments": "",
                                                                             "status": "in_progress"})
            for piece in _split(item["arguments"], min(chunks, len(item["arguments"]))):
                yield event("response.function_call_arguments.delta", **ids, delta=piece)
            yield event("response.function_call_arguments.done", **ids, name=item["name"],
                        arguments=item["arguments"])
        else:
            part = item["content"][0]
            yield event("response.output_item.added", output_index=0, item={**item, "content": [],
                                                                             "status": "in_progress"})
            yield event("response.content_part.added", **ids, content_index=0,
                        part={"type": "output_text", "text": "", "annotations": []})
            for piece in _split(part["text"], chunks):
                yield event("response.output_text.delta", **ids, content_index=0, delta=piece, logprobs=[])
            yield event("response.output_text.done", **ids, content_index=0, text=part["text"], logprobs=[])
            yield event("response.content_part.done", **ids, content_index=0, part=part)
        yield event("response.output_item.done", output_index=0, item=item)
        yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                    response=final)


def _add_cached(usage: dict[str, Any], cached: int) -> None:
    if cached:
        usage["prompt_tokens"] += cached
        usage["total_tokens"] += cached
        usage["prompt_tokens_details"]["cached_tokens"] = cached


def _as_chat(body: Mapping[str, Any]) -> dict[str, Any]:
    """Just enough of a chat request for the shared reply generator."""
    source = body.get("input")
    messages: list[dict[str, Any]] = []
    if body.get("instructions"):
        messages.append({"role": "system", "content": body["instructions"]})
    for item in [{"role": "user", "content": source}] if isinstance(source, str) else source or ():
        if isinstance(item, dict) and item.get("type", "message") == "message":
            content = item.get("content")
            if isinstance(content, list):
                content = [{"type": "text", "text": p.get("text", "")} for p in content
                           if isinstance(p, dict) and p.get("type") in ("input_text", "output_text")]
            messages.append({"role": item.get("role"), "content": content})
    chat: dict[str, Any] = {"messages": messages, "max_tokens": body.get("max_output_tokens")}
    fmt = (body.get("text") or {}).get("format") or {}
    if fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {"schema": fmt.get("schema") or {}}}
    tools = [t for t in body.get("tools") or () if isinstance(t, dict) and t.get("type") == "function"]
    if tools:
        chat["tools"] = [{"type": "function", "function": {"name": t.get("name"), "parameters": t.get("parameters")}}
                         for t in tools]
    choice = body.get("tool_choice", "auto")
    chat["tool_choice"] = {"function": {"name": choice.get("name")}} if isinstance(choice, dict) else choice
    return chat
