"""Every request is settled exactly once, whatever ends it: bad input, a gateway bug, a disconnect, a stream's end.

Each test checks what an operator would: one usage record per request, the
limit counters holding exactly what the records say was used (so a refused or
failed request holds nothing), the in-flight gauge back at 0, and what the
client saw (an OpenAI- or Anthropic-shaped error naming the `param`, a 500
that shows only the request id).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.accounting.limits import Limiter
from gateway.accounting.usage import access_line
from gateway.cache import ResponseCache
from gateway.http.connections import GuardedHttpToolsProtocol
from gateway.state.memory import MemoryStore
from gateway.telemetry.attributes import record_attributes
from gateway.tokens.counter import TokenCounter
from providers.openai_compat import OpenAICompatAdapter
from tests.conftest import ADMIN_KEY, RunningGateway, key_hash, metrics_text, run_gateway
from tests.fakes import Behaviour, FakeOpenAIUpstream

POLICY = """
version: 1
providers:
  upstream:
    kind: openai_compatible
    base_url: {base_url}
    api_key: sk-upstream-secret
    timeouts: {{connect_s: 2, first_byte_s: 5, total_s: 10}}
prices:
  targets:
    upstream:
      "*": {{input: 1.0, output: 2.0}}
telemetry:
  metrics: {{enabled: true}}
models:
  chat-model:
    targets:
      - provider: upstream
        model: upstream-chat
    cache:
      mode: exact
      ttl_s: 600
teams:
  alpha:
    keys:
      - id: alpha-key
        hash: "{alpha}"
    models: [chat-model]
    budget: {{tokens: 1000000, usd: 100, period: daily}}
admin:
  keys: [{{id: ops, hash: "{admin}"}}]
