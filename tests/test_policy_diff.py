"""`switchboard policy diff OLD NEW` as an operator runs it: a real subprocess on pairs of policy files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import key_hash

ROOT = Path(__file__).resolve().parents[1]

BASE = f"""
version: 1
providers:
  up:
    kind: openai_compatible
    base_url: http://127.0.0.1:9/v1
    api_key: sk-upstream-old-secret
  backup:
    kind: openai_compatible
    base_url: http://127.0.0.1:10/v1
prices:
  targets:
    up: {{"*": {{input: 1.0, output: 2.0}}}}
    backup: {{"*": {{input: 0.5, output: 1.0}}}}
models:
  chat:
    routing: {{strategy: weighted}}
    targets:
      - {{provider: up, model: m1, weight: 3}}
      - {{provider: backup, model: m2}}
    fallbacks: {{default: [small]}}
    cache: {{mode: exact, scope: team}}
  small:
    targets: [{{provider: backup, model: s1}}]
teams:
  alpha:
    models: [chat, small]
    limits: {{rpm: 100, tpm: 10000}}
    model_limits: {{chat: {{rpm: 50}}}}
    budget: {{usd: 20, period: monthly}}
    keys:
      - {{id: alpha-1, hash: "{key_hash('sk-alpha-1')}", limits: {{rpm: 10}}}}
  beta:
    models: [small]
    keys:
      - {{id: beta-1, hash: "{key_hash('sk-beta-1')}"}}
