"""Cost attribution tags through a running gateway: spans, metrics, ledger rows and `spend --by tag:<key>`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from gateway.accounting.ledger import _SCHEMA, Ledger
from gateway.accounting.spend import spend
from gateway.accounting.usage import UsageRecord
from gateway.compiled.policy import PolicyError, parse_policy
from providers.base import Usage
from tests.conftest import ADMIN_KEY, ADMIN_POLICY, RunningGateway, metrics_text, standard_policy
from tests.fakes import FakeOpenAIUpstream
from tests.fakes.otlp_receiver import WaitingSpanExporter

ROOT = Path(__file__).resolve().parents[1]
PRICES = """
prices:
  targets:
    upstream: {"*": {input: 2.0, output: 8.0}}
"""
TAGS = PRICES + """
ledger: {path: ledger.sqlite, flush_interval_s: 0.05}
tags:
  allowed:
    feature: [search, chat]
    env: [prod, staging]
""" + ADMIN_POLICY


def _policy(upstream: FakeOpenAIUpstream, extra: str = "") -> str:
    return standard_policy(upstream.base_url, extra=TAGS + extra).replace(
        "    models: [beta-model]\n",
        "    models: [beta-model]\n    tags: {strict: true, allowed: {feature: [batch]}}\n")


def _ask(gateway: RunningGateway, tags: str | None, *, key: str = "sk-alpha", model: str = "chat-model",
         stream: bool = False) -> Decimal:
    """One request with the tags header; the cost the client was told."""
    client = gateway.client(key, default_headers={"x-switchboard-tags": tags} if tags is not None else {})
    messages = [{"role": "user", "content": "how much is this"}]
    if stream:
        chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True,
                                                     stream_options={"include_usage": True}))
        return Decimal(str((chunks[-1].model_extra or {})["switchboard"]["cost_usd"]))
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages)
    return Decimal(raw.headers["x-switchboard-cost-usd"])


def _spend_cli(policy: Path, by: str) -> list[dict[str, object]]:
    result = subprocess.run([sys.executable, "-m", "gateway", "spend", "--policy", str(policy), "--by", by,
                             "--format", "json"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_tags_land_on_ledger_rows_metrics_and_spend_by_tag(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway(_policy(upstream))
    told = {
        "search": [_ask(gateway, "feature=search, env=prod"), _ask(gateway, "feature = search ,", stream=True)],
        "other": [_ask(gateway, "feature=secret-project,env=prod")],  # an unlisted value: `other`
        "chat": [_ask(gateway, "bogus=1, feature=chat, feature=search")],  # unlisted key dropped; first wins
        "(untagged)": [_ask(gateway, None), _ask(gateway, "")],
    }
    records = gateway.usage.wait_for(6)
    assert sorted(r.tags for r in records) == sorted([
        (("env", "prod"), ("feature", "search")), (("feature", "search"),), (("env", "prod"), ("feature", "other")),
        (("feature", "chat"),), (), ()])

    spent = httpx.get(gateway.base_url + "/admin/spend", params={"by": "tag:env"},
                      headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert spent.status_code == 200
    assert {row["tag:env"]: row["requests"] for row in spent.json()} == {"prod": 2, "(untagged)": 4}
    bad = httpx.get(gateway.base_url + "/admin/spend", params={"by": "tag:env') --"},
                    headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "by")
    assert bad.json()["error"]["message"] == ("by must be one of team, model, key, day, organization, end_user or "
                                              "tag:<key>.")
    by_feature = {row["tag:feature"]: row for row in _spend_cli(gateway.policy_path, "tag:feature")}
    assert {name: row["requests"] for name, row in by_feature.items()} == {name: len(c) for name, c in told.items()}
    for name, costs in told.items():
        assert Decimal(str(by_feature[name]["cost_usd"])) == pytest.approx(sum(costs), abs=Decimal("1e-9"))
    with sqlite3.connect(gateway.policy_path.parent / "ledger.sqlite") as connection:
        stored = sorted(str(row[0]) for row in connection.execute("SELECT tags FROM usage"))
    assert stored == sorted(['{"env":"prod","feature":"search"}', '{"feature":"search"}', '{"feature":"chat"}',
                             '{"env":"prod","feature":"other"}', "None", "None"])

    metrics = metrics_text(gateway)
    assert 'switchboard_tag_requests_total{tag="feature",team="alpha",value="search"} 2.0' in metrics
    assert 'switchboard_tag_requests_total{tag="feature",team="alpha",value="other"} 1.0' in metrics
    assert 'switchboard_tag_requests_total{tag="env",team="alpha",value="prod"} 2.0' in metrics
    search_cost = float(sum(told["search"]))
    line = next(x for x in metrics.splitlines()
                if x.startswith('switchboard_tag_cost_usd_total{tag="feature",team="alpha",value="search"}'))
    assert float(line.split()[-1]) == pytest.approx(search_cost, abs=1e-12)
    assert "secret-project" not in metrics and "bogus" not in metrics


def test_a_strict_team_is_refused_for_unlisted_tags_and_team_values_stay_its_own(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway(_policy(upstream))
    for tags, message in (("feature=nope", "Invalid x-switchboard-tags header: tag feature does not allow 'nope'; "
                                           "allowed: env: prod, staging; feature: batch, chat, search (strict)."),
                          ("team=alpha", "Invalid x-switchboard-tags header: unknown tag 'team'; allowed: env: prod, "
                                         "staging; feature: batch, chat, search (strict)."),
                          ("feature", "Invalid x-switchboard-tags header: 'feature' is not key=value; allowed: "
                                      "env: prod, staging; feature: batch, chat, search (strict).")):
        with pytest.raises(openai.BadRequestError) as refused:
            _ask(gateway, tags, key="sk-beta", model="beta-model")
        assert refused.value.status_code == 400
        assert refused.value.body == {"message": message, "type": "invalid_request_error", "param": None,
                                      "code": "invalid_tags"}
    assert upstream.request_count == 0  # refused before any upstream call
    _ask(gateway, "feature=batch", key="sk-beta", model="beta-model")
    _ask(gateway, "feature=batch")  # beta's own value is not alpha's: `other` there
    records = gateway.usage.wait_for(5)
    assert [(r.team, r.status, r.tags) for r in records if r.status == 200] == [
        ("beta", 200, (("feature", "batch"),)), ("alpha", 200, (("feature", "other"),))]


def test_tags_are_span_attributes(upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    exporter = WaitingSpanExporter()
    gateway = start_gateway(_policy(upstream), span_exporter=exporter)
    _ask(gateway, "feature=chat, env=dev, region=eu")
    (server,) = [s for s in exporter.wait_for_servers(1) if s.kind.name == "SERVER"]
    attributes = dict(server.attributes or {})
    assert attributes["switchboard.tag.feature"] == "chat" and attributes["switchboard.tag.env"] == "other"
    assert not [name for name in attributes if name.startswith("switchboard.tag.") and name not in (
        "switchboard.tag.feature", "switchboard.tag.env")]


def test_attribution_off_reads_no_header(upstream: FakeOpenAIUpstream,
                                         start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway(standard_policy(upstream.base_url, extra=PRICES))
    _ask(gateway, "feature=search")
    assert gateway.usage.wait_for(1)[0].tags == ()


def test_an_older_ledger_gets_the_tags_column_and_its_rows_count_as_untagged(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as connection:  # the ledger as the gateway wrote it before tags
        connection.executescript(_SCHEMA.replace(",\n    tags TEXT", ""))
        connection.execute("INSERT INTO usage (gateway_id, request_id, ts, day, team, key_id, endpoint, public_model, "
                           "stream, status, outcome, prompt_tokens, completion_tokens, cached_tokens, "
                           "cache_write_tokens, reasoning_tokens, usage_estimated, cost_usd, duration_ms) VALUES "
                           "('g1', 'r1', 1.0, '1970-01-01', 'alpha', 'k', 'chat', 'm', 0, 200, 'completed', 10, 5, 0, "
                           "0, 0, 0, 0.5, 1.0)")
        assert "tags" not in {row[1] for row in connection.execute("PRAGMA table_info(usage)")}
    ledger = Ledger(path)
    ledger.record(UsageRecord(request_id="r2", team="alpha", key_id="k", endpoint="chat", public_model="m",
                              provider="p", upstream_model="u", stream=False, status=200, usage=Usage(10, 5),
                              duration_ms=1.0, overhead_ms=0.1, cost_usd=0.25, tags=(("feature", "search"),)), at=2.0)
    ledger.close()
    assert {row["tag:feature"]: row["cost_usd"] for row in spend(path, "tag:feature")} == {
        "(untagged)": 0.5, "search": 0.25}
    with pytest.raises(ValueError, match="--by must be one of team, model, key, day, organization, end_user or "
                                         "tag:<key>"):
        spend(path, "tag:no spaces")


@pytest.mark.parametrize(("extra", "problem"), [
    ("tags: {allowed: {feature-name: [a]}}",
     "tags.allowed: tag key 'feature-name': use letters, digits and _ (at most 64)"),
    ("tags: {allowed: {feature: [other]}}",
     "tags.allowed: tag feature: `other` is what unlisted values become; it cannot be listed"),
    ("tags: {allowed: {feature: ['a b']}}",
     "tags.allowed: tag feature: value 'a b': use letters, digits and _ . : / - (at most 64)"),
    ("tags: {header: 'x tags'}", "tags.header: String should match pattern '^[A-Za-z0-9-]+$'"),
    ("tags: {strikt: true}", "tags.strikt: unknown field"),
])
def test_tag_settings_are_validated_with_their_yaml_path(extra: str, problem: str) -> None:
    with pytest.raises(PolicyError) as refused:
        parse_policy(standard_policy("http://127.0.0.1:9/v1", extra=extra))
    assert any(p.startswith(problem) for p in refused.value.problems), refused.value.problems


def test_the_tag_header_may_not_also_pin_routes() -> None:
    pinning = standard_policy("http://127.0.0.1:9/v1", extra="tags: {allowed: {feature: [a]}}").replace(
        "        model: upstream-beta\n", "        model: upstream-beta\n    routing: {allow_tag_pinning: true}\n")
    with pytest.raises(PolicyError) as refused:
        parse_policy(pinning)
    assert refused.value.problems == [
        "tags.header: x-switchboard-tags also pins routes of models with routing.allow_tag_pinning (beta-model); "
        "name another header for cost attribution, e.g. x-switchboard-metadata (line 37)"]
    moved = pinning.replace("tags: {allowed:", "tags: {header: x-switchboard-metadata, allowed:")
    assert parse_policy(moved).tags.header == "x-switchboard-metadata"


def test_tag_rules_apply_on_reload(upstream: FakeOpenAIUpstream,
                                   start_gateway: Callable[..., RunningGateway]) -> None:
    """Every `tags` and `teams.*.tags` field is read from the live policy: a reload changes what is recorded."""
    gateway = start_gateway(_policy(upstream))
    _ask(gateway, "feature=summarize")
    edited = _policy(upstream).replace("feature: [search, chat]", "feature: [search, chat, summarize]").replace(
        "    models: [chat-model, embed-model]\n",
        "    models: [chat-model, embed-model]\n    tags: {allowed: {region: [eu]}}\n").replace(
        "tags: {strict: true, allowed: {feature: [batch]}}", "tags: {strict: false, allowed: {feature: [batch]}}")
    applied = threading.Event()
    gateway.store.on_change(lambda policy: applied.set())
    gateway.policy_path.write_text(edited.replace("tags:\n  allowed:",
                                                  "tags:\n  header: x-team-tags\n  strict: true\n  allowed:"))
    assert applied.wait(5), "the edited policy was not applied"
    _ask(gateway, "feature=summarize")  # the old header: no longer read
    client = gateway.client(default_headers={"x-team-tags": "feature=summarize, region=eu"})
    client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):  # alpha is strict now (tags.strict)
        gateway.client(default_headers={"x-team-tags": "region=us"}).chat.completions.create(
            model="chat-model", messages=[{"role": "user", "content": "hi"}])
    beta = gateway.client("sk-beta", default_headers={"x-team-tags": "feature=nope"})
    beta.chat.completions.create(model="beta-model", messages=[{"role": "user", "content": "hi"}])  # its own: not
    records = gateway.usage.wait_for(5)
    assert [r.tags for r in records] == [(("feature", "other"),), (), (("feature", "summarize"), ("region", "eu")),
                                         (), (("feature", "other"),)]
