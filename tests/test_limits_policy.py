"""The limits, budget and state sections of the policy: strict validation with paths and lines."""

from __future__ import annotations

import pytest

from gateway.compiled.policy import PolicyError, parse_policy
from tests.test_limits_admission import policy_text


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    return caught.value.problems


def test_a_full_limits_policy_builds_runtime_rules() -> None:
    policy = parse_policy(policy_text(
        team_extra="    limits: {rpm: 10, tpd: 1000}\n    model_limits:\n      big: {tpm: 500}\n"
                   "    budget: {period: weekly, timezone: America/New_York, usd: 12.5, soft_thresholds: [0.9, 0.5]}",
        key_extra="        budget: {period: rolling, window_s: 3600, tokens: 100}",
        top_extra="state: {url: 'rediss://cache.internal:6380/2', failure_mode: fail_closed}"))
    rules = policy.rules
    assert rules is not None and rules.any
    plan = rules.plan("alpha", "alpha-key", "big")
    assert plan is not None and plan.needs_tokens and plan.needs_usd
    assert [(r.scope, r.unit, r.window_s, r.limit) for r in plan.rates] == [
        ("team", "requests", 60, 10), ("team", "tokens", 86_400, 1000), ("model", "tokens", 60, 500)]
    assert [b.scope for b in plan.budgets] == ["team", "key"]
    assert plan.budgets[0].usd_micros == 12_500_000 and plan.budgets[0].soft_thresholds == (0.5, 0.9)
    assert rules.plan("beta", "beta-key", "big") is None
    assert policy.state.failure_mode == "fail_closed"


@pytest.mark.parametrize(("team_extra", "expected"), [
    ("    budget: {tokens: 10, on_exhaust: downgrade, downgrade_to: nope}",
     "teams.alpha.budget.downgrade_to: unknown model 'nope'"),
    ("    model_limits:\n      ghost: {rpm: 1}", "teams.alpha.model_limits.ghost: unknown model 'ghost'"),
    ("    budget: {tokens: 10, timezone: Mars/Olympus}", "unknown IANA time zone 'Mars/Olympus'"),
    ("    budget: {period: rolling, tokens: 10}", "`window_s` is required with period: rolling"),
    ("    budget: {period: daily}", "set `tokens`, `usd` or both"),
    ("    budget: {tokens: 10, on_exhaust: downgrade}", "`downgrade_to` is required"),
    ("    budget: {tokens: 10, soft_thresholds: [80]}", "between 0 and 1"),
    ("    limits: {rpm: -1}", "teams.alpha.limits.rpm: Input should be greater than or equal to 0"),
    ("    limits: {rps: 5}", "teams.alpha.limits.rps: unknown field"),
])
def test_mistakes_are_reported_with_their_path(team_extra: str, expected: str) -> None:
    found = problems(policy_text(team_extra=team_extra))
    assert any(expected in problem for problem in found), found


def test_downgrade_target_must_be_usable_by_the_team() -> None:
    text = policy_text().replace("    models: [big]\n", "    models: [big]\n"
                                 "    budget: {tokens: 10, on_exhaust: downgrade, downgrade_to: small}\n")
    assert any("team 'beta' may not use model 'small'" in p for p in problems(text))


def test_state_needs_a_redis_url_for_the_redis_backend() -> None:
    assert any("backend: redis needs `url`" in p for p in problems(policy_text(top_extra="state: {backend: redis}")))
    assert any("state.url: must start with redis://" in p
               for p in problems(policy_text(top_extra="state: {url: 'http://x'}")))


@pytest.mark.parametrize(("state", "expected"), [
    ("state: {leases: {requests: 32}}", "state: `leases` saves Redis round trips: it needs backend: redis"),
    ("state: {backend: durable, url: 'redis://127.0.0.1:6379/0', leases: {}}", "it needs backend: redis"),
    ("state: {url: 'redis://127.0.0.1:6379/0', leases: {requests: 1}}",
     "state.leases.requests: Input should be greater than or equal to 2"),
    ("state: {url: 'redis://127.0.0.1:6379/0', leases: {headroom_fraction: 0.9}}",
     "state.leases.headroom_fraction: Input should be less than or equal to 0.5"),
    ("state: {url: 'redis://127.0.0.1:6379/0', leases: {idle_s: 0}}",
     "state.leases.idle_s: Input should be greater than or equal to 0.05"),
    ("state: {url: 'redis://127.0.0.1:6379/0', leases: {ttl_s: 5}}", "state.leases.ttl_s: unknown field"),
])
def test_leases_are_checked_with_their_path(state: str, expected: str) -> None:
    found = problems(policy_text(top_extra=state))
    assert any(expected in problem for problem in found), found


def test_leases_take_the_schema_defaults() -> None:
    leases = parse_policy(policy_text(top_extra="state: {url: 'redis://127.0.0.1:6379/0', leases: {}}")).state.leases
    assert leases is not None and (leases.requests, leases.headroom_fraction, leases.idle_s) == (32, 0.05, 1.0)
