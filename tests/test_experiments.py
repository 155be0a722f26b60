"""Canary and shadow traffic through a running gateway: stickiness, where the variant shows, a shadow that can
never reach the client, shadow spend, and the experiments report checked against the ledger it reads."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import re
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.accounting.ledger import _SCHEMA, Ledger
from gateway.accounting.usage import UsageRecord
from gateway.cli.experiments_report import experiments_report, wilson
from gateway.compiled.policy import PolicyError, parse_policy
from gateway.routing.experiments import canary_salt, sticky_hash
from tests.conftest import ADMIN_KEY, ADMIN_POLICY, RunningGateway, key_hash, metrics_text
from tests.fakes import FakeOpenAIUpstream
from tests.fakes.openai_upstream import Behaviour
from tests.fakes.otlp_receiver import WaitingSpanExporter
from tests.fakes.state_stores import GatewayProcess, private_redis

ROOT = Path(__file__).resolve().parents[1]
Start = Callable[..., RunningGateway]
KEYS = [(f"key-{i}", f"sk-experiment-{i}") for i in range(8)]
SEED = "t1"
MESSAGES = [{"role": "user", "content": "compare the variants"}]


@pytest.fixture(scope="module")
def lab_server() -> Iterator[FakeOpenAIUpstream]:
    """The candidates' upstream, apart from the control's so each side's traffic can be told and scripted."""
    with FakeOpenAIUpstream() as fake:
        yield fake


@pytest.fixture
def lab(lab_server: FakeOpenAIUpstream) -> Iterator[FakeOpenAIUpstream]:
    lab_server.reset()
    yield lab_server
    lab_server.reset()  # releases a hung shadow call before the next test


def policy(control: FakeOpenAIUpstream, lab: FakeOpenAIUpstream, *, canary: str | None = None,
           shadow: str | None = None, team: str = "", extra: str = "") -> str:
    """Model chat-model on `control`; its canary and shadow (YAML flow mappings) on `lab`; team alpha with KEYS."""
    experiment = ""
    if canary is not None:
        experiment += f"    canary: {canary}\n"
    if shadow is not None:
        experiment += f"    shadow: {shadow}\n"
    keys = "".join(f'      - {{id: {kid}, hash: "{key_hash(secret)}"}}\n' for kid, secret in KEYS)
    return f"""
version: 1
server:
  reload: {{watch: true, poll_interval_s: 0.05}}
providers:
  upstream:
    kind: openai_compatible
    base_url: {control.base_url}
    api_key: sk-control
    timeouts: {{connect_s: 2, first_byte_s: 30, total_s: 60}}
  lab:
    kind: openai_compatible
    base_url: {lab.base_url}
    api_key: sk-lab
    timeouts: {{connect_s: 2, first_byte_s: 30, total_s: 60}}
models:
  chat-model:
    targets: [{{provider: upstream, model: upstream-chat}}]
{experiment}  next-model:
    targets: [{{provider: lab, model: lab-next}}]
prices:
  targets:
    upstream: {{"*": {{input: 2.0, output: 8.0}}}}
    lab: {{"*": {{input: 1.0, output: 4.0}}}}
ledger: {{path: ledger.sqlite, flush_interval_s: 0.05}}
teams:
  alpha:
    keys:
{keys}    models: [chat-model]
{team}{ADMIN_POLICY}{extra}"""


CANARY = f"{{target: {{provider: lab, model: lab-canary}}, share: 0.5, seed: {SEED}}}"


def in_canary(value: str, share: float = 0.5, seed: str = SEED) -> bool:
    return sticky_hash(canary_salt("chat-model", seed), value) < int(share * 2 ** 64)


def ask(gateway: RunningGateway, secret: str, *, stream: bool = False, user: str | None = None,
        request_id: str | None = None) -> tuple[str | None, str]:
    """One chat request; the variant header and the answer's text."""
    client = gateway.client(secret, default_headers={"x-request-id": request_id} if request_id else {})
    extra = {"user": user} if user is not None else {}
    if stream:
        with client.chat.completions.with_streaming_response.create(
                model="chat-model", messages=MESSAGES, stream=True, **extra) as response:
            variant = response.headers.get("x-switchboard-variant")
            text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
        return variant, text
    raw = client.chat.completions.with_raw_response.create(model="chat-model", messages=MESSAGES, **extra)
    return raw.headers.get("x-switchboard-variant"), raw.parse().choices[0].message.content or ""


def ledger_rows(gateway: RunningGateway) -> list[sqlite3.Row]:
    ledger = gateway.policy_path.parent / "ledger.sqlite"
    deadline = time.monotonic() + 10
    while True:  # the writer commits every 50 ms; wait for it to have the rows the sink already saw
        connection = sqlite3.connect(ledger)
        connection.row_factory = sqlite3.Row
        try:
            rows = connection.execute("SELECT * FROM usage ORDER BY ts").fetchall()
        finally:
            connection.close()
        if len(rows) >= len(gateway.usage.records) or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


# --- policy ---------------------------------------------------------------------------------------------------


