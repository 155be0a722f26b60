"""The budget hierarchy (accounting/hierarchy.py): organisation -> team -> end user -> key, through a running gateway.

Each level refuses on its own and the most restrictive wins; end users are bounded per team (a hostile tenant's
10,000 ids fold into one `other` bucket, with bounded Redis keys and metric labels); every level is in the
response headers, /admin/usage and the ledger; shadow mode, downgrade, calendar windows in an IANA zone and
rolling windows work on the new levels; and three replicas sharing Redis hold an organisation budget together.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import json
import re
import sqlite3
import subprocess
import sys
import threading
import time
import zoneinfo
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from gateway.accounting.ledger import _SCHEMA, Ledger
from gateway.accounting.limits import Limiter
from gateway.accounting.spend import spend
from gateway.accounting.usage import UsageRecord
from gateway.compiled.policy import PolicyError, parse_policy
from gateway.state.memory import MemoryStore
from gateway.tokens.counter import TokenCounter
from providers.base import Usage
from tests.conftest import ADMIN_KEY, RunningGateway, key_hash, metrics_text, standard_policy
from tests.fakes import Behaviour, FakeOpenAIUpstream
from tests.fakes.state_stores import (
    SHARED_REDIS,
    FakeClock,
    GatewayProcess,
    drop_prefix,
    private_redis,
    shared_redis_available,
    unique_prefix,
)

ALPHA = "    models: [chat-model, embed-model, cheap-model]\n"
BETA = "    models: [beta-model]\n"
CHEAP_MODEL = "  cheap-model:\n    targets:\n      - provider: upstream\n        model: upstream-cheap\n"


def policy(upstream: FakeOpenAIUpstream, *, alpha: str = "", beta: str = "", organizations: str = "",
           extra: str = "") -> str:
    """The standard two-team policy with an admin key, a cheap model for alpha, and the given lines added."""
    admin = f"admin:\n  keys:\n    - id: ops\n      hash: \"{key_hash(ADMIN_KEY)}\"\n"
    text = standard_policy(upstream.base_url, extra=admin + organizations + extra)
    text = text.replace("models:\n  chat-model:\n", "models:\n" + CHEAP_MODEL + "  chat-model:\n", 1)
    text = text.replace("    models: [chat-model, embed-model]\n", ALPHA + alpha, 1)
    return text.replace(BETA, BETA + beta, 1)


def org(budget: str, teams: str = "[alpha, beta]") -> str:
    return f"organizations:\n  acme:\n    teams: {teams}\n    budget: {budget}\n"


def users(budget: str, *, max_tracked: int = 1000, header: str | None = None, required: bool = False) -> str:
    lines = f"    end_users:\n      max_tracked: {max_tracked}\n      required: {str(required).lower()}\n"
    if header:
        lines += f"      header: {header}\n"
    return lines + f"      budget: {budget}\n"


def with_key_budget(text: str, budget: str) -> str:
    """Give alpha's key a budget (its key entry is the standard policy's)."""
    entry = f"      - id: alpha-key\n        hash: \"{key_hash('sk-alpha')}\"\n"
    assert entry in text
    return text.replace(entry, entry + f"        budget: {budget}\n", 1)


def ask(gateway: RunningGateway, key: str = "sk-alpha", user: str | None = None, model: str = "chat-model",
        headers: dict[str, str] | None = None, content: str = "hi there") -> httpx.Response:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 5}
    if user is not None:
        body["user"] = user
    return httpx.post(gateway.v1 + "/chat/completions", json=body,
                      headers={"authorization": f"Bearer {key}", **(headers or {})}, timeout=10)


def usage_report(gateway: RunningGateway, team: str = "alpha", **params: str) -> dict[str, Any]:
    response = httpx.get(gateway.base_url + "/admin/usage", params={"team": team, **params},
                         headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def rows_by_scope(report: dict[str, Any], unit: str = "tokens") -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["scope"], r["owner"]): r for r in report["usage"] if r["unit"] == unit and "budget" in r["limit_type"]}


def spend_until_refused(gateway: RunningGateway, limit: int = 50, **kwargs: Any) -> httpx.Response:
    for _ in range(limit):
        response = ask(gateway, **kwargs)
        if response.status_code != 200:
            return response
    raise AssertionError("never refused")


def assert_budget_refusal(response: httpx.Response, who: str) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "budget_exceeded" and error["type"] == "insufficient_quota", error
    assert f"Budget exceeded for {who}:" in error["message"], error["message"]
    assert response.headers["x-should-retry"] == "false"


# --- policy validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(("yaml_text", "problem"), [
    ("organizations: {acme: {teams: [alpha, nobody], budget: {tokens: 5}}}",
     "organizations.acme.teams.1: unknown team 'nobody'; defined: alpha, beta"),
    ("organizations: {acme: {teams: [alpha]}, globex: {teams: [beta, alpha]}}",
     "organizations.globex.teams.1: team 'alpha' is already listed in organisation 'acme'; a team belongs to at "
     "most one organisation"),
    ("organizations: {acme: {teams: [alpha, alpha]}}",
     "organizations.acme.teams.1: team 'alpha' is already listed in this organisation"),
    ("organizations: {acme: {teams: []}}", "organizations.acme.teams: List should have at least 1 item"),
    ("organizations: {'bad name': {teams: [alpha]}}", "organizations.bad name"),
    ("organizations: {acme: {teams: [alpha, beta], budget: {tokens: 5, on_exhaust: downgrade, "
     "downgrade_to: chat-model}}}",
     "organizations.acme.budget.downgrade_to: team 'beta' may not use model 'chat-model'; add it to "
     "teams.beta.models"),
    ("organizations: {acme: {teams: [alpha], budget: {tokens: 5, notify: [pager]}}}",
     "organizations.acme.budget.notify.0: unknown webhook 'pager'"),
])
def test_organisations_are_validated_with_precise_messages(upstream: FakeOpenAIUpstream, yaml_text: str,
                                                           problem: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(policy(upstream, organizations=yaml_text + "\n"))
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


@pytest.mark.parametrize(("lines", "problem"), [
    ("    end_users: {header: authorization}\n",
     "teams.alpha.end_users.header: authorization carries the API key"),
    ("    end_users: {max_tracked: 0}\n", "teams.alpha.end_users.max_tracked: Input should be greater than or equal"),
    ("    end_users: {header: 'x end user'}\n", "teams.alpha.end_users.header: String should match pattern"),
    ("    end_users: {budget: {tokens: 5, on_exhaust: downgrade, downgrade_to: beta-model}}\n",
     "teams.alpha.end_users.budget.downgrade_to: team 'alpha' may not use model 'beta-model'"),
    ("    end_users: {budget: {usd: 1, period: rolling}}\n",
     "teams.alpha.end_users.budget: `window_s` is required with period: rolling"),
])
def test_end_user_settings_are_validated(upstream: FakeOpenAIUpstream, lines: str, problem: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(policy(upstream, alpha=lines))
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


# --- each level refuses; the most restrictive wins ------------------------------------------------------


@pytest.mark.parametrize(("level", "who"), [
    ("org", "organization acme"), ("team", "team alpha"), ("user", "end user u-1 (team alpha)"),
    ("key", "key alpha-key (team alpha)")])
def test_each_level_refuses_and_the_refusal_names_it(upstream: FakeOpenAIUpstream,
                                                     start_gateway: Callable[..., RunningGateway],
                                                     level: str, who: str) -> None:
    small, big = "{tokens: 60}", "{tokens: 100000}"
    text = policy(upstream, organizations=org(small if level == "org" else big),
                  alpha=f"    budget: {small if level == 'team' else big}\n"
                        + users(small if level == "user" else big))
    gateway = start_gateway(with_key_budget(text, small if level == "key" else big))
    refused = spend_until_refused(gateway, user="u-1")
    assert_budget_refusal(refused, who)
    assert f"x-switchboard-budget-{level}-remaining-tokens" in refused.headers
    assert 2 <= upstream.request_count <= 12  # 60 tokens hold a few 5-token answers to a short prompt
    if level == "user":  # another end user of the same team and key is not refused
        assert ask(gateway, user="u-2").status_code == 200


def test_an_organisation_budget_counts_the_spend_of_all_its_teams(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway(policy(upstream, organizations=org("{tokens: 80}")))
    spend_until_refused(gateway)  # alpha spends the organisation's budget
    refused = ask(gateway, key="sk-beta", model="beta-model")  # beta never sent a request, yet is refused
    assert_budget_refusal(refused, "organization acme")
    spent = sum(r.usage.total_tokens for r in gateway.usage.wait_for(upstream.request_count + 2)
                if r.usage is not None)
    beta_report = rows_by_scope(usage_report(gateway, "beta"))
    assert beta_report[("org", "acme")]["used"] == spent <= 80
    assert usage_report(gateway, "beta")["organization"] == "acme"


def test_the_most_restrictive_level_wins_and_every_level_is_in_the_headers(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    text = policy(upstream, organizations=org("{tokens: 100000, usd: 50}"),
                  alpha="    budget: {tokens: 90000, period: weekly}\n" + users("{tokens: 70, period: daily}"))
    gateway = start_gateway(with_key_budget(text, "{tokens: 80000, period: rolling, window_s: 3600}"))
    served = ask(gateway, user="u-1")
    assert served.status_code == 200
    headers = served.headers
    reserved = set()  # the first request's reservation (prompt estimate + max_tokens) on every level
    for level, limit in (("org", 100000), ("team", 90000), ("user", 70), ("key", 80000)):
        assert headers[f"x-switchboard-budget-{level}-limit-tokens"] == str(limit)
        reserved.add(limit - int(headers[f"x-switchboard-budget-{level}-remaining-tokens"]))
        assert re.fullmatch(r"(\d+h)?(\d+m)?[\d.]+m?s", headers[f"x-switchboard-budget-{level}-reset"])
    assert len(reserved) == 1 and 5 < reserved.pop() < 30
    assert headers["x-switchboard-budget-org-limit-usd"] == "50"
    assert headers["x-switchboard-end-user-bucket"] == "u-1"
    refused = spend_until_refused(gateway, user="u-1")
    assert_budget_refusal(refused, "end user u-1 (team alpha)")  # the tightest level refuses, not the others
    assert int(refused.headers["x-switchboard-budget-user-remaining-tokens"]) < 30
    assert int(refused.headers["x-switchboard-budget-team-remaining-tokens"]) > 80000
    assert ask(gateway, user="u-2").status_code == 200
    assert ask(gateway).status_code == 200  # a request naming no end user has no end-user budget


def test_admin_usage_shows_every_level(upstream: FakeOpenAIUpstream,
                                       start_gateway: Callable[..., RunningGateway]) -> None:
    text = policy(upstream, organizations=org("{tokens: 100000}"),
                  alpha="    budget: {tokens: 90000}\n" + users("{tokens: 5000}", max_tracked=1))
    gateway = start_gateway(with_key_budget(text, "{tokens: 80000}"))
    assert ask(gateway, user="u-1").status_code == 200
    assert ask(gateway, user="u-2").status_code == 200  # beyond max_tracked: the `other` bucket
    assert ask(gateway, user="u-2").headers["x-switchboard-end-user-bucket"] == "other"
    records = gateway.usage.wait_for(3)
    tokens = [r.usage.total_tokens for r in records if r.usage is not None]
    report = usage_report(gateway, end_user="u-1")
    rows = rows_by_scope(report)
    assert rows[("org", "acme")]["used"] == rows[("team", "alpha")]["used"] == rows[("key", "alpha-key")]["used"] \
        == sum(tokens)
    assert rows[("user", "u-1")]["used"] == tokens[0]
    assert rows[("user", "other")]["used"] == tokens[1] + tokens[2]
    assert rows[("user", "u-1")]["limit_type"] == "monthly budget"
    assert report["organization"] == "acme"
    assert report["end_users"] | {"period": None} == {"period": None, "tracked": 1, "max_tracked": 1,
                                                      "folded_requests": 2, "header": None, "required": False}
    bad = httpx.get(gateway.base_url + "/admin/usage", params={"team": "alpha", "end_user": "a b"},
                    headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "end_user"


# --- end users: where they come from, what is accepted, how many are tracked ------------------------------


def test_the_end_user_comes_from_the_header_or_the_user_field_and_is_validated(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway(policy(upstream, alpha=users("{tokens: 100000}", header="x-end-user", required=True)))
    by_header = ask(gateway, user="from-body", headers={"x-end-user": "from-header"})
    assert by_header.headers["x-switchboard-end-user-bucket"] == "from-header"
    assert ask(gateway, user="from-body").headers["x-switchboard-end-user-bucket"] == "from-body"
    for bad, where in (("a" * 65, "user"), ("x y", "user"), ("{beta}:b", "user"), ("other", "user"),
                       ("u-1\n", "user"), ("a{b}", "x-end-user")):
        response = ask(gateway, user=bad) if where == "user" else ask(gateway, headers={"x-end-user": bad})
        assert response.status_code == 400, (bad, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_end_user" and error["type"] == "invalid_request_error", error
        assert error["param"] == where
    missing = ask(gateway)
    assert missing.status_code == 400 and "must name their end user" in missing.json()["error"]["message"]
    assert upstream.request_count == 2


def test_the_same_user_id_in_another_team_is_another_bucket(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway(policy(upstream, alpha=users("{tokens: 60}"), beta=users("{tokens: 60}")))
    assert_budget_refusal(spend_until_refused(gateway, user="shared-id"), "end user shared-id (team alpha)")
    assert ask(gateway, key="sk-beta", model="beta-model", user="shared-id").status_code == 200
    beta = rows_by_scope(usage_report(gateway, "beta", end_user="shared-id"))
    alpha = rows_by_scope(usage_report(gateway, "alpha", end_user="shared-id"))
    assert 0 < beta[("user", "shared-id")]["used"] < alpha[("user", "shared-id")]["used"]


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    if not shared_redis_available():
        pytest.fail("no Redis on 127.0.0.1:6379 (make test starts one)")
    prefix = unique_prefix()
    yield prefix
    drop_prefix(SHARED_REDIS, prefix)


# 10,000 requests take ~50 s on a busy 2-core machine: that run is `make test-slow`'s; 300 run in the default suite.
@pytest.mark.parametrize("hostile", [300, pytest.param(10_000, marks=pytest.mark.slow)])
def test_a_hostile_tenants_distinct_user_ids_fold_into_other_with_bounded_keys_and_labels(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway], redis_prefix: str,
        hostile: int) -> None:
    state = f"state: {{url: '{SHARED_REDIS}', key_prefix: '{redis_prefix}', timeout_s: 5}}\n"
    text = policy(upstream, alpha=users("{tokens: 100000000, soft_thresholds: [0.000001]}", max_tracked=5),
                  beta=users("{tokens: 100000000}", max_tracked=5),
                  extra=state + "telemetry: {metrics: {enabled: true}}\n")
    gateway = start_gateway(text)

    async def flood() -> list[int]:
        # A connection the pool left idle past the server's keep-alive (uvicorn: 5 s) may be closed just as it
        # is reused (a ReadError on a POST, which no client retries): the pool lets go of it sooner.
        limits = httpx.Limits(max_connections=16, keepalive_expiry=2)
        async with httpx.AsyncClient(base_url=gateway.v1, limits=limits, timeout=30,
                                     headers={"authorization": "Bearer sk-alpha"}) as client:
            semaphore = asyncio.Semaphore(16)

            async def one(index: int) -> int:
                async with semaphore:
                    response = await client.post("/chat/completions", json={
                        "model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                        "user": f"hostile-{index}"})
                    return response.status_code
            return await asyncio.gather(*(one(i) for i in range(hostile)))

    statuses = asyncio.run(flood())
    assert set(statuses) == {200}
    report = usage_report(gateway, end_user="hostile-0")
    assert report["end_users"]["tracked"] == 5
    assert report["end_users"]["folded_requests"] == hostile - 5
    # The other team's users are its own: beta's first user is tracked although alpha's cap is full.
    assert ask(gateway, key="sk-beta", model="beta-model", user="hostile-9999").headers[
        "x-switchboard-end-user-bucket"] == "hostile-9999"
    client = redis.Redis.from_url(SHARED_REDIS)
    try:
        keys = [k.decode() for k in client.scan_iter(match=f"{redis_prefix}*", count=1000)]
    finally:
        client.close()
    user_counters = {k for k in keys if ":b:user:" in k and "{alpha}" in k}
    assert len({k.split(":b:user:")[1].split(":")[0] for k in user_counters}) <= 5
    assert len(keys) < 60, sorted(keys)  # not one per hostile id
    metrics = metrics_text(gateway)
    assert "hostile-" not in metrics  # no user id became a label
    assert f'switchboard_end_users_folded_total{{team="alpha"}} {float(hostile - 5)}' in metrics


# --- ledger -----------------------------------------------------------------------------------


def test_ledger_rows_carry_the_organisation_and_the_end_user(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    text = policy(upstream, organizations=org("{tokens: 100000}", "[alpha]"), alpha=users("{tokens: 60}"),
                  extra="ledger: {path: ledger.sqlite, flush_interval_s: 0.05}\n")
    gateway = start_gateway(text)
    assert ask(gateway, user="u-1").status_code == 200
    refused = spend_until_refused(gateway, user="u-1")
    assert refused.status_code == 429
    assert ask(gateway, key="sk-beta", model="beta-model").status_code == 200
    gateway.stop()  # closes the ledger: every row is written
    path = gateway.policy_path.parent / "ledger.sqlite"
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT team, organization, end_user, status FROM usage").fetchall()
    assert ("alpha", "acme", "u-1", 429) in rows
    assert {(t, o, u) for t, o, u, _ in rows} == {("alpha", "acme", "u-1"), ("beta", None, None)}
    by_org = {row["organization"]: row["requests"] for row in spend(path, "organization")}
    assert by_org == {"acme": len(rows) - 1, None: 1}
    assert {(row["team"], row["end_user"]) for row in spend(path, "end_user")} == {("alpha", "u-1"),
                                                                                  ("beta", None)}


def test_an_older_ledger_gets_the_organisation_and_end_user_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as connection:  # the ledger as the gateway wrote it before the hierarchy
        connection.executescript(_SCHEMA.replace(",\n    organization TEXT,\n    end_user TEXT", ""))
        connection.execute("INSERT INTO usage (gateway_id, request_id, ts, day, team, key_id, endpoint, public_model, "
                           "stream, status, outcome, prompt_tokens, completion_tokens, cached_tokens, "
                           "cache_write_tokens, reasoning_tokens, usage_estimated, cost_usd, duration_ms) VALUES "
                           "('g1', 'r1', 1.0, '1970-01-01', 'alpha', 'k', 'chat', 'm', 0, 200, 'completed', 10, 5, 0, "
                           "0, 0, 0, 0.5, 1.0)")
        assert "end_user" not in {row[1] for row in connection.execute("PRAGMA table_info(usage)")}
    ledger = Ledger(path)
    ledger.record(UsageRecord(request_id="r2", team="alpha", key_id="k", endpoint="chat", public_model="m",
                              provider="p", upstream_model="u", stream=False, status=200, usage=Usage(10, 5),
                              duration_ms=1.0, overhead_ms=0.1, cost_usd=0.25, organization="acme", end_user="u-1"),
                  at=2.0)
    ledger.close()
    assert {row["organization"]: row["cost_usd"] for row in spend(path, "organization")} == {None: 0.5, "acme": 0.25}


# --- shadow mode and downgrade on the new levels --------------------------------------------------------


def test_shadow_budgets_on_the_new_levels_report_but_never_refuse(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    text = policy(upstream, organizations=org("{tokens: 30, mode: shadow}"),
                  alpha=users("{tokens: 30, mode: shadow}"))
    gateway = start_gateway(text)
    shadowed = None
    for _ in range(8):
        response = ask(gateway, user="u-1")
        assert response.status_code == 200
        assert "x-switchboard-budget-org-limit-tokens" not in response.headers  # shadow: not for clients
        shadowed = response.headers.get("x-switchboard-shadow-reject") or shadowed
    assert shadowed is not None and "org:budget_tokens" in shadowed and "user:budget_tokens" in shadowed
    gateway.usage.wait_for(8)
    rows = rows_by_scope(usage_report(gateway, end_user="u-1"))
    for scope, owner in (("org", "acme"), ("user", "u-1")):
        assert rows[(scope, owner)]["mode"] == "shadow"
        assert rows[(scope, owner)]["would_reject"] > 0
        assert rows[(scope, owner)]["used"] <= 30  # what an enforcing budget would have let through


def test_an_exhausted_end_user_is_downgraded(upstream: FakeOpenAIUpstream,
                                             start_gateway: Callable[..., RunningGateway]) -> None:
    text = policy(upstream, alpha=users("{tokens: 40, on_exhaust: downgrade, downgrade_to: cheap-model}"))
    gateway = start_gateway(text)
    for _ in range(10):
        response = ask(gateway, user="u-1")
        assert response.status_code == 200
        if "x-switchboard-downgraded-from" in response.headers:
            break
    else:
        raise AssertionError("never downgraded")
    assert response.headers["x-switchboard-downgraded-from"] == "chat-model"
    assert ask(gateway, user="u-2").headers.get("x-switchboard-downgraded-from") is None


# --- windows: a monthly one in an IANA zone, a rolling one -----------------------------------------------


def test_a_monthly_organisation_budget_turns_at_midnight_in_its_zone(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    zone = zoneinfo.ZoneInfo("America/New_York")
    # 2027-01-31 20:00 in New York is already February 1st in UTC.
    clock = FakeClock(dt.datetime(2027, 1, 31, 20, 0, tzinfo=zone).timestamp())
    counter = TokenCounter()
    limiter = Limiter(MemoryStore(clock=clock), counter, clock=clock)
    text = policy(upstream, organizations=org("{tokens: 60, period: monthly, timezone: America/New_York}"),
                  alpha=users("{tokens: 40, period: rolling, window_s: 3600}"))
    gateway = start_gateway(text, limiter=limiter, counter=counter)
    assert_budget_refusal(spend_until_refused(gateway, user="u-1"), "end user u-1 (team alpha)")
    assert_budget_refusal(spend_until_refused(gateway, user="u-2"), "organization acme")
    refusal = ask(gateway, user="u-3").json()["error"]["message"]
    assert "It resets at 2027-02-01T00:00:00-05:00." in refusal
    clock.advance(3 * 3600 + 59 * 60)  # 23:59 in New York: still January there
    assert ask(gateway, user="u-3").status_code == 429
    clock.advance(61)  # 00:00:01 on February 1st in New York: a new month, and u-1's rolling hour has passed
    assert ask(gateway, user="u-3").status_code == 200
    assert ask(gateway, user="u-1").status_code == 200


# --- settlement: reserve, settle to actual once, refund on failure ----------------------------------------


def test_every_level_settles_to_actual_usage_and_refunds_failures(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    text = policy(upstream, organizations=org("{tokens: 100000}"),
                  alpha="    budget: {tokens: 100000}\n" + users("{tokens: 100000}"))
    gateway = start_gateway(with_key_budget(text, "{tokens: 100000}"))
    upstream.script(Behaviour.error(400))
    assert ask(gateway, user="u-1").status_code == 400
    gateway.usage.wait_for(1)
    rows = rows_by_scope(usage_report(gateway, end_user="u-1"))
    assert {key: row["used"] for key, row in rows.items()} == {
        ("org", "acme"): 0, ("team", "alpha"): 0, ("user", "u-1"): 0, ("key", "alpha-key"): 0, ("user", "other"): 0}
    for _ in range(3):
        assert ask(gateway, user="u-1", content="a longer question " * 5).status_code == 200
    spent = sum(r.usage.total_tokens for r in gateway.usage.wait_for(4) if r.usage is not None)
    rows = rows_by_scope(usage_report(gateway, end_user="u-1"))
    assert {key: row["used"] for key, row in rows.items()} == {
        ("org", "acme"): spent, ("team", "alpha"): spent, ("user", "u-1"): spent, ("key", "alpha-key"): spent,
        ("user", "other"): 0}


# --- three replicas sharing Redis ------------------------------------------------------------------


ORG_BUDGET = 3000
MAX_TOKENS = 20
WORKERS = 12


def test_three_replicas_hold_an_organisation_budget_and_counters_equal_the_ledger(
        tmp_path: Path, upstream: FakeOpenAIUpstream) -> None:
    with private_redis(tmp_path) as server:
        state = f"state: {{url: '{server.url}', timeout_s: 5}}\n"
        text = policy(upstream, organizations=org(f"{{tokens: {ORG_BUDGET}}}"), alpha=users("{tokens: 100000}"),
                      extra=state + "ledger: {path: ledger.sqlite, flush_interval_s: 0.05}\n")
        path = tmp_path / "shared.yaml"
        path.write_text(text)
        gateways = [GatewayProcess(path, tmp_path / f"gateway-{i}.log") for i in range(3)]
        try:
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                list(pool.map(lambda gateway: gateway.start(timeout=120), gateways))

            def hammer(worker: int) -> tuple[int, int]:
                gateway = gateways[worker % 3]
                key, model = ("sk-alpha", "chat-model") if worker % 2 else ("sk-beta", "beta-model")
                client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key=key, max_retries=0)
                served = tokens = 0
                while True:
                    try:
                        reply = client.chat.completions.create(
                            model=model, messages=[{"role": "user", "content": f"worker {worker} says hello"}],
                            max_tokens=MAX_TOKENS, user=f"user-{worker % 4}")
                    except openai.RateLimitError as error:
                        assert error.code == "budget_exceeded" and "organization acme" in error.message
                        return served, tokens
                    assert reply.usage is not None
                    served += 1
                    tokens += reply.usage.total_tokens

            with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
                results = list(pool.map(hammer, range(WORKERS)))
        finally:
            for gateway in gateways:
                gateway.terminate()  # a graceful stop: settlements sent, ledger rows written
        spent = sum(t for _, t in results)
        assert sum(s for s, _ in results) > 30
        # Reservations are prompt + max_tokens and the upstream honours max_tokens, so only a prompt the
        # upstream counts higher than the gateway's estimate can pass the budget, by at most that difference
        # per request in flight (policies/README.md, "The budget hierarchy").
        in_flight_bound = WORKERS * 10
        assert spent <= ORG_BUDGET + in_flight_bound
        assert spent >= ORG_BUDGET - WORKERS * (MAX_TOKENS + 30)  # the budget was used, not refused early
        client = redis.Redis.from_url(server.url)
        try:
            def counted(pattern: str) -> int:
                return sum(int(client.get(k) or 0) for k in client.scan_iter(match=pattern))
            org_used = counted("switchboard:{org:acme}:b:org:tok:*")
            alpha_users = counted("switchboard:{alpha}:b:user:*:tok:*")
        finally:
            client.close()
        with sqlite3.connect(tmp_path / "ledger.sqlite") as connection:
            by_team = dict(connection.execute(
                "SELECT team, SUM(prompt_tokens + completion_tokens) FROM usage GROUP BY team").fetchall())
            by_org = connection.execute("SELECT SUM(prompt_tokens + completion_tokens) FROM usage "
                                        "WHERE organization = 'acme'").fetchone()[0]
            by_user = dict(connection.execute("SELECT end_user, SUM(prompt_tokens + completion_tokens) FROM usage "
                                              "WHERE team = 'alpha' GROUP BY end_user").fetchall())
        assert by_org == spent == org_used  # counter == ledger == what clients were told, refusals rolled back
        assert alpha_users == by_team["alpha"]
        assert set(by_user) == {"user-1", "user-3"}  # alpha's workers are the odd ones
        out = subprocess.run([sys.executable, "-m", "gateway", "usage", "--policy", str(path), "--team", "alpha",
                              "--end-user", "user-1"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[1])
        report = rows_by_scope(json.loads(out.stdout))
        assert report[("org", "acme")]["used"] == spent
        assert report[("user", "user-1")]["used"] == by_user["user-1"] > 0


# --- policy simulate ------------------------------------------------------------------------------


def test_simulate_replays_the_new_levels_and_keeps_an_organisations_teams_together(
        upstream: FakeOpenAIUpstream, tmp_path: Path) -> None:
    from gateway.cli.simulate import replay

    ledger_path = tmp_path / "ledger.sqlite"
    ledger = Ledger(ledger_path)
    start = dt.datetime(2027, 3, 10, 12, tzinfo=dt.UTC).timestamp()
    for index in range(20):
        team, key, model, user = (("alpha", "alpha-key", "chat-model", f"u-{index // 2 % 4}") if index % 2 == 0
                                  else ("beta", "beta-key", "beta-model", None))
        ledger.record(UsageRecord(request_id=f"r{index}", team=team, key_id=key, endpoint="chat", public_model=model,
                                  provider="upstream", upstream_model="upstream-" + model.split("-")[0],
                                  stream=False, status=200, usage=Usage(50, 50), duration_ms=1.0, overhead_ms=0.1,
                                  end_user=user), at=start + index)
    ledger.close()
    path = tmp_path / "tighter.yaml"
    # Each request reserves and uses 100 tokens. The organisation has 1,700 for both teams' 20 requests; each of
    # alpha's 4 end users 200 (u-0 and u-1 send 3 requests, u-2 and u-3 send 2).
    path.write_text(policy(upstream, organizations=org("{tokens: 1700}"), alpha=users("{tokens: 200}")))
    alone = {row["team"]: row for row in replay(str(path), ledger_path).rows()}
    split = {row["team"]: row for row in replay(str(path), ledger_path, workers=2).rows()}
    assert alone == split  # the two teams were replayed together, against one organisation budget
    # The first 16 pass (1,600 tokens). The 17th, u-0's third, is refused by u-0's budget; the 18th (beta) takes
    # the organisation's last 100; the 19th (u-1's third) and the 20th (beta) find the organisation's spent.
    # Replayed apart, beta would have been refused nothing.
    assert (alone["alpha"]["over_budget"], alone["beta"]["over_budget"]) == (2, 1)


# --- alerts on the new levels ---------------------------------------------------------------------


def test_the_new_levels_alert_once_per_threshold_naming_their_level(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    from gateway.accounting.alerts import describe
    from gateway.accounting.budgets import ThresholdEvent

    events: list[ThresholdEvent] = []
    counter = TokenCounter()
    limiter = Limiter(MemoryStore(), counter, on_threshold=events.append)
    text = policy(upstream, organizations=org("{tokens: 200, soft_thresholds: [0.05]}"),
                  alpha=users("{tokens: 60, soft_thresholds: [0.1]}"))
    gateway = start_gateway(text, limiter=limiter, counter=counter)
    spend_until_refused(gateway, user="u-1")
    until = time.monotonic() + 5
    while {(e.scope, e.kind) for e in events} != {("org", "threshold"), ("user", "threshold"), ("user", "exhausted")}:
        assert time.monotonic() < until, events
        time.sleep(0.01)
    by_kind = {(e.scope, e.kind): e for e in events}
    assert len(events) == 3  # once each per period, though many requests crossed them
    assert by_kind[("org", "threshold")].owner == "acme"
    assert describe(by_kind[("org", "threshold")]).startswith("Organization acme has used 5% of its token budget")
    assert describe(by_kind[("user", "exhausted")]).startswith("End user u-1 (team alpha) has exhausted its token")


# --- admission across hash tags --------------------------------------------------------------------


class _GatedStore(MemoryStore):
    """A memory store whose admissions of one hash tag wait for `gate` (a slow Redis shard)."""

    atomic_across_tags = False  # like a Redis Cluster: one call per hash tag

    def __init__(self, tag: str) -> None:
        super().__init__()
        self.tag = tag
        self.gate = asyncio.Event()

    async def admit(self, checks: Any) -> Any:
        if checks[0].slices[0].startswith(self.tag):
            await self.gate.wait()
        return await super().admit(checks)


def test_a_refusal_or_cancellation_under_one_tag_gives_back_the_other_tags_reservation() -> None:
    from gateway.state import Check
    from gateway.state.across_tags import reserve

    team = Check(("{alpha}:b:team:tok:m",), 1000, 10, 2_000_000_000)
    organisation = Check(("{org:acme}:b:org:tok:m",), 15, 10, 2_000_000_000)

    async def scenario() -> None:
        store = _GatedStore("{org:")
        store.gate.set()
        assert (await reserve(store, [team, organisation])).admitted
        refused = await reserve(store, [team, organisation])  # the organisation has 5 left
        assert not refused.admitted and refused.denied == 1 and refused.used == (10, 10)
        assert store.read_now([team.slices, organisation.slices]) == [10, 10]  # the team's 10 given back
        store.gate.clear()
        waiting = asyncio.ensure_future(reserve(store, [team, organisation]))
        for _ in range(100):  # let the team's admission complete; the organisation's waits at the gate
            if store.read_now([team.slices])[0] == 20:
                break
            await asyncio.sleep(0)
        assert store.read_now([team.slices])[0] == 20 and not waiting.done()
        waiting.cancel()  # the client went away mid-admission
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert store.read_now([team.slices, organisation.slices]) == [10, 10]

    asyncio.run(scenario())


def test_the_hierarchy_runs_on_a_cluster_mode_redis_that_refuses_cross_slot_calls(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway], tmp_path: Path) -> None:
    from tests.test_state_cluster_keys import REDIS_SERVER, cluster_mode_node

    if REDIS_SERVER is None:
        pytest.fail("redis-server is not installed")
    with cluster_mode_node(tmp_path) as (port, _admin):
        # fail_closed: a call Redis refuses (CROSSSLOT) would be a 503, not a quietly local count.
        state = f"state: {{url: 'redis://127.0.0.1:{port}/0', failure_mode: fail_closed, timeout_s: 2}}\n"
        text = policy(upstream, organizations=org("{tokens: 60}"), alpha=users("{tokens: 100000}"), extra=state)
        gateway = start_gateway(with_key_budget(text, "{tokens: 100000}"))
        assert_budget_refusal(spend_until_refused(gateway, user="u-1"), "organization acme")
        served = upstream.request_count
        assert served >= 2
        gateway.usage.wait_for(served + 1)
        spent = sum(r.usage.total_tokens for r in gateway.usage.records if r.usage is not None)
        rows = rows_by_scope(usage_report(gateway, end_user="u-1"))
        assert rows[("org", "acme")]["used"] == rows[("user", "u-1")]["used"] == rows[("key", "alpha-key")][
            "used"] == spent  # the refusal's reservation on the team's tag was given back


def test_the_console_and_policy_gauges_show_the_new_levels(upstream: FakeOpenAIUpstream,
                                                           start_gateway: Callable[..., RunningGateway]) -> None:
    text = policy(upstream, organizations=org("{tokens: 100000}"), alpha=users("{usd: 2}"),
                  extra="telemetry: {metrics: {enabled: true}}\n")
    gateway = start_gateway(text)
    assert ask(gateway, key="sk-beta", model="beta-model").status_code == 200
    gateway.usage.wait_for(1)
    metrics = metrics_text(gateway)
    assert 'switchboard_budget_limit_tokens{owner="acme",scope="org",team=""} 100000.0' in metrics
    assert 'switchboard_budget_limit_usd{owner="",scope="user",team="alpha"} 2.0' in metrics
    feed = httpx.get(gateway.base_url + "/admin/budgets", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert feed.status_code == 200, feed.text
    rows = {(row["team"], row["scope"], row["owner"]) for row in feed.json()["data"]}
    assert {("alpha", "org", "acme"), ("beta", "org", "acme"), ("alpha", "user", "other")} <= rows


def test_policy_diff_says_what_changes_at_the_new_levels(upstream: FakeOpenAIUpstream, tmp_path: Path) -> None:
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(policy(upstream))
    new.write_text(policy(upstream, organizations=org("{usd: 500}", "[alpha]"),
                          alpha=users("{tokens: 1000, period: daily}", header="x-end-user", max_tracked=50)))
    out = subprocess.run([sys.executable, "-m", "gateway", "policy", "diff", str(old), str(new)], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert out.returncode in (0, 1), out.stderr
    text = out.stdout
    assert "organization" in text and "acme" in text and "$500 per month (UTC)" in text, text
    assert "from header x-end-user, else the user field; up to 50 per period, each with budget 1000 tokens per " \
        "day (UTC)" in text, text


def test_the_server_span_names_the_organisation_and_the_end_user(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    from tests.fakes.otlp_receiver import WaitingSpanExporter

    exporter = WaitingSpanExporter()
    gateway = start_gateway(policy(upstream, organizations=org("{tokens: 100000}", "[alpha]"),
                                   alpha=users("{tokens: 100000}")), span_exporter=exporter)
    assert ask(gateway, user="u-1").status_code == 200
    (server,) = [s for s in exporter.wait_for_servers(1) if s.kind.name == "SERVER"]
    attributes = dict(server.attributes or {})
    assert attributes["switchboard.organization"] == "acme" and attributes["switchboard.end_user"] == "u-1"


# --- reload ----------------------------------------------------------------------------------------


def _reload(gateway: RunningGateway, text: str) -> None:
    """Rewrite the policy file and wait for the gateway's watcher (it polls every 50 ms) to apply it."""
    fingerprint = gateway.store.current.fingerprint
    gateway.policy_path.write_text(text)
    applied, waited = threading.Event(), 0.0
    while gateway.store.current.fingerprint == fingerprint and waited < 5:
        applied.wait(0.02)
        waited += 0.02
    assert gateway.store.current.fingerprint != fingerprint, "the edited policy was not applied"


