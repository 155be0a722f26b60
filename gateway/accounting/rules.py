"""Rate limits and budgets as rules, built once per policy: who is limited, in which window, to what.

`build_rules` turns the document's `limits`, `model_limits` and `budget`
sections (teams, keys, organisations and end users) into per-scope plans the
admission path (gateway/accounting/limits.py) reads without parsing anything;
each rule carries the state-store key it counts in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.accounting import hierarchy
from gateway.accounting.budgets import Budget, budget_problems, build_budget
from gateway.accounting.plans import Plan, RateRule
from gateway.policy.parts import PolicyPart, Problem
from gateway.state import safe_key

if TYPE_CHECKING:
    from gateway.policy.schema import PolicyDocument
    from gateway.policy.team_schema import RateLimitsPolicy

_WINDOWS = (("rpm", "requests", 60), ("tpm", "tokens", 60), ("rpd", "requests", 86_400), ("tpd", "tokens", 86_400))


class Rules:
    """A policy's limits and budgets by scope; `plan` is memoised per (key, model)."""

    def __init__(self) -> None:
        self.team_rates: dict[str, tuple[RateRule, ...]] = {}
        self.key_rates: dict[str, tuple[RateRule, ...]] = {}
        self.model_rates: dict[tuple[str, str], tuple[RateRule, ...]] = {}
        self.team_budgets: dict[str, Budget] = {}
        self.key_budgets: dict[str, Budget] = {}
        self.team_keys: dict[str, tuple[str, ...]] = {}
        # Organisations and end users (gateway/accounting/hierarchy.py): the levels above and beside team and key.
        self.hierarchy: hierarchy.Hierarchy = hierarchy.EMPTY
        self.default_completion_tokens = 1024
        self.shadow_header = True
        self._plans: dict[tuple[str, str], Plan | None] = {}

    @property
    def any(self) -> bool:
        return bool(self.team_rates or self.key_rates or self.model_rates or self.team_budgets or self.key_budgets
                    or self.hierarchy.any)

    def plan(self, team: str, key_id: str, model: str) -> Plan | None:
        memo = (key_id, model)
        try:
            return self._plans[memo]
        except KeyError:
            pass
        rates = (*self.team_rates.get(team, ()), *self.key_rates.get(key_id, ()),
                 *self.model_rates.get((team, model), ()))
        budgets = tuple(b for b in (self.hierarchy.org_budgets.get(team), self.team_budgets.get(team),
                                    self.key_budgets.get(key_id)) if b is not None)
        plan = None
        if rates or budgets:
            plan = Plan(rates, budgets, any(r.unit == "tokens" for r in rates) or any(
                b.tokens is not None or b.usd_micros is not None for b in budgets),
                any(b.usd_micros is not None for b in budgets),
                any(r.shadow for r in rates) or any(b.shadow for b in budgets))
        self._plans[memo] = plan
        return plan


def build_rules(document: PolicyDocument) -> Rules:
    """The runtime limits of a validated policy document."""
    rules = Rules()
    rules.default_completion_tokens = document.admission.default_completion_tokens
    rules.shadow_header = document.admission.shadow_reject_header
    for team, config in document.teams.items():
        tag = "{" + safe_key(team) + "}"
        rules.team_keys[team] = tuple(k.id for k in config.keys)
        if config.limits is not None:
            rules.team_rates[team] = _rates(config.limits, "team", team, team, f"{tag}:r:team")
        for model, limits in config.model_limits.items():
            rules.model_rates[(team, model)] = _rates(limits, "model", model, team, f"{tag}:r:model:{safe_key(model)}")
        if config.budget is not None:
            rules.team_budgets[team] = build_budget(config.budget, "team", team, team, f"{tag}:b:team")
        for key in config.keys:
            if key.limits is not None:
                rules.key_rates[key.id] = _rates(key.limits, "key", key.id, team, f"{tag}:r:key:{key.id}")
            if key.budget is not None:
                rules.key_budgets[key.id] = build_budget(key.budget, "key", key.id, team, f"{tag}:b:key:{key.id}")
    rules.hierarchy = hierarchy.build_hierarchy(document, lambda team: "{" + safe_key(team) + "}")
    return rules


def rules_problems(document: PolicyDocument) -> list[Problem]:
    """Cross-references the schema cannot check: model names in model_limits, and what team and key budgets
    name (their downgrade model and webhooks, `budget_problems`)."""
    problems: list[Problem] = []
    for team, config in document.teams.items():
        for model in config.model_limits:
            if model not in document.models:
                problems.append((("teams", team, "model_limits", model), f"unknown model {model!r}"))
        budgets = [(("teams", team, "budget"), config.budget)]
        budgets += [(("teams", team, "keys", i, "budget"), k.budget) for i, k in enumerate(config.keys)]
        for path, budget in budgets:
            if budget is not None:
                problems += budget_problems(document, path, budget, [team])
    for index, key in enumerate(document.admin.keys):
        if key.limits is not None or key.budget is not None:
            problems.append((("admin", "keys", index), "admin keys take no limits or budget"))
    return problems


def _rates(config: RateLimitsPolicy, scope: str, owner: str, team: str, base: str) -> tuple[RateRule, ...]:
    rules = []
    for name, unit, window in _WINDOWS:
        limit = getattr(config, name)
        if limit is not None:
            rules.append(RateRule(scope, owner, team, unit, window, limit, f"{base}:{name}", config.mode == "shadow"))
    return tuple(rules)


# Rate limits and budgets as the request path reads them: `Policy.rules`.
RULES = PolicyPart("rules", check=rules_problems, build=lambda compiling: build_rules(compiling.document))
