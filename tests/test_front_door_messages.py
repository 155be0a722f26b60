"""POST /v1/messages: the anthropic SDK against the gateway, served by Claude or by an OpenAI-compatible engine."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import pytest

from tests.conftest import RunningGateway, serving
from tests.fakes import FakeOpenAIUpstream
from tests.fakes.anthropic_upstream import FakeAnthropicUpstream, rate_limited
from tests.fakes.openai_upstream import Behaviour

WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}

LOCAL_OR_CLAUDE = {"claude": "anthropic", "local": "vllm"}  # conformance matrix rows


@pytest.fixture(scope="module")
def claude_fake() -> Iterator[FakeAnthropicUpstream]:
    with FakeAnthropicUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def module_gateway(claude_fake: FakeAnthropicUpstream, fake_upstream: FakeOpenAIUpstream,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    path = tmp_path_factory.mktemp("messages") / "policy.yaml"
    with serving(path, f"""
version: 1
providers:
  claude: {{kind: anthropic, base_url: {claude_fake.base_url}, api_key: sk-ant-x}}
  engine: {{kind: vllm, base_url: {fake_upstream.base_url}}}
models:
  claude: {{targets: [{{provider: claude, model: claude-sonnet-4-6}}]}}
  local: {{targets: [{{provider: engine, model: qwen3}}]}}
""") as gateway:
        yield gateway


@pytest.fixture
def client(module_gateway: RunningGateway, claude_fake: FakeAnthropicUpstream,
           upstream: FakeOpenAIUpstream) -> anthropic.Anthropic:
    claude_fake.reset()
    return anthropic.Anthropic(base_url=module_gateway.base_url, api_key="sk-alpha", max_retries=0)


@pytest.mark.conformance(provider=LOCAL_OR_CLAUDE, endpoint="messages", feature="text", stream=False)
@pytest.mark.parametrize("model", ["claude", "local"])
def test_text_reply(client: anthropic.Anthropic, model: str) -> None:
    reply = client.messages.create(model=model, max_tokens=100, system="Be brief.",
                                   messages=[{"role": "user", "content": "hello there"}])
    assert reply.type == "message" and reply.role == "assistant"
    assert reply.content[0].type == "text" and reply.content[0].text == "echo: hello there"
    assert reply.stop_reason == "end_turn"
    assert reply.usage.output_tokens == 3 and reply.usage.input_tokens > 0


@pytest.mark.conformance(provider=LOCAL_OR_CLAUDE, endpoint="messages", feature="text", stream="both")
@pytest.mark.parametrize("model", ["claude", "local"])
def test_streamed_reply_matches(client: anthropic.Anthropic, model: str) -> None:
    messages = [{"role": "user", "content": "one two three four"}]
    whole = client.messages.create(model=model, max_tokens=100, messages=messages)
    with client.messages.stream(model=model, max_tokens=100, messages=messages) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(texts) > 1 and "".join(texts) == whole.content[0].text
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens


@pytest.mark.conformance(provider=LOCAL_OR_CLAUDE, endpoint="messages", feature="tools")
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["claude", "local"])
def test_tool_use_round_trip(client: anthropic.Anthropic, model: str, stream: bool) -> None:
    messages: list[dict[str, object]] = [{"role": "user", "content": "weather in Paris?"}]
    kwargs = {"model": model, "max_tokens": 100, "tools": [WEATHER], "tool_choice": {"type": "any"}}
    if stream:
        with client.messages.stream(messages=messages, **kwargs) as events:  # type: ignore[arg-type]
            first = events.get_final_message()
    else:
        first = client.messages.create(messages=messages, **kwargs)  # type: ignore[arg-type]
    assert first.stop_reason == "tool_use"
    tool_use = next(b for b in first.content if b.type == "tool_use")
    assert tool_use.name == "get_weather" and tool_use.input == {"city": "x"}

    messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id,
                                               "content": "12 degrees"}]}]
    second = client.messages.create(model=model, max_tokens=100, messages=messages,  # type: ignore[arg-type]
                                    tools=[WEATHER], tool_choice={"type": "none"})
    assert second.stop_reason == "end_turn" and second.content[0].type == "text"


@pytest.mark.conformance(provider="anthropic", endpoint="messages", feature="cached_usage", stream=False)
def test_cached_tokens_come_back_in_anthropic_terms(client: anthropic.Anthropic,
                                                    claude_fake: FakeAnthropicUpstream) -> None:
    claude_fake.cache_read_tokens, claude_fake.cache_write_tokens = 500, 50
    reply = client.messages.create(model="claude", max_tokens=10, messages=[{"role": "user", "content": "a b"}])
    assert (reply.usage.input_tokens, reply.usage.cache_read_input_tokens,
            reply.usage.cache_creation_input_tokens) == (2, 500, 50)


def test_x_api_key_header_is_accepted(module_gateway: RunningGateway) -> None:
    response = httpx.post(module_gateway.base_url + "/v1/messages", headers={"x-api-key": "sk-alpha"},
                          json={"model": "local", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200 and response.json()["content"][0]["text"] == "echo: hi"


def test_errors_in_anthropic_shape(client: anthropic.Anthropic, module_gateway: RunningGateway,
                                   claude_fake: FakeAnthropicUpstream, upstream: FakeOpenAIUpstream) -> None:
    bad_key = anthropic.Anthropic(base_url=module_gateway.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        bad_key.messages.create(model="claude", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["error"]["type"] == "authentication_error"

    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])

    claude_fake.script(rate_limited(3))
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model="claude", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert limited.value.response.headers["retry-after"] == "3"

    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="claude", max_tokens=5,
                               messages=[{"role": "system", "content": "x"}])  # type: ignore[list-item]


def test_mid_stream_failure_is_an_error_event(client: anthropic.Anthropic, upstream: FakeOpenAIUpstream) -> None:
    upstream.script(Behaviour.error_mid_stream(after_chunks=2))
    with pytest.raises(anthropic.APIStatusError), client.messages.stream(
            model="local", max_tokens=100, messages=[{"role": "user", "content": "a b c d e"}]) as stream:
        stream.get_final_message()
