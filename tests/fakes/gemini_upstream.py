"""A fake Gemini API: a real aiohttp server on loopback, speaking protocols.md section 6.

    with FakeGeminiUpstream(require_api_key="gm-test") as fake:
        fake.script(gemini_error(429, "RESOURCE_EXHAUSTED", retry_delay="13s"))
        fake.cache_read_tokens = 1024              # cachedContentTokenCount (a subset of promptTokenCount)
        fake.thoughts_tokens = 64                  # thoughtsTokenCount (not in candidatesTokenCount)
        fake.finish_reason = "SAFETY"              # the next replies stop for safety
        ...

``POST /v1beta/models/{model}:generateContent`` answers one GenerateContentResponse;
``:streamGenerateContent?alt=sse`` sends partial responses as ``data:`` events (no ``event:`` lines,
no ``[DONE]``) and closes. Replies are deterministic like the other fakes: ``"echo: <last user text>"``,
a functionCall of the chosen function, or a minimal instance of the response schema.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.native_upstream import NativeFakeUpstream
from tests.fakes.openai_upstream import Behaviour, _Exchange, _split, count_tokens, minimal_instance

MODELS = "/v1beta/models"
_HTTP_STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


def gemini_error(status: int, grpc_status: str | None = None, message: str | None = None, *,
                 retry_delay: str | None = None, reason: str | None = None,
                 headers: Mapping[str, str] | None = None) -> Behaviour:
    """Answer ``status`` with Google's error body ``{"error": {code, message, status, details}}``."""
    return Behaviour(status=status, body=error_payload(status, grpc_status, message, retry_delay, reason),
                     headers=headers or {})


def prompt_blocked() -> Behaviour:
    """A 200 with no candidates: the prompt was blocked before generation."""
    return Behaviour(status=200, body={"promptFeedback": {"blockReason": "SAFETY"},
                                       "usageMetadata": {"promptTokenCount": 3, "totalTokenCount": 3}})


def error_payload(status: int, grpc_status: str | None, message: str | None, retry_delay: str | None = None,
                  reason: str | None = None) -> dict[str, Any]:
    details: list[dict[str, Any]] = []
    if reason:
        details.append({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
                        "domain": "googleapis.com"})
    if retry_delay:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay})
    grpc = grpc_status or _HTTP_STATUS.get(status, "UNKNOWN")
    return {"error": {"code": status, "message": message or f"fake {grpc}", "status": grpc, "details": details}}