def test_cross_references_are_checked_with_their_paths(upstream: FakeOpenAIUpstream,
                                                       lab: FakeOpenAIUpstream) -> None:
    text = policy(upstream, lab, canary="{model: nope, share: 0.1}",
                  shadow="{target: {provider: ghost, model: x}, share: 0.1}")
    with pytest.raises(PolicyError) as raised:
        parse_policy(text)
    problems = raised.value.problems
    assert any(p.startswith("models.chat-model.canary.model: unknown model 'nope'") for p in problems), problems
    assert any(p.startswith("models.chat-model.shadow.target.provider: unknown provider 'ghost'")
               for p in problems), problems
    with pytest.raises(PolicyError, match=re.escape("models.chat-model.canary.model: a model cannot be its own")):
        parse_policy(policy(upstream, lab, canary="{model: chat-model, share: 0.1}"))
    chained = policy(upstream, lab, canary="{model: next-model, share: 0.1}").replace(
        "    targets: [{provider: lab, model: lab-next}]\n",
        "    targets: [{provider: lab, model: lab-next}]\n    shadow: {model: chat-model, share: 1}\n")
    with pytest.raises(PolicyError, match="experiments do not chain"):
        parse_policy(chained)
    for wrong, message in (("{share: 0.1}", "exactly one of `model`"),
                           ("{model: next-model, target: {provider: lab, model: x}, share: 0.1}",
                            "exactly one of `model`"),
                           ("{model: next-model, share: 1.5}", "less than or equal to 1"),
                           ("{model: next-model, share: 0.1, sticky_by: cookie}", "sticky_by"),
                           ("{model: next-model, share: 0.1, colour: red}", "unknown field")):
        with pytest.raises(PolicyError, match=re.escape(message)):
            parse_policy(policy(upstream, lab, canary=wrong))
    with pytest.raises(PolicyError, match=re.escape("shadow.max_concurrent")):
        parse_policy(policy(upstream, lab, shadow="{model: next-model, share: 0.1, max_concurrent: 0}"))


# --- canary ---------------------------------------------------------------------------------------------------


def test_assignment_shares_are_within_binomial_bounds_and_grow_monotonically() -> None:
    callers = [f"k:team-key-{i}" for i in range(20_000)]
    salt = canary_salt("chat-model", "")
    hashes = [sticky_hash(salt, c) for c in callers]
    previous: set[int] = set()
    for share in (0.01, 0.05, 0.3, 0.5):
        chosen = {i for i, h in enumerate(hashes) if h < int(share * 2 ** 64)}
        mean, sd = share * len(callers), math.sqrt(len(callers) * share * (1 - share))
        assert abs(len(chosen) - mean) < 4 * sd, (share, len(chosen))
        assert previous <= chosen  # raising the share only moves callers into the canary
        previous = chosen
    reseeded = {i for i, c in enumerate(callers) if sticky_hash(canary_salt("chat-model", "other"), c) < 2 ** 63}
    overlap = len(reseeded & previous)  # a new seed draws a new half: about a quarter are in both
    assert abs(overlap - 5000) < 4 * math.sqrt(20_000 * 0.25 * 0.75)


def test_a_key_keeps_its_variant_over_200_requests_and_the_canary_serves_it(
        upstream: FakeOpenAIUpstream, lab: FakeOpenAIUpstream, start_gateway: Start) -> None:
    canary_keys = [k for k in KEYS if in_canary("k:" + k[0])]
    control_keys = [k for k in KEYS if not in_canary("k:" + k[0])]
    assert canary_keys and control_keys  # the seed splits the 8 test keys both ways
    gateway = start_gateway(policy(upstream, lab, canary=CANARY))
    for (_, secret), expected in ((canary_keys[0], "canary"), (control_keys[0], "control")):
        seen = {ask(gateway, secret, stream=i % 10 == 0)[0] for i in range(200)}
        assert seen == {expected}
    assert lab.request_count == 200 and upstream.request_count == 200
    assert {r.json["model"] for r in lab.requests} == {"lab-canary"}


def test_end_users_are_sticky_and_the_key_decides_without_a_user(
        upstream: FakeOpenAIUpstream, lab: FakeOpenAIUpstream, start_gateway: Start) -> None:
    users = [f"user-{i}" for i in range(40)]
    expected = {u: "canary" if in_canary("u:" + u) else "control" for u in users}
    assert set(expected.values()) == {"canary", "control"}
    gateway = start_gateway(policy(upstream, lab, canary=CANARY.replace("share", "sticky_by: end_user, share")))
    secret = KEYS[0][1]
    for _ in range(3):
        for user in users:
            assert ask(gateway, secret, user=user)[0] == expected[user], user
    without = "canary" if in_canary("k:" + KEYS[0][0]) else "control"
    assert {ask(gateway, secret)[0] for _ in range(5)} == {without}


