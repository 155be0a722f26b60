"""POST /v1/responses passed through natively to upstreams that serve the Responses API (vLLM, OpenAI).

The same SDK calls still work against an Anthropic-backed model, by translation;
models that could fall back to a chat-only provider are translated too.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest
from pydantic import BaseModel

from tests.conftest import RunningGateway, serving
from tests.fakes.anthropic_upstream import FakeAnthropicUpstream
from tests.fakes.openai_upstream import Behaviour
from tests.fakes.responses_upstream import RESPONSES, FakeResponsesUpstream

WEATHER = {"type": "function", "name": "get_weather", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
conformance = pytest.mark.conformance


class Person(BaseModel):
    name: str
    age: int | None


@pytest.fixture(scope="module")
def vllm() -> Iterator[FakeResponsesUpstream]:
    with FakeResponsesUpstream(sorted_keys=True) as fake:  # vLLM writes the SDK's models, keys sorted
        yield fake


@pytest.fixture(scope="module")
def openai_fake() -> Iterator[FakeResponsesUpstream]:
    with FakeResponsesUpstream(require_api_key="sk-openai-upstream") as fake:
        yield fake


@pytest.fixture(scope="module")
def claude_fake() -> Iterator[FakeAnthropicUpstream]:
    with FakeAnthropicUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def module_gateway(vllm: FakeResponsesUpstream, openai_fake: FakeResponsesUpstream, claude_fake: FakeAnthropicUpstream,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    path = tmp_path_factory.mktemp("responses-native") / "policy.yaml"
    with serving(path, f"""
version: 1
providers:
  engine: {{kind: vllm, base_url: {vllm.base_url}}}
  chatonly: {{kind: openai_compatible, base_url: {vllm.base_url}}}
  oai: {{kind: openai, base_url: {openai_fake.base_url}, api_key: sk-openai-upstream}}
  claude: {{kind: anthropic, base_url: {claude_fake.base_url}, api_key: sk-ant-x}}
models:
  local: {{targets: [{{provider: engine, model: qwen3}}]}}
  gpt: {{targets: [{{provider: oai, model: gpt-5-mini}}]}}
  claude: {{targets: [{{provider: claude, model: claude-sonnet-4-6}}]}}
  generic: {{targets: [{{provider: chatonly, model: llama}}]}}
  local-or-claude:
    targets: [{{provider: engine, model: qwen3}}]
    fallbacks: {{default: [claude]}}
