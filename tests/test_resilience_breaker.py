"""Circuit breakers: the state machine on an injected clock, and ejection through a gateway."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import openai
import pytest

from gateway.policy.model_schema import CircuitBreakerPolicy
from gateway.routing.breaker import BreakerState, CircuitBreaker
from tests.conftest import RunningGateway
from tests.fakes import Behaviour, FakeOpenAIUpstream
from tests.fakes.routing_policy import ADMIN_KEY, chat, key_hash, multi_policy

SETTINGS = CircuitBreakerPolicy(consecutive_failures=3, failure_rate=0.5, window_s=10, min_requests=6,
                                cooldown_s=2, max_cooldown_s=5)


def test_opens_after_consecutive_failures_then_half_opens_for_one_probe_and_closes() -> None:
    breaker = CircuitBreaker()
    for now in (0.0, 0.1, 0.2):
        assert breaker.allows(now)
        breaker.on_failure(now, SETTINGS)
    assert breaker.state(0.3) is BreakerState.OPEN
    assert not breaker.allows(2.1)
    assert breaker.state(2.2) is BreakerState.HALF_OPEN
    assert breaker.allows(2.2)
    breaker.on_attempt(2.2)  # the probe
    assert not breaker.allows(2.3)  # only one probe at a time
    breaker.on_success(2.4, SETTINGS)
    assert breaker.state(2.4) is BreakerState.CLOSED
    assert breaker.allows(2.5)


def test_a_failed_probe_reopens_with_a_growing_cooldown_capped_at_the_maximum() -> None:
    breaker = CircuitBreaker()
    now = 0.0
    for _ in range(3):
        breaker.on_failure(now, SETTINGS)
    cooldowns = []
    for _ in range(4):
        cooldowns.append(breaker.cooldown_s)
        now += breaker.cooldown_s
        assert breaker.allows(now)
        breaker.on_attempt(now)
        breaker.on_failure(now, SETTINGS)
    assert cooldowns == [2, 4, 5, 5]
    assert breaker.state(now) is BreakerState.OPEN


def test_opens_on_the_failure_rate_over_the_window() -> None:
    breaker = CircuitBreaker()
    outcomes = [False, True, False, True, False, True]  # never 3 in a row, but 50% over 6 requests
    for index, failed in enumerate(outcomes):
        (breaker.on_failure if failed else breaker.on_success)(float(index), SETTINGS)
    assert breaker.state(6.0) is BreakerState.OPEN


def test_old_outcomes_leave_the_window() -> None:
    breaker = CircuitBreaker()
    for index in range(5):
        breaker.on_failure(float(index * 20), SETTINGS)  # far apart: each alone in its window
        breaker.on_success(float(index * 20) + 1, SETTINGS)
    assert breaker.state(100.0) is BreakerState.CLOSED


def test_the_rate_window_judges_recent_traffic_only() -> None:
    settings = CircuitBreakerPolicy(consecutive_failures=100, failure_rate=0.5, window_s=10, min_requests=6,
                                    cooldown_s=2, max_cooldown_s=5)
    breaker = CircuitBreaker()
    for index in range(10_000):
        breaker.on_success(index / 1000, settings)  # 10 s of healthy traffic
    for index in range(6):
        breaker.on_failure(10.0 + index / 100, settings)  # 6 failures among ~9,000 recent successes
    assert breaker.state(10.1) is BreakerState.CLOSED
    for index in range(6):
        breaker.on_failure(30.0 + index / 100, settings)  # 20 s later the old traffic has left the window
    assert breaker.state(30.1) is BreakerState.OPEN


def test_one_teams_answered_failures_do_not_open_it_two_teams_or_a_confirmation_do() -> None:
    breaker = CircuitBreaker()
    for now in range(10):
        breaker.on_failure(float(now), SETTINGS, caller="beta")  # beta's malformed requests, answered with 500
    assert breaker.state(10.0) is BreakerState.CLOSED
    breaker.on_failure(10.0, SETTINGS, caller="alpha")
    assert breaker.state(10.0) is BreakerState.OPEN

    confirmed = CircuitBreaker()
    for now in (0.0, 0.1, 0.2):
        confirmed.on_failure(now, SETTINGS, caller="beta")
    assert confirmed.state(0.3) is BreakerState.CLOSED
    confirmed.confirm(0.3, SETTINGS)  # beta's request then succeeded on another target: the failures were ours
    assert confirmed.state(0.3) is BreakerState.OPEN


def test_a_teams_failures_outside_the_window_do_not_join_anothers() -> None:
    breaker = CircuitBreaker()
    breaker.on_failure(0.0, SETTINGS, caller="alpha")
    for now in (20.0, 20.1, 20.2):
        breaker.on_failure(now, SETTINGS, caller="beta")
    assert breaker.state(20.3) is BreakerState.CLOSED


def test_a_bad_probe_request_does_not_reopen_it() -> None:
    breaker = CircuitBreaker()
    for now in (0.0, 0.1, 0.2):
        breaker.on_failure(now, SETTINGS)  # connection errors: the target's own
    assert breaker.state(2.5) is BreakerState.HALF_OPEN
    breaker.on_attempt(2.5)
    breaker.on_failure(2.6, SETTINGS, caller="beta")  # the probe was a malformed request; the target answered
    assert breaker.state(2.6) is BreakerState.HALF_OPEN and breaker.allows(2.6)


def test_an_abandoned_probe_gives_its_slot_back() -> None:
    breaker = CircuitBreaker()
    for _ in range(3):
        breaker.on_failure(0.0, SETTINGS)
    breaker.on_attempt(2.0)
    breaker.on_abandon()
    assert breaker.allows(2.0)


@pytest.fixture
def fakes() -> Iterator[list[FakeOpenAIUpstream]]:
    with FakeOpenAIUpstream() as a, FakeOpenAIUpstream() as b:
        yield [a, b]


def _row(gateway: RunningGateway, model: str) -> dict:
    rows = httpx.get(gateway.base_url + "/admin/targets", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    return next(r for r in rows.json()["data"] if r["model"] == model)


def test_a_failing_target_is_ejected_probed_after_cooldown_and_restored(fakes, start_gateway) -> None:
    models = """
  m:
    # One team: its 500s count. The cooldown outlasts the three requests below even on a loaded machine (at
    # 0.3 s they sometimes took longer, and the probe went out among them).
    circuit_breaker: {consecutive_failures: 2, cooldown_s: 2.0, min_callers: 1}
    targets:
      - {provider: p0, model: up-0}
      - {provider: p1, model: up-1}
