"""`kind: anthropic` through a running gateway, with the openai SDK in front and a fake Messages API behind."""

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

from providers.anthropic import STRUCTURED_TOOL, AnthropicAdapter
from providers.base import Call, Endpoint
from tests.chat_accumulator import accumulate, from_completion, same_message
from tests.conftest import RunningGateway, key_hash, run_gateway
from tests.fakes.anthropic_upstream import (
    TOOL_USE_ID,
    FakeAnthropicUpstream,
    anthropic_error,
    error_mid_stream,
    overloaded,
    rate_limited,
)
from tests.fakes.openai_upstream import Behaviour
from tests.stream_translation import translate_bytes

UPSTREAM_KEY = "sk-ant-upstream-secret"
FIXTURES = Path(__file__).parent / "fixtures" / "anthropic"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PNG = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5"
       "ErkJggg==")


def _policy(base_url: str) -> str:
    return f"""
version: 1
providers:
  claude-direct:
    kind: anthropic
    base_url: {base_url}
    api_key: {UPSTREAM_KEY}
    timeouts: {{connect_s: 2, first_byte_s: 5, total_s: 10}}
  claude-cached:
    kind: anthropic
    base_url: {base_url}
    api_key: {UPSTREAM_KEY}
    options:
      default_max_tokens: 256
      prompt_caching: {{last_turns: 2, ttl: 1h}}
  claude-tool-json:
    kind: anthropic
    base_url: {base_url}
    api_key: {UPSTREAM_KEY}
    options: {{structured_output: tool, anthropic_version: "2026-10-21"}}
models:
  claude: {{targets: [{{provider: claude-direct, model: claude-sonnet-4-6}}]}}
  claude-cached: {{targets: [{{provider: claude-cached, model: claude-sonnet-4-6}}]}}
  claude-tool-json: {{targets: [{{provider: claude-tool-json, model: claude-haiku-4-5}}]}}
teams:
  alpha:
    keys: [{{id: alpha-key, hash: "{key_hash('sk-alpha')}"}}]
    models: ["*"]
"""


