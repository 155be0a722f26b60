"""The built-in mock provider: an in-process OpenAI-compatible engine.

It lets the gateway answer with no API key and no network: deterministic
text derived from the prompt, real token counts (through the gateway's token
counter), real streaming with configurable pacing, tool calls and structured
output that validate against the request's schemas, and embeddings. It speaks
OpenAI's wire format, so translation is the OpenAI-compatible adapter's; this
module only adds the engine that plays the upstream.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import math
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from providers.base import Endpoint, EngineReply, TokenCounting, UpstreamRequest
from providers.openai_compat import CompatSpec, OpenAICompatAdapter

MOCK_BASE_URL = "mock://switchboard/v1"

_PROSE = (
    "switchboard routes every request through policy before it reaches a model and the answer "
    "streams back token by token with usage counted and cost settled so teams stay inside "
    "budgets while operators watch traces limits caches and fallbacks keep traffic flowing"
)
_VOCABULARY = tuple(_PROSE.split())


class MockOptions(BaseModel):
    """Settings of a `kind: mock` provider."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    first_token_ms: float = Field(0, ge=0, description="Delay before the response (or first chunk).")
    token_interval_ms: float = Field(0, ge=0, description="Delay between streamed chunks.")
    reply_words: int = Field(24, ge=1, le=4096, description="Length of the generated text, in words.")
    embedding_dimensions: int = Field(256, ge=1, le=8192, description="Default embedding size.")