def test_an_end_user_named_by_the_teams_header_keeps_one_variant_whichever_key_or_field_they_come_with(
        upstream: FakeOpenAIUpstream, lab: FakeOpenAIUpstream, start_gateway: Start) -> None:
    """The canary's end user is the budget hierarchy's: the team's end-user header wins over the `user` field."""
    users = [f"user-{i}" for i in range(24)]
    expected = {u: "canary" if in_canary("u:" + u) else "control" for u in users}
    assert set(expected.values()) == {"canary", "control"}
    team = "    end_users: {header: x-end-user}\n"
    gateway = start_gateway(policy(upstream, lab, canary=CANARY.replace("share", "sticky_by: end_user, share"),
                                   team=team))
    for index, user in enumerate(users):
        for secret in (KEYS[index % len(KEYS)][1], KEYS[(index + 3) % len(KEYS)][1]):  # two keys, one user
            client = gateway.client(secret, default_headers={"x-end-user": user})
            for extra in ({}, {"user": "someone-else"}):  # the header names the user, not the field
                raw = client.chat.completions.with_raw_response.create(model="chat-model", messages=MESSAGES,
                                                                      **extra)
                assert raw.headers.get("x-switchboard-variant") == expected[user], (user, extra)
    rows = gateway.usage.wait_for(len(users) * 4)
    assert {(r.end_user, r.variant) for r in rows} == set(expected.items())


def test_a_canary_model_answers_with_its_own_price_and_neither_reads_nor_fills_the_cache(
        upstream: FakeOpenAIUpstream, lab: FakeOpenAIUpstream, start_gateway: Start) -> None:
    text = policy(upstream, lab, canary=f"{{model: next-model, share: 0.5, seed: {SEED}}}").replace(
        "    targets: [{provider: upstream, model: upstream-chat}]\n",
        "    targets: [{provider: upstream, model: upstream-chat}]\n    cache: {mode: exact, scope: global}\n")
    gateway = start_gateway(text)
    canary = next(s for k, s in KEYS if in_canary("k:" + k))
    control = next(s for k, s in KEYS if not in_canary("k:" + k))
    ask(gateway, control)
    ask(gateway, control)  # a hit for control
    for _ in range(3):
        assert ask(gateway, canary)[0] == "canary"  # the control answer in the cache is not the canary's
    records = gateway.usage.wait_for(5)
    assert [r.cache for r in records] == ["miss", "hit", None, None, None]
    assert [r.variant for r in records] == ["control", "control", "canary", "canary", "canary"]
    assert {r.upstream_model for r in records[2:]} == {"lab-next"} and lab.request_count == 3
    prompt, completion = records[2].usage.prompt_tokens, records[2].usage.completion_tokens  # type: ignore[union-attr]
    assert records[2].cost_usd == pytest.approx((prompt * 1.0 + completion * 4.0) / 1e6)


def test_the_variant_is_on_the_header_ledger_span_access_log_and_metrics(
        upstream: FakeOpenAIUpstream, lab: FakeOpenAIUpstream, start_gateway: Start) -> None:
    exporter = WaitingSpanExporter()
    gateway = start_gateway(policy(upstream, lab, canary=CANARY), span_exporter=exporter)
    canary = next(s for k, s in KEYS if in_canary("k:" + k))
    control = next(s for k, s in KEYS if not in_canary("k:" + k))
    assert ask(gateway, canary)[0] == "canary"
    assert ask(gateway, control, stream=True)[0] == "control"
    lab.script(Behaviour.error(500))
    with pytest.raises(openai.InternalServerError) as failed:
        ask(gateway, canary)
    assert failed.value.response.headers["x-switchboard-variant"] == "canary"  # errors say it too
    records = gateway.usage.wait_for(3)
    assert [r.variant for r in records] == ["canary", "control", "canary"]
    rows = ledger_rows(gateway)
    assert [(r["variant"], r["provider"], r["status"]) for r in rows] == [
        ("canary", "lab", 200), ("control", "upstream", 200), ("canary", None, 502)]  # the upstream's 500
    servers = [s for s in exporter.wait_for_servers(3) if s.kind.name == "SERVER"]
    assert sorted(s.attributes["switchboard.variant"] for s in servers) == ["canary", "canary", "control"]
    events = [e for s in servers for e in s.events if e.name == "switchboard.experiment"]
    assert sorted(e.attributes["switchboard.variant"] for e in events) == ["canary", "canary", "control"]
    text = metrics_text(gateway)
    assert 'switchboard_variant_requests_total{model="chat-model",status="200",variant="canary"} 1.0' in text
    assert 'switchboard_variant_requests_total{model="chat-model",status="502",variant="canary"} 1.0' in text
    assert 'switchboard_variant_errors_total{model="chat-model",variant="canary"} 1.0' in text
    assert 'switchboard_variant_time_to_first_token_seconds_count{model="chat-model",variant="control"} 1.0' in text
    assert re.search(r'switchboard_variant_cost_usd_total\{model="chat-model",variant="canary"\} [0-9.e-]+', text)


def test_a_model_without_experiments_carries_no_variant(upstream: FakeOpenAIUpstream, lab: FakeOpenAIUpstream,
                                                        start_gateway: Start) -> None:
    gateway = start_gateway(policy(upstream, lab))
    assert ask(gateway, KEYS[0][1])[0] is None
    assert gateway.usage.wait_for(1)[0].variant is None
    assert ledger_rows(gateway)[0]["variant"] is None