"""


class Harness:
    """A gateway whose limiter counts in a memory store the test can read."""

    def __init__(self, gateway: RunningGateway, store: MemoryStore) -> None:
        self.gateway = gateway
        self.store = store

    def held_tokens(self) -> int:
        """Tokens the budget counts right now: used plus still reserved."""
        with self.store._lock:
            return sum(value for key, (value, _) in self.store._values.items() if ":tok:" in key)

    def in_flight(self) -> float:
        text = metrics_text(self.gateway)
        line = next(line for line in text.splitlines() if line.startswith("switchboard_requests_in_flight "))
        return float(line.split()[1])

    def settled_tokens(self) -> int:
        return sum(r.usage.total_tokens for r in self.gateway.usage.records if r.usage is not None)


@pytest.fixture
def harness(upstream: FakeOpenAIUpstream, tmp_path: Any) -> Iterator[Harness]:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(base_url=upstream.base_url, alpha=key_hash("sk-alpha"), admin=key_hash(ADMIN_KEY)))
    store = MemoryStore()
    counter = TokenCounter()
    gateway = run_gateway(path, limiter=Limiter(store, counter), counter=counter, cache=ResponseCache())
    try:
        yield Harness(gateway, store)
    finally:
        gateway.stop()


def _deep(levels: int) -> Any:
    value: Any = "x"
    for _ in range(levels):
        value = [value]
    return value


AUTH = {"authorization": "Bearer sk-alpha"}
HELLO = [{"role": "user", "content": "hello"}]

BAD_CHAT = [
    pytest.param({"messages": [{"role": "user", "content": "hi", "extra": _deep(300)}]}, "messages", id="deep-json"),
    pytest.param({"messages": HELLO, "temperature": "hot"}, "temperature", id="temperature-hot"),
    pytest.param({"messages": HELLO, "stop": 5}, "stop", id="stop-5"),
    pytest.param({"messages": [{"role": "assistant", "tool_calls": ["x"]}]}, "messages[0].tool_calls[0]",
                 id="tool-calls-x"),
    pytest.param({"messages": []}, "messages", id="no-messages"),
    pytest.param({"messages": [1]}, "messages[0]", id="message-not-object"),
    pytest.param({"messages": HELLO, "tools": [5]}, "tools[0]", id="tools-5"),
    pytest.param({"messages": [{"role": "user", "content": [1]}]}, "messages[0].content[0]", id="content-part-1"),
    pytest.param({"messages": HELLO, "max_tokens": "ten"}, "max_tokens", id="max-tokens-string"),
]


@pytest.mark.parametrize("door", ["chat", "messages"])
def test_a_whole_reply_goes_out_with_its_usage_already_counted_and_is_recorded_once(
        upstream: FakeOpenAIUpstream, tmp_path: Any, door: str) -> None:
    """When the first byte of a whole reply leaves, the team's budget holds what the request used, not the
    reservation its admission made: a request the client sends on receiving the answer is admitted against the
    right figure. The usage record (ledger, access log, metrics, trace) may follow the reply out: one, the same
    usage."""
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(base_url=upstream.base_url, alpha=key_hash("sk-alpha"), admin=key_hash(ADMIN_KEY)))
    store = MemoryStore()
    counter = TokenCounter()
    held_at_first_byte: list[int] = []

    def watched(app: Any) -> Any:
        async def serve(scope: dict[str, Any], receive: Any, send: Any) -> None:
            async def sending(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":  # in the server's loop: nothing else runs meanwhile
                    held_at_first_byte.append(Harness(gateway, store).held_tokens())
                await send(message)
            inference = scope["type"] == "http" and scope["path"].endswith(("/chat/completions", "/messages"))
            await app(scope, receive, sending if inference else send)
        return serve

    gateway = run_gateway(path, limiter=Limiter(store, counter), counter=counter, wrap=watched)
    try:
        path_, headers = ("/chat/completions", AUTH) if door == "chat" else ("/messages", {"x-api-key": "sk-alpha"})
        body = {"model": "chat-model", "max_tokens": 500, "messages": HELLO}  # reserves 500 more than it uses
        response = httpx.post(gateway.v1 + path_, headers=headers, json=body, timeout=10)
        assert response.status_code == 200, response.text
        [record] = gateway.usage.wait_for(1)
        assert record.usage is not None and record.status == 200
        assert held_at_first_byte == [record.usage.total_tokens]
        assert Harness(gateway, store).held_tokens() == record.usage.total_tokens
    finally:
        gateway.stop()


@pytest.mark.parametrize(("body", "param"), BAD_CHAT)
def test_bad_chat_input_is_a_400_naming_the_param_and_holds_nothing(harness: Harness, upstream: FakeOpenAIUpstream,
                                                                    body: dict[str, Any], param: str) -> None:
    response = httpx.post(harness.gateway.v1 + "/chat/completions", headers=AUTH,
                          json={"model": "chat-model", "max_tokens": 50, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    [record] = harness.gateway.usage.wait_for(1)
    assert record.status == 400 and record.team == "alpha" and record.usage is None
    assert harness.held_tokens() == 0  # the reservation (prompt + max_tokens) is not kept
    assert harness.in_flight() == 0
    assert upstream.request_count == 0


@pytest.mark.parametrize("body", [
    pytest.param({"messages": [{"role": "user", "content": [1]}]}, id="content-1"),
    pytest.param({"messages": HELLO, "tools": [5]}, id="tools-5"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "text", "text": _deep(300)}]}]},
                 id="deep-json"),
])
def test_bad_messages_input_is_an_anthropic_400_and_holds_nothing(harness: Harness, upstream: FakeOpenAIUpstream,
                                                                 body: dict[str, Any]) -> None:
    response = httpx.post(harness.gateway.v1 + "/messages", headers={"x-api-key": "sk-alpha"},
                          json={"model": "chat-model", "max_tokens": 50, **body})
    assert response.status_code == 400, response.text
    payload = response.json()
    assert payload["type"] == "error" and payload["error"]["type"] == "invalid_request_error"
    assert harness.held_tokens() == 0
    assert harness.in_flight() == 0
    assert upstream.request_count == 0


def test_a_gateway_bug_is_a_500_showing_only_the_request_id_and_still_settles(
        harness: Harness, upstream: FakeOpenAIUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Any, settings: Any, call: Any) -> Any:
        raise RuntimeError("adapter internals: sk-upstream-secret")

    monkeypatch.setattr(OpenAICompatAdapter, "build_request", broken)
    response = httpx.post(harness.gateway.v1 + "/chat/completions", headers=AUTH,
                          json={"model": "chat-model", "max_tokens": 50, "messages": HELLO})
    assert response.status_code == 500
    error = response.json()["error"]
    request_id = response.headers["x-request-id"]
    assert request_id in error["message"] and error["code"] == "internal_error"
    assert "secret" not in response.text and "adapter internals" not in response.text
    [record] = harness.gateway.usage.wait_for(1)
    assert (record.status, record.outcome, record.request_id) == (500, "internal_error", request_id)
    assert harness.held_tokens() == 0
    assert harness.in_flight() == 0


def test_a_bug_mid_stream_ends_the_stream_without_done_and_settles_what_was_relayed(
        harness: Harness, upstream: FakeOpenAIUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.front_doors import messages

    def broken(self: Any, chunk: Any) -> list[bytes]:
        raise RuntimeError("re-framer bug")

    monkeypatch.setattr(messages._MessageStream, "chunk", broken)
    body = {"model": "chat-model", "max_tokens": 50, "messages": HELLO, "stream": True}
    with (httpx.stream("POST", harness.gateway.v1 + "/messages", headers={"x-api-key": "sk-alpha"},
                       json=body) as response, pytest.raises(httpx.RemoteProtocolError)):
        response.read()  # the response started: a cut connection is all HTTP can say
    [record] = harness.gateway.usage.wait_for(1)
    assert record.outcome == "internal_error"
    assert harness.held_tokens() == harness.settled_tokens()
    assert harness.in_flight() == 0


@pytest.mark.parametrize("together", [True, False], ids=["tail-in-one-read", "tail-read-by-read"])
@pytest.mark.parametrize("door", ["chat", "messages", "responses"])
def test_a_stream_is_completed_when_its_terminal_event_is_seen_however_reads_fall(
        harness: Harness, upstream: FakeOpenAIUpstream, door: str, together: bool) -> None:
    behaviour = Behaviour(tail_in_one_write=True) if together else Behaviour(chunk_delay_ms=20)
    for _ in range(2):
        upstream.script(behaviour)
    url, body, headers, terminal = {
        "chat": ("/chat/completions", {"messages": HELLO, "stream_options": {"include_usage": True}}, AUTH,
                 b"data: [DONE]"),
        "messages": ("/messages", {"messages": HELLO, "max_tokens": 50}, {"x-api-key": "sk-alpha"},
                     b"event: message_stop"),
        "responses": ("/responses", {"input": "hello"}, AUTH, b"event: response.completed"),
    }[door]
    streamed = []
    for _ in range(2):
        with httpx.stream("POST", harness.gateway.v1 + url, headers=headers,
                          json={"model": "chat-model", "stream": True, "temperature": 0, **body}) as response:
            assert response.status_code == 200
            streamed.append((response.read(), response.headers.get("x-switchboard-cache")))
    first, second = harness.gateway.usage.wait_for(2)
    assert terminal in streamed[0][0] and terminal in streamed[1][0]
    assert first.outcome == "completed" and first.usage is not None and not first.usage.estimated
    assert second.outcome == "cache_hit" and streamed[1][1] == "hit"  # the whole stream was cached
    assert upstream.request_count == 1
    assert harness.held_tokens() == harness.settled_tokens()
    assert harness.in_flight() == 0


def test_coalesced_followers_get_the_whole_answer_when_the_tail_comes_in_one_read(
        harness: Harness, upstream: FakeOpenAIUpstream) -> None:
    upstream.script(Behaviour(tail_in_one_write=True, delay_ms=300))
    bodies: list[bytes] = []

    def ask() -> None:
        with httpx.stream("POST", harness.gateway.v1 + "/messages", headers={"x-api-key": "sk-alpha"},
                          json={"model": "chat-model", "max_tokens": 50, "messages": HELLO, "stream": True,
                                "temperature": 0}) as r:
            bodies.append(r.read())

    leader = threading.Thread(target=ask)
    leader.start()
    assert upstream.wait_for_requests(1)
    followers = [threading.Thread(target=ask) for _ in range(3)]
    for follower in followers:
        follower.start()
    for thread in (leader, *followers):
        thread.join(10)
    assert upstream.request_count == 1
    assert len(bodies) == 4 and all(b"event: message_stop" in body and b"event: error" not in body
                                    for body in bodies)
    records = harness.gateway.usage.wait_for(4)
    assert sorted(r.outcome for r in records) == ["cache_hit"] * 3 + ["completed"]
    assert harness.in_flight() == 0


def test_a_client_that_leaves_a_non_streamed_request_cancels_it_and_it_settles(
        harness: Harness, upstream: FakeOpenAIUpstream) -> None:
    upstream.script(Behaviour.hanging())
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(harness.gateway.v1 + "/chat/completions", headers=AUTH, timeout=0.5,
                   json={"model": "chat-model", "max_tokens": 50, "messages": HELLO})
    assert upstream.wait_for_disconnect()  # the gateway hung up on the upstream when the client left
    [record] = harness.gateway.usage.wait_for(1)
    assert record.outcome == "client_disconnected"
    assert harness.held_tokens() == harness.settled_tokens()
    assert harness.in_flight() == 0


def test_the_ledger_key_is_the_gateways_own_and_the_clients_id_is_echoed(harness: Harness) -> None:
    client = harness.gateway.client()
    ids = []
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model="chat-model", messages=[{"role": "user", "content": f"hi {len(ids)}"}],
            extra_headers={"x-request-id": "client-chosen-id"})
        assert raw.headers["x-request-id"] == "client-chosen-id"
        ids.append(raw.headers["x-request-id"])
    first, second = harness.gateway.usage.wait_for(2)
    assert first.request_id == second.request_id == "client-chosen-id"
    assert first.gateway_id != second.gateway_id
    assert all(len(r.gateway_id) == 36 and r.gateway_id[14] == "7" for r in (first, second))  # UUIDv7


ChatCall = Callable[..., Any]


def test_every_refusal_path_settles_once(harness: Harness, upstream: FakeOpenAIUpstream) -> None:
    """Auth failure, unknown model, upstream 400 and upstream 500: one record each (none for the bad key)."""
    client = harness.gateway.client()
    with pytest.raises(openai.AuthenticationError):
        harness.gateway.client("sk-nobody").chat.completions.create(model="chat-model", messages=HELLO)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    upstream.script(Behaviour.error(400, message="bad"))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="chat-model", messages=HELLO, max_tokens=50)
    upstream.script(Behaviour.error(500))
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="chat-model", messages=HELLO, max_tokens=50)
    records = harness.gateway.usage.wait_for(3)
    assert sorted(r.status for r in records) == [400, 404, 502]
    assert harness.held_tokens() == 0
    assert harness.in_flight() == 0


FALLBACK_POLICY = """
version: 1
providers:
  first:
    kind: openai_compatible
    base_url: {first}
    timeouts: {{connect_s: 2, first_byte_s: 5, total_s: 10}}
  second:
    kind: openai_compatible
    base_url: {second}
    timeouts: {{connect_s: 2, first_byte_s: 5, total_s: 10}}
