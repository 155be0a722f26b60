"""`kind: gemini` through a running gateway, with the openai SDK in front and a fake Gemini API behind."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from providers.base import Call, Endpoint
from providers.gemini import GeminiAdapter, GeminiOptions, gemini_request, openapi_schema
from tests.chat_accumulator import accumulate, from_completion, same_message
from tests.conftest import RunningGateway, key_hash, run_gateway
from tests.fakes.gemini_upstream import FakeGeminiUpstream, gemini_error, prompt_blocked
from tests.fakes.openai_upstream import Behaviour
from tests.stream_translation import translate_bytes

UPSTREAM_KEY = "gm-upstream-secret"
FIXTURES = Path(__file__).parent / "fixtures" / "gemini"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"


def _policy(base_url: str) -> str:
    return f"""
version: 1
providers:
  gemini:
    kind: gemini
    base_url: {base_url}
    api_key: {UPSTREAM_KEY}
    timeouts: {{connect_s: 2, first_byte_s: 5, total_s: 10}}
  gemini-openapi:
    kind: gemini
    base_url: {base_url}
    api_key: {UPSTREAM_KEY}
    options:
      schema_dialect: openapi
      default_max_tokens: 512
      safety_settings: [{{category: HARM_CATEGORY_HARASSMENT, threshold: BLOCK_ONLY_HIGH}}]
  gemini-badkey:
    kind: gemini
    base_url: {base_url}
    api_key: wrong-key
models:
  flash: {{targets: [{{provider: gemini, model: gemini-2.5-flash}}]}}
  flash-openapi: {{targets: [{{provider: gemini-openapi, model: models/gemini-2.5-flash}}]}}
  flash-badkey: {{targets: [{{provider: gemini-badkey, model: gemini-2.5-flash}}]}}
teams:
  alpha:
    keys: [{{id: alpha-key, hash: "{key_hash('sk-alpha')}"}}]
    models: ["*"]