def test_every_experiment_setting_applies_on_reload(upstream: FakeOpenAIUpstream, lab: FakeOpenAIUpstream,
                                                    start_gateway: Start) -> None:
    gateway = start_gateway(policy(upstream, lab, canary="{target: {provider: lab, model: lab-canary}, share: 1.0}",
                                   shadow="{model: next-model, share: 1.0, stream: as_client}"))
    assert ask(gateway, KEYS[0][1], stream=True)[0] == "canary"
    gateway.usage.wait_for(2)
    assert sorted((r.json["model"], bool(r.json.get("stream"))) for r in lab.requests) == [
        ("lab-canary", True), ("lab-next", True)]
    lab.reset()
    applied = threading.Event()
    gateway.store.on_change(lambda _: applied.set())
    gateway.policy_path.write_text(policy(
        upstream, lab, canary="{model: next-model, share: 0.5, sticky_by: end_user, seed: t2}",
        shadow="{target: {provider: lab, model: lab-shadow2}, share: 1.0, max_concurrent: 1, stream: never}"))
    assert applied.wait(5), "the edited policy was not applied"
    users = [f"reloaded-{i}" for i in range(20)]
    for user in users:
        expected = "canary" if in_canary("u:" + user, seed="t2") else "control"
        assert ask(gateway, KEYS[0][1], user=user, stream=True)[0] == expected, user
    gateway.usage.wait_for(2 + 2 * len(users))
    shadows = [r.json for r in lab.requests if r.json["model"] == "lab-shadow2"]
    assert len(shadows) == len(users) and not any(body.get("stream") for body in shadows)
    canaries = sum(in_canary("u:" + u, seed="t2") for u in users)
    assert sum(r.json["model"] == "lab-next" for r in lab.requests) == canaries
    control_user = next(u for u in users if not in_canary("u:" + u, seed="t2"))
    lab.script(Behaviour.hanging())  # the next shadow call holds the only slot (max_concurrent: 1)
    ask(gateway, KEYS[0][1], user=control_user)
    ask(gateway, KEYS[0][1], user=control_user)
    assert 'switchboard_shadow_dropped_total{model="chat-model"} 1.0' in metrics_text(gateway)


# --- shadow ---------------------------------------------------------------------------------------------------

SHADOW = "{target: {provider: lab, model: lab-shadow}, share: 1.0}"


def test_a_hanging_shadow_never_delays_the_client_and_is_settled_when_released(
        upstream: FakeOpenAIUpstream, lab: FakeOpenAIUpstream, start_gateway: Start) -> None:
    gateway = start_gateway(policy(upstream, lab, shadow=SHADOW))
    secret = KEYS[0][1]
    ask(gateway, secret)  # warm up: connection pools, tokenizer
    assert gateway.usage.wait_for(2) and lab.wait_for_requests(1)
    lab.reset()
    lab.script(*[Behaviour.hanging()] * 4)
    started = time.perf_counter()
    answers = [ask(gateway, secret), ask(gateway, secret, stream=True)]
    elapsed = time.perf_counter() - started
    # Both shadow calls have reached the candidate and are hanging there: the client's answers came anyway.
    assert lab.wait_for_requests(2) and lab.pending_behaviours == 2
    assert [variant for variant, _ in answers] == ["control", "control"] and all(text for _, text in answers)
    assert elapsed < 5.0, elapsed  # normal time: the fake answers at once; the hang would last forever
    client_rows = gateway.usage.wait_for(4)[2:]
    assert [(r.variant, r.status) for r in client_rows] == [("control", 200), ("control", 200)]
    lab.release()
    shadows = sorted([r for r in gateway.usage.wait_for(6) if r.variant == "shadow"][1:], key=lambda r: r.stream)
    assert [(r.status, r.outcome, r.stream) for r in shadows] == [(200, "completed", False), (200, "completed", True)]
    assert shadows[1].time_to_first_token_ms is not None  # the streamed shadow's TTFT is measured
    assert shadows[0].duration_ms > client_rows[0].duration_ms
    assert "\nswitchboard_requests_in_flight 0.0\n" in metrics_text(gateway)  # every shadow call ended and settled


def test_a_shadow_call_is_traced_as_a_child_of_the_clients_request_and_may_be_mirrored_unstreamed(
        upstream: FakeOpenAIUpstream, lab: FakeOpenAIUpstream, start_gateway: Start) -> None:
    exporter = WaitingSpanExporter()
    gateway = start_gateway(policy(upstream, lab, shadow=SHADOW.replace("share: 1.0", "share: 1.0, stream: never")),
                            span_exporter=exporter)
    ask(gateway, KEYS[0][1], stream=True)
    records = gateway.usage.wait_for(2)  # in either order: the shadow may finish first
    assert sorted((r.variant, r.stream) for r in records) == [("control", True), ("shadow", False)]
    assert "stream" not in lab.requests[0].json and lab.requests[0].json["model"] == "lab-shadow"
    servers = {s.attributes["switchboard.variant"]: s for s in exporter.wait_for_servers(2)
               if s.kind.name == "SERVER"}
    client, shadow = servers["control"], servers["shadow"]
    assert shadow.context.trace_id == client.context.trace_id
    assert shadow.parent is not None and shadow.parent.span_id == client.context.span_id
    assert shadow.attributes["switchboard.request_id"] == client.attributes["switchboard.request_id"]


