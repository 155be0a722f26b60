"""Each team's Responses API rules, built once per policy: retention, ownership and upstream resources."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.policy.parts import PolicyPart
from gateway.policy.team_schema import TeamResponsesPolicy

if TYPE_CHECKING:
    from gateway.policy.schema import PolicyDocument


@dataclass(frozen=True, slots=True)
class TeamResponseRules:
    """`teams.<name>.responses`, resolved."""

    store: bool
    by_key: bool
    ttl_s: float
    max_bytes: int
    upstream_store: bool
    prompts: frozenset[str]
    vector_stores: frozenset[str]
    files: frozenset[str]
    containers: frozenset[str]

    def owner(self, key_id: str) -> str:
        """Who may use what this caller stores: the whole team, or only this key."""
        return f"key:{key_id}" if self.by_key else "team"


def team_rules(config: TeamResponsesPolicy) -> TeamResponseRules:
    return TeamResponseRules(
        store=config.store, by_key=config.scope == "key", ttl_s=config.ttl_s, max_bytes=config.max_bytes,
        upstream_store=config.upstream_store, prompts=frozenset(config.allowed_prompts),
        vector_stores=frozenset(config.allowed_vector_stores), files=frozenset(config.allowed_files),
        containers=frozenset(config.allowed_containers))


DEFAULT_RULES = team_rules(TeamResponsesPolicy())


def build_response_rules(document: PolicyDocument) -> Mapping[str, TeamResponseRules]:
    return {name: team_rules(team.responses) for name, team in document.teams.items()}


# Stored Responses API state per team: `Policy.responses`.
RESPONSES = PolicyPart("responses", build=lambda compiling: build_response_rules(compiling.document))
