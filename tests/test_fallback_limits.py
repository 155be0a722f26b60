"""A fallback model's own limits and budgets apply (issue 14, item 8): gateway/accounting/fallback_limits.py.

Each test runs a real gateway in front of the fake OpenAI upstream: the requested model fails (a scripted 500)
and the gateway falls back. A fallback whose team x model limit or USD budget refuses the request is skipped
(the route header says why) and never called; one within its limits serves, and the counters of the model
that served move, while the failed model only keeps the request it was sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.trace import SpanKind

from tests.conftest import RunningGateway, key_hash, standard_policy
from tests.fakes import Behaviour, FakeOpenAIUpstream
from tests.fakes.otlp_receiver import WaitingSpanExporter
from tests.test_hostile_tenants import FALLBACK_POLICY

Start = Callable[..., RunningGateway]
ASK = [{"role": "user", "content": "tell me something"}]
ADMIN_KEY = "sk-admin-fallbacks"
ALPHA_MODELS = "    models: [chat-model, embed-model]\n"


def fallback_policy(upstream: FakeOpenAIUpstream, alpha_lines: str, extra: str = "",
                    fallbacks: str = "[premium-model, cheap-model]") -> str:
    """Team alpha may use shared-model (falling back to premium-model, then cheap-model) with `alpha_lines`."""
    admin = f'admin:\n  keys: [{{id: ops, hash: "{key_hash(ADMIN_KEY)}"}}]\n'
    text = standard_policy(upstream.base_url, extra=admin + extra)
    text = text.replace("models:\n", "models:\n" + FALLBACK_POLICY.replace(
        "[premium-model, cheap-model]", fallbacks), 1)
    return text.replace(ALPHA_MODELS, "    models: [chat-model, shared-model, premium-model, cheap-model]\n"
                        + alpha_lines, 1)


def usage_rows(gateway: RunningGateway) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Team alpha's /admin/usage rows by (scope, owner, limit type)."""
    response = httpx.get(gateway.base_url + "/admin/usage", params={"team": "alpha"},
                         headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    return {(r["scope"], r["owner"], r["limit_type"]): r for r in response.json()["usage"]}


def upstream_models(upstream: FakeOpenAIUpstream) -> list[str]:
    return [r.json["model"] for r in upstream.requests]


def test_a_fallback_over_its_own_rate_limit_is_skipped_and_the_client_gets_the_failure(
        upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    # Nothing limits shared-model: the fallback's limit is the only one the request meets.
    gateway = start_gateway(fallback_policy(upstream, "    model_limits:\n      premium-model: {rpm: 1}\n",
                                            fallbacks="[premium-model]"))
    client = gateway.client()
    client.chat.completions.create(model="premium-model", messages=ASK)  # premium-model's minute is used up
    upstream.reset()
    upstream.script(Behaviour.error(500))
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model="shared-model", messages=ASK)
    error = failed.value
    # The error of the model the client asked for, not a rate limit of a model it never named.
    assert error.status_code == 502 and error.type != "rate_limit_error"
    assert error.response.headers["x-switchboard-route"] == \
        "shared-model@upstream:500,premium-model:rate_limit_exceeded"
    assert upstream_models(upstream) == ["upstream-shared"]  # the skipped fallback was never called
    records = gateway.usage.wait_for(2)
    assert records[1].status == 502 and records[1].upstream_model is None
    rows = usage_rows(gateway)
    assert rows[("model", "premium-model", "requests per minute")]["used"] == 1  # the refusal reserved nothing


def test_a_skipped_fallback_gives_way_to_the_next_one_within_its_limits(
        upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    limits = "    model_limits:\n      premium-model: {rpm: 0}\n      cheap-model: {rpm: 5}\n"
    exporter = WaitingSpanExporter()
    gateway = start_gateway(fallback_policy(upstream, limits), span_exporter=exporter)
    upstream.script(Behaviour.error(500))
    answer = gateway.client().chat.completions.with_raw_response.create(model="shared-model", messages=ASK)
    assert answer.headers["x-switchboard-model"] == "cheap-model"
    assert answer.headers["x-switchboard-route"] == \
        "shared-model@upstream:500,premium-model:rate_limit_exceeded,cheap-model@upstream:ok"
    assert upstream_models(upstream) == ["upstream-shared", "upstream-cheap"]
    gateway.usage.wait_for(1)
    rows = usage_rows(gateway)
    assert rows[("model", "cheap-model", "requests per minute")]["used"] == 1
    assert rows[("model", "premium-model", "requests per minute")]["used"] == 0
    (server,) = [s for s in exporter.wait_for_servers(1) if s.kind is SpanKind.SERVER]
    hops = [(dict(e.attributes or {})["switchboard.fallback.to"], dict(e.attributes or {}).get(
        "switchboard.fallback.skipped")) for e in server.events if e.name == "switchboard.fallback"]
    assert hops == [("premium-model", "rate_limit_exceeded"), ("cheap-model", None)]


def test_the_fallback_that_serves_is_counted_against_its_own_limits(
        upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    limits = ("    limits: {tpm: 100000}\n    budget: {tokens: 100000, period: daily}\n    model_limits:\n"
              "      shared-model: {rpm: 10, tpm: 100000}\n      premium-model: {rpm: 10, tpm: 100000}\n")
    gateway = start_gateway(fallback_policy(upstream, limits))
    upstream.script(Behaviour.error(500))
    answer = gateway.client().chat.completions.with_raw_response.create(model="shared-model", messages=ASK,
                                                                        max_tokens=50)
    assert answer.headers["x-switchboard-model"] == "premium-model"
    record = gateway.usage.wait_for(1)[0]
    assert record.upstream_model == "upstream-premium" and record.usage is not None
    used = record.usage.total_tokens
    rows = usage_rows(gateway)
    # The model that served: its request and its tokens, settled to what it used.
    assert rows[("model", "premium-model", "requests per minute")]["used"] == 1
    assert rows[("model", "premium-model", "tokens per minute")]["used"] == used
    # The model that failed: the request it was sent, and its token reservation back.
    assert rows[("model", "shared-model", "requests per minute")]["used"] == 1
    assert rows[("model", "shared-model", "tokens per minute")]["used"] == 0
    # The team's limits and budget count the request once.
    assert rows[("team", "alpha", "tokens per minute")]["used"] == used
    assert rows[("team", "alpha", "daily budget")]["used"] == used


PRICED = """
prices:
  version: fallback-test
  targets:
    upstream:
      upstream-shared: {input: 1.0, output: 1.0}
      upstream-premium: {input: 1000.0, output: 1000.0}
      upstream-cheap: {input: 1.0, output: 1.0}
"""


def _priced_fallback(upstream: FakeOpenAIUpstream, start_gateway: Start, usd: float) -> tuple[dict[str, str], Any]:
    """shared-model fails under a daily USD budget of `usd`; the answer's headers and its usage record."""
    # 1,000 completion tokens reserved: $0.001 on shared-model and cheap-model, $1 on premium-model.
    gateway = start_gateway(fallback_policy(upstream, f"    budget: {{usd: {usd}, period: daily}}\n", extra=PRICED))
    upstream.script(Behaviour.error(500))
    answer = gateway.client().chat.completions.with_raw_response.create(model="shared-model", messages=ASK,
                                                                        max_tokens=1000)
    record = gateway.usage.wait_for(1)[0]
    assert record.usage is not None and record.cost_usd is not None
    assert usage_rows(gateway)[("team", "alpha", "daily budget")]["used"] == pytest.approx(record.cost_usd, abs=1e-6)
    return dict(answer.headers), record


def test_a_fallback_whose_price_would_pass_the_usd_budget_is_skipped(
        upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    headers, record = _priced_fallback(upstream, start_gateway, 0.5)
    assert headers["x-switchboard-route"] == \
        "shared-model@upstream:500,premium-model:budget_exceeded,cheap-model@upstream:ok"
    assert upstream_models(upstream) == ["upstream-shared", "upstream-cheap"]
    assert 0 < record.cost_usd < 0.001  # the budget was settled to what cheap-model cost


def test_a_dearer_fallback_within_the_budget_serves_and_is_billed_at_its_own_price(
        upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    headers, record = _priced_fallback(upstream, start_gateway, 5)
    assert headers["x-switchboard-model"] == "premium-model"
    assert record.cost_usd == pytest.approx(record.usage.total_tokens * 1000 / 1e6)  # priced where it was served


def test_a_fallbacks_admission_event_shows_its_own_limit_and_the_budget_top_up(
        upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    # The fallback's checks are its team x model limit and the USD budget's top-up: not one frame's meters.
    limits = "    budget: {usd: 5, period: daily}\n    model_limits:\n      premium-model: {rpm: 3}\n"
    exporter = WaitingSpanExporter()
    # Every admission's event, the first model's routine one included (`notable` would show only the fallback's).
    every_admission = "telemetry:\n  traces: {admission_events: all}\n"
    gateway = start_gateway(fallback_policy(upstream, limits, extra=PRICED + every_admission,
                                            fallbacks="[premium-model]"), span_exporter=exporter)
    upstream.script(Behaviour.error(500))
    answer = gateway.client().chat.completions.with_raw_response.create(model="shared-model", messages=ASK,
                                                                        max_tokens=1000)
    assert answer.headers["x-switchboard-model"] == "premium-model"
    (server,) = [s for s in exporter.wait_for_servers(1) if s.kind is SpanKind.SERVER]
    first, fallback = (dict(e.attributes or {}) for e in server.events if e.name == "switchboard.admission")
    assert first["switchboard.admission.checks"] == ("team alpha: daily usd budget",)
    assert fallback["switchboard.admission.fallback"] is True
    assert fallback["switchboard.admission.verdict"] == "admitted"
    assert fallback["switchboard.admission.model"] == "premium-model"
    assert fallback["switchboard.admission.checks"] == ("model premium-model for team alpha: requests per minute",
                                                        "team alpha: daily usd budget")
    assert fallback["switchboard.admission.limits"] == (3.0, 5.0)
    # USD in dollars: the budget already holds the first model's reservation, and the top-up is the difference.
    top_up = fallback["switchboard.admission.reserved_usd"]
    assert top_up > first["switchboard.admission.reserved_usd"] > 0
    assert fallback["switchboard.admission.used"] == (0.0, first["switchboard.admission.reserved_usd"])
    assert fallback["switchboard.admission.requested"] == (1.0, top_up)
    assert fallback["switchboard.admission.remaining"] == pytest.approx(
        (2.0, 5.0 - first["switchboard.admission.reserved_usd"] - top_up))


def test_a_hard_stopped_stream_served_by_a_dearer_fallback_is_cut_at_the_fallbacks_price(
        upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    # $0.05 left: about 50,000 tokens on shared-model, about 40 (after the prompt) on premium-model.
    budget = "    budget: {usd: 0.05, period: daily, hard_stop_streams: true}\n"
    gateway = start_gateway(fallback_policy(upstream, budget, extra=PRICED, fallbacks="[premium-model]"))
    upstream.script(Behaviour.error(500), Behaviour(content="word " * 400, overrun=True, stream_chunks=100))
    with httpx.stream("POST", gateway.v1 + "/chat/completions", headers={"authorization": "Bearer sk-alpha"},
                      json={"model": "shared-model", "messages": ASK, "stream": True, "max_tokens": 20},
                      timeout=10) as response:
        assert response.headers["x-switchboard-model"] == "premium-model"
        events = [line for line in response.iter_lines() if line]
    assert "budget_exceeded" in events[-1] and "data: [DONE]" not in events
    record = gateway.usage.wait_for(1)[0]
    assert record.cost_usd is not None and record.cost_usd <= 0.05 + 1e-6  # cut before it passed the budget