"""
    gateway = start_gateway(multi_policy({"p0": fakes[0].base_url, "p1": fakes[1].base_url}, models))
    client = gateway.client()
    fakes[0].script(Behaviour.error(500), Behaviour.error(500))
    for _ in range(2):
        with pytest.raises(Exception):  # noqa: B017 - no retries configured: the client sees each failure
            client.chat.completions.create(model="m", messages=chat())
    row = _row(gateway, "up-0")
    assert (row["state"], row["failures"], row["trips"]) == ("open", 2, 1)
    # Ejected: traffic goes to the second target without touching the first.
    assert {client.chat.completions.create(model="m", messages=chat()).model for _ in range(3)} == {"up-1"}
    assert fakes[0].request_count == 2

    ticker = threading.Event()
    for _ in range(400):
        if _row(gateway, "up-0")["state"] == "half_open":
            break
        ticker.wait(0.02)
    assert _row(gateway, "up-0")["state"] == "half_open"
    assert client.chat.completions.create(model="m", messages=chat()).model == "up-0"  # the probe
    assert _row(gateway, "up-0")["state"] == "closed"


def test_when_every_target_is_ejected_the_client_gets_503_with_retry_after(fakes, start_gateway) -> None:
    models = """
  m:
    circuit_breaker: {consecutive_failures: 1, cooldown_s: 30, min_callers: 1}
    targets: [{provider: p0, model: up-0}]
"""
    gateway = start_gateway(multi_policy({"p0": fakes[0].base_url}, models))
    fakes[0].script(Behaviour.error(502))
    headers = {"authorization": "Bearer sk-alpha"}
    body = {"model": "m", "messages": chat()}
    assert httpx.post(gateway.v1 + "/chat/completions", headers=headers, json=body).status_code == 502
    response = httpx.post(gateway.v1 + "/chat/completions", headers=headers, json=body)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_healthy_target"
    assert 25 <= int(response.headers["retry-after"]) <= 30
    assert fakes[0].request_count == 1


def test_health_checks_take_a_failing_provider_out_of_rotation(fakes, start_gateway) -> None:
    models = """
  m:
    targets:
      - {provider: p0, model: up-0}
      - {provider: p1, model: up-1}
