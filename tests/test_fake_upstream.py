"""The fake OpenAI upstream speaks the wire format the real openai SDK expects, and its scripts work."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.fakes import TOOL_CALL_ID, Behaviour, FakeOpenAIUpstream, minimal_instance

REPO_ROOT = Path(__file__).resolve().parent.parent
USER_TEXT = "what is the weather in Paris"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": USER_TEXT}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 3}},
            "required": ["city", "days"],
        },
    },
}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIUpstream]:
    with FakeOpenAIUpstream() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeOpenAIUpstream) -> Iterator[FakeOpenAIUpstream]:
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def client(fake: FakeOpenAIUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0, timeout=5) as sdk:
        yield sdk


def test_chat_non_stream(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-4o-mini"
    choice = completion.choices[0]
    assert choice.message.content == f"echo: {USER_TEXT}"
    assert choice.finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (8, 7, 15)
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 0


def test_chat_n_choices_and_max_tokens(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="m", messages=MESSAGES, n=3, max_tokens=2)

    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert {c.message.content for c in completion.choices} == {"echo: what"}
    assert {c.finish_reason for c in completion.choices} == {"length"}
    assert completion.usage is not None and completion.usage.completion_tokens == 6


def test_stream_with_include_usage(client: openai.OpenAI, fake: FakeOpenAIUpstream) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )

    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" and c.model == "gpt-4o-mini" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = chunks[1 : 1 + fake.stream_chunks]
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == f"echo: {USER_TEXT}"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (8, 7)
    assert len(chunks) == fake.stream_chunks + 3


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI, fake: FakeOpenAIUpstream) -> None:
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))

    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(chunks) == fake.stream_chunks + 2


def test_tool_call_non_stream(client: openai.OpenAI) -> None:
    echo_tool = {"type": "function", "function": {"name": "echo", "parameters": {"type": "object"}}}
    completion = client.chat.completions.create(model="m", messages=MESSAGES, tools=[echo_tool])

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    call = choice.message.tool_calls[0]
    assert (call.id, call.type, call.function.name) == (TOOL_CALL_ID, "function", "echo")
    assert json.loads(call.function.arguments) == {"echo": USER_TEXT}


def test_tool_choice_none_answers_with_text(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="m", messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="none")

    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].message.content == f"echo: {USER_TEXT}"


def test_tool_call_streamed_like_openai(fake: FakeOpenAIUpstream) -> None:
    request = {"model": "m", "messages": MESSAGES, "tools": [WEATHER_TOOL], "stream": True}
    with httpx.stream("POST", f"{fake.base_url}/chat/completions", json=request) as response:
        lines = [line for line in response.iter_lines() if line]

    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    first = events[0]["choices"][0]["delta"]
    assert first["role"] == "assistant"
    assert first["tool_calls"] == [
        {
            "index": 0,
            "id": TOOL_CALL_ID,
            "type": "function",
            "function": {"name": "get_weather", "arguments": ""},
        }
    ]
    fragments = [e["choices"][0]["delta"]["tool_calls"] for e in events[1:-1]]
    assert len(fragments) > 1
    assert all(f[0].keys() == {"index", "function"} and f[0]["function"].keys() == {"arguments"} for f in fragments)
    arguments = "".join(f[0]["function"]["arguments"] for f in fragments)
    assert json.loads(arguments) == {"city": "x", "days": 3}
    assert events[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }


def test_tool_call_streamed_through_sdk(client: openai.OpenAI) -> None:
    arguments, names = "", []
    for chunk in client.chat.completions.create(model="m", messages=MESSAGES, tools=[WEATHER_TOOL], stream=True):
        for call in chunk.choices[0].delta.tool_calls or []:
            arguments += call.function.arguments or ""
            names += [call.function.name] if call.function.name else []

    assert names == ["get_weather"]
    assert json.loads(arguments) == {"city": "x", "days": 3}


class Unit(Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


class Reading(BaseModel):
    value: float
    unit: Unit


class Forecast(BaseModel):
    city: str
    days: int
    rainy: bool
    mood: Literal["good", "bad"]
    note: str | None
    readings: list[Reading]
    latest: Reading


def test_parse_with_pydantic_response_format(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(model="m", messages=MESSAGES, response_format=Forecast)

    parsed = completion.choices[0].message.parsed
    assert parsed == Forecast(
        city="x",
        days=1,
        rainy=True,
        mood="good",
        note="x",  # anyOf takes the first non-null branch
        readings=[],
        latest=Reading(value=1, unit=Unit.CELSIUS),
    )


def test_minimal_instance_honours_bounds_formats_and_refs() -> None:
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "exclusiveMinimum": 5},
            "when": {"type": "string", "format": "date-time"},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}, "minItems": 2},
            "optional": {"type": "string"},
        },
        "required": ["n", "when", "tags"],
        "$defs": {"Tag": {"anyOf": [{"type": "null"}, {"const": "t"}]}},
    }

    assert minimal_instance(schema) == {"n": 6, "when": "2024-01-01T00:00:00Z", "tags": ["t", "t"]}


def test_embeddings_sdk_default_base64_matches_float(client: openai.OpenAI, fake: FakeOpenAIUpstream) -> None:
    default = client.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])
    as_float = client.embeddings.create(
        model="text-embedding-3-small", input=["hello", "world"], encoding_format="float", dimensions=4
    )

    assert fake.requests[0].json["encoding_format"] == "base64"
    assert [len(d.embedding) for d in default.data] == [fake.embedding_dimensions] * 2
    assert default.model == "text-embedding-3-small"
    assert default.usage.prompt_tokens == 2
    assert [len(d.embedding) for d in as_float.data] == [4, 4]
    assert default.data[0].embedding[:4] == as_float.data[0].embedding
    assert default.data[0].embedding != default.data[1].embedding


def test_models_list(client: openai.OpenAI, fake: FakeOpenAIUpstream) -> None:
    assert [m.id for m in client.models.list()] == list(fake.models)
    assert client.models.retrieve("gpt-4o").owned_by == "system"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_legacy_completions(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="say hi")
    chunks = list(
        client.completions.create(
            model="gpt-3.5-turbo-instruct",
            prompt="say hi",
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert completion.object == "text_completion"
    assert completion.choices[0].text == "echo: say hi"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "echo: say hi"
    assert chunks[-1].choices == [] and chunks[-1].usage == completion.usage


def test_scripted_errors_apply_in_order_then_normal(client: openai.OpenAI, fake: FakeOpenAIUpstream) -> None:
    fake.script(
        Behaviour.error(500),
        Behaviour.rate_limited(retry_after=7),
        Behaviour.error(400, "bad things", code="context_length_exceeded"),
    )

    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as rate_limited:
        client.chat.completions.create(model="m", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as bad_request:
        client.chat.completions.create(model="m", messages=MESSAGES)
    completion = client.chat.completions.create(model="m", messages=MESSAGES)

    assert rate_limited.value.response.headers["retry-after"] == "7"
    assert bad_request.value.code == "context_length_exceeded"
    assert bad_request.value.body == {
        "message": "bad things",
        "type": "invalid_request_error",
        "param": None,
        "code": "context_length_exceeded",
    }
    assert completion.choices[0].message.content == f"echo: {USER_TEXT}"
    assert fake.pending_behaviours == 0


def test_behaviour_is_not_consumed_by_health_checks(fake: FakeOpenAIUpstream) -> None:
    fake.script(Behaviour.error(503))

    assert httpx.get(f"{fake.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{fake.base_url}/models").status_code == 200
    assert fake.pending_behaviours == 1


def test_connection_failures_surface_as_sdk_errors(client: openai.OpenAI, fake: FakeOpenAIUpstream) -> None:
    fake.script(Behaviour.abrupt_close(), Behaviour.die_mid_stream(after_chunks=2))

    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="m", messages=MESSAGES)
    received = []
    with pytest.raises(openai.APIConnectionError):
        received.extend(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert len(received) == 2


def test_error_mid_stream_raises_api_error(client: openai.OpenAI, fake: FakeOpenAIUpstream) -> None:
    fake.script(Behaviour.error_mid_stream(after_chunks=1, message="boom"))

    with pytest.raises(openai.APIError, match="boom"):
        list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))


def test_hang_until_client_times_out_is_seen_as_disconnect(fake: FakeOpenAIUpstream) -> None:
    fake.script(Behaviour.hanging())
    with (
        openai.OpenAI(base_url=fake.base_url, api_key="k", max_retries=0, timeout=0.2) as impatient,
        pytest.raises(openai.APITimeoutError),
    ):
        impatient.chat.completions.create(model="m", messages=MESSAGES)

    assert fake.wait_for_disconnect(timeout=5)
    assert fake.disconnects[0].streaming is False


def test_client_leaving_mid_stream_is_detected(fake: FakeOpenAIUpstream) -> None:
    fake.script(Behaviour.slow_stream(chunks=100, chunk_delay_ms=50))
    request = {"model": "m", "messages": MESSAGES, "stream": True}

    with httpx.stream("POST", f"{fake.base_url}/chat/completions", json=request) as response:
        first = next(line for line in response.iter_lines() if line)
    assert first.startswith("data: {")

    assert fake.wait_for_disconnect(timeout=5)
    [disconnect] = fake.disconnects
    assert disconnect.streaming and disconnect.path == "/v1/chat/completions"
    assert 1 <= disconnect.chunks_sent < 100
    assert fake.stream_disconnects == 1


def test_recording_captures_headers_and_body(client: openai.OpenAI, fake: FakeOpenAIUpstream) -> None:
    client.chat.completions.create(model="m", messages=MESSAGES, extra_headers={"X-Trace-Me": "yes"})

    assert fake.wait_for_requests(1)
    [recorded] = fake.requests
    assert (recorded.method, recorded.path, recorded.query_string) == ("POST", "/v1/chat/completions", "")
    assert recorded.headers["authorization"] == "Bearer sk-test"
    assert recorded.header("X-Trace-Me") == "yes"
    assert recorded.json == json.loads(recorded.body)
    assert recorded.json["messages"] == MESSAGES


def test_require_api_key() -> None:
    with (
        FakeOpenAIUpstream(require_api_key="sk-right") as fake,
        openai.OpenAI(base_url=fake.base_url, api_key="sk-wrong", max_retries=0) as wrong,
        openai.OpenAI(base_url=fake.base_url, api_key="sk-right", max_retries=0) as right,
    ):
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="m", messages=MESSAGES)
        assert right.chat.completions.create(model="m", messages=MESSAGES).choices


def test_cli_prints_ready_and_exits_on_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.openai_upstream", "--port", "0", "--stream-chunks", "3"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready = process.stdout.readline().split()
        assert ready[0] == "ready"
        base_url = ready[1]
        request = {"model": "m", "messages": MESSAGES, "stream": True}
        with httpx.stream("POST", f"{base_url}/chat/completions", json=request) as response:
            events = [line for line in response.iter_lines() if line]
        assert len(events) == 3 + 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
