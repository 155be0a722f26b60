"""`switchboard policy explain`: the route a request would take, in words."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from gateway.routing.experiments import explain_experiments
from gateway.routing.strategies import RouteRequest, RouteState
from gateway.tokens.counter import requested_completion
from providers.base import Endpoint

if TYPE_CHECKING:
    from gateway.compiled.policy import Model, Policy
    from gateway.policy.model_schema import ModelPolicy
    from gateway.tokens.counter import TokenCounter


def explain_route(policy: Policy, model_name: str, *, team: str | None = None, body: Mapping[str, Any] | None = None,
                  counter: TokenCounter | None = None) -> list[str]:
    """The route a request would take, as lines of text (`switchboard policy explain`).

    Ranks the targets as a freshly started gateway would (no traffic seen yet).
    """
    model = policy.models.get(model_name)
    if model is None:
        raise KeyError(f"unknown model {model_name!r}; defined: " + ", ".join(sorted(policy.models)))
    lines: list[str] = []
    seen: set[str] = set()
    _explain_model(policy, model, body or {}, counter, lines, seen, "")
    lines.extend(explain_experiments(policy, model_name))
    if team is not None:
        lines.extend(_explain_team(policy, team, model_name))
    return lines


def _explain_model(policy: Policy, model: Model, body: Mapping[str, Any],
                   counter: TokenCounter | None, lines: list[str], seen: set[str],
                   indent: str) -> None:
    seen.add(model.name)
    config: ModelPolicy = model.plan.config
    timing = ", ".join(f"{label} {value:g}s" for label, value in (
        ("deadline", config.deadline_s), ("ttft timeout", config.ttft_timeout_s),
        ("stream idle timeout", config.stream_idle_timeout_s)) if value is not None) or "no deadline"
    lines.append(f"{indent}model {model.name}: strategy {config.routing.strategy}, retries {config.retries}, {timing}")
    describe = getattr(model.plan.strategy, "describe", None)
    if describe is not None:
        lines.extend(f"{indent}  {line}" for line in describe())
    if config.routing.strategy == "weighted":
        # Which target goes first rotates from request to request; the shares are what is stable.
        ranked = sorted(model.targets, key=lambda t: -t.weight)
        total = sum(t.weight for t in ranked)
        lines.append(f"{indent}  targets, by share of traffic (the first pick rotates by weight):")
    else:
        ranked = model.plan.strategy.rank(list(model.targets), RouteState(rng=random.Random(0)), RouteRequest(body))
        lines.append(f"{indent}  targets, in the order a request would try them:")
    for number, target in enumerate(ranked, 1):
        extras = [f"weight {target.weight:g}"]
        if target.tags:
            extras.append("tags " + ",".join(f"{k}={v}" for k, v in sorted(target.tags)))
        if target.cost is not None:
            extras.append(f"cost {target.cost:g}")
        if config.routing.strategy == "weighted":
            extras.append(f"share {target.weight / total:.0%}")
        if describe is not None:
            extras.append(f"score {model.plan.strategy.total(target):g}")  # type: ignore[attr-defined]
        lines.append(f"{indent}    {number}. {target.provider.name} ({target.provider.settings.kind}) "
                     f"model {target.upstream_model}; " + ", ".join(extras))
    breaker = config.circuit_breaker
    lines.append(f"{indent}  circuit breaker: " + (
        f"{breaker.consecutive_failures} failures in a row or {breaker.failure_rate:.0%} of >= {breaker.min_requests} "
        f"in {breaker.window_s:g}s; cooldown {breaker.cooldown_s:g}s doubling to {breaker.max_cooldown_s:g}s"
        if breaker.enabled else "off"))
    if config.context_window is not None:
        verdict = ""
        if body and counter is not None:
            # The gateway's own rule (routing/resilience.py `_fits`): the prompt plus the completion it may ask for.
            first = model.targets[0]
            endpoint = Endpoint.CHAT if "messages" in body else Endpoint.COMPLETIONS
            tokens = counter.count_prompt(endpoint, body, first.upstream_model,
                                          first.provider.adapter.capabilities.tokenizer)
            reserve = requested_completion(body) or 0
            fits = tokens + reserve <= config.context_window
            asked = f" + max_tokens {reserve} = {tokens + reserve}" if reserve else ""
            verdict = f"; this request: {tokens} prompt tokens{asked}, " + (
                "fits" if fits else "too long -> context_window fallbacks")
        lines.append(f"{indent}  context window: {config.context_window} tokens{verdict}")
    for kind in ("default", "context_window", "content_policy"):
        names = getattr(config.fallbacks, kind)
        if names:
            lines.append(f"{indent}  fallbacks ({kind}): " + " -> ".join(names))
            for name in names:
                if name not in seen and name in policy.models:
                    _explain_model(policy, policy.models[name], body, counter, lines, seen, indent + "    ")


def _explain_team(policy: Policy, team: str, model: str) -> list[str]:
    if team not in policy.teams:
        return [f"team {team}: unknown team"]
    if not policy.teams[team].may_use(model):
        return [f"team {team}: may NOT use {model} (requests get 404 model_not_found)"]
    lines = [f"team {team}: may use {model}"]
    rules = getattr(policy, "rules", None)
    if rules is not None:  # limits are gateway/accounting/limits.py's; shown when that module built them
        rates = (*getattr(rules, "team_rates", {}).get(team, ()),
                 *getattr(rules, "model_rates", {}).get((team, model), ()))
        lines.extend(f"  limit: {rule.limit} {rule.label} for {rule.who}" for rule in rates)
        budget = getattr(rules, "team_budgets", {}).get(team)
        if budget is not None:
            lines.append(f"  budget: {budget}")
        keys = getattr(rules, "key_rates", {})
        lines.extend(f"  limit: {rule.limit} {rule.label} for {rule.who}"
                     for key_id in getattr(rules, "team_keys", {}).get(team, ()) for rule in keys.get(key_id, ()))
    return lines