"""
    check = "    health_check: {path: /health, interval_s: 0.05, unhealthy_after: 1}\n"
    text = multi_policy({"p0": fakes[0].base_url, "p1": fakes[1].base_url}, models, provider_extra=check)
    text = text.replace("path: /health", "path: /v1/missing", 1)  # p0's check gets 404s
    gateway = start_gateway(text)
    ticker = threading.Event()
    for _ in range(100):
        if not _row(gateway, "up-0")["healthy"]:
            break
        ticker.wait(0.02)
    assert _row(gateway, "up-0")["state"] == "unhealthy"
    assert _row(gateway, "up-1")["healthy"]
    assert gateway.client().chat.completions.create(model="m", messages=chat()).model == "up-1"


def _two_teams(base_url: str, models: str) -> str:
    return f"""
version: 1
server: {{reload: {{watch: false}}}}
providers:
  p0: {{kind: vllm, base_url: {base_url}, timeouts: {{connect_s: 2, first_byte_s: 5, total_s: 10}}}}
  p1: {{kind: vllm, base_url: {base_url}, timeouts: {{connect_s: 2, first_byte_s: 5, total_s: 10}}}}
models:
{models}
teams:
  alpha:
    keys: [{{id: alpha-key, hash: "{key_hash('sk-alpha')}"}}]
    models: ["*"]
  beta:
    keys: [{{id: beta-key, hash: "{key_hash('sk-beta')}"}}]
    models: ["*"]
admin:
  keys: [{{id: ops, hash: "{key_hash(ADMIN_KEY)}"}}]
"""


def test_one_teams_malformed_requests_do_not_eject_the_target_for_every_team(fakes, start_gateway) -> None:
    """The issue's reproduction: five malformed embeddings requests, answered with 500, had opened the breaker."""
    gateway = start_gateway(_two_teams(fakes[0].base_url, "  embed: {targets: [{provider: p0, model: up-embed}]}"))
    fakes[0].script(*[Behaviour.error(500, "Internal Server Error: input must not be empty")] * 5)
    for _ in range(5):
        with pytest.raises(openai.InternalServerError):
            # Well-formed to the gateway (it checks types only), refused by this upstream with a 500.
            gateway.client("sk-beta").embeddings.create(model="embed", input="x", encoding_format="bogus")  # type: ignore[arg-type]
    assert _row(gateway, "up-embed")["state"] == "closed"
    alpha = gateway.client("sk-alpha")
    for _ in range(20):
        assert len(alpha.embeddings.create(model="embed", input="valid text").data) == 1


def test_answered_failures_from_two_teams_do_eject_it(fakes, start_gateway) -> None:
    gateway = start_gateway(_two_teams(fakes[0].base_url, "  embed: {targets: [{provider: p0, model: up-embed}]}"))
    fakes[0].script(*[Behaviour.error(500)] * 6)
    for key in ("sk-beta", "sk-beta", "sk-beta", "sk-beta", "sk-alpha"):
        with pytest.raises(openai.InternalServerError):
            gateway.client(key).embeddings.create(model="embed", input="x")
    assert _row(gateway, "up-embed")["state"] == "open"
    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client("sk-alpha").embeddings.create(model="embed", input="x")
    assert caught.value.status_code == 503 and caught.value.code == "no_healthy_target"


def test_a_500_for_a_request_another_target_serves_counts_against_the_first(fakes, start_gateway) -> None:
    models = """
  m:
    retries: 1
    backoff: {initial_s: 0, max_s: 0}
    circuit_breaker: {consecutive_failures: 1, cooldown_s: 30}
    targets:
      - {provider: p0, model: up-0}
      - {provider: p1, model: up-1}
"""
    gateway = start_gateway(_two_teams(fakes[0].base_url, models))
    fakes[0].script(Behaviour.error(500))
    reply = gateway.client("sk-beta").chat.completions.with_raw_response.create(model="m", messages=chat())
    assert reply.parse().model == "up-1"
    assert reply.headers["x-switchboard-route"] == "m@p0:500,m@p1:ok"
    assert _row(gateway, "up-0")["state"] == "open"