"""


def _diff(tmp_path: Path, old: str, new: str, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "old.yaml").write_text(old)
    (tmp_path / "new.yaml").write_text(new)
    return subprocess.run([sys.executable, "-m", "gateway", "policy", "diff", str(tmp_path / "old.yaml"),
                           str(tmp_path / "new.yaml"), *extra], capture_output=True, text=True, cwd=ROOT, timeout=60)


def _changed(tmp_path: Path, new: str) -> str:
    result = _diff(tmp_path, BASE, new)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_identical_and_default_restating_policies_are_no_changes(tmp_path: Path) -> None:
    # Spelling out defaults (priority of a single target, weight 1, retries 0, state auto) changes nothing.
    restated = BASE.replace("targets: [{provider: backup, model: s1}]",
                            "targets: [{provider: backup, model: s1, weight: 1}]\n    retries: 0\n"
                            "    routing: {strategy: priority}") + "state: {backend: auto}\n"
    for new in (BASE, restated):
        result = _diff(tmp_path, BASE, new)
        assert (result.returncode, result.stdout, result.stderr) == (0, "no changes\n", "")


def test_routes_and_weights(tmp_path: Path) -> None:
    out = _changed(tmp_path, BASE.replace("{provider: up, model: m1, weight: 3}",
                                          "{provider: up, model: m1, weight: 1}\n      - {provider: up, model: m3}"))
    assert "model chat:\n  routes: added up/m3\n  weight of up/m1: 3 -> 1\n  weight of up/m3: 1 (new)\n" in out
    assert "  price on up/m3: $1 input, $1 cached input, $2 output per 1M tokens (version policy) (new)\n" in out


def test_route_order_and_strategy(tmp_path: Path) -> None:
    swapped = BASE.replace("""      - {provider: up, model: m1, weight: 3}
      - {provider: backup, model: m2}""", """      - {provider: backup, model: m2}
      - {provider: up, model: m1, weight: 3}""").replace("strategy: weighted", "strategy: priority")
    out = _changed(tmp_path, swapped)
    assert "  routes: reordered: up/m1, backup/m2 -> backup/m2, up/m1\n" in out
    assert "  routing.strategy: weighted -> priority\n" in out


def test_fallbacks(tmp_path: Path) -> None:
    out = _changed(tmp_path, BASE.replace("fallbacks: {default: [small]}",
                                          "fallbacks: {context_window: [small]}"))
    assert "model chat:\n  fallbacks: added context_window: small; removed default: small\n" in out


def test_rate_limits_of_team_key_and_model(tmp_path: Path) -> None:
    out = _changed(tmp_path, BASE.replace("limits: {rpm: 100, tpm: 10000}", "limits: {rpm: 60}")
                   .replace("model_limits: {chat: {rpm: 50}}", "model_limits: {chat: {rpm: 50, rpd: 1000}}")
                   .replace("limits: {rpm: 10}}", "limits: {rpm: 5}}"))
    assert ("team alpha:\n  rate limits: 100 requests per minute, 10000 tokens per minute -> "
            "60 requests per minute\n") in out
    assert ("team alpha, model chat:\n  rate limits: 50 requests per minute -> 50 requests per minute, "
            "1000 requests per day\n") in out
    assert "team alpha, key alpha-1:\n  rate limits: 10 requests per minute -> 5 requests per minute\n" in out


def test_budgets(tmp_path: Path) -> None:
    out = _changed(tmp_path, BASE.replace(
        "budget: {usd: 20, period: monthly}",
        "budget: {usd: 10, tokens: 5000, period: weekly, timezone: Europe/Berlin, on_exhaust: downgrade, "
        "downgrade_to: small, soft_thresholds: [0.8]}"))
    assert ("team alpha:\n  budget: $20 per month (UTC), then reject -> 5000 tokens and $10 per week "
            "(Europe/Berlin), then downgrade to small, alerts at 80%\n") in out


def test_prices_from_a_model_price(tmp_path: Path) -> None:
    out = _changed(tmp_path, BASE.replace("    fallbacks: {default: [small]}",
                                          "    fallbacks: {default: [small]}\n    price: {input: 3, output: 6}"))
    assert ("  price on up/m1: $1 input, $1 cached input, $2 output per 1M tokens (version policy) -> "
            "$3 input, $3 cached input, $6 output per 1M tokens (version policy)\n") in out
    assert "  price on backup/m2: $0.5 input" in out


def test_cache_scope_per_team_and_model(tmp_path: Path) -> None:
    out = _changed(tmp_path, BASE.replace("cache: {mode: exact, scope: team}", "cache: {mode: exact, scope: key}"))
    assert ("team alpha, model chat:\n  cache: exact, scope team, ttl 3600s, memory 67108864 bytes -> "
            "exact, scope key, ttl 3600s, memory 67108864 bytes\n") in out


def test_access(tmp_path: Path) -> None:
    out = _changed(tmp_path, BASE.replace("models: [small]\n", 'models: ["*"]\n')
                   .replace("models: [chat, small]", "models: [chat]"))
    assert "team alpha:\n  models: removed small\n" in out
    assert "team beta:\n  models: added every model; removed small\n" in out


def test_keys_added_removed_replaced_and_disabled_never_show_secrets(tmp_path: Path) -> None:
    new = (BASE.replace(key_hash("sk-alpha-1") + '", limits', key_hash("sk-alpha-rotated") + '", disabled: true, '
                        'expires_at: "2027-01-01T00:00:00Z", limits')
           .replace(f'{{id: beta-1, hash: "{key_hash("sk-beta-1")}"}}',
                    f'{{id: beta-2, hash: "{key_hash("sk-beta-2")}"}}')
           .replace("sk-upstream-old-secret", "sk-upstream-new-secret"))
    result = _diff(tmp_path, BASE, new)
    out = result.stdout
    assert ("team alpha, key alpha-1:\n  state: enabled -> disabled\n  expires: never -> 2027-01-01T00:00:00Z\n"
            "  secret: changed (value not shown)\n") in out
    assert "team beta:\n  keys: added beta-2; removed beta-1\n" in out
    assert "team beta, key beta-1: removed (state enabled; expires never; rate limits none; budget none)\n" in out
    assert "team beta, key beta-2: added (state enabled; expires never; rate limits none; budget none)\n" in out
    assert "provider up:\n  api_key: changed (value not shown)\n" in out
    as_json = _diff(tmp_path, BASE, new, "--format", "json").stdout
    for secret in ("sk-upstream", "sk-alpha", "sk-beta", "sha256", key_hash("sk-alpha-1")[7:],
                   key_hash("sk-alpha-rotated")[7:], key_hash("sk-beta-2")[7:]):
        assert secret not in out and secret not in as_json


def test_json_format_is_ordered_and_complete(tmp_path: Path) -> None:
    new = BASE.replace("limits: {rpm: 100, tpm: 10000}", "limits: {rpm: 60}").replace("weight: 3", "weight: 2")
    first = _diff(tmp_path, BASE, new, "--format", "json")
    again = _diff(tmp_path, BASE, new, "--format", "json")
    assert first.returncode == 0 and first.stdout == again.stdout
    changes = json.loads(first.stdout)["changes"]
    assert changes == [
        {"kind": "model", "name": ["chat"], "change": "changed", "aspect": "weight of up/m1", "old": "3", "new": "2"},
        {"kind": "team", "name": ["alpha"], "change": "changed", "aspect": "rate limits",
         "old": "100 requests per minute, 10000 tokens per minute", "new": "60 requests per minute"},
    ]


@pytest.mark.parametrize("side", ["old", "new"])
def test_an_invalid_policy_is_refused_with_the_loaders_message(tmp_path: Path, side: str) -> None:
    broken = BASE.replace("models: [small]\n", "models: [smal]\n")
    old, new = (broken, BASE) if side == "old" else (BASE, broken)
    result = _diff(tmp_path, old, new)
    assert result.returncode == 1 and result.stdout == ""
    assert f"{tmp_path / (side + '.yaml')}: invalid policy" in result.stderr
    assert "teams.beta.models.0: unknown model 'smal'; defined: chat, small (line 34)" in result.stderr


def test_tags_providers_and_settings(tmp_path: Path) -> None:
    new = (BASE.replace("base_url: http://127.0.0.1:10/v1", "base_url: http://127.0.0.1:11/v1\n    "
                        "timeouts: {total_s: 30}")
           .replace("models: [small]\n", "models: [small]\n    tags: {allowed: {feature: [batch]}, strict: true}\n")
           + "tags: {allowed: {feature: [search]}}\nledger: {path: ledger.sqlite}\n")
    out = _changed(tmp_path, new)
    assert "settings ledger:\n  path: unset -> ledger.sqlite\n" in out
    assert "settings tags:\n  header: off (no cost attribution tags) -> x-switchboard-tags\n" in out
    assert ("provider backup:\n  base_url: http://127.0.0.1:10/v1 -> http://127.0.0.1:11/v1\n"
            "  timeouts: connect 5s, first byte 60s, total 600s -> connect 5s, first byte 60s, total 30s\n") in out
    assert "team alpha:\n  tags: off -> feature: search\n" in out
    assert "team beta:\n  tags: off -> feature: batch, search (strict)\n" in out


def test_credentials_in_urls_are_not_shown(tmp_path: Path) -> None:
    out = _changed(tmp_path, BASE.replace("http://127.0.0.1:10/v1", "http://proxy-user:hunter2@127.0.0.1:10/v1"))
    assert ("provider backup:\n  base_url: http://127.0.0.1:10/v1 -> "
            "http://(credentials not shown)@127.0.0.1:10/v1\n") in out
    assert "hunter2" not in out and "proxy-user" not in out
