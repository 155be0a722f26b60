"""GET /metrics: Prometheus text that prometheus_client's own parser reads back correctly."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningGateway, standard_policy
from tests.fakes import Behaviour, FakeOpenAIUpstream

PRICES = """
prices:
  targets:
    upstream:
      upstream-chat: {input: 2.50, cached_input: 1.25, output: 10.00}
"""


def scrape(gateway: RunningGateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = httpx.get(gateway.base_url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def metered(upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    return start_gateway(standard_policy(upstream.base_url, extra=PRICES))


def test_metrics_count_requests_tokens_cost_and_errors(metered: RunningGateway, upstream: FakeOpenAIUpstream) -> None:
    client = metered.client()
    costs = Decimal(0)
    for text in ("one two", "three four five"):
        raw = client.chat.completions.with_raw_response.create(model="chat-model",
                                                               messages=[{"role": "user", "content": text}])
        costs += Decimal(raw.headers["x-switchboard-cost-usd"])
    list(client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "s t"}],
                                        stream=True))
    upstream.script(Behaviour.error(500))
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "x"}])
    assert httpx.post(metered.v1 + "/chat/completions", json={}, headers={"authorization": "Bearer no"}).status_code \
        == 401
    records = metered.usage.wait_for(4)

    samples = scrape(metered)
    ok = {"team": "alpha", "model": "chat-model", "provider": "upstream", "status": "200"}
    assert value(samples, "switchboard_requests_total", **ok) == 3
    assert value(samples, "switchboard_request_duration_seconds_count", **ok) == 3
    assert value(samples, "switchboard_request_duration_seconds_bucket", **ok, le="+Inf") == 3
    assert sum(v for (name, labels), v in samples.items()
               if name == "switchboard_requests_total" and ("status", "502") in labels) == 1
    where = {"team": "alpha", "model": "chat-model", "provider": "upstream"}
    assert value(samples, "switchboard_time_to_first_token_seconds_count", **where) == 1
    prompt = sum(r.usage.prompt_tokens for r in records if r.usage and r.status == 200)
    completion = sum(r.usage.completion_tokens for r in records if r.usage and r.status == 200)
    assert value(samples, "switchboard_tokens_total", **where, type="input") == prompt
    assert value(samples, "switchboard_tokens_total", **where, type="output") == completion
    streamed = next(r for r in records if r.stream)
    assert value(samples, "switchboard_cost_usd_total", **where) == pytest.approx(
        float(costs) + (streamed.cost_usd or 0), abs=1e-9)
    assert value(samples, "switchboard_upstream_errors_total", provider="upstream", type="500") == 1
    assert value(samples, "switchboard_stream_outcomes_total", team="alpha", model="chat-model",
                 outcome="completed") == 1
    assert value(samples, "switchboard_requests_in_flight") == 0


def test_in_flight_counts_an_open_stream(metered: RunningGateway, upstream: FakeOpenAIUpstream) -> None:
    upstream.script(Behaviour.slow_stream(chunks=50, chunk_delay_ms=20))
    stream = metered.client().chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "x"}],
                                                      stream=True)
    next(iter(stream))
    assert value(scrape(metered), "switchboard_requests_in_flight") == 1
    stream.close()
    metered.usage.wait_for(1)
    assert value(scrape(metered), "switchboard_requests_in_flight") == 0


def test_rejections_counter_is_exposed_for_admission(metered: RunningGateway) -> None:
    metrics = metered._server.config.app.state.services.telemetry.metrics  # type: ignore[attr-defined]
    metrics.rejected("alpha", "team", "budget_exceeded")
    assert value(scrape(metered), "switchboard_rejections_total", team="alpha", scope="team",
                 reason="budget_exceeded") == 1


def test_metrics_can_be_disabled(upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway(standard_policy(upstream.base_url, extra="telemetry: {metrics: {enabled: false}}"))
    response = httpx.get(gateway.base_url + "/metrics")
    assert response.status_code == 404 and response.json()["error"]["code"] == "metrics_disabled"


def test_genai_semconv_client_metrics(metered: RunningGateway) -> None:
    metered.client().chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "a b c"}])
    record = metered.usage.wait_for(1)[0]
    samples = scrape(metered)
    genai = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "upstream",
             "gen_ai_request_model": "upstream-chat"}
    assert value(samples, "gen_ai_client_token_usage_count", **genai, gen_ai_token_type="input") == 1
    assert record.usage is not None
    assert value(samples, "gen_ai_client_token_usage_sum", **genai, gen_ai_token_type="input") == \
        record.usage.prompt_tokens
    assert value(samples, "gen_ai_client_operation_duration_seconds_count", **genai, error_type="") == 1