@pytest.fixture(scope="module")
def module_fake() -> Iterator[FakeAnthropicUpstream]:
    with FakeAnthropicUpstream(require_api_key=UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture(scope="module")
def module_gateway(module_fake: FakeAnthropicUpstream, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[RunningGateway]:
    path = tmp_path_factory.mktemp("anthropic") / "policy.yaml"
    path.write_text(_policy(module_fake.base_url))
    gateway = run_gateway(path)
    yield gateway
    gateway.stop()


@pytest.fixture
def fake(module_fake: FakeAnthropicUpstream) -> FakeAnthropicUpstream:
    module_fake.reset()
    return module_fake


@pytest.fixture
def client(module_gateway: RunningGateway, fake: FakeAnthropicUpstream) -> openai.OpenAI:
    return module_gateway.client()


def _sent(fake: FakeAnthropicUpstream) -> dict[str, Any]:
    assert fake.last_request is not None
    return fake.last_request.json


# --- chat and streaming ------------------------------------------------------------------------


@pytest.mark.conformance(provider="anthropic", endpoint="chat", feature="text", stream=False)
def test_plain_chat_is_translated_both_ways(client: openai.OpenAI, fake: FakeAnthropicUpstream) -> None:
    reply = client.chat.completions.create(model="claude", messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
        {"role": "user", "content": "hello there"},
    ], stop="END", temperature=1.5, user="u-42")

    assert reply.choices[0].message.content == "echo: hello there"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "claude-sonnet-4-6"
    request = fake.last_request
    assert request is not None and request.path == "/v1/messages"
    assert request.header("x-api-key") == UPSTREAM_KEY
    assert request.header("anthropic-version") == "2023-06-01"
    assert request.header("authorization") is None
    assert request.json == {
        "model": "claude-sonnet-4-6", "max_tokens": 4096,
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Answer in English."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
        "stop_sequences": ["END"], "temperature": 1.0, "metadata": {"user_id": "u-42"},
    }


@pytest.mark.conformance(provider="anthropic", endpoint="chat", feature="text", stream="both")
def test_streamed_text_matches_the_whole_reply(client: openai.OpenAI, module_gateway: RunningGateway,
                                               fake: FakeAnthropicUpstream) -> None:
    messages = [{"role": "user", "content": "one two three four five six"}]
    whole = client.chat.completions.create(model="claude", messages=messages)
    chunks = [c.model_dump() for c in client.chat.completions.create(
        model="claude", messages=messages, stream=True, stream_options={"include_usage": True})]

    assert _sent(fake)["stream"] is True
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) > 1
    assert same_message(accumulate(chunks), from_completion(whole.model_dump()))
    records = module_gateway.usage.wait_for(2)
    assert records[-1].usage is not None and not records[-1].usage.estimated
    assert records[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="claude", stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert all(c.usage is None and c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_maps_to_length(client: openai.OpenAI, fake: FakeAnthropicUpstream) -> None:
    reply = client.chat.completions.create(model="claude", max_completion_tokens=2,
                                           messages=[{"role": "user", "content": "a b c d e"}])
    assert _sent(fake)["max_tokens"] == 2
    assert reply.choices[0].finish_reason == "length"


# --- tools -------------------------------------------------------------------------------------


@pytest.mark.conformance(provider="anthropic", endpoint="chat", feature="tools", stream=False)
def test_tool_call_round_trip(client: openai.OpenAI, fake: FakeAnthropicUpstream) -> None:
    messages: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
    first = client.chat.completions.create(model="claude", messages=messages, tools=[WEATHER_TOOL],
                                           tool_choice="required", parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.id == TOOL_USE_ID and call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"city": "x"}
    sent = _sent(fake)
    assert sent["tools"] == [{"name": "get_weather", "description": "Weather in a city",
                              "input_schema": WEATHER_TOOL["function"]["parameters"]}]
    assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}

    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "12 degrees"}]
    second = client.chat.completions.create(model="claude", messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == "echo: tool said 12 degrees"
    turns = _sent(fake)["messages"]
    assert turns[1] == {"role": "assistant", "content": [
        {"type": "tool_use", "id": TOOL_USE_ID, "name": "get_weather", "input": {"city": "x"}}]}
    assert turns[2] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": TOOL_USE_ID, "content": "12 degrees"}]}


@pytest.mark.conformance(provider="anthropic", endpoint="chat", feature="tools", stream="both")
def test_streamed_tool_call_has_indexed_deltas(client: openai.OpenAI, fake: FakeAnthropicUpstream) -> None:
    fake.stream_chunks = 4
    messages = [{"role": "user", "content": "weather?"}]
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "integer"}}, "required": ["q", "n"]}}}
    whole = client.chat.completions.create(model="claude", messages=messages, tools=[tool])
    chunks = [c.model_dump() for c in client.chat.completions.create(
        model="claude", messages=messages, tools=[tool], stream=True, stream_options={"include_usage": True})]
    fake.stream_chunks = 5

    deltas = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls") or ()]
    assert len(deltas) > 2 and all(d["index"] == 0 for d in deltas)
    assert deltas[0]["id"] == TOOL_USE_ID and deltas[0]["function"] == {"name": "lookup", "arguments": ""}
    assert all(d["id"] is None for d in deltas[1:])
    streamed = accumulate(chunks)
    assert streamed["finish_reason"] == "tool_calls"
    assert same_message(streamed, from_completion(whole.model_dump()))


# --- structured output -------------------------------------------------------------------------


class Person(BaseModel):
    name: str
    age: int | None


@pytest.mark.conformance(provider="anthropic", endpoint="chat", feature="json_schema", stream=False)
def test_parse_with_native_structured_output(client: openai.OpenAI, fake: FakeAnthropicUpstream) -> None:
    reply = client.chat.completions.parse(model="claude", response_format=Person,
                                          messages=[{"role": "user", "content": "who?"}])
    assert reply.choices[0].message.parsed == Person(name="x", age=1)
    schema = _sent(fake)["output_config"]["format"]
    assert schema["type"] == "json_schema" and schema["schema"]["required"] == ["name", "age"]


