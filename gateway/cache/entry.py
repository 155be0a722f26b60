"""A cached answer in canonical form, stored once and replayable either way.

An entry holds the complete non-streamed JSON response and, pre-encoded, the
SSE events of the same answer, so a hit is answered by writing stored bytes:
a non-streamed request gets `body`, a streamed one `events` (+ the usage
event when it asked for usage) + `[DONE]`. An entry recorded from a stream
keeps the upstream's own events and assembles the body from them; one
recorded from a whole response synthesizes the events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from providers.base import Endpoint, Usage
from providers.canonical import usage_json
from providers.openai_compat import usage_from_openai
from providers.sse import DONE_EVENT, encode_event

# Content is replayed in pieces of this many characters: a valid stream of
# chunked deltas without one event per token.
_PIECE = 256
_ENTRY_OVERHEAD = 200
_VERSION = 1


@dataclass(frozen=True, slots=True)
class Entry:
    created: float  # wall-clock seconds when the answer was stored
    body: bytes  # the complete non-streamed JSON response
    events: bytes  # the answer's SSE events, without the usage event and [DONE]
    usage_event: bytes  # the final usage chunk as an SSE event (b"" when the upstream reported none)
    usage: Usage | None
    # The deployment that produced the answer, (provider, upstream model): what a hit saves is priced at it.
    served_by: tuple[str, str] | None = None

    @property
    def size(self) -> int:
        return len(self.body) + len(self.events) + len(self.usage_event) + _ENTRY_OVERHEAD

    def stream_bytes(self, wants_usage: bool) -> bytes:
        """The whole replayed stream, ready for one write."""
        return self.events + (self.usage_event if wants_usage else b"") + DONE_EVENT

    def encode(self) -> bytes:
        usage = self.usage
        head = {"v": _VERSION, "created": self.created, "lengths": [len(self.body), len(self.events)],
                "usage": None if usage is None else [usage.prompt_tokens, usage.completion_tokens,
                                                     usage.cached_tokens, usage.cache_write_tokens,
                                                     usage.reasoning_tokens],
                "served_by": self.served_by}
        # orjson never writes a raw newline, so the first one ends the header.
        return orjson.dumps(head) + b"\n" + self.body + self.events + self.usage_event

    @classmethod
    def decode(cls, raw: bytes) -> Entry | None:
        """The entry `encode` wrote, or None for anything else (e.g. another version's format)."""
        end = raw.find(b"\n")
        try:
            head = orjson.loads(raw[:end])
            if end < 0 or head.get("v") != _VERSION:
                return None
            body_len, events_len = head["lengths"]
            start = end + 1
            usage = Usage(*head["usage"]) if head["usage"] is not None else None
            served_by = head.get("served_by")
            return cls(float(head["created"]), raw[start:start + body_len],
                       raw[start + body_len:start + body_len + events_len], raw[start + body_len + events_len:], usage,
                       tuple(served_by) if served_by else None)  # type: ignore[arg-type]
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            return None


def _event(payload: Mapping[str, Any]) -> bytes:
    return encode_event(orjson.dumps(payload))


def from_response(endpoint: Endpoint, body: bytes, usage: Usage | None, created: float) -> Entry:
    """An entry from a complete response body; its stream form is synthesized."""
    payload = orjson.loads(body)
    if endpoint is Endpoint.EMBEDDINGS:
        return Entry(created, body, b"", b"", usage)
    head = {"id": payload.get("id"), "object": "chat.completion.chunk" if endpoint is Endpoint.CHAT
            else "text_completion", "created": payload.get("created"), "model": payload.get("model")}
    if payload.get("system_fingerprint") is not None:
        head["system_fingerprint"] = payload["system_fingerprint"]
    events: list[bytes] = []
    for position, choice in enumerate(payload.get("choices") or ()):
        index = choice.get("index", position)
        if endpoint is Endpoint.CHAT:
            events.extend(_chat_events(head, index, choice))
        else:
            for piece in _pieces(choice.get("text") or ""):
                events.append(_event({**head, "choices": [{"text": piece, "index": index, "logprobs": None,
                                                            "finish_reason": None}]}))
            events.append(_event({**head, "choices": [{"text": "", "index": index, "logprobs": None,
                                                        "finish_reason": choice.get("finish_reason")}]}))
    raw_usage = payload.get("usage")
    usage_event = _event({**head, "choices": [], "usage": raw_usage}) if isinstance(raw_usage, dict) else b""
    return Entry(created, body, b"".join(events), usage_event, usage)


def _chat_events(head: Mapping[str, Any], index: int, choice: Mapping[str, Any]) -> list[bytes]:
    message = choice.get("message") or {}
    content = message.get("content")
    calls = message.get("tool_calls") or []

    def delta(values: Mapping[str, Any], finish: str | None = None) -> bytes:
        return _event({**head, "choices": [{"index": index, "delta": values, "logprobs": None,
                                            "finish_reason": finish}]})

    events = [delta({"role": "assistant", "content": "" if content is not None or not calls else None})]
    events.extend(delta({"content": piece}) for piece in _pieces(content or ""))
    if message.get("refusal"):
        events.append(delta({"refusal": message["refusal"]}))
    for position, call in enumerate(calls):
        function = call.get("function") or {}
        events.append(delta({"tool_calls": [{"index": position, "id": call.get("id"), "type": call.get("type",
                             "function"), "function": {"name": function.get("name"),
                                                       "arguments": function.get("arguments", "")}}]}))
    events.append(delta({}, choice.get("finish_reason")))
    return events


def _pieces(text: str) -> list[str]:
    return [text[i:i + _PIECE] for i in range(0, len(text), _PIECE)]


def from_stream(endpoint: Endpoint, chunks: Sequence[bytes], usage: Usage | None, usage_data: bytes | None,
                created: float) -> Entry:
    """An entry from a completed stream's canonical chunks (without its usage-only chunk)."""
    events = b"".join(map(encode_event, chunks))
    usage_event = encode_event(usage_data) if usage_data is not None else b""
    raw_usage: Any = None
    if usage_data is not None:
        raw_usage = orjson.loads(usage_data).get("usage")
    if raw_usage is None and usage is not None:
        raw_usage = usage_json(usage)
    body = orjson.dumps(_assemble(endpoint, chunks, raw_usage))
    if usage is None and isinstance(raw_usage, dict):
        usage = usage_from_openai(raw_usage)
    return Entry(created, body, events, usage_event, usage)


def _assemble(endpoint: Endpoint, chunks: Sequence[bytes], raw_usage: Any) -> dict[str, Any]:
    """The non-streamed response a client would have received for this stream."""
    head: dict[str, Any] = {}
    states: dict[int, dict[str, Any]] = {}
    for data in chunks:
        payload = orjson.loads(data)
        if not head:
            head = payload
        for choice in payload.get("choices") or ():
            state = states.setdefault(choice.get("index", 0), {"text": [], "refusal": [], "calls": {},
                                                                "finish": None})
            if choice.get("finish_reason"):
                state["finish"] = choice["finish_reason"]
            if endpoint is Endpoint.COMPLETIONS:
                state["text"].append(choice.get("text") or "")
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                state["text"].append(delta["content"])
            if delta.get("refusal"):
                state["refusal"].append(delta["refusal"])
            for call in delta.get("tool_calls") or ():
                entry = state["calls"].setdefault(call.get("index", 0), {"id": None, "type": "function",
                                                                         "function": {"name": "", "arguments": ""}})
                entry["id"] = call.get("id") or entry["id"]
                function = call.get("function") or {}
                if function.get("name"):
                    entry["function"]["name"] = function["name"]
                entry["function"]["arguments"] += function.get("arguments") or ""
    choices = []
    for index in sorted(states):
        state = states[index]
        text = "".join(state["text"])
        if endpoint is Endpoint.COMPLETIONS:
            choices.append({"text": text, "index": index, "logprobs": None, "finish_reason": state["finish"]})
            continue
        calls = [state["calls"][i] for i in sorted(state["calls"])]
        message: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None,
                                   "refusal": "".join(state["refusal"]) or None, "annotations": []}
        if calls:
            message["tool_calls"] = calls
        choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": state["finish"]})
    body: dict[str, Any] = {"id": head.get("id"), "object": "chat.completion" if endpoint is Endpoint.CHAT
                            else "text_completion", "created": head.get("created"), "model": head.get("model"),
                            "choices": choices}
    if raw_usage is not None:
        body["usage"] = raw_usage
    if head.get("system_fingerprint") is not None:
        body["system_fingerprint"] = head["system_fingerprint"]
    return body