prices:
  targets:
    first:
      "*": {{input: 1.0, output: 2.0}}
    second:
      "*": {{input: 10.0, output: 20.0}}
models:
  primary:
    retries: 0
    fallbacks: {{default: [backup]}}
    targets: [{{provider: first, model: up-primary}}]
    cache: {{mode: exact}}
  backup:
    targets: [{{provider: second, model: up-backup}}]
    cache: {{mode: exact}}
teams:
  alpha:
    keys: [{{id: alpha-key, hash: "{alpha}"}}]
    models: [primary, backup]
"""


def test_a_fallbacks_answer_is_cached_as_the_fallbacks_and_never_replayed_for_the_requested_model(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    with FakeOpenAIUpstream() as second:
        gateway = start_gateway(FALLBACK_POLICY.format(first=upstream.base_url, second=second.base_url,
                                                       alpha=key_hash("sk-alpha")))
        client = gateway.client()

        def ask(model: str) -> httpx.Headers:
            return client.chat.completions.with_raw_response.create(model=model, messages=HELLO).headers

        upstream.script(Behaviour.error(500))
        headers = ask("primary")
        assert headers["x-switchboard-model"] == "backup" and second.request_count == 1
        headers = ask("primary")  # the primary is back: its own answer, not the fallback's cached one
        assert headers["x-switchboard-cache"] == "miss" and headers["x-switchboard-model"] == "primary"
        assert upstream.request_count == 2
        headers = ask("backup")  # the fallback's answer was stored as the backup model's
        assert headers["x-switchboard-cache"] == "hit" and second.request_count == 1
        hit = gateway.usage.wait_for(3)[-1]
        original = gateway.usage.records[0]
        assert hit.cost_saved_usd == pytest.approx(original.cost_usd)  # priced where it was produced


def test_an_attempt_the_upstream_started_answering_is_billed_even_when_it_fails(
        harness: Harness, upstream: FakeOpenAIUpstream) -> None:
    upstream.script(Behaviour.die_mid_stream(after_chunks=1))  # the role chunk, then the connection drops
    with pytest.raises(openai.InternalServerError) as failed:  # no retries configured: the client gets a 502
        list(harness.gateway.client().chat.completions.create(model="chat-model", messages=HELLO, stream=True))
    assert failed.value.status_code == 502
    [record] = harness.gateway.usage.wait_for(1)
    assert record.status == 502 and record.usage is None
    assert record.failed_attempt_tokens > 0  # the upstream had started answering: it bills the prompt
    assert record.cost_usd == record.failed_attempt_cost_usd == pytest.approx(record.failed_attempt_tokens / 1e6)
    assert harness.held_tokens() == record.failed_attempt_tokens
    assert harness.in_flight() == 0
    assert access_line(record)["failed_attempt_tokens"] == record.failed_attempt_tokens
    assert record_attributes(record)["switchboard.failed_attempt_tokens"] == record.failed_attempt_tokens


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=st.integers(min_value=0, max_value=9), stream=st.booleans(), door=st.sampled_from(["chat", "messages"]))
def test_wherever_a_client_hangs_up_nothing_stays_reserved(harness: Harness, upstream: FakeOpenAIUpstream,
                                                          pieces: int, stream: bool, door: str) -> None:
    """A client that reads `pieces` network reads of the answer and hangs up: the request settles all the same."""
    upstream.script(Behaviour(chunk_delay_ms=15, delay_ms=5 * pieces))
    before = len(harness.gateway.usage.records)
    path, headers = ("/chat/completions", AUTH) if door == "chat" else ("/messages", {"x-api-key": "sk-alpha"})
    body = {"model": "chat-model", "max_tokens": 50, "messages": HELLO, "stream": stream}
    timeout = 0.02 + 0.01 * pieces if not stream else 5
    with (httpx.Client(timeout=timeout) as client, contextlib.suppress(httpx.TimeoutException),
          client.stream("POST", harness.gateway.v1 + path, headers=headers, json=body) as response):
        for number, _ in enumerate(response.iter_raw()):
            if number >= pieces:
                break
    harness.gateway.usage.wait_for(before + 1)
    assert harness.held_tokens() == harness.settled_tokens()
    deadline = time.monotonic() + 5
    while harness.in_flight() != 0:
        assert time.monotonic() < deadline, "in-flight gauge stuck above 0"
        time.sleep(0.02)


@pytest.mark.parametrize("http", [GuardedHttpToolsProtocol, "h11"], ids=["switchboard-protocol", "plain-h11"])
def test_a_client_that_leaves_during_a_stalled_call_cancels_it_on_any_server(
        upstream: FakeOpenAIUpstream, tmp_path: Any, http: Any) -> None:
    """Our protocol tells the request its client left; under a server without that hook, a watcher notices."""
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(base_url=upstream.base_url, alpha=key_hash("sk-alpha"), admin=key_hash(ADMIN_KEY)))
    store = MemoryStore()
    counter = TokenCounter()
    gateway = run_gateway(path, limiter=Limiter(store, counter), counter=counter, http=http)
    harness = Harness(gateway, store)
    try:
        upstream.script(Behaviour(delay_ms=30_000))  # answers long after the client has gone
        body = {"model": "chat-model", "max_tokens": 50, "messages": HELLO}
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gateway.v1 + "/chat/completions", headers=AUTH, json=body, timeout=0.3)
        [record] = gateway.usage.wait_for(1, timeout=10)
        assert time.monotonic() - started < 10  # settled when the client left, not when the upstream answered
        assert record.outcome == "client_disconnected" and record.status == 499
        assert harness.held_tokens() == 0  # the reservation was refunded
    finally:
        gateway.stop()


def test_a_client_invented_model_name_is_bounded_in_every_sink(harness: Harness) -> None:
    response = httpx.post(harness.gateway.v1 + "/chat/completions", headers=AUTH,
                          json={"model": "m" * 200_000, "messages": HELLO})
    assert response.status_code == 404
    [record] = harness.gateway.usage.wait_for(1)
    assert len(record.public_model) <= 65 and record.public_model.startswith("mmm")
