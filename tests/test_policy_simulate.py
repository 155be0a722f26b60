"""`switchboard policy simulate NEW --ledger PATH`: a recorded ledger replayed against a tighter policy."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.accounting.ledger import Ledger
from gateway.accounting.usage import UsageRecord
from providers.base import Usage
from tests.conftest import RunningGateway, key_hash, standard_policy
from tests.fakes import FakeOpenAIUpstream

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "sk-admin-simulate"
PRICES = """
prices:
  targets:
    upstream:
      upstream-chat: {input: 2.00, output: 8.00}
      upstream-chat-2: {input: 1.00, output: 4.00}
      upstream-beta: {input: 0.50, output: 1.50}
      upstream-cheap: {input: 0.10, output: 0.20}
"""


def _simulate(policy: Path, ledger: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "policy", "simulate", str(policy), "--ledger",
                           str(ledger), *extra], capture_output=True, text=True, cwd=ROOT, timeout=120)


def _report(policy: Path, ledger: Path, *extra: str) -> dict[str, Any]:
    result = _simulate(policy, ledger, "--format", "json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _by_pair(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(row["team"], row["model"]): row for row in report["by_team_model"]}


def _cost(prompt: int, completion: int, input_price: float, output_price: float) -> float:
    return (prompt * input_price + completion * output_price) * 1e-6


def test_a_ledger_of_real_traffic_replayed_against_a_tighter_policy(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway], tmp_path: Path) -> None:
    extra = PRICES + f"""
ledger: {{path: {tmp_path / "ledger.sqlite"}, flush_interval_s: 0.05}}
admin:
  keys: [{{id: finance, hash: "{key_hash(ADMIN_KEY)}"}}]
"""
    gateway = start_gateway(standard_policy(upstream.base_url, extra=extra))
    for index in range(6):
        gateway.client("sk-alpha").chat.completions.create(
            model="chat-model", messages=[{"role": "user", "content": "word " * (index + 1)}])
    for index in range(3):
        gateway.client("sk-beta").chat.completions.create(
            model="beta-model", messages=[{"role": "user", "content": "other " * (index + 2)}])
    gateway.usage.wait_for(9)
    spent = httpx.get(gateway.base_url + "/admin/spend", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert spent.status_code == 200 and sum(row["requests"] for row in spent.json()) == 9  # flushed to the file
    gateway.stop()
    with sqlite3.connect(tmp_path / "ledger.sqlite") as connection:
        rows = connection.execute("SELECT team, prompt_tokens, completion_tokens, cost_usd, day FROM usage "
                                  "ORDER BY ts").fetchall()
    assert len({row[4] for row in rows}) == 1, "the requests straddled UTC midnight; rerun"
    alpha = [row for row in rows if row[0] == "alpha"]
    beta = [row for row in rows if row[0] == "beta"]

    # Tighter: alpha may send 4 requests a day; beta's model costs twice as much.
    tighter = tmp_path / "tighter.yaml"
    tighter.write_text(standard_policy(upstream.base_url, extra=PRICES.replace(
        "upstream-beta: {input: 0.50, output: 1.50}", "upstream-beta: {input: 1.00, output: 3.00}")).replace(
        "    models: [chat-model, embed-model]", "    models: [chat-model, embed-model]\n    limits: {rpd: 4}"))
    report = _report(tighter, tmp_path / "ledger.sqlite")

    pairs = _by_pair(report)
    assert report["requests"] == 9 and set(pairs) == {("alpha", "chat-model"), ("beta", "beta-model")}
    chat, beta_model = pairs[("alpha", "chat-model")], pairs[("beta", "beta-model")]
    assert (chat["requests"], chat["rate_limited"], chat["over_budget"], chat["downgraded"]) == (6, 2, 0, 0)
    assert chat["cost_before_usd"] == pytest.approx(sum(row[3] for row in alpha), abs=1e-12)
    assert chat["cost_after_usd"] == pytest.approx(sum(_cost(r[1], r[2], 2.0, 8.0) for r in alpha[:4]), abs=1e-12)
    assert (beta_model["requests"], beta_model["rate_limited"]) == (3, 0)
    assert beta_model["cost_after_usd"] == pytest.approx(2 * beta_model["cost_before_usd"], abs=1e-12)
    assert beta_model["cost_delta_usd"] == pytest.approx(sum(row[3] for row in beta), abs=1e-12)

    # The same ledger against the policy that recorded it: nothing refused, nothing costs more.
    same = tmp_path / "same.yaml"
    same.write_text(standard_policy(upstream.base_url, extra=PRICES))
    unchanged = _report(same, tmp_path / "ledger.sqlite")["totals"]
    assert (unchanged["requests"], unchanged["rate_limited"], unchanged["rerouted"]) == (9, 0, 0)
    assert unchanged["cost_delta_usd"] == pytest.approx(0, abs=1e-12)


# A Monday 10:00:00 UTC: minute windows start on it.
T0 = dt.datetime(2026, 11, 2, 10, 0, tzinfo=dt.UTC).timestamp()
TEAMS = f"""
teams:
  alpha:
    keys: [{{id: alpha-key, hash: "{key_hash('sk-alpha')}"}}]
    models: [chat-model, embed-model]
  beta:
    keys: [{{id: beta-key, hash: "{key_hash('sk-beta')}"}}]
    models: [beta-model, cheap-model]
  gamma:
    keys: [{{id: gamma-key, hash: "{key_hash('sk-gamma')}"}}]
    models: [beta-model]