"""


@pytest.fixture(scope="module")
def module_fake() -> Iterator[FakeGeminiUpstream]:
    with FakeGeminiUpstream(require_api_key=UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def module_gateway(module_fake: FakeGeminiUpstream, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[RunningGateway]:
    path = tmp_path_factory.mktemp("gemini") / "policy.yaml"
    path.write_text(_policy(module_fake.base_url))
    gateway = run_gateway(path)
    yield gateway
    gateway.stop()


@pytest.fixture
def fake(module_fake: FakeGeminiUpstream) -> FakeGeminiUpstream:
    module_fake.reset()
    return module_fake


@pytest.fixture
def client(module_gateway: RunningGateway, fake: FakeGeminiUpstream) -> openai.OpenAI:
    return module_gateway.client()


def _sent(fake: FakeGeminiUpstream) -> dict[str, Any]:
    assert fake.last_request is not None
    return fake.last_request.json


def _stream(client: openai.OpenAI, **kwargs: Any) -> list[dict[str, Any]]:
    return [c.model_dump() for c in client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs)]


# --- chat and streaming ------------------------------------------------------------------------


@pytest.mark.conformance(provider="gemini", endpoint="chat", feature="text", stream=False)
def test_plain_chat_is_translated_both_ways(client: openai.OpenAI, fake: FakeGeminiUpstream) -> None:
    reply = client.chat.completions.create(model="flash", messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "again please"},
    ], temperature=0.2, top_p=0.9, max_tokens=50, stop=["END"], seed=7)

    assert reply.choices[0].message.content == "echo: again please"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "gemini-2.5-flash"
    request = fake.last_request
    assert request is not None
    assert request.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert request.header("x-goog-api-key") == UPSTREAM_KEY and request.header("authorization") is None
    assert request.json == {
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "contents": [{"role": "user", "parts": [{"text": "hello there"}]},
                     {"role": "model", "parts": [{"text": "hi"}]},
                     {"role": "user", "parts": [{"text": "again please"}]}],
        "generationConfig": {"temperature": 0.2, "topP": 0.9, "seed": 7, "maxOutputTokens": 50,
                             "stopSequences": ["END"]},
    }


@pytest.mark.conformance(provider="gemini", endpoint="chat", feature="text", stream="both")
def test_streamed_text_matches_the_whole_reply(client: openai.OpenAI, module_gateway: RunningGateway,
                                               fake: FakeGeminiUpstream) -> None:
    messages = [{"role": "user", "content": "one two three four five six"}]
    whole = client.chat.completions.create(model="flash", messages=messages)
    chunks = _stream(client, model="flash", messages=messages)

    request = fake.last_request
    assert request is not None and request.path.endswith(":streamGenerateContent")
    assert request.query_string == "alt=sse"
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) > 1
    assert same_message(accumulate(chunks), from_completion(whole.model_dump()))
    record = module_gateway.usage.wait_for(2)[-1]
    assert record.usage is not None and not record.usage.estimated


def test_max_tokens_maps_to_length(client: openai.OpenAI, fake: FakeGeminiUpstream) -> None:
    reply = client.chat.completions.create(model="flash-openapi", messages=[{"role": "user", "content": "hi"}])
    assert _sent(fake)["generationConfig"]["maxOutputTokens"] == 512  # the provider's default
    assert _sent(fake)["safetySettings"] == [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_ONLY_HIGH"}]
    assert fake.last_request.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    reply = client.chat.completions.create(model="flash", max_completion_tokens=2,
                                           messages=[{"role": "user", "content": "a b c d"}])
    assert reply.choices[0].finish_reason == "length"


# --- tools -------------------------------------------------------------------------------------


@pytest.mark.conformance(provider="gemini", endpoint="chat", feature="tools")
@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(client: openai.OpenAI, fake: FakeGeminiUpstream, stream: bool) -> None:
    messages: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
    kwargs = {"model": "flash", "tools": [WEATHER_TOOL], "tool_choice": "required"}
    if stream:
        first = accumulate(_stream(client, messages=messages, **kwargs))
        call = first["tool_calls"][0]
        assert first["finish_reason"] == "tool_calls"
        call_id, name, arguments = call["id"], call["name"], call["arguments"]
    else:
        reply = client.chat.completions.create(messages=messages, **kwargs)
        assert reply.choices[0].finish_reason == "tool_calls"
        tool_call = reply.choices[0].message.tool_calls[0]
        call_id, name, arguments = tool_call.id, tool_call.function.name, tool_call.function.arguments
    assert name == "get_weather" and orjson.loads(arguments) == {"city": "x"}
    sent = _sent(fake)
    assert sent["tools"] == [{"functionDeclarations": [{
        "name": "get_weather", "description": "Weather in a city",
        "parametersJsonSchema": WEATHER_TOOL["function"]["parameters"]}]}]
    assert sent["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}

    messages += [{"role": "assistant", "content": None, "tool_calls": [
                     {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
                 {"role": "tool", "tool_call_id": call_id, "content": '{"temp": 12}'}]
    second = client.chat.completions.create(model="flash", messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == 'echo: tool said {"temp":12}'
    contents = _sent(fake)["contents"]
    assert contents[1] == {"role": "model", "parts": [{"functionCall": {"name": "get_weather",
                                                                        "args": {"city": "x"}}}]}
    assert contents[2] == {"role": "user", "parts": [{"functionResponse": {"name": "get_weather",
                                                                           "response": {"temp": 12}}}]}


def test_thought_signature_survives_the_round_trip() -> None:
    adapter = GeminiAdapter()
    call = Call(Endpoint.CHAT, {"model": "m", "messages": []}, "gemini-3-pro", False)
    body = orjson.dumps({"candidates": [{"content": {"role": "model", "parts": [
        {"functionCall": {"name": "f", "args": {"a": 1}}, "thoughtSignature": "c2lnbmF0dXJl+/="}]},
        "finishReason": "STOP"}], "responseId": "r1"})
    tool_call = orjson.loads(adapter.parse_response(call, body).body)["choices"][0]["message"]["tool_calls"][0]
    replay = gemini_request({"messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [tool_call]},
        {"role": "tool", "tool_call_id": tool_call["id"], "content": "done"}]}, GeminiOptions())
    assert replay["contents"][1]["parts"][0] == {"functionCall": {"name": "f", "args": {"a": 1}},
                                                 "thoughtSignature": "c2lnbmF0dXJl+/="}
    assert replay["contents"][2]["parts"][0] == {"functionResponse": {"name": "f", "response": {"result": "done"}}}


# --- structured output -------------------------------------------------------------------------


class Person(BaseModel):
    name: str
    age: int | None


@pytest.mark.conformance(provider="gemini", endpoint="chat", feature="json_schema", stream=False)
@pytest.mark.parametrize("model", ["flash", "flash-openapi"])
def test_parse_with_response_schema(client: openai.OpenAI, fake: FakeGeminiUpstream, model: str) -> None:
    reply = client.chat.completions.parse(model=model, response_format=Person,
                                          messages=[{"role": "user", "content": "who?"}])
    assert reply.choices[0].message.parsed == Person(name="x", age=1)
    config = _sent(fake)["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    if model == "flash":
        assert config["responseJsonSchema"]["required"] == ["name", "age"]
    else:
        assert config["responseSchema"] == {
            "type": "object", "title": "Person", "required": ["name", "age"],
            "properties": {"name": {"type": "string", "title": "Name"},
                           "age": {"type": "integer", "nullable": True, "title": "Age"}}}


def test_openapi_schema_inlines_refs_and_drops_what_gemini_rejects() -> None:
    schema = {"type": "object", "$defs": {"Pet": {"type": "object", "properties": {"kind": {"const": "cat"}},
                                                   "additionalProperties": False}},
              "properties": {"pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}},
                             "nick": {"type": ["string", "null"], "default": None}},
              "additionalProperties": False}
    assert openapi_schema(schema) == {"type": "object", "properties": {
        "pets": {"type": "array", "items": {"type": "object", "properties": {"kind": {"enum": ["cat"]}}}},
        "nick": {"type": "string", "nullable": True}}}


# --- images, usage, safety ---------------------------------------------------------------------


@pytest.mark.conformance(provider="gemini", endpoint="chat", feature="images", stream=False)
def test_image_parts_become_inline_and_file_data(client: openai.OpenAI, fake: FakeGeminiUpstream) -> None:
    reply = client.chat.completions.create(model="flash", messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": PNG}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.webp?size=2"}},
    ]}])
    assert reply.choices[0].message.content == "echo: what is this"
    assert _sent(fake)["contents"][0]["parts"][1:] == [
        {"inlineData": {"mimeType": "image/png", "data": PNG.split(",", 1)[1]}},
        {"fileData": {"mimeType": "image/webp", "fileUri": "https://example.com/cat.webp?size=2"}},
    ]


@pytest.mark.conformance(provider="gemini", endpoint="chat", feature="cached_usage")
@pytest.mark.parametrize("stream", [False, True])
def test_cached_and_thought_tokens_reach_usage(client: openai.OpenAI, module_gateway: RunningGateway,
                                               fake: FakeGeminiUpstream, stream: bool) -> None:
    fake.cache_read_tokens, fake.thoughts_tokens = 1024, 64
    before = len(module_gateway.usage.records)
    messages = [{"role": "user", "content": "four words right here"}]
    if stream:
        usage = _stream(client, model="flash", messages=messages)[-1]["usage"]
    else:
        usage = client.chat.completions.create(model="flash", messages=messages).model_dump()["usage"]
    # promptTokenCount already includes the cached tokens; thoughts are billed as output.
    assert usage["prompt_tokens"] == 4 + 1024
    assert usage["prompt_tokens_details"]["cached_tokens"] == 1024
    assert usage["completion_tokens"] == 5 + 64  # "echo: four words right here" + thoughts
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 64
    record = module_gateway.usage.wait_for(before + 1)[-1]
    assert record.usage is not None and record.usage.cached_tokens == 1024


def test_streamed_and_whole_replies_cost_the_same(client: openai.OpenAI, fake: FakeGeminiUpstream) -> None:
    fake.cache_read_tokens, fake.thoughts_tokens = 1000, 100
    messages = [{"role": "user", "content": "price this please"}]
    raw = client.chat.completions.with_raw_response.create(model="flash", messages=messages)
    chunks = list(client.chat.completions.create(model="flash", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    # gemini-2.5-flash: $0.30 input, $0.03 cached, $2.50 output (thinking included) per 1M tokens.
    expected = (3 * 0.30 + 1000 * 0.03 + (4 + 100) * 2.50) / 1e6
    assert float(raw.headers["x-switchboard-cost-usd"]) == pytest.approx(expected)
    assert chunks[-1].model_extra["switchboard"]["cost_usd"] == pytest.approx(expected)


@pytest.mark.parametrize("stream", [False, True])
def test_safety_stop_is_a_content_filter_finish(client: openai.OpenAI, fake: FakeGeminiUpstream,
                                                stream: bool) -> None:
    fake.finish_reason = "SAFETY"
    messages = [{"role": "user", "content": "something"}]
    if stream:
        finish = accumulate(_stream(client, model="flash", messages=messages))["finish_reason"]
    else:
        finish = client.chat.completions.create(model="flash", messages=messages).choices[0].finish_reason
    assert finish == "content_filter"


def test_blocked_prompt_is_a_content_filter_finish(client: openai.OpenAI, fake: FakeGeminiUpstream) -> None:
    fake.script(prompt_blocked())
    reply = client.chat.completions.create(model="flash", messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].finish_reason == "content_filter"
    assert reply.choices[0].message.content is None


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("behaviour", "status", "code"), [
    (gemini_error(400, "INVALID_ARGUMENT", "Invalid value at 'contents[0].role'"), 400, None),
    (gemini_error(400, "INVALID_ARGUMENT", "The input token count (1200000) exceeds the maximum number of tokens "
                  "allowed (1048576)."), 400, "context_length_exceeded"),
    (gemini_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."), 502,
     "upstream_auth_failed"),
    (gemini_error(403, "PERMISSION_DENIED", "Permission denied"), 502, "upstream_auth_failed"),
    (gemini_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded", retry_delay="13s"), 429, "rate_limit_exceeded"),
    (gemini_error(503, "UNAVAILABLE", "The model is overloaded."), 503, "upstream_overloaded"),
    (gemini_error(500, "INTERNAL", "An internal error has occurred."), 502, "upstream_error"),
])
def test_errors_map_to_openai_classes(client: openai.OpenAI, fake: FakeGeminiUpstream, behaviour: Behaviour,
                                      status: int, code: str | None) -> None:
    fake.script(behaviour)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="flash", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == status
    assert caught.value.body["code"] == code
    if status == 429:
        assert isinstance(caught.value, openai.RateLimitError)
        assert caught.value.response.headers["retry-after"] == "13"


def test_invalid_upstream_key_is_the_operators_problem(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="flash-badkey", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502 and caught.value.body["code"] == "upstream_auth_failed"
    assert "wrong-key" not in str(caught.value.body)


def test_error_event_mid_stream_fails_the_stream(client: openai.OpenAI, fake: FakeGeminiUpstream) -> None:
    fake.script(Behaviour(drop_after_chunks=2, stream_error={"code": 503, "message": "overloaded",
                                                             "status": "UNAVAILABLE"}))
    with pytest.raises(openai.APIError, match="overloaded"):
        list(client.chat.completions.create(model="flash", stream=True,
                                            messages=[{"role": "user", "content": "a b c d e f"}]))


def test_cut_stream_is_an_error_not_a_short_answer(client: openai.OpenAI, fake: FakeGeminiUpstream) -> None:
    fake.script(Behaviour.die_mid_stream(after_chunks=2))
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="flash", stream=True,
                                            messages=[{"role": "user", "content": "a b c d e f"}]))


# --- stream/non-stream parity ------------------------------------------------------------------

ADAPTER = GeminiAdapter()
CALL = Call(Endpoint.CHAT, {"model": "m", "messages": []}, "gemini-2.5-flash", True)
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30)
_json_value = st.recursive(st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                           max_leaves=6)
_part = st.one_of(
    st.builds(lambda t: {"text": t}, _text),
    st.builds(lambda t: {"text": t, "thought": True}, _text),
    st.builds(lambda name, args: {"functionCall": {"name": name, "args": args}},
              st.from_regex(r"[a-z_]{1,12}", fullmatch=True), st.dictionaries(_text, _json_value, max_size=4)),
)


@st.composite
def _exchange(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A random Gemini response, whole and as an SSE stream of partial responses."""
    parts = draw(st.lists(_part, min_size=1, max_size=4))
    finish = draw(st.sampled_from(["STOP", "MAX_TOKENS", "SAFETY", "RECITATION", "OTHER"]))
    usage = {"promptTokenCount": draw(st.integers(0, 10**6)), "candidatesTokenCount": draw(st.integers(0, 10**5)),
             "cachedContentTokenCount": draw(st.integers(0, 10**5)), "thoughtsTokenCount": draw(st.integers(0, 999))}
    whole = {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": 0}],
             "usageMetadata": usage, "modelVersion": "gemini-2.5-flash", "responseId": "r1"}
    pieces: list[dict[str, Any]] = []
    for part in parts:
        if "text" in part:
            text = part["text"]
            cuts = sorted(draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=3))) if len(text) > 1 else []
            pieces += [{**part, "text": text[a:b]} for a, b in itertools.pairwise([0, *cuts, len(text)]) if b > a]
        else:
            pieces.append(part)
    events = []
    for i, piece in enumerate(pieces):
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": [piece]}, "index": 0}
        if i == len(pieces) - 1:
            candidate["finishReason"] = finish
        events.append({"candidates": [candidate], "modelVersion": "gemini-2.5-flash", "responseId": "r1",
                       "usageMetadata": usage if i == len(pieces) - 1 else {"promptTokenCount": 1}})
    sse = b"".join(b"data: " + orjson.dumps(e) + b"\r\n\r\n" for e in events)
    return orjson.dumps(whole), sse


