"""Response caching through the running gateway: scopes, TTL, header modes, replays, what is never stored.

Every test runs against both backends: the in-process LRU and the shared
Redis at 127.0.0.1:6379 (a unique key prefix per test, deleted afterwards).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import redis

from gateway.cache import ResponseCache
from tests.conftest import RunningGateway, key_hash
from tests.fakes import Behaviour, FakeOpenAIUpstream

REDIS_URL = "redis://127.0.0.1:6379/0"
ASK = [{"role": "user", "content": "what is the capital of France"}]


class Clock:
    """Wall-clock seconds the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """The `cache:` lines that pick the backend; Redis keys get a prefix of their own."""
    if request.param == "memory":
        yield "backend: memory"
        return
    prefix = f"sbtest:cache:{uuid.uuid4().hex}:"
    yield f'backend: redis\n      url: "{REDIS_URL}"\n      key_prefix: "{prefix}"'
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


def cache_policy(base_url: str, cache: str, *, team_cache: str = "", extra_keys: str = "") -> str:
    """Two teams that may both use `chat-model`, whose `cache:` block is `cache` (indented YAML lines)."""
    return f"""
version: 1
providers:
  upstream:
    kind: openai_compatible
    base_url: {base_url}
    timeouts: {{connect_s: 2, first_byte_s: 5, total_s: 10}}
prices:
  targets:
    upstream:
      "*": {{input: 1.0, output: 2.0}}
models:
  chat-model:
    targets:
      - provider: upstream
        model: upstream-chat
    cache:
      {cache}
  embed-model:
    targets:
      - provider: upstream
        model: upstream-embed
teams:
  alpha:
    keys:
      - id: alpha-key
        hash: "{key_hash('sk-alpha')}"
{extra_keys}
    models: [chat-model, embed-model]
{team_cache}
  beta:
    keys:
      - id: beta-key
        hash: "{key_hash('sk-beta')}"
    models: [chat-model]
"""


Start = Callable[..., RunningGateway]


def _gateway(upstream: FakeOpenAIUpstream, start_gateway: Start, cache: str, clock: Clock | None = None,
             **policy: str) -> RunningGateway:
    return start_gateway(cache_policy(upstream.base_url, cache, **policy),
                         cache=ResponseCache(clock=clock or Clock()))


def ask(gateway: RunningGateway, key: str = "sk-alpha", headers: dict[str, str] | None = None,
        **body: Any) -> tuple[Any, httpx.Headers]:
    """One non-streamed chat completion: (parsed reply, response headers)."""
    body.setdefault("messages", ASK)
    raw = gateway.client(key).chat.completions.with_raw_response.create(model="chat-model",
                                                                         extra_headers=headers, **body)
    return raw.parse(), raw.headers


def ask_stream(gateway: RunningGateway, key: str = "sk-alpha", usage: bool = False,
               **body: Any) -> tuple[list[Any], httpx.Headers]:
    body.setdefault("messages", ASK)
    options = {"stream_options": {"include_usage": True}} if usage else {}
    raw = gateway.client(key).chat.completions.with_raw_response.create(model="chat-model", stream=True,
                                                                         **options, **body)
    return list(raw.parse()), raw.headers


def streamed_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_two_teams_asking_the_same_never_share_an_answer(upstream: FakeOpenAIUpstream, start_gateway: Start,
                                                          backend: str) -> None:
    gateway = _gateway(upstream, start_gateway, f"mode: exact\n      {backend}")
    first, headers = ask(gateway, "sk-alpha")
    assert headers["x-switchboard-cache"] == "miss"
    again, headers = ask(gateway, "sk-alpha")
    assert headers["x-switchboard-cache"] == "hit"
    assert again.choices[0].message.content == first.choices[0].message.content
    assert upstream.request_count == 1

    _, headers = ask(gateway, "sk-beta")
    assert headers["x-switchboard-cache"] == "miss"
    assert upstream.request_count == 2
    _, headers = ask(gateway, "sk-beta")
    assert headers["x-switchboard-cache"] == "hit"
    assert upstream.request_count == 2


