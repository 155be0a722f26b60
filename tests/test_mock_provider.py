"""The built-in mock provider behind the demo policy: what `make run` serves with no keys and no network."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pydantic import BaseModel

from gateway.tokens.counter import TokenCounter
from tests.conftest import RunningGateway
from tests.demo_policy import demo_text


@pytest.fixture
def demo(start_gateway: Callable[[str], RunningGateway]) -> RunningGateway:
    return start_gateway(demo_text())


def test_demo_answers_deterministically_with_real_token_counts(demo: RunningGateway) -> None:
    client = demo.client("sk-switchboard-demo")
    messages = [{"role": "user", "content": "Tell me about gateways"}]
    first = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    second = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert first.choices[0].message.content == second.choices[0].message.content
    counter = TokenCounter()
    counter.preload()
    assert first.usage.prompt_tokens == counter.count_chat_prompt({"messages": messages}, "gpt-4o-mini")
    assert first.usage.completion_tokens == counter.count_text(first.choices[0].message.content, "gpt-4o-mini")


def test_demo_streams_the_same_text_with_usage(demo: RunningGateway) -> None:
    client = demo.client("sk-switchboard-demo")
    messages = [{"role": "user", "content": "stream please"}]
    whole = client.chat.completions.create(model="gpt-4o", messages=messages)
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_demo_honours_max_tokens_with_a_length_finish(demo: RunningGateway) -> None:
    reply = demo.client("sk-switchboard-demo").chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "long answer"}], max_tokens=5)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens <= 5


class Ticket(BaseModel):
    title: str
    priority: int
    tags: list[str]


def test_demo_structured_output_and_tools(demo: RunningGateway) -> None:
    client = demo.client("sk-switchboard-demo")
    parsed = client.chat.completions.parse(model="gpt-4o-mini", response_format=Ticket,
                                           messages=[{"role": "user", "content": "file a ticket"}])
    assert isinstance(parsed.choices[0].message.parsed, Ticket)
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
    reply = client.chat.completions.create(model="gpt-4o-mini", tools=[tool],
                                           messages=[{"role": "user", "content": "find docs"}])
    assert reply.choices[0].finish_reason == "tool_calls"
    assert reply.choices[0].message.tool_calls[0].function.name == "lookup"


def test_demo_embeddings_are_unit_vectors(demo: RunningGateway) -> None:
    result = demo.client("sk-switchboard-demo").embeddings.create(model="text-embedding-3-small",
                                                                  input=["a", "b"], dimensions=64)
    vector = result.data[0].embedding
    assert len(vector) == 64 and abs(sum(v * v for v in vector) - 1) < 1e-4
    assert result.data[0].embedding != result.data[1].embedding