def test_organisation_and_end_user_settings_apply_on_reload(upstream: FakeOpenAIUpstream,
                                                            start_gateway: Callable[[str], RunningGateway]) -> None:
    """Every field under `organizations` and `teams.<t>.end_users` is read from the live policy: a reload that
    tightens, moves or renames them changes the very next request's admission, with no restart."""
    roomy = "{tokens: 100000}"
    gateway = start_gateway(policy(upstream, organizations=org(roomy), alpha=users(roomy)))
    assert ask(gateway, user="u-1").headers["x-switchboard-end-user-bucket"] == "u-1"

    _reload(gateway, policy(upstream, organizations=org("{tokens: 1}"), alpha=users(roomy)))
    assert_budget_refusal(ask(gateway, user="u-1"), "organization acme")  # organizations.*.budget

    _reload(gateway, policy(upstream, organizations=org("{tokens: 1}", teams="[beta]"), alpha=users(roomy)))
    assert ask(gateway, user="u-1").status_code == 200  # organizations.*.teams: alpha left the organisation

    _reload(gateway, policy(upstream, alpha=users("{tokens: 1}", header="x-end-user")))
    by_header = ask(gateway, headers={"x-end-user": "u-2"})  # end_users.header and end_users.budget
    assert_budget_refusal(by_header, "end user u-2 (team alpha)")

    _reload(gateway, policy(upstream, alpha=users(roomy, header="x-end-user", required=True)))
    missing = ask(gateway)  # end_users.required: a request naming no end user is refused
    assert missing.status_code == 400, missing.text

    _reload(gateway, policy(upstream, alpha=users(roomy, max_tracked=1)))
    assert ask(gateway, user="u-1").headers["x-switchboard-end-user-bucket"] == "u-1"  # tracked before: kept
    assert ask(gateway, user="u-9").headers["x-switchboard-end-user-bucket"] == "other"  # end_users.max_tracked