def test_key_scope_keeps_answers_to_one_key(upstream: FakeOpenAIUpstream, start_gateway: Start,
                                            backend: str) -> None:
    second_key = f'      - id: alpha-two\n        hash: "{key_hash("sk-alpha-2")}"'
    gateway = _gateway(upstream, start_gateway, f"mode: exact\n      scope: key\n      {backend}",
                       extra_keys=second_key)
    ask(gateway, "sk-alpha")
    _, headers = ask(gateway, "sk-alpha-2")
    assert headers["x-switchboard-cache"] == "miss"
    _, headers = ask(gateway, "sk-alpha-2")
    assert headers["x-switchboard-cache"] == "hit"
    assert upstream.request_count == 2


def test_global_scope_shares_between_teams(upstream: FakeOpenAIUpstream, start_gateway: Start,
                                           backend: str) -> None:
    gateway = _gateway(upstream, start_gateway, f"mode: exact\n      scope: global\n      {backend}")
    ask(gateway, "sk-alpha")
    _, headers = ask(gateway, "sk-beta")
    assert headers["x-switchboard-cache"] == "hit"
    assert upstream.request_count == 1


def test_entries_expire_after_their_ttl(upstream: FakeOpenAIUpstream, start_gateway: Start, backend: str) -> None:
    clock = Clock()
    gateway = _gateway(upstream, start_gateway, f"mode: exact\n      ttl_s: 60\n      {backend}", clock)
    ask(gateway)
    clock.now += 59
    _, headers = ask(gateway)
    assert headers["x-switchboard-cache"] == "hit"
    assert headers["age"] == "59"
    clock.now += 2
    _, headers = ask(gateway)
    assert headers["x-switchboard-cache"] == "miss"
    assert upstream.request_count == 2
    _, headers = ask(gateway)  # the fresh answer was stored again
    assert headers["x-switchboard-cache"] == "hit"
    assert headers["age"] == "0"


def test_request_headers_choose_what_the_cache_may_do(upstream: FakeOpenAIUpstream, start_gateway: Start,
                                                      backend: str) -> None:
    gateway = _gateway(upstream, start_gateway, f"mode: exact\n      {backend}")
    # no-store: neither read nor written.
    _, headers = ask(gateway, headers={"x-switchboard-cache": "no-store"})
    assert headers["x-switchboard-cache"] == "bypass"
    _, headers = ask(gateway)
    assert headers["x-switchboard-cache"] == "miss"
    assert upstream.request_count == 2
    # bypass: not read (the upstream answers), written only where nothing fresh is stored.
    upstream.script(Behaviour(content="a second opinion"))
    reply, headers = ask(gateway, headers={"x-switchboard-cache": "bypass"})
    assert headers["x-switchboard-cache"] == "bypass"
    assert reply.choices[0].message.content == "a second opinion"
    assert upstream.request_count == 3
    cached, headers = ask(gateway)
    assert headers["x-switchboard-cache"] == "hit"
    assert cached.choices[0].message.content == "echo: what is the capital of France"
    # refresh: not read, and overwrites.
    upstream.script(Behaviour(content="the refreshed answer"))
    _, headers = ask(gateway, headers={"x-switchboard-cache": "refresh"})
    assert headers["x-switchboard-cache"] == "bypass"
    cached, headers = ask(gateway)
    assert headers["x-switchboard-cache"] == "hit"
    assert cached.choices[0].message.content == "the refreshed answer"
    # bypass writes a request nobody stored yet.
    _, headers = ask(gateway, headers={"x-switchboard-cache": "bypass"}, temperature=0.5)
    _, headers = ask(gateway, temperature=0.5)
    assert headers["x-switchboard-cache"] == "hit"
    assert upstream.request_count == 5
    with pytest.raises(openai.BadRequestError, match="x-switchboard-cache"):
        ask(gateway, headers={"x-switchboard-cache": "sometimes"})


def test_stream_hit_replays_a_stream_recorded_from_a_stream(upstream: FakeOpenAIUpstream, start_gateway: Start,
                                                            backend: str) -> None:
    gateway = _gateway(upstream, start_gateway, f"mode: exact\n      {backend}")
    first, headers = ask_stream(gateway, usage=True)
    assert headers["x-switchboard-cache"] == "miss"
    replay, headers = ask_stream(gateway, usage=True)
    assert headers["x-switchboard-cache"] == "hit"
    assert upstream.request_count == 1
    assert streamed_text(replay) == streamed_text(first) == "echo: what is the capital of France"
    assert replay[-1].usage.total_tokens == first[-1].usage.total_tokens
    assert replay[-1].usage.completion_tokens == 7
    without_usage, _ = ask_stream(gateway)
    assert all(chunk.usage is None for chunk in without_usage)
    assert streamed_text(without_usage) == streamed_text(first)


