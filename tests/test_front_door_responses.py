"""POST /v1/responses translated to chat: the openai SDK's Responses API against Anthropic-backed and
chat-only OpenAI-compatible models."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
from pydantic import BaseModel

from tests.conftest import RunningGateway, serving
from tests.fakes import FakeOpenAIUpstream
from tests.fakes.anthropic_upstream import FakeAnthropicUpstream
from tests.fakes.openai_upstream import Behaviour

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
MODELS = ["claude", "local"]

LOCAL_OR_CLAUDE = {"claude": "anthropic", "local": "openai-compatible"}  # conformance matrix rows


@pytest.fixture(scope="module")
def claude_fake() -> Iterator[FakeAnthropicUpstream]:
    with FakeAnthropicUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def module_gateway(claude_fake: FakeAnthropicUpstream, fake_upstream: FakeOpenAIUpstream,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    path = tmp_path_factory.mktemp("responses") / "policy.yaml"
    with serving(path, f"""
version: 1
providers:
  claude: {{kind: anthropic, base_url: {claude_fake.base_url}, api_key: sk-ant-x}}
  # A chat-only OpenAI-compatible server, so this file covers the translation; vLLM's native
  # /v1/responses is passed through instead (tests/test_responses_passthrough.py).
  engine: {{kind: openai_compatible, base_url: {fake_upstream.base_url}}}
models:
  claude: {{targets: [{{provider: claude, model: claude-sonnet-4-6}}]}}
  local: {{targets: [{{provider: engine, model: qwen3}}]}}
