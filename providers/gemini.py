"""Google's Gemini API (`kind: gemini`), translated to and from OpenAI Chat Completions.

Request: `contents` of `user`/`model` turns with `parts`, `systemInstruction`,
`generationConfig`, function declarations and `toolConfig`. Responses and the
`streamGenerateContent?alt=sse` stream (each event a partial response, ended
by the connection closing) come back as OpenAI shapes (protocols.md section 6).

Gemini function calls may carry a `thoughtSignature` that must be sent back
with the call on the next turn; OpenAI clients only keep a tool call's id, so
the signature travels inside the id.
"""

from __future__ import annotations

import mimetypes
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

_SIGNATURE_MARK = "~sig~"  # call id = "call_<n>" + mark + thoughtSignature


class SafetySetting(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    category: str = Field(description="e.g. HARM_CATEGORY_HARASSMENT")
    threshold: str = Field(description="e.g. BLOCK_ONLY_HIGH, BLOCK_NONE")


class GeminiOptions(BaseModel):
    """Settings of a `kind: gemini` provider."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_dialect: Literal["json_schema", "openapi"] = Field(
        "json_schema", description="How tool and response schemas are sent: full JSON Schema "
        "(parametersJsonSchema / responseJsonSchema) or Gemini's OpenAPI subset (parameters / responseSchema), "
        "converted by the gateway."
    )
    default_max_tokens: int | None = Field(
        None, ge=1, description="maxOutputTokens when the client sets no limit (None: the model's default)."
    )
    safety_settings: tuple[SafetySetting, ...] = Field((), description="Sent as safetySettings on every call.")


_CONTENT_FILTER_REASONS = frozenset({
    "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "MODEL_ARMOR",
})
_STATUS_KINDS = {
    "INVALID_ARGUMENT": FailureKind.BAD_REQUEST,
    "FAILED_PRECONDITION": FailureKind.BAD_REQUEST,
    "OUT_OF_RANGE": FailureKind.BAD_REQUEST,
    "UNAUTHENTICATED": FailureKind.AUTHENTICATION,
    "PERMISSION_DENIED": FailureKind.PERMISSION,
    "NOT_FOUND": FailureKind.NOT_FOUND,
    "RESOURCE_EXHAUSTED": FailureKind.RATE_LIMITED,
    "UNAVAILABLE": FailureKind.OVERLOADED,
    "DEADLINE_EXCEEDED": FailureKind.TIMEOUT,
    "INTERNAL": FailureKind.UPSTREAM_ERROR,
}
_HTTP_KINDS = {
    400: FailureKind.BAD_REQUEST, 401: FailureKind.AUTHENTICATION, 403: FailureKind.PERMISSION,
    404: FailureKind.NOT_FOUND, 429: FailureKind.RATE_LIMITED, 503: FailureKind.OVERLOADED,
    504: FailureKind.TIMEOUT,
}
# Gemini-only request fields a client may send through the openai SDK's extra_body.
_NATIVE_FIELDS = ("safetySettings", "cachedContent")
_GENERATION_RENAMES = (("temperature", "temperature"), ("top_p", "topP"), ("seed", "seed"),
                       ("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty"))


class GeminiAdapter:
    kind = "gemini"
    options_model = GeminiOptions
    capabilities = Capabilities(
        endpoints=frozenset({Endpoint.CHAT}),
        default_base_url="https://generativelanguage.googleapis.com/v1beta",
        requires_api_key=True,
        tokenizer="gemini",
        request_id_header=None,
    )

    def build_request(self, provider: ProviderSettings, call: Call) -> UpstreamRequest:
        options = provider.options
        assert isinstance(options, GeminiOptions)
        body = gemini_request(call.body, options)
        model = call.upstream_model.removeprefix("models/")
        action = ":streamGenerateContent?alt=sse" if call.stream else ":generateContent"
        headers = {"content-type": "application/json", **provider.extra_headers}
        if provider.api_key:
            headers["x-goog-api-key"] = provider.api_key
        return UpstreamRequest("POST", f"{provider.base_url}/models/{model}{action}", headers, orjson.dumps(body))

    def parse_response(self, call: Call, body: bytes) -> ParsedResponse:
        payload = load_object(body, "response body")
        response_id = payload.get("responseId") or "gemini"
        choices = []
        for position, candidate in enumerate(payload.get("candidates") or ()):
            texts: list[str] = []
            calls: list[dict[str, Any]] = []
            for part in (candidate.get("content") or {}).get("parts") or ():
                if "functionCall" in part:
                    calls.append(_tool_call(part, response_id, len(calls)))
                elif part.get("text") and not part.get("thought"):
                    texts.append(part["text"])
            finish = _finish_reason(candidate.get("finishReason"), bool(calls))
            choices.append(choice(candidate.get("index", position), "".join(texts) if texts else None, calls, finish))
        if not choices:  # the prompt itself was blocked (promptFeedback.blockReason)
            choices.append(choice(0, None, [], "content_filter"))
        usage = usage_from_gemini(payload.get("usageMetadata"))
        model = payload.get("modelVersion") or call.upstream_model
        out = completion_body(response_id, int(time.time()), model, choices, usage)
        return ParsedResponse(out, usage, model, tuple(c["finish_reason"] for c in choices))

    def stream_translator(self, call: Call) -> StreamTranslator:
        return _GenerateContentStream(call.upstream_model)

    def classify_error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamFailure:
        return _failure(status, error_object(body), headers)


class _GenerateContentStream(PayloadTranslator):
    """A streamGenerateContent stream as OpenAI chat chunks; Gemini ends it by closing the connection."""

    __slots__ = ("_finished_candidates", "_tools_seen", "_upstream_model", "_usage_metadata", "_writer", "finished")

    def __init__(self, upstream_model: str) -> None:
        self._upstream_model = upstream_model
        self._writer: ChunkWriter | None = None
        self._tools_seen: dict[int, int] = {}  # candidate index -> tool calls so far (their `index`)
        self._finished_candidates: set[int] = set()
        self._usage_metadata: Any = None
        self.finished = False  # only the connection closing ends a Gemini stream

    def feed(self, data: bytes) -> Sequence[StreamChunk]:
        payload = load_object(data, "stream event")
        if "error" in payload:
            error = payload["error"] if isinstance(payload["error"], dict) else {}
            raise UpstreamFailed(_failure(int(error.get("code") or 502), payload, {}))
        writer = self._writer
        if writer is None:
            writer = self._writer = ChunkWriter(payload.get("responseId") or "gemini", int(time.time()),
                                                payload.get("modelVersion") or self._upstream_model)
        out: list[StreamChunk] = []
        tools_seen = self._tools_seen
        candidates = payload.get("candidates") or ()
        if not candidates and (payload.get("promptFeedback") or {}).get("blockReason"):
            out.append(writer.delta(0, {"role": "assistant", "content": ""}))
            out.append(writer.delta(0, {}, "content_filter"))
            self._finished_candidates.add(0)
        for position, candidate in enumerate(candidates):
            index = candidate.get("index", position)
            if index not in tools_seen:
                tools_seen[index] = 0
                out.append(writer.delta(index, {"role": "assistant", "content": ""}))
            for part in (candidate.get("content") or {}).get("parts") or ():
                if "functionCall" in part:
                    call_ = _tool_call(part, payload.get("responseId") or "gemini", tools_seen[index])
                    out.append(writer.delta(index, {"tool_calls": [{"index": tools_seen[index], **call_}]}))
                    tools_seen[index] += 1
                elif part.get("text") and not part.get("thought"):
                    out.append(writer.delta(index, {"content": part["text"]}))
            if candidate.get("finishReason"):
                self._finished_candidates.add(index)
                out.append(writer.delta(index, {}, _finish_reason(candidate["finishReason"], tools_seen[index] > 0)))
        if payload.get("usageMetadata"):
            self._usage_metadata = payload["usageMetadata"]  # cumulative: the last one counts
        return out

    def end(self) -> Sequence[StreamChunk]:
        # Without a finishReason the answer was cut short.
        if self._writer is None or not self._finished_candidates:
            raise stream_cut()
        usage = usage_from_gemini(self._usage_metadata)
        return () if usage is None else (self._writer.usage(usage),)


# --- request -----------------------------------------------------------------------------------


def gemini_request(body: Mapping[str, Any], options: GeminiOptions) -> dict[str, Any]:
    """The generateContent request for an OpenAI chat request (a new dict; `body` is not modified)."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad_request("'messages' must be an array", "messages")
    system, contents = _contents(messages)
    request: dict[str, Any] = {"contents": contents}
    if system:
        request["systemInstruction"] = {"parts": system}
    config: dict[str, Any] = {}
    for name, native in _GENERATION_RENAMES:
        if body.get(name) is not None:
            config[native] = body[name]
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or options.default_max_tokens
    if limit:
        config["maxOutputTokens"] = limit
    stop = body.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    if (body.get("n") or 1) != 1:
        config["candidateCount"] = body["n"]
    _response_format(body.get("response_format"), options, config)
    if config:
        request["generationConfig"] = config
    tools = [_declaration(tool, i, options) for i, tool in enumerate(body.get("tools") or ())]
    if tools:
        request["tools"] = [{"functionDeclarations": tools}]
        tool_config = _tool_config(body.get("tool_choice"))
        if tool_config:
            request["toolConfig"] = {"functionCallingConfig": tool_config}
    if options.safety_settings:
        request["safetySettings"] = [s.model_dump() for s in options.safety_settings]
    for name in _NATIVE_FIELDS:
        if name in body:
            request[name] = body[name]
    return request


def _contents(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name (functionResponse needs the name)
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object", "messages")
        role = message.get("role")
        if role in ("system", "developer"):
            text = text_of(message.get("content"))
            if text:
                system.append({"text": text})
            continue
        if role == "user":
            role, parts = "user", _user_parts(message.get("content"), where)
        elif role == "assistant":
            role, parts = "model", _model_parts(message, where, names)
        elif role == "tool":
            role, parts = "user", [_function_response(message, where, names)]
        else:
            raise bad_request(f"{where}.role {role!r} is not supported by this model", "messages")
        if not parts:
            continue
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    return system, contents


def _user_parts(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or an array of parts", "messages")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if part.get("text"):
                parts.append({"text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise bad_request(f"{where}.content[{j}].image_url.url must be a string", "messages")
            parts.append(_media(url))
        elif kind == "input_audio" and isinstance(part.get("input_audio"), dict):
            audio = part["input_audio"]
            parts.append({"inlineData": {"mimeType": f"audio/{audio.get('format') or 'wav'}",
                                         "data": audio.get("data") or ""}})
        elif kind == "file" and isinstance(part.get("file"), dict) and part["file"].get("file_data"):
            parts.append(_media(part["file"]["file_data"]))
        else:
            raise bad_request(f"{where}.content[{j}] of type {kind!r} is not supported by this model", "messages")
    return parts


def _media(url: str) -> dict[str, Any]:
    inline = data_url(url)
    if inline is not None:
        return {"inlineData": {"mimeType": inline[0], "data": inline[1]}}
    mime_type = mimetypes.guess_type(url.split("?", 1)[0])[0] or "image/jpeg"
    return {"fileData": {"mimeType": mime_type, "fileUri": url}}


def _model_parts(message: Mapping[str, Any], where: str, names: dict[str, str]) -> list[dict[str, Any]]:
    text = text_of(message.get("content"))
    parts: list[dict[str, Any]] = [{"text": text}] if text else []
    for k, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") or {}
        call_id = call.get("id") or ""
        names[call_id] = function.get("name") or ""
        part: dict[str, Any] = {"functionCall": {
            "name": function.get("name") or "",
            "args": json_arguments(function.get("arguments"), f"{where}.tool_calls[{k}].function.arguments")}}
        if _SIGNATURE_MARK in call_id:
            part["thoughtSignature"] = call_id.split(_SIGNATURE_MARK, 1)[1]
        parts.append(part)
    return parts


def _function_response(message: Mapping[str, Any], where: str, names: Mapping[str, str]) -> dict[str, Any]:
    call_id = message.get("tool_call_id") or ""
    if call_id not in names:
        raise bad_request(f"{where}.tool_call_id does not match a tool call of an earlier assistant message",
                          "messages")
    text = text_of(message.get("content"))
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        value = None
    # `response` must be an object; anything else is wrapped.
    response = value if isinstance(value, dict) else {"result": text}
    return {"functionResponse": {"name": names[call_id], "response": response}}


def _declaration(tool: Any, index: int, options: GeminiOptions) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict) or not function.get("name"):
        raise bad_request(f"tools[{index}] must be a function tool with a name", "tools")
    declaration = {"name": function["name"]}
    if function.get("description"):
        declaration["description"] = function["description"]
    parameters = function.get("parameters")
    if parameters and parameters.get("properties"):
        if options.schema_dialect == "json_schema":
            declaration["parametersJsonSchema"] = parameters
        else:
            declaration["parameters"] = openapi_schema(parameters)
    return declaration


def _tool_config(tool_choice: Any) -> dict[str, Any] | None:
    if tool_choice is None or tool_choice == "auto":
        return None
    if tool_choice == "none":
        return {"mode": "NONE"}
    if tool_choice == "required":
        return {"mode": "ANY"}
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        return {"mode": "ANY", "allowedFunctionNames": [(tool_choice.get("function") or {}).get("name")]}
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "allowed_tools":
        allowed = tool_choice.get("allowed_tools") or {}
        names = [(t.get("function") or {}).get("name") for t in allowed.get("tools") or ()]
        return {"mode": "ANY" if allowed.get("mode") == "required" else "AUTO", "allowedFunctionNames": names}
    raise bad_request("unsupported tool_choice", "tool_choice")


def _response_format(response_format: Any, options: GeminiOptions, config: dict[str, Any]) -> None:
    if not isinstance(response_format, dict) or response_format.get("type") in (None, "text"):
        return
    config["responseMimeType"] = "application/json"
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if schema:
            if options.schema_dialect == "json_schema":
                config["responseJsonSchema"] = schema
            else:
                config["responseSchema"] = openapi_schema(schema)
    elif response_format.get("type") != "json_object":
        raise bad_request("unsupported response_format type", "response_format")


_OPENAPI_KEYS = frozenset({
    "type", "format", "description", "nullable", "enum", "items", "properties", "required", "anyOf",
    "minItems", "maxItems", "minimum", "maximum", "minLength", "maxLength", "pattern", "title", "propertyOrdering",
})


def openapi_schema(schema: Mapping[str, Any], root: Mapping[str, Any] | None = None, depth: int = 0) -> dict[str, Any]:
    """Gemini's OpenAPI-subset Schema for a JSON Schema: refs inlined, nulls as `nullable`, the rest dropped."""
    root = schema if root is None else root
    if depth > 32:
        raise bad_request("the JSON schema nests too deeply (or is recursive) for Gemini's schema dialect")
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for key in ref[2:].split("/"):
            target = target.get(key, {}) if isinstance(target, dict) else {}
        return openapi_schema({**target, **{k: v for k, v in schema.items() if k != "$ref"}}, root, depth + 1)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties":
            out[key] = {name: openapi_schema(sub, root, depth + 1) for name, sub in value.items()}
        elif key == "items" and isinstance(value, dict):
            out[key] = openapi_schema(value, root, depth + 1)
        elif key == "anyOf":
            branches = [b for b in value if b.get("type") != "null"]
            if len(branches) < len(value):
                out["nullable"] = True
            if len(branches) == 1:
                out.update(openapi_schema(branches[0], root, depth + 1))
            else:
                out[key] = [openapi_schema(b, root, depth + 1) for b in branches]
        elif key == "type" and isinstance(value, list):
            kinds = [k for k in value if k != "null"]
            out["type"] = kinds[0] if kinds else "null"
            if len(kinds) < len(value):
                out["nullable"] = True
        elif key == "const":
            out["enum"] = [value]
        elif key in _OPENAPI_KEYS:
            out[key] = value
    return out


# --- response ----------------------------------------------------------------------------------


def _tool_call(part: Mapping[str, Any], response_id: str, position: int) -> dict[str, Any]:
    call = part["functionCall"]
    call_id = call.get("id") or f"call_{response_id[:12]}_{position}"
    if part.get("thoughtSignature"):
        call_id += _SIGNATURE_MARK + part["thoughtSignature"]
    return tool_call(call_id, call.get("name") or "", orjson.dumps(call.get("args") or {}).decode())


def usage_from_gemini(raw: Any) -> Usage | None:
    """Canonical usage: prompt includes cached and tool-use prompt tokens; output includes thoughts."""
    if not isinstance(raw, dict):
        return None
    thoughts = int(raw.get("thoughtsTokenCount") or 0)
    return Usage(
        prompt_tokens=int(raw.get("promptTokenCount") or 0) + int(raw.get("toolUsePromptTokenCount") or 0),
        completion_tokens=int(raw.get("candidatesTokenCount") or 0) + thoughts,
        cached_tokens=int(raw.get("cachedContentTokenCount") or 0),
        reasoning_tokens=thoughts,
    )


def _finish_reason(reason: Any, has_tool_calls: bool) -> str:
    if reason == "MAX_TOKENS":
        return "length"
    if reason in _CONTENT_FILTER_REASONS:
        return "content_filter"
    return "tool_calls" if has_tool_calls else "stop"


def _failure(status: int, payload: Mapping[str, Any], headers: Mapping[str, str]) -> UpstreamFailure:
    error = payload.get("error") if isinstance(payload.get("error"), dict) else {}
    details = [d for d in error.get("details") or () if isinstance(d, dict)]
    kind = _STATUS_KINDS.get(error.get("status")) or _HTTP_KINDS.get(status)
    if kind is None:
        kind = FailureKind.UPSTREAM_ERROR if status >= 500 else FailureKind.BAD_REQUEST
    message = str(error.get("message") or f"upstream returned HTTP {status}")
    code = None
    if any(d.get("reason") == "API_KEY_INVALID" for d in details):
        kind = FailureKind.AUTHENTICATION  # Gemini answers a bad key with 400 INVALID_ARGUMENT
    elif kind is FailureKind.BAD_REQUEST and "exceeds the maximum number of tokens" in message:
        kind, code = FailureKind.CONTEXT_LENGTH, "context_length_exceeded"
    elif kind is FailureKind.RATE_LIMITED:
        code = "rate_limit_exceeded"
    retry_after = retry_after_seconds(headers)
    if retry_after is None:
        delay = next((d.get("retryDelay") for d in details if str(d.get("@type", "")).endswith("RetryInfo")), None)
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                retry_after = float(delay[:-1])
            except ValueError:
                retry_after = None
    return UpstreamFailure(kind=kind, status=status, message=message, code=code, retry_after=retry_after)
