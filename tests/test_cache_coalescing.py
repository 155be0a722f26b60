"""Single-flight: identical requests in flight at once make one upstream call between them."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from gateway.cache import ResponseCache
from tests.conftest import RunningGateway
from tests.fakes import Behaviour, FakeOpenAIUpstream
from tests.test_cache_gateway import ASK, cache_policy

Start = Callable[..., RunningGateway]
EXPECTED = "echo: what is the capital of France"


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a condition another thread makes true."""
    waiting = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        waiting.wait(0.01)
    raise AssertionError("condition not reached")


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_hundred_identical_requests_make_one_upstream_call(upstream: FakeOpenAIUpstream, start_gateway: Start,
                                                           backend: str) -> None:
    cache = ResponseCache()
    lines = "backend: memory" if backend == "memory" else (
        'backend: redis\n      url: "redis://127.0.0.1:6379/0"\n      key_prefix: "sbtest:coalesce:"\n'
        "      ttl_s: 5")
    gateway = start_gateway(cache_policy(upstream.base_url, f"mode: exact\n      {lines}"), cache=cache)
    upstream.script(Behaviour.hanging())  # the leader's call waits until every follower has arrived
    # A unique question per run, so a Redis entry from another run cannot answer it.
    question = [{"role": "user", "content": f"what is the capital of France {uuid.uuid4().hex}"}]

    async def burst() -> list[Any]:
        http = httpx.AsyncClient(limits=httpx.Limits(max_connections=200), timeout=20)
        client = openai.AsyncOpenAI(base_url=gateway.v1, api_key="sk-alpha", max_retries=0, http_client=http)

        async def one(index: int) -> Any:
            if index % 2:
                stream = await client.chat.completions.create(model="chat-model", messages=question, stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            reply = await client.chat.completions.create(model="chat-model", messages=question)
            return reply.choices[0].message.content

        tasks = [asyncio.create_task(one(i)) for i in range(100)]
        await asyncio.to_thread(upstream.wait_for_requests, 1)
        await asyncio.to_thread(_until, lambda: cache.followers() == 99)
        upstream.release()
        answers = await asyncio.gather(*tasks)
        await http.aclose()
        return answers

    answers = asyncio.run(burst())
    assert answers == [f"echo: {question[0]['content']}"] * 100
    assert upstream.request_count == 1
    records = gateway.usage.wait_for(100)
    assert sorted(r.cache for r in records).count("hit") == 99


def test_streamed_followers_get_the_stream_as_it_arrives(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    cache = ResponseCache()
    gateway = start_gateway(cache_policy(upstream.base_url, "mode: exact"), cache=cache)
    upstream.script(Behaviour.slow_stream(chunks=10, chunk_delay_ms=100))
    leader = gateway.client().chat.completions.create(model="chat-model", messages=ASK, stream=True)
    chunks = iter(leader)
    first = next(chunks)  # the leader's stream is under way (and has about a second to go)
    follower_text: list[str] = []

    def follow() -> None:
        stream = gateway.client().chat.completions.create(model="chat-model", messages=ASK, stream=True)
        follower_text.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))

    thread = threading.Thread(target=follow)
    thread.start()
    _until(lambda: cache.followers() == 1)
    leader_text = "".join(c.choices[0].delta.content or "" for c in [first, *chunks] if c.choices)
    thread.join(timeout=10)
    assert follower_text == [leader_text] == [EXPECTED]
    assert upstream.request_count == 1


def test_followers_call_the_upstream_themselves_when_the_leader_fails(upstream: FakeOpenAIUpstream,
                                                                      start_gateway: Start) -> None:
    cache = ResponseCache()
    gateway = start_gateway(cache_policy(upstream.base_url, "mode: exact"), cache=cache)
    upstream.script(Behaviour(hang=True, status=500))
    outcomes: list[Any] = []

    def call() -> None:
        try:
            outcomes.append(gateway.client().chat.completions.create(model="chat-model", messages=ASK))
        except openai.APIError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    upstream.wait_for_requests(1)
    _until(lambda: cache.followers() == 2)
    upstream.release()
    for thread in threads:
        thread.join(timeout=10)
    failures = [o for o in outcomes if isinstance(o, openai.APIError)]
    answers = [o.choices[0].message.content for o in outcomes if not isinstance(o, openai.APIError)]
    assert len(failures) == 1  # the leader's own error is not passed on to its followers
    assert answers == [EXPECTED, EXPECTED]
    assert upstream.request_count == 2  # one of them led a new flight, the other followed it


def test_a_stream_that_breaks_midway_ends_its_followers_with_an_error_and_is_not_stored(
        upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    cache = ResponseCache()
    gateway = start_gateway(cache_policy(upstream.base_url, "mode: exact"), cache=cache)
    upstream.script(Behaviour(stream_chunks=10, chunk_delay_ms=100, drop_after_chunks=6))
    leader = iter(gateway.client().chat.completions.create(model="chat-model", messages=ASK, stream=True))
    next(leader)
    errors: list[Exception] = []

    def follow() -> None:
        try:
            list(gateway.client().chat.completions.create(model="chat-model", messages=ASK, stream=True))
        except openai.APIError as exc:
            errors.append(exc)

    thread = threading.Thread(target=follow)
    thread.start()
    _until(lambda: cache.followers() == 1)
    with pytest.raises(openai.APIError):
        list(leader)
    thread.join(timeout=10)
    assert len(errors) == 1 and "ended before completing" in str(errors[0])
    raw = gateway.client().chat.completions.with_raw_response.create(model="chat-model", messages=ASK)
    assert raw.headers["x-switchboard-cache"] == "miss"
    assert upstream.request_count == 2


def test_a_client_leaving_mid_stream_stores_nothing(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    gateway = start_gateway(cache_policy(upstream.base_url, "mode: exact"), cache=ResponseCache())
    upstream.script(Behaviour(stream_chunks=20, chunk_delay_ms=50))
    stream = gateway.client().chat.completions.create(model="chat-model", messages=ASK, stream=True)
    next(iter(stream))
    stream.close()
    assert upstream.wait_for_disconnect()
    raw = gateway.client().chat.completions.with_raw_response.create(model="chat-model", messages=ASK)
    assert raw.headers["x-switchboard-cache"] == "miss"