@pytest.mark.conformance(provider="anthropic", endpoint="chat", feature="json_schema")
@pytest.mark.parametrize("stream", [False, True])
def test_parse_through_a_forced_tool(client: openai.OpenAI, fake: FakeAnthropicUpstream, stream: bool) -> None:
    messages = [{"role": "user", "content": "who?"}]
    if stream:
        with client.chat.completions.stream(model="claude-tool-json", response_format=Person,
                                            messages=messages) as events:
            final = events.get_final_completion()
    else:
        final = client.chat.completions.parse(model="claude-tool-json", response_format=Person, messages=messages)
    assert final.choices[0].message.parsed == Person(name="x", age=1)
    assert final.choices[0].finish_reason == "stop"
    assert not final.choices[0].message.tool_calls
    sent = _sent(fake)
    assert fake.last_request.header("anthropic-version") == "2026-10-21"
    assert sent["tool_choice"] == {"type": "tool", "name": STRUCTURED_TOOL}
    assert "output_config" not in sent


# --- images and caching ------------------------------------------------------------------------


@pytest.mark.conformance(provider="anthropic", endpoint="chat", feature="images", stream=False)
def test_image_parts_become_image_blocks(client: openai.OpenAI, fake: FakeAnthropicUpstream) -> None:
    reply = client.chat.completions.create(model="claude", messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": PNG}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "low"}},
    ]}])
    assert reply.choices[0].message.content == "echo: what is this"
    blocks = _sent(fake)["messages"][0]["content"]
    assert blocks[1] == {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                     "data": PNG.split(",", 1)[1]}}
    assert blocks[2] == {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}


@pytest.mark.conformance(provider="anthropic", endpoint="chat", feature="cached_usage")
@pytest.mark.parametrize("stream", [False, True])
def test_cached_tokens_reach_usage(client: openai.OpenAI, module_gateway: RunningGateway,
                                   fake: FakeAnthropicUpstream, stream: bool) -> None:
    fake.cache_read_tokens, fake.cache_write_tokens = 2048, 100
    before = len(module_gateway.usage.records)
    messages = [{"role": "user", "content": "four words right here"}]
    if stream:
        chunks = list(client.chat.completions.create(model="claude", messages=messages, stream=True,
                                                     stream_options={"include_usage": True}))
        usage = chunks[-1].usage
    else:
        usage = client.chat.completions.create(model="claude", messages=messages).usage
    assert usage is not None
    # Anthropic's input_tokens (4) excludes cached tokens; OpenAI's prompt_tokens includes them.
    assert usage.prompt_tokens == 4 + 2048 + 100
    assert usage.prompt_tokens_details.cached_tokens == 2048
    assert usage.prompt_tokens_details.model_dump()["cache_write_tokens"] == 100
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    record = module_gateway.usage.wait_for(before + 1)[-1]
    assert record.usage is not None
    assert (record.usage.cached_tokens, record.usage.cache_write_tokens) == (2048, 100)


