"""The conformance matrix's common cells: every provider through every front door, streamed and not.

One gateway in front of a fake of each wire format (and the in-process mock).
Each test is one cell: what an `openai`-SDK (or `anthropic`-SDK, for /v1/messages)
application checks — the text, a tool-call round trip, structured output parsed by
the SDK, an image that reaches the upstream in its own format, and cached prompt
tokens in the usage the client and the usage record see. Provider-specific detail
(exact translations, errors, fixtures) stays in tests/test_provider_<kind>.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import openai
import orjson
import pytest
from pydantic import BaseModel

from tests import conformance_report
from tests.conftest import RunningGateway, serving
from tests.fakes.anthropic_upstream import FakeAnthropicUpstream
from tests.fakes.azure_upstream import FakeAzureUpstream
from tests.fakes.gemini_upstream import FakeGeminiUpstream
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.fakes.responses_upstream import FakeResponsesUpstream

PROVIDERS = ["openai-compatible", "vllm", "anthropic", "gemini", "azure_openai", "mock"]
FEATURES = ["text", "tools", "json_schema", "images", "cached_usage"]
CACHED = 640
# A 1x1 PNG; its base64 must reach every upstream in that upstream's own image format.
PNG_B64 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
PNG_URL = "data:image/png;base64," + PNG_B64
CHAT_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"], "additionalProperties": False}}}
FLAT_TOOL = {"type": "function", "name": "get_weather", "strict": True, **{
    k: v for k, v in CHAT_TOOL["function"].items() if k != "name"}}
ANTHROPIC_TOOL = {"name": "get_weather", "input_schema": CHAT_TOOL["function"]["parameters"]}

matrix = pytest.mark.parametrize("stream", [False, True])
# The in-process mock has no prompt cache, so cached-token usage is n.a. for it
# (the matrix renders that cell from capabilities); it is not generated at all.
applicable = pytest.mark.parametrize(
    ("provider", "feature"),
    [(p, f) for p in PROVIDERS for f in FEATURES if not (p == "mock" and f == "cached_usage")],
)


class Person(BaseModel):
    name: str
    age: int | None


class _AzureWithCache(FakeAzureUpstream, FakeResponsesUpstream):
    """The Azure fake, with FakeResponsesUpstream's `cached_tokens` on its chat replies."""


@dataclass
class Fakes:
    upstreams: dict[str, FakeOpenAIUpstream]

    def reset(self) -> None:
        for fake in self.upstreams.values():
            fake.reset()

    def cache(self, provider: str, tokens: int) -> None:
        fake = self.upstreams[provider]
        if isinstance(fake, FakeResponsesUpstream):
            fake.cached_tokens = tokens
        else:  # the Anthropic and Gemini fakes
            fake.cache_read_tokens = tokens  # type: ignore[attr-defined]

    def received_image(self, provider: str) -> bool:
        sent = self.upstreams[provider].last_request
        return sent is not None and PNG_B64.encode() in sent.body


@pytest.fixture(scope="module")
def fakes() -> Iterator[Fakes]:
    made = {"openai-compatible": FakeResponsesUpstream(), "vllm": FakeResponsesUpstream(sorted_keys=True),
            "anthropic": FakeAnthropicUpstream(), "gemini": FakeGeminiUpstream(), "azure_openai": _AzureWithCache()}
    for fake in made.values():
        fake.start()
    yield Fakes(made)  # type: ignore[arg-type]
    for fake in made.values():
        fake.stop()


