"""The gateway as a drop-in OpenAI base URL: the official SDK against a real running gateway."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
import openai
import pytest
from pydantic import BaseModel

from tests.conftest import RunningGateway, standard_policy
from tests.fakes import Behaviour, FakeOpenAIUpstream

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_chat_is_forwarded_with_the_model_rewritten_and_the_upstream_key(
    gateway: RunningGateway, upstream: FakeOpenAIUpstream
) -> None:
    client = gateway.client()
    raw = client.chat.completions.with_raw_response.create(
        model="chat-model",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello gateway"}],
        temperature=0.2, n=2, stop=["\n\n"], seed=7, max_tokens=50, max_completion_tokens=60,
        extra_headers={"x-request-id": "trace-me-123"},
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: hello gateway"
    assert len(completion.choices) == 2
    assert completion.usage is not None and completion.usage.total_tokens > 0
    assert raw.headers["x-request-id"] == "trace-me-123"
    assert float(raw.headers["x-switchboard-overhead-ms"]) >= 0

    sent = upstream.last_request
    assert sent is not None and sent.path == "/v1/chat/completions"
    assert sent.json["model"] == "upstream-chat"
    assert sent.header("authorization") == "Bearer sk-upstream-secret"
    # Self-hosted kinds get the id as a UUID (llama-cpp-python refuses any other form): derived, documented.
    assert sent.header("x-request-id") == str(uuid.uuid5(uuid.NAMESPACE_URL, "switchboard:trace-me-123"))
    for name, value in {"temperature": 0.2, "n": 2, "stop": ["\n\n"], "seed": 7, "max_tokens": 50,
                        "max_completion_tokens": 60}.items():
        assert sent.json[name] == value, name
    assert sent.json["messages"][0] == {"role": "system", "content": "be brief"}


def test_cookies_an_upstream_sets_are_neither_kept_nor_passed_on(
    upstream: FakeOpenAIUpstream, start_gateway: Callable[[str], RunningGateway]
) -> None:
    """Every team shares a provider's connection pool: a cookie kept from one caller's answer would ride on the next."""
    # By host name: an HTTP client's cookie jar may ignore cookies from bare IP addresses.
    gateway = start_gateway(standard_policy(upstream.base_url.replace("127.0.0.1", "localhost")))
    answer = {"id": "chatcmpl-c", "object": "chat.completion", "created": 1, "model": "upstream-chat",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}
    upstream.script(Behaviour(status=200, body=answer, headers={"set-cookie": "session=first-caller; Path=/"}))
    client = gateway.client()
    raw = client.chat.completions.with_raw_response.create(
        model="chat-model", messages=[{"role": "user", "content": "first"}])
    assert raw.parse().choices[0].message.content == "hi"
    assert "set-cookie" not in raw.headers

    client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "second"}])
    sent = upstream.last_request
    assert sent is not None and sent.json["messages"][0]["content"] == "second"
    assert sent.header("cookie") is None


def test_usage_is_settled_for_every_request(gateway: RunningGateway) -> None:
    gateway.client().chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "a b c"}])
    record = gateway.usage.wait_for(1)[0]
    assert (record.team, record.key_id, record.public_model) == ("alpha", "alpha-key", "chat-model")
    assert (record.provider, record.upstream_model, record.status) == ("upstream", "upstream-chat", 200)
    assert record.usage is not None and not record.usage.estimated
    assert record.usage.completion_tokens == 4  # "echo: a b c", counted by the fake as words


def test_stream_relays_chunks_and_strips_the_usage_chunk_nobody_asked_for(
    gateway: RunningGateway, upstream: FakeOpenAIUpstream
) -> None:
    stream = gateway.client().chat.completions.create(
        model="chat-model", messages=[{"role": "user", "content": "stream this please"}], stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: stream this please"
    assert all(c.choices for c in chunks), "the client did not ask for a usage chunk"
    assert chunks[-1].choices[0].finish_reason == "stop"
    # The gateway asked the upstream for usage anyway, so it can settle the stream.
    assert upstream.last_request is not None
    assert upstream.last_request.json["stream_options"] == {"include_usage": True}
    record = gateway.usage.wait_for(1)[0]
    assert record.stream and record.usage is not None and not record.usage.estimated
    assert record.time_to_first_token_ms is not None


def test_a_finished_stream_leaves_its_upstream_connection_to_the_next_call(
    gateway: RunningGateway, upstream: FakeOpenAIUpstream
) -> None:
    """The body's end often trails `[DONE]`; dropping the connection there cost the next call a connect (over TLS,
    a handshake)."""
    upstream.script(Behaviour(end_delay_ms=100))
    client = gateway.client()
    stream = client.chat.completions.create(
        model="chat-model", messages=[{"role": "user", "content": "first stream"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "echo: first stream"
    # The next call goes out once the upstream has ended the body; until then the connection is not free.
    assert upstream.wait_for_streams_ended(1)
    client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "next"}])

    first, second = upstream.requests
    assert first.peer is not None and second.peer == first.peer, "the second call opened a new connection"
    assert upstream.disconnects == []


def test_a_stream_whose_body_never_ends_after_done_is_answered_and_its_connection_dropped(
    gateway: RunningGateway, upstream: FakeOpenAIUpstream
) -> None:
    upstream.script(Behaviour(end_delay_ms=30_000))
    client = gateway.client()
    stream = client.chat.completions.create(
        model="chat-model", messages=[{"role": "user", "content": "lingering"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "echo: lingering"
    assert upstream.disconnects == [], "the client's stream must not wait for the upstream's end of body"

    assert upstream.wait_for_disconnect(timeout=10), "the gateway kept waiting on a body that never ended"
    client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "next"}])
    first, second = upstream.requests
    assert second.peer != first.peer


def test_stream_with_include_usage_ends_with_the_usage_chunk(gateway: RunningGateway) -> None:
    stream = gateway.client().chat.completions.create(
        model="chat-model", messages=[{"role": "user", "content": "count me"}], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


def test_stream_is_terminated_with_done(gateway: RunningGateway) -> None:
    with httpx.stream("POST", gateway.v1 + "/chat/completions", headers={"authorization": "Bearer sk-alpha"},
                      json={"model": "chat-model", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_tool_calls_non_streamed_and_streamed(gateway: RunningGateway) -> None:
    client = gateway.client()
    messages = [{"role": "user", "content": "weather in Paris?"}]
    completion = client.chat.completions.create(model="chat-model", messages=messages, tools=[WEATHER_TOOL],
                                                tool_choice="auto")
    call = completion.choices[0].message.tool_calls[0]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and call.function.arguments == '{"city":"x"}'

    arguments: dict[int, str] = {}
    names: dict[int, str] = {}
    for chunk in client.chat.completions.create(model="chat-model", messages=messages, tools=[WEATHER_TOOL],
                                                stream=True):
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            arguments[delta.index] = arguments.get(delta.index, "") + (delta.function.arguments or "")
            if delta.function.name:
                names[delta.index] = delta.function.name
    assert names == {0: "get_weather"} and arguments == {0: '{"city":"x"}'}


class Person(BaseModel):
    name: str
    age: int


def test_structured_output_parse(gateway: RunningGateway, upstream: FakeOpenAIUpstream) -> None:
    completion = gateway.client().chat.completions.parse(
        model="chat-model", messages=[{"role": "user", "content": "who?"}], response_format=Person
    )
    assert isinstance(completion.choices[0].message.parsed, Person)
    sent = upstream.last_request
    assert sent is not None and sent.json["response_format"]["type"] == "json_schema"
    assert sent.json["response_format"]["json_schema"]["name"] == "Person"


def test_embeddings_with_the_sdk_default_base64_encoding(gateway: RunningGateway,
                                                         upstream: FakeOpenAIUpstream) -> None:
    result = gateway.client().embeddings.create(model="embed-model", input=["one", "two"])
    assert [d.index for d in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 16 and isinstance(result.data[0].embedding[0], float)
    assert upstream.last_request is not None and upstream.last_request.json["model"] == "upstream-embed"


def test_legacy_completions_stream_and_not(gateway: RunningGateway) -> None:
    client = gateway.client()
    completion = client.completions.create(model="chat-model", prompt="say it", max_tokens=5)
    assert completion.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="chat-model", prompt="say it", max_tokens=5, stream=True) if c.choices)
    assert streamed == completion.choices[0].text


def test_models_lists_only_the_callers_models(gateway: RunningGateway) -> None:
    alpha = sorted(m.id for m in gateway.client("sk-alpha").models.list())
    beta = sorted(m.id for m in gateway.client("sk-beta").models.list())
    assert alpha == ["chat-model", "embed-model"]
    assert beta == ["beta-model"]
    assert gateway.client("sk-alpha").models.retrieve("chat-model").id == "chat-model"
    with pytest.raises(openai.NotFoundError):
        gateway.client("sk-alpha").models.retrieve("beta-model")


def test_api_key_header_is_accepted(gateway: RunningGateway) -> None:
    response = httpx.post(gateway.v1 + "/chat/completions", headers={"api-key": "sk-alpha"},
                          json={"model": "chat-model", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200


def test_health_and_readiness(gateway: RunningGateway) -> None:
    assert httpx.get(gateway.base_url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gateway.base_url + "/readyz")
    assert ready.status_code == 200 and ready.json()["policy"] == gateway.store.current.fingerprint