"""
MODELS = """
version: 1
providers:
  upstream: {kind: openai_compatible, base_url: "http://127.0.0.1:9/v1"}
models:
  chat-model: {targets: [{provider: upstream, model: upstream-chat}]}
  embed-model: {targets: [{provider: upstream, model: upstream-embed}]}
  beta-model: {targets: [{provider: upstream, model: upstream-beta}]}
  cheap-model: {targets: [{provider: upstream, model: upstream-cheap}]}
"""


def _write_ledger(path: Path, requests: list[tuple[float, str, str, str, str, int, int, float]]) -> None:
    """Rows through the ledger's own writer, at chosen times: (offset s, team, key, model, upstream, in, out, $)."""
    ledger = Ledger(path, flush_interval_s=0.01)
    for index, (offset, team, key, model, upstream_model, prompt, completion, cost) in enumerate(requests):
        record = UsageRecord(request_id=f"r{index}", team=team, key_id=key, endpoint="chat", public_model=model,
                             provider="upstream", upstream_model=upstream_model, stream=False, status=200,
                             usage=Usage(prompt, completion), duration_ms=10.0, overhead_ms=0.1, cost_usd=cost)
        ledger.record(record, at=T0 + offset)
    ledger.close()


def test_rate_limits_budgets_downgrades_reroutes_and_access_exactly(tmp_path: Path) -> None:
    chat = _cost(100, 50, 2.0, 8.0)
    beta = _cost(100, 50, 0.5, 1.5)
    ledger = tmp_path / "ledger.sqlite"
    _write_ledger(ledger, [
        (0, "alpha", "alpha-key", "chat-model", "upstream-chat", 100, 50, chat),
        (10, "alpha", "alpha-key", "chat-model", "upstream-chat", 100, 50, chat),
        (20, "alpha", "alpha-key", "chat-model", "upstream-chat", 100, 50, chat),  # third in its minute
        (70, "alpha", "alpha-key", "chat-model", "upstream-chat", 100, 50, chat),
        (80, "alpha", "alpha-key", "chat-model", "upstream-chat", 100, 50, chat),
        (5, "alpha", "alpha-key", "embed-model", "upstream-embed", 10, 0, 0.0),
        (30, "beta", "beta-key", "beta-model", "upstream-beta", 100, 50, beta),
        (31, "beta", "beta-key", "beta-model", "upstream-beta", 100, 50, beta),
        (32, "beta", "beta-key", "beta-model", "upstream-beta", 100, 50, beta),
        (40, "gamma", "gamma-key", "beta-model", "upstream-beta", 100, 50, beta),
    ])
    new = tmp_path / "new.yaml"
    new.write_text(PRICES + MODELS.replace("model: upstream-chat}", "model: upstream-chat-2}") + TEAMS
                   .replace("models: [chat-model, embed-model]", "models: [chat-model]\n    limits: {rpm: 2}")
                   .replace("models: [beta-model, cheap-model]", "models: [beta-model, cheap-model]\n    budget: "
                            "{tokens: 250, period: daily, on_exhaust: downgrade, downgrade_to: cheap-model, "
                            "soft_thresholds: [0.5]}")
                   .replace(f"{key_hash('sk-gamma')}\"}}", f"{key_hash('sk-gamma')}\", disabled: true}}"))
    report = _report(new, ledger)
    pairs = _by_pair(report)
    assert report["requests"] == 10 and report["from"] == "2026-11-02T10:00:00Z"
    assert {k: pairs[("alpha", "chat-model")][k] for k in ("requests", "rate_limited", "rerouted", "rerouted_to")} \
        == {"requests": 5, "rate_limited": 1, "rerouted": 4, "rerouted_to": "upstream/upstream-chat-2"}
    assert pairs[("alpha", "chat-model")]["cost_after_usd"] == pytest.approx(4 * _cost(100, 50, 1.0, 4.0), abs=1e-12)
    assert pairs[("alpha", "chat-model")]["first_refusals"]["rate_limited"].startswith(
        "Rate limit reached for team alpha on requests per minute: limit 2, used 2, requested 1.")
    assert pairs[("alpha", "embed-model")]["first_refusals"] == {
        "no_access": "The model `embed-model` does not exist or you do not have access to it."}
    assert pairs[("gamma", "beta-model")]["first_refusals"] == {"key_refused": "key gamma-key: disabled"}
    assert pairs[("alpha", "chat-model")]["cost_before_usd"] == pytest.approx(5 * chat, abs=1e-12)
    assert (pairs[("alpha", "embed-model")]["no_access"], pairs[("alpha", "embed-model")]["cost_after_usd"]) == (1, 0)
    beta_row = pairs[("beta", "beta-model")]
    assert (beta_row["downgraded"], beta_row["downgraded_to"], beta_row["over_budget"]) == (2, "cheap-model", 0)
    assert beta_row["cost_after_usd"] == pytest.approx(beta + 2 * _cost(100, 50, 0.1, 0.2), abs=1e-12)
    assert (pairs[("gamma", "beta-model")]["key_refused"], pairs[("gamma", "beta-model")]["cost_after_usd"]) == (1, 0)
    assert report["totals"]["cost_delta_usd"] == pytest.approx(
        sum(row["cost_after_usd"] - row["cost_before_usd"] for row in pairs.values()), abs=1e-12)
    # The soft threshold, then the budget's exhaustion (its first downgrade), as the alerts would report them.
    assert [(a["team"], a["unit"], a["threshold"]) for a in report["budget_alerts"]] == [
        ("beta", "tokens", 0.5), ("beta", "tokens", 1.0)]

    # A hard budget instead of the downgrade: the beta requests past it are refused.
    hard = tmp_path / "hard.yaml"
    hard.write_text(new.read_text().replace(", on_exhaust: downgrade, downgrade_to: cheap-model", ""))
    beta_hard = _by_pair(_report(hard, ledger))[("beta", "beta-model")]
    assert (beta_hard["over_budget"], beta_hard["downgraded"], beta_hard["cost_after_usd"]) == (2, 0, beta)

    # --since/--until bound the replay: only the first minute's chat requests, so none is refused.
    window = _report(new, ledger, "--since", "2026-11-02T10:00:00", "--until", "2026-11-02T10:00:15")
    assert {k: (r["requests"], r["rate_limited"]) for k, r in _by_pair(window).items()} == {
        ("alpha", "chat-model"): (2, 0), ("alpha", "embed-model"): (1, 0)}

    table = _simulate(new, ledger)
    assert table.returncode == 0
    assert "Replayed 10 requests recorded from 2026-11-02T10:00:00Z to 2026-11-02T10:01:20Z" in table.stdout
    assert "budget alert: team beta would cross 50% of its tokens budget" in table.stdout