def test_front_doors_have_variants_and_a_client_that_leaves_does_not_take_the_shadow_with_it(
        upstream: FakeOpenAIUpstream, lab: FakeOpenAIUpstream, start_gateway: Start) -> None:
    gateway = start_gateway(policy(upstream, lab, canary=CANARY, shadow=SHADOW))
    canary = next(s for k, s in KEYS if in_canary("k:" + k))
    control = next(s for k, s in KEYS if not in_canary("k:" + k))
    reply = httpx.post(gateway.v1 + "/messages", headers={"x-api-key": canary, "anthropic-version": "2023-06-01"},
                       json={"model": "chat-model", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200 and reply.json()["type"] == "message"
    assert reply.headers["x-switchboard-variant"] == "canary"
    assert sorted(r.variant for r in gateway.usage.wait_for(2)) == ["canary", "shadow"]
    upstream.script(Behaviour.slow_stream(chunks=200, chunk_delay_ms=20))
    with httpx.stream("POST", gateway.v1 + "/chat/completions", headers={"authorization": f"Bearer {control}"},
                      json={"model": "chat-model", "messages": MESSAGES, "stream": True}) as response:
        assert response.headers["x-switchboard-variant"] == "control"
        next(response.iter_bytes())  # the first content, then the client goes away
    records = gateway.usage.wait_for(4)[2:]
    assert sorted((r.variant, r.outcome) for r in records) == [("control", "client_disconnected"),
                                                               ("shadow", "completed")]


@pytest.mark.parametrize("failure", [Behaviour.error(500), Behaviour.abrupt_close(), Behaviour.die_mid_stream(2)],
                         ids=["500", "connection-closed", "died-mid-stream"])
def test_a_failing_shadow_is_invisible_to_the_client(upstream: FakeOpenAIUpstream, lab: FakeOpenAIUpstream,
                                                     start_gateway: Start, failure: Behaviour) -> None:
    gateway = start_gateway(policy(upstream, lab, shadow=SHADOW))
    secret = KEYS[0][1]
    expected = ask(gateway, secret, stream=True)
    gateway.usage.wait_for(2)
    lab.script(failure)
    assert ask(gateway, secret, stream=True) == expected  # same variant, same answer as with a healthy shadow
    records = gateway.usage.wait_for(4)
    client = [r for r in records if r.variant == "control"]
    shadow = [r for r in records if r.variant == "shadow"]
    assert [(r.status, r.outcome) for r in client] == [(200, "completed"), (200, "completed")]
    assert shadow[1].status >= 500 or shadow[1].outcome != "completed"
    assert upstream.request_count == 2  # no fallback to control, no retry the client could notice
    assert 'switchboard_variant_errors_total{model="chat-model",variant="shadow"} 1.0' in metrics_text(gateway)


def test_a_saturated_shadow_drops_and_counts_instead_of_queueing(
        upstream: FakeOpenAIUpstream, lab: FakeOpenAIUpstream, start_gateway: Start) -> None:
    gateway = start_gateway(policy(upstream, lab, shadow=SHADOW.replace("share: 1.0", "share: 1.0, max_concurrent: 1")))
    lab.script(Behaviour.hanging())
    secret = KEYS[0][1]
    for _ in range(3):
        ask(gateway, secret)
    assert lab.wait_for_requests(1)
    assert [r.variant for r in gateway.usage.wait_for(3)] == ["control"] * 3
    assert 'switchboard_shadow_dropped_total{model="chat-model"} 2.0' in metrics_text(gateway)
    lab.release()
    gateway.usage.wait_for(4)
    ask(gateway, secret)  # the slot is free again: mirrored
    assert [r.variant for r in gateway.usage.wait_for(6)].count("shadow") == 2


def test_a_shadow_running_at_shutdown_is_settled(upstream: FakeOpenAIUpstream, lab: FakeOpenAIUpstream,
                                                 start_gateway: Start) -> None:
    gateway = start_gateway(policy(upstream, lab, shadow=SHADOW))
    lab.script(Behaviour.hanging())
    ask(gateway, KEYS[0][1])
    assert lab.wait_for_requests(1)
    gateway.stop()
    records = gateway.usage.wait_for(2)
    assert [(r.variant, r.outcome) for r in records] == [("control", "completed"),
                                                         ("shadow", "client_disconnected")]


def test_shadow_spend_is_the_teams_on_the_ledger_and_admin_usage_and_outside_its_budget(
        upstream: FakeOpenAIUpstream, lab: FakeOpenAIUpstream, start_gateway: Start) -> None:
    gateway = start_gateway(policy(upstream, lab, shadow=SHADOW, team="    budget: {usd: 1.0, tokens: 100000}\n"))
    secrets = [s for _, s in KEYS[:3]]
    for i in range(9):
        if i == 1:  # the first mirror has reached the candidate: the next, streamed, comes without usage
            assert lab.wait_for_requests(1)
            lab.script(Behaviour(no_usage=True))
        ask(gateway, secrets[i % 3], stream=i % 2 == 1)
    records = gateway.usage.wait_for(18)
    rows = ledger_rows(gateway)
    assert [(r["stream"], r["usage_estimated"]) for r in rows if r["variant"] == "shadow"].count((1, 1)) == 1
    assert len(rows) == 18 and len({r["gateway_id"] for r in rows}) == 18
    shadow_rows = [r for r in rows if r["variant"] == "shadow"]
    client_rows = [r for r in rows if r["variant"] != "shadow"]
    assert len(shadow_rows) == 9 and {r["provider"] for r in shadow_rows} == {"lab"}
    # Each shadow row keeps its client's request id: the two can be joined.
    assert sorted(r["request_id"] for r in shadow_rows) == sorted(r["request_id"] for r in client_rows)
    response = httpx.get(gateway.base_url + "/admin/usage", params={"team": "alpha"},
                         headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    report = response.json()
    budget = {r["unit"]: r["used"] for r in report["usage"] if r["scope"] == "team"}
    micros = sum(math.ceil(r["cost_usd"] * 1e6) for r in client_rows)
    assert budget["usd"] == pytest.approx(micros / 1e6)  # the budget holds the clients' spend, no shadow in it
    assert budget["tokens"] == sum(r.usage.total_tokens for r in records if r.variant == "control")  # type: ignore[union-attr]
    spend = report["shadow_spend"]
    assert spend["calls"] == 9
    assert spend["usd"] == pytest.approx(sum(math.ceil(r["cost_usd"] * 1e6) for r in shadow_rows) / 1e6)
    assert spend["tokens"] == sum(r["prompt_tokens"] + r["completion_tokens"] for r in shadow_rows)
    previous = httpx.get(gateway.base_url + "/admin/usage", params={"team": "alpha", "period": "previous"},
                         headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()["shadow_spend"]
    assert previous["calls"] == 0


# --- the ledger column and the report ---------------------------------------------------------------------------


def test_an_older_ledger_gets_the_variant_column_on_open(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    connection = sqlite3.connect(path)
    connection.executescript(_SCHEMA.replace(",\n    variant TEXT", ""))
    connection.close()
    ledger = Ledger(path, flush_interval_s=0.01)
    ledger.record(UsageRecord(request_id="r", team="alpha", key_id="k", endpoint="chat", public_model="m",
                              provider="p", upstream_model="u", stream=False, status=200, usage=None,
                              duration_ms=1.0, overhead_ms=0.1, variant="canary"))
    assert ledger.flush()
    ledger.close()
    connection = sqlite3.connect(path)
    assert connection.execute("SELECT variant FROM usage").fetchall() == [("canary",)]
    connection.close()


def test_wilson_intervals_match_published_values() -> None:
    # Newcombe (1998), table I: 81/263 -> 0.2553 to 0.3662; 0/10 -> 0 to 0.2775.
    low, high = wilson(81, 263)  # type: ignore[misc]
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    assert wilson(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))


def test_the_report_matches_the_ledger_built_by_real_requests(
        upstream: FakeOpenAIUpstream, lab: FakeOpenAIUpstream, start_gateway: Start) -> None:
    gateway = start_gateway(policy(upstream, lab, canary=CANARY, shadow=SHADOW))
    canary = [s for k, s in KEYS if in_canary("k:" + k)]
    control = [s for k, s in KEYS if not in_canary("k:" + k)]
    lab.script(*[Behaviour.error(503, path="/v1/chat/completions")] * 2)
    upstream.script(Behaviour.error(500))
    sent = 0
    for i in range(24):
        for group in (canary, control):
            with contextlib.suppress(openai.APIStatusError):  # the scripted failures: counted as errors
                ask(gateway, group[i % len(group)], stream=i % 3 == 0)
            sent += 1
    records = gateway.usage.wait_for(2 * sent)  # every request mirrored once (share 1.0), each settled
    rows = ledger_rows(gateway)
    assert len(rows) == 2 * sent
    report = experiments_report(gateway.policy_path.parent / "ledger.sqlite", model="chat-model")
    (entry,) = report["models"]
    variants = entry["variants"]
    assert set(variants) <= {"control", "canary", "shadow"} and {"control", "canary"} <= set(variants)
    for name, figures in variants.items():
        mine = [r for r in rows if r["variant"] == name]
        ok = [r for r in mine if r["status"] < 400 and r["outcome"] == "completed"]
        assert figures["requests"] == len(mine)
        assert figures["error_rate"]["value"] == pytest.approx(1 - len(ok) / len(mine))
        low, high = figures["error_rate"]["ci"]
        assert (low, high) == pytest.approx(wilson(len(mine) - len(ok), len(mine)))
        latency = [r["duration_ms"] for r in ok]
        assert figures["latency_ms_mean"]["value"] == pytest.approx(statistics.fmean(latency))
        half = 1.959963984540054 * statistics.stdev(latency) / math.sqrt(len(latency))
        assert figures["latency_ms_mean"]["ci"] == pytest.approx([statistics.fmean(latency) - half,
                                                                  statistics.fmean(latency) + half])
        ordered = sorted(latency)
        assert figures["latency_ms_p50"]["value"] == ordered[math.ceil(0.5 * len(ordered)) - 1]
        assert figures["latency_ms_p95"]["value"] == ordered[math.ceil(0.95 * len(ordered)) - 1]
        for figure in ("latency_ms_p50", "latency_ms_p95", "ttft_ms_p50"):
            value, (low, high) = variants[name][figure]["value"], variants[name][figure]["ci"]
            assert low <= value <= high
        ttft = [r["ttft_ms"] for r in ok if r["ttft_ms"] is not None]
        assert figures["ttft_ms_mean"]["value"] == pytest.approx(statistics.fmean(ttft))
        assert figures["cost_usd_per_request"]["value"] == pytest.approx(statistics.fmean(r["cost_usd"] for r in ok))
        assert figures["output_tokens_per_request"]["value"] == pytest.approx(
            statistics.fmean(r["completion_tokens"] for r in ok))
    diff = variants["canary"]["cost_usd_per_request_diff"]
    assert diff["value"] == pytest.approx(variants["canary"]["cost_usd_per_request"]["value"]
                                          - variants["control"]["cost_usd_per_request"]["value"])
    assert diff["ci"][1] < 0  # the canary's upstream is priced at half: cheaper, and the interval says so
    rate_diff = variants["canary"]["error_rate_diff"]
    assert rate_diff["ci"][0] <= rate_diff["value"] <= rate_diff["ci"][1]
    assert sum(1 for r in records if r.variant == "shadow") == variants["shadow"]["requests"] == sent
    # The same ledger gives the same report, through the CLI too.
    cli = subprocess.run([sys.executable, "-m", "gateway", "experiments", "report", "--ledger",
                          str(gateway.policy_path.parent / "ledger.sqlite"), "--model", "chat-model", "--format",
                          "json"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["models"] == json.loads(json.dumps(report["models"]))
    table = subprocess.run([sys.executable, "-m", "gateway", "experiments", "report", "--ledger",
                            str(gateway.policy_path.parent / "ledger.sqlite")], capture_output=True, text=True,
                           cwd=ROOT, timeout=60)
    assert "canary - control" in table.stdout and "error_rate" in table.stdout


# --- three replicas ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # three gateway processes loading tiktoken: ~30-60 s on a busy 2-core machine
def test_three_replicas_agree_on_every_callers_variant_and_ledger_every_request_once(
        tmp_path: Path, upstream: FakeOpenAIUpstream, lab: FakeOpenAIUpstream) -> None:
    with private_redis(tmp_path) as redis_server:
        text = policy(upstream, lab, canary=CANARY, shadow=SHADOW,
                      team="    limits: {rpm: 100000}\n    budget: {usd: 100}\n",
                      extra=f"state: {{url: '{redis_server.url}', timeout_s: 5}}\n")
        path = tmp_path / "replicas.yaml"
        path.write_text(text)
        gateways = [GatewayProcess(path, tmp_path / f"gateway-{i}.log") for i in range(3)]
        try:
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                list(pool.map(lambda g: g.start(timeout=120), gateways))

            def one(job: tuple[int, int]) -> tuple[str, str, str]:
                key, number = job
                replica = gateways[number % 3]
                client = openai.OpenAI(base_url=replica.base_url + "/v1", api_key=KEYS[key][1], max_retries=0)
                request_id = f"req-{key}-{number}"
                raw = client.chat.completions.with_raw_response.create(
                    model="chat-model", messages=MESSAGES, extra_headers={"x-request-id": request_id})
                return KEYS[key][0], raw.headers["x-switchboard-variant"], request_id

            jobs = [(key, number) for key in range(len(KEYS)) for number in range(12)]
            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                answers = list(pool.map(one, jobs))
            variants: dict[str, set[str]] = {}
            for key_id, variant, _ in answers:
                variants.setdefault(key_id, set()).add(variant)
            assert variants == {k: {"canary" if in_canary("k:" + k) else "control"} for k, _ in KEYS}
            # Every shadow call has reached the candidate before the replicas are stopped (and flush their rows).
            assert lab.wait_for_requests(len(jobs) + sum(in_canary("k:" + k) for k, _ in KEYS) * 12, timeout=30)
        finally:
            for gateway in gateways:
                gateway.terminate()
        connection = sqlite3.connect(tmp_path / "ledger.sqlite")
        rows = connection.execute("SELECT request_id, variant, gateway_id, key_id, cost_usd FROM usage").fetchall()
        connection.close()
        usage = subprocess.run([sys.executable, "-m", "gateway", "usage", "--policy", str(path), "--team", "alpha"],
                               capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert usage.returncode == 0, usage.stderr
        report = json.loads(usage.stdout)
        served = [(r[0], r[1]) for r in rows if r[1] != "shadow"]
        assert sorted(request_id for request_id, _ in served) == sorted(a[2] for a in answers)
        assert dict(served) == {a[2]: a[1] for a in answers}
        mirrored = sorted(r[0] for r in rows if r[1] == "shadow")
        assert mirrored == sorted(a[2] for a in answers)  # share 1.0: each request mirrored once, ledgered once
        assert len({r[2] for r in rows}) == len(rows) == 2 * len(jobs)
        # In Redis, shared by the three: the budget holds exactly the clients' rows, the shadow spend the rest.
        budget = next(r for r in report["usage"] if r["scope"] == "team" and r["unit"] == "usd")
        clients_micros = sum(math.ceil(r[4] * 1e6) for r in rows if r[1] != "shadow")  # all priced
        shadow_micros = sum(math.ceil((r[4] or 0) * 1e6) for r in rows if r[1] == "shadow")  # none if cut at exit
        assert round(budget["used"] * 1e6) == clients_micros
        assert report["shadow_spend"]["calls"] == len(jobs)
        assert round(report["shadow_spend"]["usd"] * 1e6) == shadow_micros


def test_the_report_finds_known_effects_on_a_synthetic_ledger(tmp_path: Path) -> None:
    """Lognormal latencies (the canary's 5% faster) and error rates 1% against 3%: the differences' intervals
    exclude zero on the right side, and the same ledger gives the same report (a fixed seed)."""
    import random

    from gateway.accounting.ledger import _row, insert_rows, open_ledger
    from providers.base import Usage

    rng = random.Random(7)
    truth = {"control": (6.0, 0.01), "canary": (5.95, 0.03)}
    rows = []
    for i in range(30_000):
        variant = "canary" if i % 5 == 0 else "control"
        mu, error_rate = truth[variant]
        record = UsageRecord(request_id=str(i), gateway_id=f"g{i}", team="t", key_id="k", endpoint="chat",
                             public_model="chat", provider="p", upstream_model="u", stream=False,
                             status=502 if rng.random() < error_rate else 200,
                             usage=Usage(prompt_tokens=100, completion_tokens=50),
                             duration_ms=rng.lognormvariate(mu, 0.5), overhead_ms=0.1, cost_usd=1e-4, variant=variant)
        rows.append(_row(record, 1_800_000_000 + i))
    connection = open_ledger(tmp_path / "synthetic.sqlite")
    with connection:
        insert_rows(connection, rows)
    connection.close()
    report = experiments_report(tmp_path / "synthetic.sqlite")
    canary = report["models"][0]["variants"]["canary"]
    assert canary["requests"] == 6000
    for figure in ("latency_ms_p50_diff", "latency_ms_p95_diff", "latency_ms_mean_diff"):
        assert canary[figure]["ci"][1] < 0, figure  # faster, and the interval says so
    assert canary["error_rate_diff"]["ci"][0] > 0
    assert canary["cost_usd_per_request_diff"]["value"] == pytest.approx(0, abs=1e-12)
    assert experiments_report(tmp_path / "synthetic.sqlite") == report


def test_the_intervals_cover_the_truth_about_95_percent_of_the_time() -> None:
    """Calibration over 300 seeded replications: each interval kind holds the true value in 90-99% of them."""
    import random

    from gateway.cli.experiments_report import _mean, _mean_diff, _quantile, _quantile_diff, _quantile_draws, _rate_diff

    rng = random.Random(11)
    held = {"p50": 0, "p95": 0, "mean": 0, "wilson": 0, "p50_diff": 0, "mean_diff": 0, "rate_diff": 0}
    replications = 300
    for _ in range(replications):
        a = sorted(rng.lognormvariate(6.0, 0.5) for _ in range(400))
        b = sorted(rng.lognormvariate(5.9, 0.5) for _ in range(300))
        errors_a = sum(rng.random() < 0.05 for _ in range(400))
        errors_b = sum(rng.random() < 0.08 for _ in range(300))
        draws_a50, draws_b50 = _quantile_draws(a, 0.5, rng), _quantile_draws(b, 0.5, rng)
        checks = {
            "p50": (_quantile(a, 0.5, draws_a50), math.exp(6.0)),
            "p95": (_quantile(a, 0.95, _quantile_draws(a, 0.95, rng)), math.exp(6.0 + 1.6448536 * 0.5)),
            "mean": (_mean(a), math.exp(6.0 + 0.125)),
            "wilson": ({"ci": wilson(errors_a, 400)}, 0.05),
            "p50_diff": (_quantile_diff(b, a, 0.5, draws_b50, draws_a50), math.exp(5.9) - math.exp(6.0)),
            "mean_diff": (_mean_diff(b, a), math.exp(5.9 + 0.125) - math.exp(6.0 + 0.125)),
            "rate_diff": (_rate_diff(errors_b, 300, errors_a, 400), 0.03),
        }
        for name, (figure, true) in checks.items():
            low, high = figure["ci"]  # type: ignore[index]
            held[name] += low <= true <= high
    coverage = {name: count / replications for name, count in held.items()}
    assert all(0.90 <= share <= 0.99 for share in coverage.values()), coverage


def test_policy_explain_says_what_the_experiments_do() -> None:
    result = subprocess.run([sys.executable, "-m", "gateway", "policy", "explain",
                             str(ROOT / "policies" / "examples" / "experiments.yaml"), "--model", "chat"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "canary: 5% of end users (the end-user header or `user` field; the key without one), sticky, served " \
           "by target lab/gpt-4.1-mini" in result.stdout
    assert "shadow: 10% of requests mirrored (streamed like the client's) to model chat-next, at most 8 at once " \
           "per process" in result.stdout
