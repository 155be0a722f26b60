"""Scrape-time gauges for dashboards and alerts: budget sizes and periods, the state store's health."""

from __future__ import annotations

import socket
from collections.abc import Callable

import openai

from tests.conftest import ADMIN_POLICY, RunningGateway, standard_policy
from tests.fakes import FakeOpenAIUpstream
from tests.test_metrics import PRICES, scrape, value


def budgeted(upstream: FakeOpenAIUpstream, extra: str = "") -> str:
    """Team alpha with a daily USD and token budget; its key alpha-key with a rolling hourly one."""
    return standard_policy(upstream.base_url, extra=PRICES + ADMIN_POLICY + extra).replace(
        "    models: [chat-model, embed-model]\n",
        "    models: [chat-model, embed-model]\n    budget: {usd: 12.5, tokens: 900000, period: daily}\n", 1).replace(
        "      - id: alpha-key\n",
        "      - id: alpha-key\n        budget: {usd: 2, period: rolling, window_s: 3600}\n", 1)


def test_budgets_are_exported_with_their_periods(upstream: FakeOpenAIUpstream,
                                                 start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway(budgeted(upstream))
    samples = scrape(gateway)
    team = {"team": "alpha", "scope": "team", "owner": "alpha"}
    key = {"team": "alpha", "scope": "key", "owner": "alpha-key"}
    assert value(samples, "switchboard_budget_limit_usd", **team) == 12.5
    assert value(samples, "switchboard_budget_limit_tokens", **team) == 900000
    assert value(samples, "switchboard_budget_period_seconds", **team) == 86400
    assert value(samples, "switchboard_budget_limit_usd", **key) == 2
    assert value(samples, "switchboard_budget_period_seconds", **key) == 3600
    assert ("switchboard_budget_limit_tokens", frozenset(key.items())) not in samples  # no token budget there
    assert value(samples, "switchboard_state_store_up", backend="durable") == 1


def test_an_unreachable_redis_shows_as_down(upstream: FakeOpenAIUpstream,
                                            start_gateway: Callable[..., RunningGateway]) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gateway = start_gateway(budgeted(upstream, f"state: {{url: 'redis://127.0.0.1:{port}/0', timeout_s: 0.2}}\n"))
    # fail_open: the request is served while the store is down, and the gauge says so.
    reply = gateway.client().chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "x"}])
    assert reply.choices[0].message.content == "echo: x"
    assert value(scrape(gateway), "switchboard_state_store_up", backend="redis") == 0


def test_a_reachable_redis_shows_as_up(upstream: FakeOpenAIUpstream,
                                       start_gateway: Callable[..., RunningGateway]) -> None:
    prefix = f"switchboard-test-health-{socket.gethostname()}-{id(upstream)}:"
    gateway = start_gateway(budgeted(upstream, f"state: {{url: 'redis://127.0.0.1:6379/0', key_prefix: '{prefix}'}}\n"))
    try:
        gateway.client().chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "x"}])
    except openai.APIError as exc:  # pragma: no cover - a failure here is the test's answer
        raise AssertionError(exc) from exc
    assert value(scrape(gateway), "switchboard_state_store_up", backend="redis") == 1