def test_whole_response_answered_from_a_recorded_stream(upstream: FakeOpenAIUpstream, start_gateway: Start,
                                                        backend: str) -> None:
    gateway = _gateway(upstream, start_gateway, f"mode: exact\n      {backend}")
    streamed, _ = ask_stream(gateway, usage=True)
    whole, headers = ask(gateway)
    assert headers["x-switchboard-cache"] == "hit"
    assert upstream.request_count == 1
    assert whole.choices[0].message.content == streamed_text(streamed)
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage.total_tokens == streamed[-1].usage.total_tokens
    assert whole.id == streamed[0].id


def test_stream_answered_from_a_recorded_whole_response(upstream: FakeOpenAIUpstream, start_gateway: Start,
                                                        backend: str) -> None:
    gateway = _gateway(upstream, start_gateway, f"mode: exact\n      {backend}")
    whole, _ = ask(gateway)
    streamed, headers = ask_stream(gateway, usage=True)
    assert headers["x-switchboard-cache"] == "hit"
    assert headers["content-type"].startswith("text/event-stream")
    assert upstream.request_count == 1
    assert streamed_text(streamed) == whole.choices[0].message.content
    assert streamed[-2].choices[0].finish_reason == "stop"
    assert streamed[-1].usage.total_tokens == whole.usage.total_tokens


def test_tool_calls_survive_both_replays(upstream: FakeOpenAIUpstream, start_gateway: Start, backend: str) -> None:
    gateway = _gateway(upstream, start_gateway, f"mode: exact\n      {backend}")
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"echo": {"type": "string"}}, "required": ["echo"]}}}]
    streamed, _ = ask_stream(gateway, tools=tools)
    whole, headers = ask(gateway, tools=tools)
    assert headers["x-switchboard-cache"] == "hit"
    call = whole.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup"
    assert call.function.arguments == '{"echo":"what is the capital of France"}'
    assert whole.choices[0].finish_reason == "tool_calls"
    # Different tools are a different request.
    _, headers = ask(gateway)
    assert headers["x-switchboard-cache"] == "miss"
    assert len(streamed) > 2


def test_failed_truncated_and_unfinished_answers_are_never_stored(upstream: FakeOpenAIUpstream,
                                                                  start_gateway: Start, backend: str) -> None:
    gateway = _gateway(upstream, start_gateway, f"mode: exact\n      {backend}")
    upstream.script(Behaviour.error(500))
    with pytest.raises(openai.InternalServerError):
        ask(gateway)
    upstream.script(Behaviour.die_mid_stream(after_chunks=2))
    with pytest.raises(openai.APIError):
        ask_stream(gateway)
    filtered = {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "upstream-chat",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                             "finish_reason": "content_filter"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}}
    upstream.script(Behaviour(status=200, body=filtered))
    reply, _ = ask(gateway)
    assert reply.choices[0].finish_reason == "content_filter"
    _, headers = ask(gateway)
    assert headers["x-switchboard-cache"] == "miss"
    assert upstream.request_count == 4


def test_only_deterministic_caches_temperature_zero_or_seeded(upstream: FakeOpenAIUpstream, start_gateway: Start,
                                                             backend: str) -> None:
    gateway = _gateway(upstream, start_gateway, f"mode: exact\n      only_deterministic: true\n      {backend}")
    for _ in range(2):
        _, headers = ask(gateway, temperature=0.7)
        assert headers["x-switchboard-cache"] == "bypass"
    assert upstream.request_count == 2
    ask(gateway, temperature=0)
    _, headers = ask(gateway, temperature=0)
    assert headers["x-switchboard-cache"] == "hit"
    ask(gateway, temperature=0.7, seed=7)
    _, headers = ask(gateway, temperature=0.7, seed=7)
    assert headers["x-switchboard-cache"] == "hit"
    assert upstream.request_count == 4