def test_streamed_and_whole_replies_cost_the_same(client: openai.OpenAI, fake: FakeAnthropicUpstream) -> None:
    fake.cache_read_tokens, fake.cache_write_tokens = 4000, 1000
    messages = [{"role": "user", "content": "price this please"}]
    raw = client.chat.completions.with_raw_response.create(model="claude", messages=messages)
    chunks = list(client.chat.completions.create(model="claude", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    usage = raw.parse().usage
    # claude-sonnet-4-6: $3 input, $0.30 cached, $3.75 cache write, $15 output per 1M tokens.
    expected = (3 * 3.00 + 4000 * 0.30 + 1000 * 3.75 + usage.completion_tokens * 15.00) / 1e6
    assert float(raw.headers["x-switchboard-cost-usd"]) == pytest.approx(expected)
    assert chunks[-1].model_extra["switchboard"]["cost_usd"] == pytest.approx(expected)


def test_automatic_cache_breakpoints_respect_the_limit(client: openai.OpenAI, fake: FakeAnthropicUpstream) -> None:
    client.chat.completions.create(model="claude-cached", tools=[WEATHER_TOOL], tool_choice="none", messages=[
        {"role": "system", "content": "long shared instructions"},
        {"role": "user", "content": [{"type": "text", "text": "first", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "third"},
    ], extra_body={"cache_control": {"type": "ephemeral"}})
    sent = _sent(fake)
    marker = {"type": "ephemeral", "ttl": "1h"}
    assert sent["max_tokens"] == 256
    assert sent["system"][-1]["cache_control"] == marker
    turns = sent["messages"]
    assert turns[0]["content"][0]["cache_control"] == {"type": "ephemeral"}  # explicit, passed through
    assert turns[4]["content"][-1]["cache_control"] == marker
    # Explicit (2, incl. the top-level one) + system + newest turn = 4: the second-newest turn gets none.
    assert "cache_control" not in turns[2]["content"][-1]
    assert "cache_control" not in sent["tools"][0]


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("behaviour", "status", "code"), [
    (anthropic_error(400, "invalid_request_error", "messages: roles must alternate"), 400, None),
    (anthropic_error(400, "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"), 400,
     "context_length_exceeded"),
    (anthropic_error(401, "authentication_error", "invalid x-api-key"), 502, "upstream_auth_failed"),
    (anthropic_error(404, "not_found_error", "model: claude-nope"), 404, None),
    (rate_limited(7), 429, "rate_limit_exceeded"),
    (overloaded(), 503, "upstream_overloaded"),
    (anthropic_error(503, "api_error", "unavailable"), 503, "upstream_overloaded"),
    (anthropic_error(500, "api_error", "Internal server error"), 502, "upstream_error"),
])
def test_errors_map_to_openai_classes(client: openai.OpenAI, fake: FakeAnthropicUpstream, behaviour: Behaviour,
                                      status: int, code: str | None) -> None:
    fake.script(behaviour)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="claude", messages=[{"role": "user", "content": "hi"}])
    error = caught.value
    assert error.status_code == status
    assert error.body["code"] == code
    assert UPSTREAM_KEY not in str(error.body)
    if status == 429:
        assert isinstance(error, openai.RateLimitError)
        assert error.response.headers["retry-after"] == "7"
    if status == 400:
        assert isinstance(error, openai.BadRequestError)
        assert behaviour.body["error"]["message"] in error.message


def test_error_event_mid_stream_fails_the_stream(client: openai.OpenAI, fake: FakeAnthropicUpstream) -> None:
    fake.script(error_mid_stream(after_events=4))
    stream = client.chat.completions.create(model="claude", stream=True,
                                            messages=[{"role": "user", "content": "a b c d e f"}])
    with pytest.raises(openai.APIError, match="Overloaded"):
        for _ in stream:
            pass


def test_cut_stream_is_an_error_not_a_short_answer(client: openai.OpenAI, fake: FakeAnthropicUpstream) -> None:
    fake.script(Behaviour.die_mid_stream(after_chunks=4))
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="claude", stream=True,
                                            messages=[{"role": "user", "content": "a b c d e f"}]))


def test_untranslatable_request_is_a_400(client: openai.OpenAI, fake: FakeAnthropicUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="claude", n=2, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="claude", messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}])
    assert fake.request_count == 0


# --- golden fixtures and stream/non-stream parity ----------------------------------------------

ADAPTER = AnthropicAdapter()
CALL = Call(Endpoint.CHAT, {"model": "m", "messages": []}, "claude-sonnet-4-6", True)


async def _translate(chunks: list[bytes], call: Call = CALL) -> list[dict[str, Any]]:
    return [orjson.loads(c.data) for c in translate_bytes(ADAPTER, call, chunks)]


def test_golden_stream_matches_golden_message() -> None:
    """The recorded stream in protocols.md 5.4 (text + tool_use) against the matching whole message."""
    stream = (FIXTURES / "stream_tool_use.sse").read_bytes()
    whole = ADAPTER.parse_response(CALL, (FIXTURES / "message_tool_use.json").read_bytes())
    streamed = accumulate(asyncio.run(_translate([stream])))
    assert streamed["tool_calls"] == [{"id": "toolu_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert same_message(streamed, from_completion(orjson.loads(whole.body)))
    assert whole.usage is not None and whole.usage.prompt_tokens == 25 + 2048 and whole.usage.cached_tokens == 2048


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30)
_json_value = st.recursive(st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                           max_leaves=6)
_block = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, _text),
    st.builds(lambda name, args: {"type": "tool_use", "name": name, "input": args},
              st.from_regex(r"[a-z_]{1,12}", fullmatch=True), st.dictionaries(_text, _json_value, max_size=4)),
)