""") as gateway:
        yield gateway


@pytest.fixture
def client(module_gateway: RunningGateway, vllm: FakeResponsesUpstream, openai_fake: FakeResponsesUpstream,
           claude_fake: FakeAnthropicUpstream) -> openai.OpenAI:
    for fake in (vllm, openai_fake, claude_fake):
        fake.reset()
    module_gateway.usage.clear()
    return module_gateway.client()


@conformance(provider={"local": "vllm"}, endpoint="responses", stream=False,
             feature="text")
@pytest.mark.parametrize("model", ["local", "gpt"])
def test_create_is_passed_through_with_usage_settled(client: openai.OpenAI, module_gateway: RunningGateway,
                                                     vllm: FakeResponsesUpstream, openai_fake: FakeResponsesUpstream,
                                                     model: str) -> None:
    reply = client.responses.create(model=model, input="hello there", instructions="Be brief.",
                                    max_output_tokens=50, store=False)
    fake = vllm if model == "local" else openai_fake
    sent = fake.last_request
    assert sent is not None and sent.path == RESPONSES
    # Forwarded as the client wrote it, only the model rewritten to the deployment's.
    assert sent.json["input"] == "hello there" and sent.json["instructions"] == "Be brief."
    assert sent.json["model"] == ("qwen3" if model == "local" else "gpt-5-mini")
    assert "stream_options" not in sent.json
    assert reply.output_text == "echo: hello there" and reply.status == "completed"
    assert reply.id.startswith("resp_fake")  # the upstream's own object, not a translation
    record = module_gateway.usage.wait_for(1)[0]
    assert record.endpoint == "responses" and record.status == 200
    assert record.usage is not None and not record.usage.estimated
    assert (record.usage.prompt_tokens, record.usage.completion_tokens) == (
        reply.usage.input_tokens, reply.usage.output_tokens)


@conformance(provider="vllm", endpoint="responses", stream=True, feature="text")
def test_stream_keeps_the_responses_framing(module_gateway: RunningGateway, client: openai.OpenAI) -> None:
    body = {"model": "local", "input": "one two three four", "stream": True}
    raw = httpx.post(module_gateway.v1 + "/responses", json=body, headers={"authorization": "Bearer sk-alpha"})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    frames = [f for f in raw.text.split("\n\n") if f]
    assert "[DONE]" not in raw.text
    for frame in frames:  # each event named by an `event:` line matching its JSON `type`
        name, data = frame.split("\n", 1)
        assert name.removeprefix("event: ") == orjson.loads(data.removeprefix("data: "))["type"]

    events = list(client.responses.create(model="local", input="one two three four", stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text == "echo: one two three four"
    records = module_gateway.usage.wait_for(2)
    usage = events[-1].response.usage
    assert records[-1].usage is not None and not records[-1].usage.estimated
    assert records[-1].usage.completion_tokens == usage.output_tokens
    assert records[-1].usage.prompt_tokens == usage.input_tokens


@conformance(provider={"local": "vllm", "claude": "anthropic"}, endpoint="responses", feature="tools")
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["local", "claude"])
def test_function_call_round_trip(client: openai.OpenAI, vllm: FakeResponsesUpstream, model: str,
                                  stream: bool) -> None:
    kwargs = {"model": model, "tools": [WEATHER], "tool_choice": "required"}
    if stream:
        with client.responses.stream(input="weather in Paris?", **kwargs) as events:
            seen = [e.type for e in events]
            first = events.get_final_response()
        assert "response.function_call_arguments.delta" in seen
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
    if model == "local":
        assert [r.path for r in vllm.requests] == [RESPONSES, RESPONSES]
        assert vllm.last_request.json["input"][1]["type"] == "function_call"  # items forwarded untouched


@conformance(provider={"local": "vllm", "claude": "anthropic"}, endpoint="responses", feature="json_schema")
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["local", "claude"])
def test_parse_and_stream_with_text_format(client: openai.OpenAI, vllm: FakeResponsesUpstream, model: str,
                                           stream: bool) -> None:
    if stream:
        with client.responses.stream(model=model, input="who?", text_format=Person) as events:
            parsed = events.get_final_response().output_parsed
    else:
        parsed = client.responses.parse(model=model, input="who?", text_format=Person).output_parsed
    assert parsed == Person(name="x", age=1)
    if model == "local":
        assert vllm.last_request.json["text"]["format"]["name"] == "Person"


@conformance(provider="vllm", endpoint="responses", feature="cached_usage")
@pytest.mark.parametrize("stream", [False, True])
def test_cached_tokens_settle_like_chat(client: openai.OpenAI, module_gateway: RunningGateway,
                                        vllm: FakeResponsesUpstream, stream: bool) -> None:
    vllm.cached_tokens = 1024
    if stream:
        with client.responses.stream(model="local", input="a b") as events:
            usage = events.get_final_response().usage
    else:
        usage = client.responses.create(model="local", input="a b").usage
    assert usage.input_tokens_details.cached_tokens == 1024
    record = module_gateway.usage.wait_for(1)[0]
    assert record.usage is not None
    assert record.usage.cached_tokens == 1024 and record.usage.prompt_tokens == usage.input_tokens


def test_models_that_may_fall_back_to_chat_only_providers_are_translated(
        client: openai.OpenAI, vllm: FakeResponsesUpstream) -> None:
    for model in ("local-or-claude", "generic"):
        reply = client.responses.create(model=model, input="hi")
        assert reply.output_text == "echo: hi"
        assert vllm.last_request is not None and vllm.last_request.path == "/v1/chat/completions"


def test_incomplete_and_errors_pass_through(client: openai.OpenAI, vllm: FakeResponsesUpstream) -> None:
    reply = client.responses.create(model="local", input="a b c d e", max_output_tokens=2)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    with pytest.raises(openai.NotFoundError) as caught:  # an id the gateway never stored, answered without a call
        client.responses.create(model="local", input="more", previous_response_id="resp_123")
    assert caught.value.body["param"] == "previous_response_id" and vllm.last_request.json["input"] == "a b c d e"
    vllm.script(Behaviour.rate_limited(retry_after=2))
    with pytest.raises(openai.RateLimitError):
        client.responses.create(model="local", input="x")


def test_failure_mid_stream_is_the_error_event(client: openai.OpenAI, vllm: FakeResponsesUpstream,
                                               module_gateway: RunningGateway) -> None:
    vllm.script(Behaviour.error_mid_stream(after_chunks=5))
    events = list(client.responses.create(model="local", input="a b c d e", stream=True))
    assert events[-1].type == "error" and "mid-stream" in events[-1].message
    assert events[-1].sequence_number == len(events) - 1
    assert "response.completed" not in [e.type for e in events]
    vllm.script(Behaviour.die_mid_stream(after_chunks=5))
    events = list(client.responses.create(model="local", input="a b c d e", stream=True))
    assert events[-1].type == "error" and "response.completed" not in [e.type for e in events]
    records = module_gateway.usage.wait_for(2)
    assert all(r.outcome == "upstream_error" for r in records)
    # No usage reported: the gateway's estimate from the events relayed stands in for it.
    assert all(r.usage is not None and r.usage.estimated and r.usage.prompt_tokens > 0 for r in records)