def test_fields_that_do_not_change_the_answer_share_an_entry(upstream: FakeOpenAIUpstream, start_gateway: Start,
                                                             backend: str) -> None:
    gateway = _gateway(upstream, start_gateway, f"mode: exact\n      {backend}")
    ask(gateway, user="someone", temperature=0.2, max_tokens=50)
    _, headers = ask(gateway, user="someone-else", max_tokens=50, temperature=0.2, metadata={"run": "2"})
    assert headers["x-switchboard-cache"] == "hit"
    _, headers = ask(gateway, max_tokens=51, temperature=0.2)
    assert headers["x-switchboard-cache"] == "miss"


def test_a_hit_bills_nothing_and_records_what_it_saved(upstream: FakeOpenAIUpstream, start_gateway: Start,
                                                       backend: str) -> None:
    gateway = _gateway(upstream, start_gateway, f"mode: exact\n      {backend}")
    _, miss_headers = ask(gateway)
    _, hit_headers = ask(gateway)
    miss, hit = gateway.usage.wait_for(2)
    assert miss.cache == "miss" and miss.usage is not None and miss.cost_usd is not None
    assert hit.cache == "hit"
    assert hit.usage is not None and hit.usage.total_tokens == 0
    assert hit.cost_usd is None and hit.provider is None
    assert hit.cache_tokens == miss.usage.total_tokens
    assert hit.cost_saved_usd == pytest.approx(miss.cost_usd)
    assert "x-switchboard-cost-usd" in miss_headers and "x-switchboard-cost-usd" not in hit_headers


def test_models_without_a_cache_behave_as_before(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    gateway = _gateway(upstream, start_gateway, "mode: 'off'")
    for _ in range(2):
        _, headers = ask(gateway)
        assert "x-switchboard-cache" not in headers
    assert upstream.request_count == 2
    assert gateway.usage.wait_for(2)[1].cache is None


def test_completions_and_embeddings_are_cached_too(upstream: FakeOpenAIUpstream, start_gateway: Start,
                                                   backend: str) -> None:
    text = cache_policy(upstream.base_url, f"mode: exact\n      {backend}").replace(
        "    targets:\n      - provider: upstream\n        model: upstream-embed\n",
        f"    targets:\n      - provider: upstream\n        model: upstream-embed\n    cache:\n      mode: exact\n"
        f"      {backend}\n")
    gateway = start_gateway(text, cache=ResponseCache())
    client = gateway.client()
    pieces = "".join(c.choices[0].text for c in client.completions.create(model="chat-model", prompt="say hi",
                                                                          stream=True))
    raw = client.completions.with_raw_response.create(model="chat-model", prompt="say hi")
    assert raw.headers["x-switchboard-cache"] == "hit"
    assert raw.parse().choices[0].text == pieces == "echo: say hi"
    first = client.embeddings.create(model="embed-model", input="a sentence")
    raw = client.embeddings.with_raw_response.create(model="embed-model", input="a sentence")
    assert raw.headers["x-switchboard-cache"] == "hit"
    assert raw.parse().data[0].embedding == first.data[0].embedding
    assert upstream.request_count == 2


def test_an_unreachable_redis_is_a_miss_not_an_error(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gateway = _gateway(upstream, start_gateway, f'mode: exact\n      backend: redis\n      url: "redis://127.0.0.1:{port}/0"'
                       "\n      timeout_s: 0.2")
    for _ in range(2):
        reply, headers = ask(gateway)
        assert headers["x-switchboard-cache"] == "miss"
        assert reply.choices[0].message.content == "echo: what is the capital of France"
    assert upstream.request_count == 2


def test_hits_count_as_requests_but_not_as_tokens_against_limits(upstream: FakeOpenAIUpstream,
                                                                 start_gateway: Start) -> None:
    gateway = _gateway(upstream, start_gateway, "mode: exact", team_cache="    limits: {rpm: 12, tpm: 60}")
    for _ in range(12):  # one miss of ~20 tokens, then hits that would be ~200 tokens if they were billed
        _, headers = ask(gateway, max_tokens=10)
    assert headers["x-switchboard-cache"] == "hit"
    with pytest.raises(openai.RateLimitError):
        ask(gateway, max_tokens=10)
    assert upstream.request_count == 1