async def _translate(chunks: list[bytes]) -> list[dict[str, Any]]:
    return [orjson.loads(c.data) for c in translate_bytes(ADAPTER, CALL, chunks)]


def test_golden_stream_matches_golden_response() -> None:
    """Recorded-shape stream (text, then a whole functionCall, CRLF framing) against the matching whole response."""
    stream = (FIXTURES / "stream_function_call.sse").read_bytes()
    whole = ADAPTER.parse_response(CALL, (FIXTURES / "generate_content_function_call.json").read_bytes())
    streamed = accumulate(asyncio.run(_translate([stream])))
    assert streamed["content"] == "Let me check the weather."
    assert streamed["tool_calls"] == [{"id": "call_abc123_0", "name": "get_weather", "arguments": '{"city":"Paris"}'}]
    assert streamed["finish_reason"] == "tool_calls"
    assert same_message(streamed, from_completion(orjson.loads(whole.body)))
    assert whole.usage is not None
    assert (whole.usage.prompt_tokens, whole.usage.cached_tokens, whole.usage.completion_tokens,
            whole.usage.reasoning_tokens) == (1034, 1024, 84, 64)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exchange=_exchange(), data=st.data())
def test_stream_translation_matches_whole_response_at_any_chunk_boundary(exchange: tuple[bytes, bytes],
                                                                        data: st.DataObject) -> None:
    body, sse = exchange
    cuts = sorted(data.draw(st.sets(st.integers(1, len(sse) - 1), max_size=12)))
    network_chunks = [sse[a:b] for a, b in itertools.pairwise([0, *cuts, len(sse)])]

    whole = orjson.loads(ADAPTER.parse_response(CALL, body).body)
    chunks = asyncio.run(_translate(network_chunks))
    streamed = accumulate(chunks)
    assert same_message(streamed, from_completion(whole))
    assert streamed["usage"] == whole["usage"]