class MockEngine:
    """Answers OpenAI-format requests deterministically, in process."""

    def __init__(self, options: MockOptions, counter: TokenCounting) -> None:
        self._options = options
        self._counter = counter

    def respond(self, request: UpstreamRequest) -> EngineReply:
        try:
            body = orjson.loads(request.body or b"{}")
        except orjson.JSONDecodeError:
            return _error(400, "request body is not valid JSON")
        endpoint = _endpoint_of(request.url)
        if endpoint is None:
            return _error(404, f"unknown path {request.url}")
        model = str(body.get("model") or "mock")
        if endpoint is Endpoint.EMBEDDINGS:
            return self._embeddings(body, model)
        if endpoint is Endpoint.CHAT:
            prompt_tokens = self._counter.count_chat_prompt(body, model)
            prompt_text = _last_user_text(body.get("messages") or [])
        else:
            prompt_tokens = self._counter.count_completion_prompt(body, model)
            prompt = body.get("prompt")
            prompt_text = prompt if isinstance(prompt, str) else orjson.dumps(prompt).decode()
        choices = [self._choice(body, model, prompt_text, index) for index in range(_int(body.get("n"), 1))]
        completion_tokens = sum(c.tokens for c in choices)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }
        response_id = ("chatcmpl-" if endpoint is Endpoint.CHAT else "cmpl-") + _digest(request.body or b"")[:24]
        first_delay = self._options.first_token_ms / 1000
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            events = _stream_events(endpoint, response_id, model, choices, usage if include_usage else None)
            return EngineReply(200, events=events, first_delay_s=first_delay,
                             event_interval_s=self._options.token_interval_ms / 1000)
        payload = _response(endpoint, response_id, model, choices, usage)
        delay = first_delay + completion_tokens * self._options.token_interval_ms / 1000
        return EngineReply(200, body=orjson.dumps(payload), first_delay_s=delay)

    def _choice(self, body: Mapping[str, Any], model: str, prompt_text: str, index: int) -> _Choice:
        tool = _forced_tool(body)
        result = _tool_result(body)
        if result is not None and not _tool_required(body):
            # A tool loop ends as an agent expects: after a tool result, the model answers in text.
            text = f"Mock answer from the tool result: {result[:200]}"
            return _Choice(index, text, None, "stop", self._counter.count_text(text, model))
        if tool is not None:
            arguments = orjson.dumps(schema_instance(tool.get("parameters") or {}, prompt_text)).decode()
            name = str(tool.get("name") or "tool")
            call_id = "call_" + _digest(f"{prompt_text}{index}".encode())[:20]
            tokens = self._counter.count_text(name + arguments, model)
            return _Choice(index, None, {"id": call_id, "name": name, "arguments": arguments}, "tool_calls", tokens)
        response_format = body.get("response_format") or {}
        if response_format.get("type") == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema") or {}
            text = orjson.dumps(schema_instance(schema, prompt_text)).decode()
        elif response_format.get("type") == "json_object":
            text = orjson.dumps({"reply": prompt_text[:200]}).decode()
        else:
            text = self._prose(prompt_text, index)
        limit = _int(body.get("max_completion_tokens") or body.get("max_tokens"), 0)
        tokens = self._counter.count_text(text, model)
        finish = "stop"
        if limit and tokens > limit:
            # Cut by words until the count fits, as a real model stops at max_tokens.
            words = text.split(" ")
            while words and self._counter.count_text(" ".join(words), model) > limit:
                words.pop()
            text, tokens, finish = " ".join(words), self._counter.count_text(" ".join(words), model), "length"
        return _Choice(index, text, None, finish, tokens)

    def _prose(self, prompt_text: str, index: int) -> str:
        seed = int(_digest(f"{index}:{prompt_text}".encode())[:8], 16)
        words = [_VOCABULARY[(seed + i * 7) % len(_VOCABULARY)] for i in range(self._options.reply_words)]
        return "Mock reply: " + " ".join(words) + "."

    def _embeddings(self, body: Mapping[str, Any], model: str) -> EngineReply:
        inputs = body.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            return _error(400, "'input' must be a non-empty string or array")
        dimensions = _int(body.get("dimensions"), self._options.embedding_dimensions)
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(inputs):
            vector = _unit_vector(orjson.dumps(item), dimensions)
            encoded: Any = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode() if as_base64 else vector
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = self._counter.count_embedding_input(body, model)
        payload = {"object": "list", "data": data, "model": model,
                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return EngineReply(200, body=orjson.dumps(payload), first_delay_s=self._options.first_token_ms / 1000)


@dataclass(frozen=True, slots=True)
class _Choice:
    index: int
    text: str | None
    tool_call: dict[str, str] | None
    finish_reason: str
    tokens: int


def _response(endpoint: Endpoint, response_id: str, model: str, choices: list[_Choice],
              usage: dict[str, Any]) -> dict[str, Any]:
    created = int(time.time())
    if endpoint is Endpoint.COMPLETIONS:
        return {"id": response_id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": c.index, "text": c.text or "", "logprobs": None,
                             "finish_reason": c.finish_reason} for c in choices],
                "usage": usage}
    return {
        "id": response_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": c.index, "message": _message(c), "logprobs": None,
                     "finish_reason": c.finish_reason} for c in choices],
        "usage": usage, "system_fingerprint": "fp_switchboard_mock",
    }


def _message(choice: _Choice) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
    if choice.tool_call:
        message["tool_calls"] = [{"id": choice.tool_call["id"], "type": "function",
                                  "function": {"name": choice.tool_call["name"],
                                               "arguments": choice.tool_call["arguments"]}}]
    return message


