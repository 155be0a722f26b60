"""Cost attribution tags: `x-switchboard-tags: feature=search, env=prod`, allow-listed by the policy.

The policy's `tags:` section (and a team's own `tags:`) lists the keys a request
may tag itself with and each key's values; they are built at load into
frozensets per team, so a request pays one header lookup when it sends no
tags, and a split plus a few set lookups when it does. A value the list does
not know becomes `other` and a key it does not know is dropped, so what lands
on spans, metrics labels and ledger rows is bounded by the policy, whatever
clients send; with `strict: true` either is refused with 400 instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from gateway.errors import ErrorKind, GatewayError
from gateway.policy.model_schema import ROUTE_PIN_HEADER
from gateway.policy.parts import PolicyPart

if TYPE_CHECKING:
    from gateway.policy.schema import PolicyDocument

OTHER = "other"
DEFAULT_HEADER = "x-switchboard-tags"
# Bounds on what is parsed of a header, whatever its size (the server bounds the whole head).
_MAX_CHARS = 1024
_MAX_PAIRS = 16

Tags = tuple[tuple[str, str], ...]  # (key, value) pairs sorted by key; () when the request has none


@dataclass(frozen=True, slots=True)
class TagRules:
    """One team's allow-list: the global one with the team's keys and values added."""

    allowed: Mapping[str, frozenset[str]]
    strict: bool

    def describe(self) -> str:
        listed = "; ".join(f"{key}: {', '.join(sorted(values))}" for key, values in sorted(self.allowed.items()))
        return (listed or "no keys") + (" (strict)" if self.strict else "")


@dataclass(frozen=True, slots=True)
class TagPlan:
    """The policy's tag rules per team; `header` None when attribution is off (nothing is parsed)."""

    header: str | None = None
    teams: Mapping[str, TagRules] = field(default_factory=dict)


EMPTY_TAG_PLAN = TagPlan()


def build_tag_plan(document: PolicyDocument) -> TagPlan:
    """The runtime rules; attribution is on when the policy or any team has a `tags:` section."""
    shared = document.tags
    if shared is None and all(team.tags is None for team in document.teams.values()):
        return EMPTY_TAG_PLAN
    teams = {}
    for name, team in document.teams.items():
        allowed = {key: set(values) for key, values in (shared.allowed.items() if shared else ())}
        strict = shared.strict if shared else False
        if team.tags is not None:
            for key, values in team.tags.allowed.items():
                allowed.setdefault(key, set()).update(values)
            strict = team.tags.strict if team.tags.strict is not None else strict
        teams[name] = TagRules({key: frozenset(values) for key, values in allowed.items()}, strict)
    return TagPlan(shared.header.lower() if shared else DEFAULT_HEADER, teams)


def tag_problems(document: PolicyDocument) -> list[tuple[tuple[str | int, ...], str]]:
    """The tag header must not be the routing pin header of a model that honours pins (both read k=v pairs)."""
    header = document.tags.header.lower() if document.tags else DEFAULT_HEADER
    if build_tag_plan(document).header is None or header != ROUTE_PIN_HEADER:
        return []
    pinning = [name for name, model in document.models.items() if model.routing.allow_tag_pinning]
    if not pinning:
        return []
    return [(("tags", "header"), f"{header} also pins routes of models with routing.allow_tag_pinning "
             f"({', '.join(pinning)}); name another header for cost attribution, e.g. x-switchboard-metadata")]


def request_tags(plan: TagPlan, team: str, headers: Mapping[str, str]) -> Tags:
    """The request's tags as the team's allow-list admits them; 400 `invalid_tags` under `strict`."""
    header = plan.header
    if header is None:
        return ()
    raw = headers.get(header)
    if not raw:
        return ()
    rules = plan.teams.get(team)
    if rules is None:
        return ()
    allowed = rules.allowed
    found: dict[str, str] = {}
    for part in raw[:_MAX_CHARS].split(",", _MAX_PAIRS)[:_MAX_PAIRS]:
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        values = allowed.get(key)
        if values is None or not sep:
            if rules.strict:
                raise _refused(header, f"unknown tag {key[:64]!r}" if sep else f"{part.strip()[:64]!r} is not "
                               "key=value", rules)
            continue
        if value not in values:
            if rules.strict:
                raise _refused(header, f"tag {key} does not allow {value[:64]!r}", rules)
            value = OTHER
        found.setdefault(key, value)
    return tuple(sorted(found.items()))


def _refused(header: str, what: str, rules: TagRules) -> GatewayError:
    return GatewayError(ErrorKind.BAD_REQUEST, f"Invalid {header} header: {what}; allowed: {rules.describe()}.",
                        code="invalid_tags")


def tags_json(tags: Tags) -> str | None:
    """The ledger's form: a JSON object (keys sorted), or NULL for an untagged request."""
    return orjson.dumps(dict(tags)).decode() if tags else None


# Which cost-attribution tags each team may send: `Policy.tags`.
TAGS = PolicyPart("tags", check=tag_problems, build=lambda compiling: build_tag_plan(compiling.document))
