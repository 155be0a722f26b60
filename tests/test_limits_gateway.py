"""Limits and budgets through the running gateway, seen by the openai SDK and an admin."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import openai
import pytest

from gateway.tokens.counter import TokenCounter
from tests.conftest import RunningGateway, key_hash, standard_policy
from tests.fakes import Behaviour, FakeOpenAIUpstream

ADMIN_KEY = "sk-admin-test"


def limited_policy(upstream: FakeOpenAIUpstream, team_lines: str, state: str = "") -> str:
    # Appends limits to team alpha of the standard policy (its last lines are team beta).
    admin = f"admin:\n  keys:\n    - id: ops\n      hash: \"{key_hash(ADMIN_KEY)}\"\n"
    text = standard_policy(upstream.base_url, extra=admin + state)
    anchor = "    models: [chat-model, embed-model]\n"
    return text.replace(anchor, anchor + team_lines, 1)


def chat(gateway: RunningGateway, **kwargs: object) -> openai.types.chat.ChatCompletion:
    client = gateway.client()
    return client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "hi there"}],
                                          max_tokens=5, **kwargs)  # type: ignore[call-overload,no-any-return]


def test_rate_limited_requests_get_openai_429_with_retry_headers(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[[str], RunningGateway]) -> None:
    gateway = start_gateway(limited_policy(upstream, "    limits: {rpm: 2, tpm: 100000}\n"))
    client = gateway.client()
    raw = client.chat.completions.with_raw_response.create(
        model="chat-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 100000
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    chat(gateway)
    with pytest.raises(openai.RateLimitError) as caught:
        chat(gateway)
    error = caught.value
    assert error.code == "rate_limit_exceeded" and error.type == "rate_limit_error"
    assert "team alpha" in error.message and "limit 2, used 2" in error.message
    headers = error.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-should-retry" not in headers
    assert upstream.request_count == 2  # the refused request never reached the upstream
    gateway.usage.wait_for(3)


def test_budget_exhaustion_is_a_non_retryable_429_budget_exceeded(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[[str], RunningGateway]) -> None:
    gateway = start_gateway(limited_policy(upstream, "    budget: {tokens: 30, period: daily}\n"))
    chat(gateway)  # settles its actual usage, well under 30
    gateway.usage.wait_for(1)
    client = openai.OpenAI(base_url=gateway.v1, api_key="sk-alpha", max_retries=2)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "x " * 40}],
                                       max_tokens=5)
    error = caught.value
    assert error.status_code == 429 and error.code == "budget_exceeded"
    assert "Budget exceeded for team alpha" in error.message and "resets at" in error.message
    assert error.response.headers["x-should-retry"] == "false"
    assert upstream.request_count == 1  # the SDK did not retry, the upstream saw only the first request


def test_streams_and_cancelled_streams_settle_their_usage(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[[str], RunningGateway]) -> None:
    gateway = start_gateway(limited_policy(upstream, "    limits: {tpm: 100000}\n    budget: {tokens: 100000}\n"))
    client = gateway.client()
    stream = client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "one two"}],
                                            max_tokens=500, stream=True)
    for _ in stream:
        pass
    records = gateway.usage.wait_for(1)
    spent = records[0].usage.total_tokens  # type: ignore[union-attr]
    report = admin_usage(gateway)
    budget = next(r for r in report["usage"] if r["limit_type"] == "monthly budget")
    assert budget["used"] == spent  # the 500-token reservation was refunded down to actual usage

    upstream.script(Behaviour.slow_stream(chunks=200, chunk_delay_ms=20))
    with client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "go"}],
                                        max_tokens=1000, stream=True) as cut:
        next(iter(cut))
    records = gateway.usage.wait_for(2)
    assert records[1].outcome == "client_disconnected"
    report = admin_usage(gateway)
    budget = next(r for r in report["usage"] if r["limit_type"] == "monthly budget")
    assert spent < budget["used"] < spent + 1000  # charged what was estimated, not the whole reservation


def admin_usage(gateway: RunningGateway, key: str = ADMIN_KEY, team: str = "alpha") -> dict:  # type: ignore[type-arg]
    response = httpx.get(gateway.base_url + "/admin/usage", params={"team": team},
                         headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_admin_usage_reports_every_scope_and_needs_an_admin_key(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[[str], RunningGateway]) -> None:
    team = ("    limits: {rpm: 10}\n    model_limits:\n      chat-model: {rpm: 5}\n"
            "    budget: {tokens: 1000, period: weekly}\n")
    gateway = start_gateway(limited_policy(upstream, team))
    chat(gateway)
    gateway.usage.wait_for(1)
    report = admin_usage(gateway)
    assert report["team"] == "alpha"
    rows = {(r["scope"], r["limit_type"]): r for r in report["usage"]}
    assert rows[("team", "requests per minute")]["used"] == 1
    assert rows[("team", "requests per minute")]["remaining"] == 9
    assert rows[("model", "requests per minute")]["owner"] == "chat-model"
    weekly = rows[("team", "weekly budget")]
    assert 0 < weekly["used"] < 1000 and weekly["remaining"] == 1000 - weekly["used"]
    denied = httpx.get(gateway.base_url + "/admin/usage", params={"team": "alpha"},
                       headers={"authorization": "Bearer sk-alpha"})
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    unknown = httpx.get(gateway.base_url + "/admin/usage", params={"team": "nobody"},
                        headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert unknown.status_code == 404


def test_embeddings_count_against_token_limits(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[[str], RunningGateway]) -> None:
    gateway = start_gateway(limited_policy(upstream, "    limits: {tpm: 12}\n"))
    client = gateway.client()
    client.embeddings.create(model="embed-model", input="one two three four five")
    with pytest.raises(openai.RateLimitError, match="tokens per minute"):
        client.embeddings.create(model="embed-model", input="one two three four five six seven eight nine ten")


def test_editing_the_policy_file_keeps_counted_usage(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[[str], RunningGateway]) -> None:
    # Per day, not per minute: a minute turning over between the two requests and the reload would reset the count.
    gateway = start_gateway(limited_policy(upstream, "    limits: {rpd: 3}\n"))
    chat(gateway)
    chat(gateway)
    fingerprint = gateway.store.current.fingerprint
    gateway.policy_path.write_text(limited_policy(upstream, "    limits: {rpd: 2}\n"))
    reloaded, waited = threading.Event(), 0.0
    while gateway.store.current.fingerprint == fingerprint and waited < 5:  # the file watcher polls every 50 ms
        reloaded.wait(0.02)
        waited += 0.02
    assert gateway.store.current.fingerprint != fingerprint
    with pytest.raises(openai.RateLimitError, match="limit 2, used 2"):
        chat(gateway)


class _CountingCounter(TokenCounter):
    def __init__(self) -> None:
        super().__init__()
        self.chat_prompts_counted = 0

    def count_chat_prompt(self, body: Mapping[str, Any], model: str, family: str = "openai") -> int:
        self.chat_prompts_counted += 1
        return super().count_chat_prompt(body, model, family)


def test_admission_and_the_context_window_check_count_the_prompt_once(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    counter = _CountingCounter()
    policy = limited_policy(upstream, "    limits: {tpm: 100000}\n").replace(
        "  chat-model:\n    targets:", "  chat-model:\n    context_window: 1000\n    targets:", 1)
    gateway = start_gateway(policy, counter=counter)
    assert chat(gateway).choices[0].message.content
    assert counter.chat_prompts_counted == 1
    # A prompt over the window is still refused on admission's count.
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().chat.completions.create(model="chat-model", max_tokens=5,
                                                 messages=[{"role": "user", "content": "word " * 1200}])
    assert caught.value.code == "context_length_exceeded"
    assert counter.chat_prompts_counted == 2
