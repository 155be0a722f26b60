"""The policy's `cache:` blocks, resolved at load into one rule per (team, model).

A team's `cache:` block replaces the model's for that team's requests. The
request path only looks its (team, model) pair up in a dict; a pair without a
rule (the default) costs nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.policy.model_schema import CachePolicy, SemanticCachePolicy
from gateway.policy.parts import PolicyPart
from gateway.policy.schema import PolicyDocument


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """Where entries live; equal specs share one store across policy reloads."""

    kind: str  # "memory" | "redis"
    owner: str = ""  # memory: the policy block whose max_bytes bounds the store
    max_bytes: int = 0
    url: str = ""
    key_prefix: str = ""
    timeout_s: float = 0.25


@dataclass(frozen=True, slots=True)
class CacheRule:
    """The cache settings one team's requests to one model follow."""

    mode: str  # "exact" | "semantic"
    ttl_s: float
    scope: str  # "key" | "team" | "global"
    only_deterministic: bool
    coalesce: bool
    store: StoreSpec
    semantic: SemanticCachePolicy | None = None
    hits_count_tokens: bool = False


@dataclass(frozen=True, slots=True)
class CachePlan:
    """team -> public model -> rule, for every pair whose caching is on."""

    rules: Mapping[str, Mapping[str, CacheRule]] = field(default_factory=dict)

    @property
    def stores(self) -> frozenset[StoreSpec]:
        return frozenset(rule.store for models in self.rules.values() for rule in models.values())


EMPTY_CACHE_PLAN = CachePlan()


def _effective(document: PolicyDocument, team: str, model: str) -> tuple[CachePolicy | None, tuple[str, ...]]:
    """The block that applies to (team, model) and its YAML path."""
    team_block = document.teams[team].cache
    if team_block is not None:
        return team_block, ("teams", team, "cache")
    return document.models[model].cache, ("models", model, "cache")


def _teams_of(document: PolicyDocument, model: str) -> list[str]:
    return [name for name, team in document.teams.items() if "*" in team.models or model in team.models]


def build_cache_plan(document: PolicyDocument) -> CachePlan:
    """The runtime rules; assumes `cache_problems` found nothing."""
    rules: dict[str, dict[str, CacheRule]] = {}
    for model in document.models:
        for team in _teams_of(document, model):
            block, path = _effective(document, team, model)
            if block is None or block.mode == "off":
                continue
            if block.backend == "redis":
                store = StoreSpec("redis", url=block.url or document.state.url or "", key_prefix=block.key_prefix,
                                  timeout_s=block.timeout_s)
            else:
                # A global rule is the same for every team (checked at load), so its teams share one store.
                owner = f"models.{model}" if block.scope == "global" else ".".join(path[:2])
                store = StoreSpec("memory", owner=owner, max_bytes=block.max_bytes)
            rules.setdefault(team, {})[model] = CacheRule(block.mode, block.ttl_s, block.scope,
                                                          block.only_deterministic, block.coalesce, store,
                                                          block.semantic, block.hits_count_tokens)
    return CachePlan(rules)


def cache_problems(document: PolicyDocument) -> list[tuple[tuple[str | int, ...], str]]:
    """Cross-references of the `cache:` blocks, as (YAML path, message) pairs for the policy loader."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    blocks = [(("models", name, "cache"), m.cache) for name, m in document.models.items()]
    blocks += [(("teams", name, "cache"), t.cache) for name, t in document.teams.items()]
    for path, block in blocks:
        if block is None or block.mode == "off":
            continue
        if block.backend == "redis" and not (block.url or document.state.url):
            problems.append(((*path, "url"), "backend: redis needs `url` here or in `state.url`"))
        if block.semantic is not None and block.semantic.embedding_model not in document.models:
            problems.append(((*path, "semantic", "embedding_model"),
                             f"unknown model {block.semantic.embedding_model!r}; defined: "
                             + ", ".join(sorted(document.models))))
    for model in document.models:
        applied = [(team, *_effective(document, team, model)) for team in _teams_of(document, model)]
        active = [(team, block, path) for team, block, path in applied if block is not None and block.mode != "off"]
        global_paths = [path for _, block, path in active if block.scope == "global"]
        if global_paths and len({block for _, block, _ in active}) > 1:
            teams = ", ".join(team for team, _, _ in active)
            problems.append(((*global_paths[0], "scope"),
                             f"scope: global shares `{model}` answers between teams ({teams}), so every team's "
                             "cache settings for it must be identical; use scope: team, or give them the same "
                             "settings"))
    return problems


# Caching rules per team and model: `Policy.cache`.
CACHE = PolicyPart("cache", check=cache_problems, build=lambda compiling: build_cache_plan(compiling.document))
