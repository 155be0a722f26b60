"""Shadow rules through a running gateway: counted, traced and reported as if enforced, never refusing."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from opentelemetry.trace import SpanKind

from gateway.compiled.policy import PolicyError, parse_policy
from tests.conftest import ADMIN_KEY, ADMIN_POLICY, RunningGateway, metrics_text, standard_policy
from tests.fakes import FakeOpenAIUpstream
from tests.fakes.otlp_receiver import WaitingSpanExporter
from tests.fakes.state_stores import SHARED_REDIS, drop_prefix, shared_redis_available, unique_prefix

ALPHA_MODELS = "    models: [chat-model, embed-model]\n"
ALPHA_KEY = "        hash: \"sha256:"
HEADER = "x-switchboard-shadow-reject"
Start = Callable[..., RunningGateway]


@pytest.fixture(params=["durable", "redis"])
def state(request: pytest.FixtureRequest) -> Iterator[str]:
    """The `state:` block: the embedded store of one process, or the shared Redis under a prefix of this test."""
    if request.param == "durable":
        yield ""
        return
    if not shared_redis_available():
        pytest.fail("no Redis on 127.0.0.1:6379 (make test starts one)")
    prefix = unique_prefix()
    yield f"state: {{url: '{SHARED_REDIS}', key_prefix: '{prefix}'}}\n"
    drop_prefix(SHARED_REDIS, prefix)


def policy(upstream: FakeOpenAIUpstream, team_lines: str, key_lines: str = "", state: str = "") -> str:
    """The standard policy with `team_lines` added to team alpha and `key_lines` to its key."""
    text = standard_policy(upstream.base_url, extra=ADMIN_POLICY + state)
    text = text.replace(ALPHA_MODELS, ALPHA_MODELS + team_lines, 1)
    if key_lines:
        key_line = next(line for line in text.splitlines(keepends=True) if line.startswith(ALPHA_KEY))
        text = text.replace(key_line, key_line + key_lines, 1)
    return text


def fresh_minute(needed_s: float = 15) -> None:
    """Start an rpm test with `needed_s` left in the clock minute, so its requests share one window."""
    left = 60 - time.time() % 60
    if left < needed_s:
        time.sleep(left + 0.05)  # not synchronisation: skipping a window boundary the test must not straddle


def ask(gateway: RunningGateway, content: str = "hi there") -> httpx.Headers:
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="chat-model", messages=[{"role": "user", "content": content}], max_tokens=5)
    assert raw.parse().choices[0].message.content
    return raw.headers


def usage_rows(gateway: RunningGateway) -> dict[tuple[str, str, str], dict]:  # type: ignore[type-arg]
    response = httpx.get(gateway.base_url + "/admin/usage", params={"team": "alpha"},
                         headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    return {(r["scope"], r["limit_type"], r["unit"]): r for r in response.json()["usage"]}


def shadow_rejections(gateway: RunningGateway, rule: str, scope: str = "team") -> float:
    pattern = (rf'^switchboard_shadow_rejections_total\{{rule="{rule}",scope="{scope}",team="alpha"\}} '
               r"([0-9.e+]+)$")
    found = re.search(pattern, metrics_text(gateway), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_a_shadow_rpm_limit_lets_the_third_request_through_and_reports_it(
        upstream: FakeOpenAIUpstream, start_gateway: Start, state: str) -> None:
    gateway = start_gateway(policy(upstream, "    limits: {rpm: 2, mode: shadow}\n", state=state))
    fresh_minute()
    first, second, third = ask(gateway), ask(gateway), ask(gateway)
    assert HEADER not in first and HEADER not in second
    assert third[HEADER] == "team:rpm"
    # A shadow limit must not make clients back off: it is not in OpenAI's rate-limit headers.
    assert not any(name.startswith("x-ratelimit-") for name in third)
    assert upstream.request_count == 3
    gateway.usage.wait_for(3)
    row = usage_rows(gateway)[("team", "requests per minute", "requests")]
    assert row["mode"] == "shadow" and row["limit"] == 2
    # Counted as enforcement would have counted: the third request was served, but it is not in `used`.
    assert row["used"] == 2 and row["would_reject"] == 1
    assert shadow_rejections(gateway, "rpm") == 1
    assert ask(gateway)[HEADER] == "team:rpm"
    row = usage_rows(gateway)[("team", "requests per minute", "requests")]
    assert (row["used"], row["would_reject"]) == (2, 2)


def test_a_shadow_budget_serves_what_it_would_refuse_and_reports_it(
        upstream: FakeOpenAIUpstream, start_gateway: Start, state: str) -> None:
    gateway = start_gateway(policy(upstream, "    budget: {tokens: 30, period: daily, mode: shadow}\n", state=state))
    assert HEADER not in ask(gateway)
    (first,) = gateway.usage.wait_for(1)
    served = ask(gateway, "x " * 40)  # an enforced 30-token budget refuses this (tests/test_limits_gateway.py)
    assert served[HEADER] == "team:budget_tokens"
    gateway.usage.wait_for(2)
    assert upstream.request_count == 2
    row = usage_rows(gateway)[("team", "daily budget", "tokens")]
    assert row["mode"] == "shadow" and row["on_exhaust"] == "reject"
    # The budget holds what enforcement would have let through: only the first request's tokens.
    assert row["used"] == first.usage.total_tokens < 30 and row["would_reject"] == 1  # type: ignore[union-attr]
    assert shadow_rejections(gateway, "budget_tokens") == 1
    assert HEADER not in ask(gateway)  # a small request still fits, as it would under enforcement
    assert usage_rows(gateway)[("team", "daily budget", "tokens")]["would_reject"] == 1


def test_an_enforced_rule_beside_a_shadow_one_still_refuses(
        upstream: FakeOpenAIUpstream, start_gateway: Start, state: str) -> None:
    gateway = start_gateway(policy(upstream, "    limits: {rpm: 1, mode: shadow}\n"
                                             "    budget: {tokens: 1, mode: shadow}\n",
                                   key_lines="        limits: {rpm: 2}\n", state=state))
    fresh_minute()
    assert ask(gateway)[HEADER] == "team:budget_tokens"
    assert ask(gateway)[HEADER] == "team:rpm, team:budget_tokens"
    with pytest.raises(openai.RateLimitError) as refused:
        ask(gateway)
    assert refused.value.code == "rate_limit_exceeded"
    assert "key alpha-key (team alpha)" in refused.value.message and "limit 2, used 2" in refused.value.message
    # The enforced key limit is the one in OpenAI's headers.
    assert refused.value.response.headers["x-ratelimit-limit-requests"] == "2"
    assert upstream.request_count == 2
    gateway.usage.wait_for(3)
    rows = usage_rows(gateway)
    # The shadow limit counts the first request only: it would have refused the second, and the enforced
    # rule refused the third, so no rule counted it.
    assert rows[("team", "requests per minute", "requests")]["used"] == 1
    assert rows[("team", "requests per minute", "requests")]["would_reject"] == 1
    assert rows[("key", "requests per minute", "requests")]["used"] == 2
    assert rows[("key", "requests per minute", "requests")]["mode"] == "enforce"
    assert "would_reject" not in rows[("key", "requests per minute", "requests")]


def test_shadow_refusals_are_traced_naming_the_rule(
        upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    exporter = WaitingSpanExporter()
    gateway = start_gateway(policy(upstream, "    limits: {rpm: 1, mode: shadow}\n"), span_exporter=exporter)
    fresh_minute()
    ask(gateway)
    ask(gateway)
    spans = sorted((s for s in exporter.wait_for_servers(2) if s.kind is SpanKind.SERVER),
                   key=lambda s: s.start_time or 0)
    shadows = [[dict(e.attributes or {}) for e in span.events if e.name == "switchboard.shadow"] for span in spans]
    assert shadows[0] == []
    (event,) = shadows[1]
    assert event["switchboard.shadow.verdict"] == "would_reject"
    assert event["switchboard.shadow.rules"] == ("team alpha: requests per minute (shadow)",)
    assert event["switchboard.shadow.limits"] == (1.0,) and event["switchboard.shadow.used"] == (1.0,)
    (admission,) = [dict(e.attributes or {}) for e in spans[1].events if e.name == "switchboard.admission"]
    assert admission["switchboard.admission.verdict"] == "admitted"


def test_the_shadow_header_can_be_turned_off(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    text = policy(upstream, "    limits: {rpm: 1, mode: shadow}\n") + "admission: {shadow_reject_header: false}\n"
    gateway = start_gateway(text)
    fresh_minute()
    ask(gateway)
    assert HEADER not in ask(gateway)
    assert shadow_rejections(gateway, "rpm") == 1  # still counted for the operator


def test_other_teams_never_see_a_shadow_header(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    gateway = start_gateway(policy(upstream, "    limits: {rpm: 1, mode: shadow}\n"))
    fresh_minute()
    ask(gateway)
    ask(gateway)
    beta = gateway.client("sk-beta").chat.completions.with_raw_response.create(
        model="beta-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert HEADER not in beta.headers


def test_plans_know_at_load_whether_anything_is_in_shadow_mode(upstream: FakeOpenAIUpstream) -> None:
    enforced = parse_policy(policy(upstream, "    limits: {rpm: 1}\n    budget: {tokens: 10}\n"))
    shadowed = parse_policy(policy(upstream, "    limits: {rpm: 1}\n    budget: {tokens: 10, mode: shadow}\n"))
    for loaded, expected in ((enforced, False), (shadowed, True)):
        assert loaded.rules is not None
        plan = loaded.rules.plan("alpha", "alpha-key", "chat-model")
        assert plan is not None and plan.shadowed is expected


@pytest.mark.parametrize(("lines", "message"), [
    ("    limits: {rpm: 1, mode: dry-run}\n", "teams.alpha.limits.mode: Input should be 'enforce' or 'shadow'"),
    ("    budget: {tokens: 10, mode: shadow, hard_stop_streams: true}\n",
     "teams.alpha.budget: `hard_stop_streams` needs mode: enforce"),
])
def test_invalid_modes_are_refused_with_their_path(upstream: FakeOpenAIUpstream, lines: str, message: str,
                                                   tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(policy(upstream, lines))
    assert any(problem.startswith(message) for problem in caught.value.problems), caught.value.problems


def test_model_and_key_shadow_limits_are_named_by_scope_on_streams_too(
        upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    gateway = start_gateway(policy(upstream, "    model_limits:\n      chat-model: {rpm: 1, mode: shadow}\n",
                                   key_lines="        limits: {tpm: 1, mode: shadow}\n"))
    fresh_minute()
    assert ask(gateway)[HEADER] == "key:tpm"
    with gateway.client().chat.completions.with_streaming_response.create(
            model="chat-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True) as stream:
        assert stream.headers[HEADER] == "key:tpm, model:rpm"
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream.parse() if chunk.choices)
    assert shadow_rejections(gateway, "rpm", scope="model") == 1
    assert shadow_rejections(gateway, "tpm", scope="key") == 2
