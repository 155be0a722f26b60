"""GET /metrics: Prometheus text that prometheus_client's own parser reads back correctly."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN_KEY, ADMIN_POLICY, RunningGateway, metrics_text, standard_policy
from tests.fakes import Behaviour, FakeOpenAIUpstream

PRICES = """
prices:
  targets:
    upstream:
      upstream-chat: {input: 2.50, cached_input: 1.25, output: 10.00}
"""


def scrape(gateway: RunningGateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    samples = {}
    for family in text_string_to_metric_families(metrics_text(gateway)):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def metered(upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    return start_gateway(standard_policy(upstream.base_url, extra=PRICES + ADMIN_POLICY))


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
    gateway = start_gateway(standard_policy(upstream.base_url,
                                            extra="telemetry: {metrics: {enabled: false}}" + ADMIN_POLICY))
    response = httpx.get(gateway.base_url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"})
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


def test_cache_hits_tokens_and_saved_cost(upstream: FakeOpenAIUpstream,
                                          start_gateway: Callable[..., RunningGateway]) -> None:
    policy = standard_policy(upstream.base_url, extra=PRICES + ADMIN_POLICY).replace(
        "        model: upstream-chat\n", "        model: upstream-chat\n    cache: {mode: exact}\n", 1)
    gateway = start_gateway(policy)
    client = gateway.client()
    ask = [{"role": "user", "content": "cache me if you can"}]
    first = client.chat.completions.create(model="chat-model", messages=ask)
    for _ in range(2):
        client.chat.completions.create(model="chat-model", messages=ask)
    client.chat.completions.create(model="chat-model", messages=ask, extra_headers={"x-switchboard-cache": "bypass"})
    records = gateway.usage.wait_for(4)
    assert first.usage is not None
    samples = scrape(gateway)
    where = {"team": "alpha", "model": "chat-model"}
    assert value(samples, "switchboard_cache_requests_total", **where, result="hit") == 2
    assert value(samples, "switchboard_cache_requests_total", **where, result="miss") == 1
    assert value(samples, "switchboard_cache_requests_total", **where, result="bypass") == 1
    assert value(samples, "switchboard_cache_tokens_total", **where) == 2 * first.usage.total_tokens
    saved = sum(r.cost_saved_usd or 0 for r in records)
    expected = 2 * (first.usage.prompt_tokens * 2.50 + first.usage.completion_tokens * 10.00) / 1_000_000
    assert saved == pytest.approx(expected)
    assert value(samples, "switchboard_cache_cost_saved_usd_total", **where) == pytest.approx(expected)
    # Hits are requests the upstream never saw: no tokens billed for them.
    assert upstream.request_count == 2


def test_circuit_breaker_state_is_read_at_scrape_time(upstream: FakeOpenAIUpstream,
                                                       start_gateway: Callable[..., RunningGateway]) -> None:
    policy = standard_policy(upstream.base_url, extra=ADMIN_POLICY).replace(
        "        model: upstream-chat\n",
        "        model: upstream-chat\n"
        "    circuit_breaker: {consecutive_failures: 2, cooldown_s: 600, min_callers: 1}\n", 1)
    gateway = start_gateway(policy)
    client = gateway.client()
    where = {"provider": "upstream", "model": "upstream-chat", "base_url": upstream.base_url}
    client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "fine"}])
    samples = scrape(gateway)
    assert samples[("switchboard_circuit_breaker_state", frozenset(where.items()))] == 0  # closed
    assert value(samples, "switchboard_target_healthy", **where) == 1

    upstream.script(Behaviour.error(502), Behaviour.error(502))
    for _ in range(2):
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "x"}])
    samples = scrape(gateway)
    assert value(samples, "switchboard_circuit_breaker_state", **where) == 2  # open
    assert value(samples, "switchboard_circuit_breaker_trips", **where) == 1
    assert value(samples, "switchboard_upstream_errors_total", provider="upstream", type="502") == 2


def test_breaker_collector_follows_the_routing_clock() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from gateway.compiled.policy import parse_policy
    from gateway.policy.model_schema import CircuitBreakerPolicy
    from gateway.routing.strategies import RouteState
    from gateway.telemetry.metrics import Metrics

    now = [100.0]
    routes = RouteState(clock=lambda: now[0])
    metrics = Metrics(lambda: parse_policy(standard_policy("http://127.0.0.1:9/v1")))
    metrics.watch_routes(routes)
    target = parse_policy(standard_policy("http://127.0.0.1:9/v1")).models["chat-model"].targets[0]
    breaker = routes.state(target).breaker
    settings = CircuitBreakerPolicy(consecutive_failures=1, cooldown_s=10)

    def breaker_value() -> float:
        families = text_string_to_metric_families(metrics.render().decode())
        (sample,) = [s for f in families if f.name == "switchboard_circuit_breaker_state" for s in f.samples]
        assert sample.labels["model"] == "upstream-chat"
        return sample.value

    assert breaker_value() == 0
    breaker.on_failure(now[0], settings)
    assert breaker_value() == 2
    now[0] += 10  # cooled down: the next request would be the probe
    assert breaker_value() == 1


def test_attempts_that_fail_after_they_began_are_counted_without_tracing(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    policy = standard_policy(upstream.base_url, extra=ADMIN_POLICY).replace(
        "        model: upstream-chat\n",
        "        model: upstream-chat\n    retries: 2\n    backoff: {initial_s: 0, max_s: 0}\n"
        "    ttft_timeout_s: 0.2\n", 1)
    gateway = start_gateway(policy)
    upstream.script(Behaviour.slow_first_byte(2000), Behaviour.die_mid_stream(after_chunks=1))
    chunks = list(gateway.client().chat.completions.create(
        model="chat-model", messages=[{"role": "user", "content": "x"}], stream=True))
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    gateway.usage.wait_for(1)
    samples = scrape(gateway)
    assert value(samples, "switchboard_upstream_errors_total", provider="upstream", type="timeout") == 1
    assert value(samples, "switchboard_upstream_errors_total", provider="upstream", type="connection") == 1
    assert value(samples, "switchboard_upstream_errors_total", provider="upstream", type="cancelled") == 0