def _stream_events(endpoint: Endpoint, response_id: str, model: str, choices: list[_Choice],
                   usage: dict[str, Any] | None) -> tuple[bytes, ...]:
    created = int(time.time())
    chat = endpoint is Endpoint.CHAT
    head = {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model}
    events: list[bytes] = []

    def emit(index: int, delta: dict[str, Any] | str, finish: str | None = None) -> None:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish}
        if chat:
            choice["delta"] = delta
            choice["logprobs"] = None
        else:
            choice["text"] = delta
            choice["logprobs"] = None
        events.append(orjson.dumps({**head, "choices": [choice]}))

    for c in choices:
        if chat:
            emit(c.index, {"role": "assistant", "content": "" if c.tool_call is None else None})
        if c.tool_call:
            call = c.tool_call
            emit(c.index, {"tool_calls": [{"index": 0, "id": call["id"], "type": "function",
                                           "function": {"name": call["name"], "arguments": ""}}]})
            for piece in _pieces(call["arguments"], 3):
                emit(c.index, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        else:
            for piece in _word_pieces(c.text or ""):
                emit(c.index, {"content": piece} if chat else piece)
        emit(c.index, {} if chat else "", c.finish_reason)
    if usage is not None:
        events.append(orjson.dumps({**head, "choices": [], "usage": usage}))
    return tuple(events)


def _word_pieces(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _pieces(text: str, count: int) -> list[str]:
    size = max(1, math.ceil(len(text) / count))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _forced_tool(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The function the mock calls: the named one, else the first, unless tool_choice is none."""
    tools = [t.get("function") for t in body.get("tools") or () if isinstance(t, dict) and t.get("function")]
    choice = body.get("tool_choice")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        return next((t for t in tools if t.get("name") == wanted), tools[0])
    return tools[0]


def _tool_result(body: Mapping[str, Any]) -> str | None:
    """The content of the last message when it is a tool result (role `tool`), else None."""
    messages = body.get("messages") or []
    last = messages[-1] if messages and isinstance(messages, list) else None
    if not isinstance(last, dict) or last.get("role") != "tool":
        return None
    content = last.get("content")
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content or "")


def _tool_required(body: Mapping[str, Any]) -> bool:
    """Whether the request forces a tool call (`required` or a named function), even after a tool result."""
    choice = body.get("tool_choice")
    return choice == "required" or isinstance(choice, dict)


def schema_instance(schema: Mapping[str, Any], text: str, root: Mapping[str, Any] | None = None) -> Any:
    """A small value that validates against a JSON schema (the subset structured outputs use)."""
    root = root if root is not None else schema
    if "$ref" in schema:
        target: Any = root
        for part in str(schema["$ref"]).lstrip("#/").split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return schema_instance(target, text, root)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            branches = [b for b in schema[key] if b.get("type") != "null"] or schema[key]
            return schema_instance(branches[0], text, root)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        return {name: schema_instance(sub, text, root) for name, sub in properties.items()}
    if kind == "array":
        return [schema_instance(schema.get("items") or {}, text, root)] * int(schema.get("minItems") or 0)
    if kind == "integer":
        return int(schema.get("minimum") or 0)
    if kind == "number":
        return float(schema.get("minimum") or 0)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return text[:64] or "mock"


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _unit_vector(seed: bytes, dimensions: int) -> list[float]:
    stream = b""
    counter = 0
    while len(stream) < dimensions * 4:
        stream += hashlib.sha256(seed + counter.to_bytes(4, "little")).digest()
        counter += 1
    raw = [v / 2**31 - 1.0 for v in struct.unpack(f"<{dimensions}I", stream[: dimensions * 4])]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]


def _endpoint_of(url: str) -> Endpoint | None:
    for endpoint, suffix in ((Endpoint.CHAT, "/chat/completions"), (Endpoint.COMPLETIONS, "/completions"),
                             (Endpoint.EMBEDDINGS, "/embeddings")):
        if url.endswith(suffix):
            return endpoint
    return None


def _error(status: int, message: str) -> EngineReply:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    return EngineReply(status, body=orjson.dumps(body))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


MOCK = CompatSpec(kind="mock", default_base_url=MOCK_BASE_URL, options_model=MockOptions)


class MockAdapter(OpenAICompatAdapter):
    """The OpenAI-compatible adapter, plus the engine that plays the upstream in process."""

    def __init__(self) -> None:
        super().__init__(MOCK)
        self.capabilities = dataclasses.replace(self.capabilities, in_process=True)

    @staticmethod
    def engine(options: BaseModel, counter: TokenCounting) -> MockEngine:
        assert isinstance(options, MockOptions)
        return MockEngine(options, counter)