def _cuts(draw: st.DrawFn, text: str) -> list[str]:
    points = sorted(draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=4))) if len(text) > 1 else []
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@st.composite
def _exchange(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A random Anthropic message, as a whole body and as an SSE stream with random splits."""
    blocks = draw(st.lists(_block, min_size=1, max_size=4))
    for i, block in enumerate(blocks):
        if block["type"] == "tool_use":
            block["id"] = f"toolu_{i}"
    stop = draw(st.sampled_from(["end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal"]))
    usage = {"input_tokens": draw(st.integers(0, 10**6)), "output_tokens": draw(st.integers(0, 10**5)),
             "cache_read_input_tokens": draw(st.integers(0, 10**6)),
             "cache_creation_input_tokens": draw(st.integers(0, 10**5))}
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": blocks,
               "stop_reason": stop, "stop_sequence": None, "usage": usage}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": {
        **message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}}]
    for i, block in enumerate(blocks):
        if block["type"] == "text":
            events.append({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}})
            events += [{"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": p}}
                       for p in _cuts(draw, block["text"])]
        else:
            events.append({"type": "content_block_start", "index": i, "content_block": {
                "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}})
            events += [{"type": "content_block_delta", "index": i,
                        "delta": {"type": "input_json_delta", "partial_json": p}}
                       for p in _cuts(draw, orjson.dumps(block["input"]).decode())]
        if draw(st.booleans()):
            events.append({"type": "ping"})
        events.append({"type": "content_block_stop", "index": i})
    events.append({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                   "usage": {"output_tokens": usage["output_tokens"]}})
    events.append({"type": "message_stop"})
    sse = b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)
    return orjson.dumps(message), sse


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exchange=_exchange(), data=st.data())
def test_stream_translation_matches_whole_response_at_any_chunk_boundary(exchange: tuple[bytes, bytes],
                                                                        data: st.DataObject) -> None:
    body, sse = exchange
    cuts = sorted(data.draw(st.sets(st.integers(1, len(sse) - 1), max_size=12)))
    bounds = [0, *cuts, len(sse)]
    network_chunks = [sse[a:b] for a, b in itertools.pairwise(bounds)]

    whole = ADAPTER.parse_response(CALL, body)
    chunks = asyncio.run(_translate(network_chunks))
    streamed = accumulate(chunks)
    assert same_message(streamed, from_completion(orjson.loads(whole.body)))
    assert streamed["usage"] == orjson.loads(whole.body)["usage"]
    tool_starts = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls") or ()
                   if tc.get("id")]
    assert [t["index"] for t in tool_starts] == list(range(len(tool_starts)))


@given(text=_text, parts=st.lists(st.sampled_from(["text", "image", "url"]), max_size=4),
       stop=st.one_of(st.none(), _text, st.lists(_text, min_size=1, max_size=4)),
       max_tokens=st.one_of(st.none(), st.integers(1, 10**5)), tools=st.booleans())
def test_request_translation_keeps_every_supported_field(text: str, parts: list[str], stop: Any,
                                                         max_tokens: int | None, tools: bool) -> None:
    from providers.anthropic import AnthropicOptions, messages_request

    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    for kind in parts:
        if kind == "text":
            content.append({"type": "text", "text": text + "!"})
        else:
            content.append({"type": "image_url", "image_url": {"url": PNG if kind == "image" else "https://x/y.png"}})
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "system", "content": text},
                                                       {"role": "user", "content": content}]}
    if stop is not None:
        body["stop"] = stop
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if tools:
        body["tools"] = [WEATHER_TOOL]
    snapshot = orjson.dumps(body)
    request = messages_request(body, "claude", False, AnthropicOptions())
    assert orjson.dumps(body) == snapshot  # the shared request body is never modified
    assert request["system"] == [{"type": "text", "text": text}]
    assert len(request["messages"][0]["content"]) == len(content)
    assert request["max_tokens"] == (max_tokens or 4096)
    if stop is not None:
        assert request["stop_sequences"] == ([stop] if isinstance(stop, str) else stop)
    assert ("tools" in request) == tools