@given(text=_text, temperature=st.one_of(st.none(), st.floats(0, 2)), top_p=st.one_of(st.none(), st.floats(0, 1)),
       max_tokens=st.one_of(st.none(), st.integers(1, 10**5)),
       stop=st.one_of(st.none(), _text, st.lists(_text, min_size=1, max_size=4)), tools=st.booleans(),
       images=st.integers(0, 3))
def test_request_translation_keeps_every_supported_field(text: str, temperature: float | None, top_p: float | None,
                                                         max_tokens: int | None, stop: Any, tools: bool,
                                                         images: int) -> None:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    content += [{"type": "image_url", "image_url": {"url": PNG}}] * images
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "developer", "content": text},
                                                       {"role": "user", "content": content}]}
    for name, value in (("temperature", temperature), ("top_p", top_p), ("max_tokens", max_tokens),
                        ("stop", stop)):
        if value is not None:
            body[name] = value
    if tools:
        body["tools"] = [WEATHER_TOOL]
    snapshot = orjson.dumps(body)
    request = gemini_request(body, GeminiOptions())
    assert orjson.dumps(body) == snapshot  # the shared request body is never modified
    assert request["systemInstruction"] == {"parts": [{"text": text}]}
    assert len(request["contents"][0]["parts"]) == 1 + images
    config = request.get("generationConfig", {})
    assert config.get("temperature") == temperature and config.get("topP") == top_p
    assert config.get("maxOutputTokens") == max_tokens
    assert config.get("stopSequences") == (None if stop is None else [stop] if isinstance(stop, str) else stop)
    assert ("tools" in request) == tools