@pytest.fixture(scope="module")
def module_gateway(fakes: Fakes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    up = fakes.upstreams
    path = tmp_path_factory.mktemp("conformance") / "policy.yaml"
    with serving(path, f"""
version: 1
providers:
  openai-compatible: {{kind: openai_compatible, base_url: {up['openai-compatible'].base_url}}}
  vllm: {{kind: vllm, base_url: {up['vllm'].base_url}}}
  anthropic: {{kind: anthropic, base_url: {up['anthropic'].base_url}, api_key: sk-ant}}
  gemini: {{kind: gemini, base_url: {up['gemini'].url}/v1beta, api_key: gm}}
  azure_openai: {{kind: azure_openai, base_url: {up['azure_openai'].url}, api_key: az}}
  mock: {{kind: mock, options: {{first_token_ms: 0, token_interval_ms: 0}}}}
models:
  openai-compatible: {{targets: [{{provider: openai-compatible, model: llama-3.1-8b}}]}}
  vllm: {{targets: [{{provider: vllm, model: qwen3-8b}}]}}
  anthropic: {{targets: [{{provider: anthropic, model: claude-sonnet-4-6}}]}}
  gemini: {{targets: [{{provider: gemini, model: gemini-2.5-flash}}]}}
  azure_openai: {{targets: [{{provider: azure_openai, model: my-gpt4o}}]}}
  mock: {{targets: [{{provider: mock, model: mock-gpt-4o}}]}}
  embed-openai-compatible: {{targets: [{{provider: openai-compatible, model: e5}}]}}
  embed-vllm: {{targets: [{{provider: vllm, model: e5}}]}}
  embed-azure_openai: {{targets: [{{provider: azure_openai, model: my-embedding}}]}}
  embed-mock: {{targets: [{{provider: mock, model: mock-embedding}}]}}
""") as gateway:
        yield gateway


@pytest.fixture
def gateway(module_gateway: RunningGateway, fakes: Fakes) -> RunningGateway:
    fakes.reset()
    module_gateway.usage.clear()
    return module_gateway


def _settled_cached(gateway: RunningGateway) -> int:
    record = gateway.usage.wait_for(1)[-1]
    assert record.usage is not None and not record.usage.estimated
    return record.usage.cached_tokens


def _image_arrived(fakes: Fakes, gateway: RunningGateway, provider: str) -> bool:
    if provider == "mock":  # no wire to inspect: the image was counted into the prompt instead
        record = gateway.usage.wait_for(1)[-1]
        return record.usage is not None and record.usage.prompt_tokens > 85
    return fakes.received_image(provider)


# --- /v1/chat/completions -------------------------------------------------------------------------


def _chat(client: openai.OpenAI, stream: bool, **kwargs: Any) -> dict[str, Any]:
    """The assistant message and usage, the same shape whether streamed or not."""
    if not stream:
        reply = client.chat.completions.create(**kwargs)
        message = reply.choices[0].message
        calls = [c.model_dump() for c in message.tool_calls or ()]
        return {"content": message.content, "tool_calls": calls, "usage": reply.usage,
                "finish": reply.choices[0].finish_reason}
    content, calls, usage, finish = "", {}, None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            finish = choice.finish_reason or finish
            for call in delta.tool_calls or ():
                entry = calls.setdefault(call.index, {"id": None, "type": "function",
                                                      "function": {"name": "", "arguments": ""}})
                entry["id"] = call.id or entry["id"]
                if call.function is not None:
                    entry["function"]["name"] += call.function.name or ""
                    entry["function"]["arguments"] += call.function.arguments or ""
    return {"content": content or None, "tool_calls": [calls[i] for i in sorted(calls)], "usage": usage,
            "finish": finish}


@pytest.mark.conformance(provider="$provider", endpoint="chat", feature="$feature")
@matrix
@applicable
def test_chat(gateway: RunningGateway, fakes: Fakes, provider: str, feature: str, stream: bool) -> None:
    client = gateway.client()
    ask = [{"role": "user", "content": "hello there"}]
    if feature == "text":
        reply = _chat(client, stream, model=provider, messages=ask)
        assert reply["content"] and reply["finish"] == "stop"
        if provider != "mock":
            assert reply["content"] == "echo: hello there"
    elif feature == "tools":
        ask = [{"role": "user", "content": "weather in Paris?"}]
        first = _chat(client, stream, model=provider, messages=ask, tools=[CHAT_TOOL], tool_choice="required")
        assert first["finish"] == "tool_calls" and len(first["tool_calls"]) == 1
        call = first["tool_calls"][0]
        assert call["function"]["name"] == "get_weather" and set(orjson.loads(call["function"]["arguments"])) == {
            "city"}
        ask += [{"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "12 degrees"}]
        second = _chat(client, stream, model=provider, messages=ask, tools=[CHAT_TOOL], tool_choice="none")
        assert second["content"] and not second["tool_calls"]
    elif feature == "json_schema":
        if stream:
            with client.chat.completions.stream(model=provider, messages=ask, response_format=Person) as events:
                parsed = events.get_final_completion().choices[0].message.parsed
        else:
            parsed = client.chat.completions.parse(model=provider, messages=ask,
                                                   response_format=Person).choices[0].message.parsed
        assert isinstance(parsed, Person)
    elif feature == "images":
        content = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": PNG_URL}}]
        reply = _chat(client, stream, model=provider, messages=[{"role": "user", "content": content}])
        assert reply["content"] and _image_arrived(fakes, gateway, provider)
    else:
        fakes.cache(provider, CACHED)
        reply = _chat(client, stream, model=provider, messages=ask)
        usage = reply["usage"]
        assert usage.prompt_tokens_details.cached_tokens == CACHED and usage.prompt_tokens >= CACHED
        assert _settled_cached(gateway) == CACHED


# --- /v1/responses --------------------------------------------------------------------------------


def _respond(client: openai.OpenAI, stream: bool, **kwargs: Any) -> Any:
    if not stream:
        return client.responses.create(**kwargs)
    with client.responses.stream(**kwargs) as events:
        return events.get_final_response()


@pytest.mark.conformance(provider="$provider", endpoint="responses", feature="$feature")
@matrix
@applicable
def test_responses(gateway: RunningGateway, fakes: Fakes, provider: str, feature: str, stream: bool) -> None:
    client = gateway.client()
    if feature == "text":
        reply = _respond(client, stream, model=provider, input="hello there")
        assert reply.status == "completed" and reply.output_text
        if provider != "mock":
            assert reply.output_text == "echo: hello there"
    elif feature == "tools":
        first = _respond(client, stream, model=provider, input="weather in Paris?", tools=[FLAT_TOOL],
                         tool_choice="required")
        call = next(item for item in first.output if item.type == "function_call")
        assert call.name == "get_weather" and set(orjson.loads(call.arguments)) == {"city"}
        second = _respond(client, stream, model=provider, tools=[FLAT_TOOL], tool_choice="none", input=[
            {"role": "user", "content": "weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "12 degrees"}])
        assert second.output_text
    elif feature == "json_schema":
        if stream:
            with client.responses.stream(model=provider, input="who?", text_format=Person) as events:
                parsed = events.get_final_response().output_parsed
        else:
            parsed = client.responses.parse(model=provider, input="who?", text_format=Person).output_parsed
        assert isinstance(parsed, Person)
    elif feature == "images":
        reply = _respond(client, stream, model=provider, input=[{"role": "user", "content": [
            {"type": "input_text", "text": "what is this?"}, {"type": "input_image", "image_url": PNG_URL}]}])
        assert reply.output_text and _image_arrived(fakes, gateway, provider)
    else:
        fakes.cache(provider, CACHED)
        reply = _respond(client, stream, model=provider, input="hello there")
        assert reply.usage.input_tokens_details.cached_tokens == CACHED and reply.usage.input_tokens >= CACHED
        assert _settled_cached(gateway) == CACHED


# --- /v1/messages (the anthropic SDK) -------------------------------------------------------------


def _message(client: anthropic.Anthropic, stream: bool, **kwargs: Any) -> Any:
    if not stream:
        return client.messages.create(max_tokens=200, **kwargs)
    with client.messages.stream(max_tokens=200, **kwargs) as events:
        return events.get_final_message()


def _text(message: Any) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


@pytest.mark.conformance(provider="$provider", endpoint="messages", feature="$feature")
@matrix
@applicable
def test_messages(gateway: RunningGateway, fakes: Fakes, provider: str, feature: str, stream: bool) -> None:
    client = anthropic.Anthropic(base_url=gateway.base_url, api_key="sk-alpha", max_retries=0)
    ask: list[dict[str, Any]] = [{"role": "user", "content": "hello there"}]
    if feature == "text":
        reply = _message(client, stream, model=provider, messages=ask)
        assert reply.stop_reason == "end_turn" and _text(reply)
        if provider != "mock":
            assert _text(reply) == "echo: hello there"
    elif feature == "tools":
        ask = [{"role": "user", "content": "weather in Paris?"}]
        first = _message(client, stream, model=provider, messages=ask, tools=[ANTHROPIC_TOOL],
                         tool_choice={"type": "any"})
        use = next(block for block in first.content if block.type == "tool_use")
        assert first.stop_reason == "tool_use" and use.name == "get_weather" and set(use.input) == {"city"}
        ask += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "12"}]}]
        second = _message(client, stream, model=provider, messages=ask, tools=[ANTHROPIC_TOOL],
                          tool_choice={"type": "none"})
        assert second.stop_reason == "end_turn" and _text(second)
    elif feature == "json_schema":
        schema = Person.model_json_schema() | {"additionalProperties": False}
        reply = _message(client, stream, model=provider, messages=ask,
                         extra_body={"output_config": {"format": {"type": "json_schema", "schema": schema}}})
        Person.model_validate_json(_text(reply))
    elif feature == "images":
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}}
        reply = _message(client, stream, model=provider, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"}, image]}])
        assert _text(reply) and _image_arrived(fakes, gateway, provider)
    else:
        fakes.cache(provider, CACHED)
        reply = _message(client, stream, model=provider, messages=ask)
        assert reply.usage.cache_read_input_tokens == CACHED
        assert _settled_cached(gateway) == CACHED


# --- /v1/embeddings -------------------------------------------------------------------------------


@pytest.mark.conformance(provider="$provider", endpoint="embeddings", feature="text", stream=False)
@pytest.mark.parametrize("provider", ["openai-compatible", "vllm", "azure_openai", "mock"])
def test_embeddings(gateway: RunningGateway, provider: str) -> None:
    reply = gateway.client().embeddings.create(model="embed-" + provider, input=["one", "two"])
    assert [d.index for d in reply.data] == [0, 1] and len(reply.data[0].embedding) > 0
    assert reply.usage.prompt_tokens > 0


def test_every_matrix_provider_is_served(gateway: RunningGateway) -> None:
    listed: Callable[[], list[str]] = lambda: [m.id for m in gateway.client().models.list()]  # noqa: E731
    assert set(PROVIDERS) <= set(listed())


def test_matrix_never_reports_an_untested_cell_as_passing() -> None:
    assert conformance_report.verdict([]) == "not tested"
    assert conformance_report.verdict(["skipped"]) == "skipped"
    assert conformance_report.verdict(["passed", "failed"]) == "**FAIL**"
    assert conformance_report.verdict(["passed", "skipped"]) == "pass"
    page = conformance_report.render({("vllm", "chat", "text", False): ["passed"],
                                      ("anthropic", "chat", "tools", True): ["failed"]}, command="pytest")
    assert "| chat | text | pass (1) | not tested |" in page.split("### vllm")[1]
    assert "| chat | tools | not tested | **FAIL** (1) |" in page.split("### anthropic")[1]
    # Anthropic has no embeddings endpoint: its row is n.a., so it is left out.
    assert "| embeddings |" not in page.split("### anthropic")[1].split("###")[0]
    assert "Totals: 1 pass, 1 fail," in page