""") as gateway:
        yield gateway


@pytest.fixture
def client(module_gateway: RunningGateway, claude_fake: FakeAnthropicUpstream,
           upstream: FakeOpenAIUpstream) -> openai.OpenAI:
    claude_fake.reset()
    return module_gateway.client()


@pytest.mark.conformance(provider=LOCAL_OR_CLAUDE, endpoint="responses", feature="text", stream=False)
@pytest.mark.parametrize("model", MODELS)
def test_string_input_with_instructions(client: openai.OpenAI, claude_fake: FakeAnthropicUpstream,
                                        upstream: FakeOpenAIUpstream, model: str) -> None:
    reply = client.responses.create(model=model, input="hello there", instructions="Be brief.",
                                    max_output_tokens=50)
    assert reply.status == "completed"
    assert reply.output_text == "echo: hello there"
    assert reply.usage is not None and reply.usage.output_tokens == 3
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens
    sent = (claude_fake if model == "claude" else upstream).last_request
    assert sent is not None
    if model == "claude":
        assert sent.json["system"] == [{"type": "text", "text": "Be brief."}] and sent.json["max_tokens"] == 50
    else:
        assert sent.json["messages"][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.conformance(provider=LOCAL_OR_CLAUDE, endpoint="responses", feature="text", stream=True)
@pytest.mark.parametrize("model", MODELS)
def test_stream_event_sequence(client: openai.OpenAI, model: str) -> None:
    whole = client.responses.create(model=model, input="one two three four")
    events = list(client.responses.create(model=model, input="one two three four", stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == whole.output_text
    completed = events[-1].response
    assert completed.output_text == whole.output_text
    assert completed.usage is not None and completed.usage.output_tokens == whole.usage.output_tokens


class Person(BaseModel):
    name: str
    age: int | None


@pytest.mark.conformance(provider=LOCAL_OR_CLAUDE, endpoint="responses", feature="json_schema", stream=False)
@pytest.mark.parametrize("model", MODELS)
def test_parse_with_text_format(client: openai.OpenAI, model: str) -> None:
    reply = client.responses.parse(model=model, input="who?", text_format=Person)
    assert reply.output_parsed == Person(name="x", age=1)


@pytest.mark.conformance(provider=LOCAL_OR_CLAUDE, endpoint="responses", feature="tools")
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", MODELS)
def test_function_call_round_trip(client: openai.OpenAI, model: str, stream: bool) -> None:
    kwargs: dict[str, Any] = {"model": model, "tools": [WEATHER], "tool_choice": "required"}
    if stream:
        with client.responses.stream(input="weather in Paris?", **kwargs) as events:
            seen = [e.type for e in events]
            first = events.get_final_response()
        assert "response.function_call_arguments.delta" in seen
        assert "response.function_call_arguments.done" in seen
    else:
        first = client.responses.create(input="weather in Paris?", **kwargs)
    call = next(item for item in first.output if item.type == "function_call")
    assert call.name == "get_weather" and orjson.loads(call.arguments) == {"city": "x"}

    second = client.responses.create(model=model, tools=[WEATHER], tool_choice="none", input=[
        {"role": "user", "content": [{"type": "input_text", "text": "weather in Paris?"}]},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "12 degrees"},
    ])
    assert second.status == "completed" and second.output_text


@pytest.mark.conformance(provider="anthropic", endpoint="responses", feature="cached_usage", stream=False)
def test_cached_tokens_in_response_usage(client: openai.OpenAI, claude_fake: FakeAnthropicUpstream) -> None:
    claude_fake.cache_read_tokens = 300
    reply = client.responses.create(model="claude", input="a b")
    assert reply.usage is not None
    assert reply.usage.input_tokens == 302 and reply.usage.input_tokens_details.cached_tokens == 300


def test_length_stop_is_incomplete(client: openai.OpenAI) -> None:
    reply = client.responses.create(model="local", input="a b c d e", max_output_tokens=2)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"


def test_conversations_and_background_are_refused_and_unknown_previous_ids_are_not_found(
        client: openai.OpenAI) -> None:
    for field, value in (("conversation", "conv_123"), ("background", True)):
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(model="local", input="more", **{field: value})
        assert caught.value.body["param"] == field
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="local", input="more", previous_response_id="resp_123")
    assert missing.value.body["code"] == "previous_response_not_found"


def test_upstream_errors_keep_openai_shape(client: openai.OpenAI, upstream: FakeOpenAIUpstream) -> None:
    upstream.script(Behaviour.rate_limited(retry_after=2))
    with pytest.raises(openai.RateLimitError):
        client.responses.create(model="local", input="x")
    upstream.script(Behaviour.error_mid_stream(after_chunks=2))
    events = list(client.responses.create(model="local", input="a b c d e", stream=True))
    # A failure after the stream started is the Responses `error` event, and no response.completed follows.
    assert events[-1].type == "error" and "mid-stream" in events[-1].message
    assert "response.completed" not in [e.type for e in events]


@pytest.mark.parametrize(("field", "value", "param", "expected"), [
    ("text", [1], "text", "an object"), ("text", 5, "text", "an object"),
    ("text", {"format": "json"}, "text.format", "an object"), ("reasoning", ["high"], "reasoning", "an object"),
    ("tools", 3, "tools", "an array"), ("tools", {"type": "function"}, "tools", "an array"),
    # Fields the translation renames (`max_tokens`, a system message) are named as the client sent them.
    ("max_output_tokens", "lots", "max_output_tokens", "an integer"),
    ("instructions", ["be brief"], "instructions", "a string"), ("temperature", "hot", "temperature", "a number"),
])
def test_a_field_of_the_wrong_json_type_is_a_400_that_names_it(client: openai.OpenAI, upstream: FakeOpenAIUpstream,
                                                               field: str, value: Any, param: str,
                                                               expected: str) -> None:
    """Found by tests/test_fuzz_endpoints.py: a `text` that was a list reached `.get` and answered 500; and a
    `max_output_tokens` of text was refused as `max_tokens`, a field the client never sent."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="local", input="x", extra_body={field: value})
    body = caught.value.body
    assert (body["param"], body["code"]) == (param, "invalid_type")
    assert f"expected {expected}" in body["message"]
    assert upstream.request_count == 0