class FakeGeminiUpstream(NativeFakeUpstream):
    """Fake generateContent / streamGenerateContent; ``base_url`` (…/v1beta) is what a provider points at."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.thoughts_tokens = 0
        self.finish_reason: str | None = None

    @property
    def base_url(self) -> str:
        return self.url + "/v1beta"

    def reset(self) -> None:
        super().reset()
        self.thoughts_tokens = 0
        self.finish_reason = None

    def routes(self) -> list[tuple[str, str, str, Any]]:
        return [("POST", MODELS + "/{model_action}", MODELS, self._generate)]

    def stream_error_frame(self, error: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps({"error": error}) + b"\n\n"

    async def _generate(self, request: web.Request, exchange: _Exchange, body: Any,
                        behaviour: Behaviour) -> web.StreamResponse:
        model, _, action = request.match_info["model_action"].partition(":")
        if action not in ("generateContent", "streamGenerateContent"):
            return _error(404, "NOT_FOUND", f"unknown method {action}")
        if self.api_key is not None and request.headers.get("x-goog-api-key") != self.api_key:
            return _error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.",
                          reason="API_KEY_INVALID")
        if not isinstance(body, dict) or not isinstance(body.get("contents"), list) or not body["contents"]:
            return _error(400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not specified")
        parts, finish = _reply(body, behaviour.content)
        finish = self.finish_reason or finish
        output = sum(count_tokens(p.get("text") or orjson.dumps(p.get("functionCall")).decode()) for p in parts)
        prompt = _prompt_words(body) + self.cache_read_tokens
        usage = {"promptTokenCount": prompt, "candidatesTokenCount": output,
                 "totalTokenCount": prompt + output + self.thoughts_tokens,
                 "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]}
        if self.cache_read_tokens:
            usage["cachedContentTokenCount"] = self.cache_read_tokens
        if self.thoughts_tokens:
            usage["thoughtsTokenCount"] = self.thoughts_tokens
        response_id = self._new_id("resp")
        if action == "generateContent":
            payload = {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish,
                                       "index": 0}],
                       "usageMetadata": usage, "modelVersion": model, "responseId": response_id}
            return await self._respond_json(request, payload, behaviour)
        if request.query.get("alt") != "sse":
            return _error(400, "INVALID_ARGUMENT", "this fake only streams with alt=sse")
        chunks = self.stream_chunks if behaviour.stream_chunks is None else behaviour.stream_chunks
        return await self._stream(request, exchange, _events(parts, finish, usage, model, response_id, chunks),
                                  behaviour)


def _error(status: int, grpc_status: str, message: str, reason: str | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(error_payload(status, grpc_status, message, reason=reason)),
                        content_type="application/json")


def _reply(body: Mapping[str, Any], override: str | None) -> tuple[list[dict[str, Any]], str]:
    last_user = next((c for c in reversed(body["contents"]) if c.get("role") == "user"), {"parts": []})
    user_text = " ".join(p["text"] for p in last_user.get("parts") or () if "text" in p)
    answers = [p["functionResponse"] for p in last_user.get("parts") or () if "functionResponse" in p]
    declaration = _chosen_function(body, bool(answers))
    if declaration is not None and override is None:
        schema = declaration.get("parametersJsonSchema") or declaration.get("parameters") or {}
        required = [name for name in schema.get("required", []) if name != "echo"]
        args = minimal_instance(schema) if required else {"echo": user_text}
        return [{"functionCall": {"name": declaration["name"], "args": args}}], "STOP"
    config = body.get("generationConfig") or {}
    schema = config.get("responseJsonSchema") or config.get("responseSchema")
    if override is not None:
        text = override
    elif schema:
        text = orjson.dumps(minimal_instance(schema)).decode()
    elif answers:
        text = "echo: tool said " + " ".join(orjson.dumps(a["response"]).decode() for a in answers)
    else:
        text = f"echo: {user_text}"
    limit = config.get("maxOutputTokens")
    words = text.split(" ")
    if isinstance(limit, int) and len(words) > limit:
        return [{"text": " ".join(words[:limit])}], "MAX_TOKENS"
    return [{"text": text}], "STOP"


def _chosen_function(body: Mapping[str, Any], answered: bool) -> Mapping[str, Any] | None:
    declarations = [d for tool in body.get("tools") or () for d in tool.get("functionDeclarations") or ()]
    config = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
    mode = config.get("mode", "AUTO")
    if not declarations or mode == "NONE" or (answered and mode == "AUTO"):
        return None
    allowed = config.get("allowedFunctionNames")
    if allowed:
        return next((d for d in declarations if d["name"] in allowed), declarations[0])
    return declarations[0]


def _prompt_words(body: Mapping[str, Any]) -> int:
    system = body.get("systemInstruction") or {}
    words = sum(count_tokens(p.get("text", "")) for p in system.get("parts") or ())
    for content in body["contents"]:
        words += sum(count_tokens(p.get("text", "")) for p in content.get("parts") or ())
    return words


def _events(parts: list[dict[str, Any]], finish: str, usage: Mapping[str, Any], model: str, response_id: str,
            chunks: int) -> Iterator[bytes]:
    pieces: list[dict[str, Any]] = []
    for part in parts:
        if "text" in part:
            pieces += [{"text": p} for p in _split(part["text"], chunks) if p]
        else:
            pieces.append(part)  # Gemini streams a function call whole
    pieces = pieces or [{"text": ""}]
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": [piece]}, "index": 0}
        if last:
            candidate["finishReason"] = finish
        # Partial usage on every event; the final one is complete.
        event_usage = usage if last else {"promptTokenCount": usage["promptTokenCount"],
                                          "totalTokenCount": usage["promptTokenCount"]}
        event = {"candidates": [candidate], "usageMetadata": event_usage, "modelVersion": model,
                 "responseId": response_id}
        yield b"data: " + orjson.dumps(event) + b"\r\n\r\n"