def test_an_invalid_policy_or_missing_ledger_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(MODELS + TEAMS.replace("models: [beta-model]\n", "models: [beta-modle]\n"))
    result = _simulate(broken, tmp_path / "ledger.sqlite")
    assert result.returncode == 1 and result.stdout == ""
    assert "teams.gamma.models.0: unknown model 'beta-modle'" in result.stderr
    valid = tmp_path / "valid.yaml"
    valid.write_text(MODELS + TEAMS)
    missing = _simulate(valid, tmp_path / "nowhere.sqlite")
    assert missing.returncode == 1 and "nowhere.sqlite: no such ledger file" in missing.stderr


def test_a_request_a_fallback_served_stays_there_while_the_fallback_remains(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite"
    _write_ledger(ledger, [(0, "alpha", "alpha-key", "chat-model", "upstream-cheap", 1000, 100, 0.0)])
    with_fallback = tmp_path / "with.yaml"
    with_fallback.write_text(PRICES + MODELS.replace(
        "chat-model: {targets: [{provider: upstream, model: upstream-chat}]}",
        "chat-model: {targets: [{provider: upstream, model: upstream-chat}], fallbacks: {default: [cheap-model]}}")
        + TEAMS.replace("models: [chat-model, embed-model]",
                        "models: [chat-model]\n    fallback_models: [cheap-model]"))
    kept = _by_pair(_report(with_fallback, ledger))[("alpha", "chat-model")]
    assert (kept["rerouted"], kept["cost_after_usd"]) == (0, pytest.approx(_cost(1000, 100, 0.1, 0.2), abs=1e-12))
    without = tmp_path / "without.yaml"
    without.write_text(with_fallback.read_text().replace("    fallback_models: [cheap-model]\n", ""))
    moved = _by_pair(_report(without, ledger))[("alpha", "chat-model")]
    assert (moved["rerouted"], moved["rerouted_to"]) == (1, "upstream/upstream-chat")
    assert moved["cost_after_usd"] == pytest.approx(_cost(1000, 100, 2.0, 8.0), abs=1e-12)


def test_replaying_teams_in_parallel_gives_the_same_report(tmp_path: Path) -> None:
    test_rate_limits_budgets_downgrades_reroutes_and_access_exactly(tmp_path)
    one, two = (_report(tmp_path / "new.yaml", tmp_path / "ledger.sqlite", "--workers", n) for n in ("1", "2"))
    assert one["requests"] == 10 and one == two
