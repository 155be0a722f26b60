"""`hard_stop_streams`: a stream that would cross its team's hard budget is cut in-band, and settled."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import openai
import pytest

from gateway.accounting.budgets import StreamAllowance
from gateway.accounting.limits import Limiter
from gateway.compiled.policy import PolicyError, parse_policy
from gateway.state.memory import MemoryStore
from gateway.tokens.counter import TokenCounter
from providers.base import Endpoint, Usage
from tests.conftest import RunningGateway, key_hash, standard_policy
from tests.fakes import Behaviour, FakeOpenAIUpstream

ADMIN_KEY = "sk-admin-hard-stop"
LONG_ANSWER = "word " * 400  # ~400 tokens, far past the budgets below
BUDGET = 150


def hard_stop_policy(upstream: FakeOpenAIUpstream, budget: str, extra: str = "") -> str:
    # A small default reservation, so a stream without max_tokens is admitted and then outruns it.
    top = (f"admin:\n  keys:\n    - id: ops\n      hash: \"{key_hash(ADMIN_KEY)}\"\n"
           "admission:\n  default_completion_tokens: 10\n" + extra)
    anchor = "    models: [chat-model, embed-model]\n"
    return standard_policy(upstream.base_url, extra=top).replace(anchor, anchor + f"    budget: {budget}\n", 1)


def budget_used(gateway: RunningGateway) -> int:
    response = httpx.get(gateway.base_url + "/admin/usage", params={"team": "alpha"},
                         headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    row = next(r for r in response.json()["usage"] if r["limit_type"] == "daily budget")
    return int(row["used"])


def stream_text(client: openai.OpenAI, **kwargs: object) -> str:
    stream = client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "go on"}],
                                            stream=True, **kwargs)  # type: ignore[call-overload]
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_a_stream_crossing_the_budget_is_cut_with_an_in_band_error_and_settled(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[[str], RunningGateway]) -> None:
    gateway = start_gateway(hard_stop_policy(upstream, f"{{tokens: {BUDGET}, period: daily, "
                                                       "hard_stop_streams: true}"))
    upstream.script(Behaviour(content=LONG_ANSWER, stream_chunks=100, chunk_delay_ms=2))
    client = gateway.client()
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        stream = client.chat.completions.create(model="chat-model", stream=True,
                                                messages=[{"role": "user", "content": "go on"}])
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    error = caught.value
    assert error.code == "budget_exceeded"
    assert "Budget exceeded for team alpha mid-stream" in error.message and "daily token budget limit 150" \
        in error.message and "resets at" in error.message
    text = "".join(received)
    assert 0 < len(text) < len(LONG_ANSWER) // 2  # part of the answer arrived, then the cut
    assert upstream.wait_for_disconnect()  # the upstream call was abandoned, not drained

    record = gateway.usage.wait_for(1)[0]
    assert record.outcome == "budget_exceeded" and record.usage is not None and record.usage.estimated
    spent = record.usage.total_tokens
    # Never past the budget; the relay's byte-based count may stop up to ~25% early on English text.
    assert BUDGET * 3 // 4 <= spent <= BUDGET
    assert budget_used(gateway) == spent  # settled what was relayed: the reservation became actual usage

    with pytest.raises(openai.RateLimitError) as refused:  # what is left cannot hold another answer
        stream_text(client, max_tokens=BUDGET - spent)
    assert refused.value.code == "budget_exceeded"


def test_legacy_completion_streams_are_cut_too(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[[str], RunningGateway]) -> None:
    policy = hard_stop_policy(upstream, f"{{tokens: {BUDGET}, period: daily, hard_stop_streams: true}}")
    gateway = start_gateway(policy.replace("[chat-model, embed-model]", "[chat-model, embed-model, completion-model]")
                            .replace("models:\n", "models:\n  completion-model:\n    targets:\n"
                                     "      - provider: upstream\n        model: upstream-instruct\n", 1))
    upstream.script(Behaviour(content=LONG_ANSWER, stream_chunks=100, chunk_delay_ms=2))
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in gateway.client().completions.create(model="completion-model", prompt="go on", stream=True):
            received.append(chunk.choices[0].text)
    assert caught.value.code == "budget_exceeded"
    assert 0 < len("".join(received)) < len(LONG_ANSWER) // 2
    record = gateway.usage.wait_for(1)[0]
    assert record.outcome == "budget_exceeded" and record.usage.total_tokens <= BUDGET  # type: ignore[union-attr]


def test_a_stream_inside_the_budget_finishes_normally(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[[str], RunningGateway]) -> None:
    gateway = start_gateway(hard_stop_policy(upstream, "{tokens: 5000, period: daily, hard_stop_streams: true}"))
    upstream.script(Behaviour(content=LONG_ANSWER, stream_chunks=100))
    assert stream_text(gateway.client()) == LONG_ANSWER  # ended with [DONE]: the SDK raised nothing
    record = gateway.usage.wait_for(1)[0]
    assert record.outcome == "completed"
    assert budget_used(gateway) == record.usage.total_tokens  # type: ignore[union-attr]


def test_without_hard_stop_a_stream_may_pass_the_budget(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[[str], RunningGateway]) -> None:
    gateway = start_gateway(hard_stop_policy(upstream, f"{{tokens: {BUDGET}, period: daily}}"))
    upstream.script(Behaviour(content=LONG_ANSWER, stream_chunks=100))
    assert stream_text(gateway.client()) == LONG_ANSWER
    gateway.usage.wait_for(1)
    assert budget_used(gateway) > BUDGET  # what hard_stop_streams exists to prevent


def test_hard_stop_needs_a_rejecting_budget(upstream: FakeOpenAIUpstream) -> None:
    text = hard_stop_policy(upstream, "{tokens: 100, on_exhaust: downgrade, downgrade_to: chat-model, "
                                      "hard_stop_streams: true}")
    with pytest.raises(PolicyError, match="hard_stop_streams"):
        parse_policy(text)


def test_usd_room_becomes_completion_tokens_at_the_output_price(upstream: FakeOpenAIUpstream) -> None:
    # $1 per 1M input tokens, $10 per 1M output: 1 micro-USD per prompt token, 10 per completion token.
    def cost(_policy: object, _target: object, usage: Usage) -> float:
        return (usage.prompt_tokens * 1 + usage.completion_tokens * 10) / 1_000_000

    policy = parse_policy(hard_stop_policy(upstream, "{usd: 0.002, period: daily, hard_stop_streams: true}"))
    limiter = Limiter(MemoryStore(), TokenCounter(), cost=cost)
    caller = next(k for k in policy.keys.values() if k.key_id == "alpha-key")
    body = {"model": "chat-model", "messages": [{"role": "user", "content": "go on"}], "stream": True}
    admission = asyncio.run(limiter.admit(policy, caller, Endpoint.CHAT, body, policy.models["chat-model"], {}))
    assert admission is not None and isinstance(admission.allowance, StreamAllowance)
    # 2000 micro-USD, minus the prompt at 1 each, leaves (2000 - prompt) // 10 completion tokens.
    assert admission.allowance.tokens == (2000 - admission.prompt_tokens) // 10
    assert admission.allowance.unit == "usd"
    # A request that is not a stream carries no allowance: nothing to cut.
    plain = asyncio.run(limiter.admit(policy, caller, Endpoint.CHAT, {**body, "stream": False},
                                      policy.models["chat-model"], {}))
    assert plain is not None and plain.allowance is None


def test_the_allowance_counts_generated_text_and_stops_before_passing() -> None:
    budget = parse_policy(hard_stop_policy_stub()).rules.team_budgets["alpha"]  # type: ignore[union-attr]
    allowance = StreamAllowance(3, budget, "tokens", 10, 0.0)
    chunk = b'{"choices":[{"index":0,"delta":{"content":"abcdefgh"}}]}'  # 8 bytes: 2 tokens
    usage_only = b'{"choices":[],"usage":{"completion_tokens":5}}'
    assert allowance.take(chunk) and allowance.spent == 2
    assert allowance.take(usage_only) and allowance.spent == 2  # no generated text, no charge
    assert allowance.take(b'{"choices":[{"index":0,"delta":{"content":"a"}}]}')  # at least 1: exactly 3
    assert not allowance.take(b'{"choices":[{"index":0,"delta":{"content":"b"}}]}')  # 4 would pass 3
    assert allowance.spent == 3


def hard_stop_policy_stub() -> str:
    return f"""
version: 1
providers:
  up: {{kind: openai_compatible, base_url: "http://127.0.0.1:9/v1", api_key: k}}
models:
  m: {{targets: [{{provider: up, model: gpt-4o}}]}}
teams:
  alpha:
    models: [m]
    budget: {{tokens: 10, hard_stop_streams: true}}
    keys:
      - id: alpha-key
        hash: "{key_hash('sk-alpha')}"
"""
