"""The `cache:` policy blocks: strict schema, per-team overrides, and global scope's agreement rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cache.plan import StoreSpec
from gateway.compiled.policy import PolicyError, load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[1]
HASH = "sha256:" + "1" * 64
HASH2 = "sha256:" + "2" * 64


def policy(model_cache: str = "", alpha_cache: str = "", beta_cache: str = "", extra: str = "") -> str:
    return f"""
version: 1
providers:
  up: {{kind: vllm, base_url: "http://127.0.0.1:1/v1"}}
models:
  chat:
    targets: [{{provider: up, model: m}}]
    {model_cache}
  embed:
    targets: [{{provider: up, model: e}}]
teams:
  alpha:
    keys: [{{id: a, hash: "{HASH}"}}]
    models: [chat, embed]
    {alpha_cache}
  beta:
    keys: [{{id: b, hash: "{HASH2}"}}]
    models: ["*"]
    {beta_cache}
{extra}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    return caught.value.problems


def test_caching_is_off_unless_a_block_turns_it_on() -> None:
    assert parse_policy(policy()).cache.rules == {}
    assert parse_policy(policy("cache: {mode: 'off'}")).cache.rules == {}


def test_a_team_block_replaces_the_model_block_for_that_team() -> None:
    rules = parse_policy(policy("cache: {mode: exact, ttl_s: 60}", beta_cache="cache: {mode: 'off'}")).cache.rules
    assert set(rules) == {"alpha"} and set(rules["alpha"]) == {"chat"}
    rule = rules["alpha"]["chat"]
    assert (rule.mode, rule.ttl_s, rule.scope) == ("exact", 60, "team")
    assert rule.store == StoreSpec("memory", owner="models.chat", max_bytes=64 * 1024 * 1024)
    rules = parse_policy(policy(alpha_cache="cache: {mode: exact, max_bytes: 4096}")).cache.rules
    assert set(rules["alpha"]) == {"chat", "embed"}
    assert rules["alpha"]["embed"].store.owner == "teams.alpha"


def test_unknown_fields_and_values_are_refused_with_their_path() -> None:
    found = problems(policy("cache: {mode: exact, ttl: 60}"))
    assert found[0].startswith("models.chat.cache.ttl: unknown field")
    found = problems(policy("cache: {mode: exact, scope: everyone}"))
    assert found[0].startswith("models.chat.cache.scope: Input should be 'key', 'team' or 'global'")


def test_semantic_mode_needs_its_settings_and_a_known_embedding_model() -> None:
    assert "`semantic` settings are required" in problems(policy("cache: {mode: semantic}"))[0]
    found = problems(policy("cache: {mode: semantic, semantic: {embedding_model: nope}}"))
    assert found[0].startswith("models.chat.cache.semantic.embedding_model: unknown model 'nope'")
    rule = parse_policy(policy("cache: {mode: semantic, semantic: {embedding_model: embed}}")).cache.rules[
        "alpha"]["chat"]
    assert rule.semantic is not None and rule.semantic.threshold == 0.95


def test_redis_backend_needs_a_url_here_or_in_state() -> None:
    found = problems(policy("cache: {mode: exact, backend: redis}"))
    assert found[0].startswith("models.chat.cache.url: backend: redis needs `url`")
    rules = parse_policy(policy("cache: {mode: exact, backend: redis}",
                                extra="state: {url: 'redis://127.0.0.1:6379/3'}")).cache.rules
    assert rules["alpha"]["chat"].store.url == "redis://127.0.0.1:6379/3"


def test_global_scope_is_refused_when_the_model_s_teams_disagree() -> None:
    found = problems(policy("cache: {mode: exact, scope: global}", beta_cache="cache: {mode: exact, ttl_s: 5}"))
    assert found[0].startswith("models.chat.cache.scope: scope: global shares `chat` answers between teams")
    found = problems(policy("cache: {mode: exact}", alpha_cache="cache: {mode: exact, scope: global}"))
    assert found[0].startswith("teams.alpha.cache.scope: scope: global")
    # Same settings everywhere, or the other team not caching at all, is fine.
    same = "cache: {mode: exact, scope: global}"
    rules = parse_policy(policy(alpha_cache=same, beta_cache=same)).cache.rules
    assert rules["alpha"]["chat"].store == rules["beta"]["chat"].store  # one store, really shared
    assert parse_policy(policy(same, beta_cache="cache: {mode: 'off'}")).cache.rules["alpha"]["chat"]


def test_the_shipped_example_loads() -> None:
    loaded = load_policy(ROOT / "policies" / "examples" / "cache.yaml", environ={})
    assert loaded.cache.rules["search"]["gpt-4o"].mode == "semantic"
    assert "research" not in loaded.cache.rules
