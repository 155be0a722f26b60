"""A model's route plan: its strategy object and frozen settings, built once per policy load."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.policy.model_schema import ROUTE_PIN_HEADER, ModelPolicy
from gateway.policy.parts import PolicyPart
from gateway.policy.schema import PolicyDocument
from gateway.routing.kv_scoring import KVAwareStrategy, kv_problems
from gateway.routing.strategies import (
    CostStrategy,
    LatencyStrategy,
    LeastBusyStrategy,
    PrefixAffinityStrategy,
    PriorityStrategy,
    Strategy,
    WeightedStrategy,
)

if TYPE_CHECKING:
    from gateway.compiled.policy import Target


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """A model's routing and resilience, built once per policy load."""

    strategy: Strategy
    config: ModelPolicy


def build_plan(name: str, config: ModelPolicy) -> RoutePlan:
    """The runtime routing of one model (called by gateway.compiled.policy while building a policy)."""
    routing = config.routing
    strategy: Strategy
    if routing.strategy == "weighted":
        strategy = WeightedStrategy()
    elif routing.strategy == "least-busy":
        strategy = LeastBusyStrategy()
    elif routing.strategy == "latency":
        strategy = LatencyStrategy(routing.exploration)
    elif routing.strategy == "cost":
        strategy = CostStrategy()
    elif routing.strategy == "kv-aware":
        strategy = KVAwareStrategy(name, routing.kv_aware)
    elif routing.strategy == "prefix-affinity":
        affinity = routing.prefix_affinity
        strategy = PrefixAffinityStrategy(name, affinity.spill_margin, affinity.table_size, affinity.block_chars,
                                          affinity.min_blocks)
    else:
        strategy = PriorityStrategy()
    return RoutePlan(strategy, config)


def pinned_targets(plan: RoutePlan, targets: Sequence[Target], headers: Mapping[str, str]) -> Sequence[Target]:
    """The targets matching `x-switchboard-tags: k=v,...` when the model allows pinning; all of them otherwise."""
    raw = headers.get(ROUTE_PIN_HEADER)
    if not raw or not plan.config.routing.allow_tag_pinning:
        return targets
    wanted = set()
    for part in raw.split(","):
        name, sep, value = part.partition("=")
        if sep and name.strip():
            wanted.add((name.strip(), value.strip()))
    return [t for t in targets if wanted <= t.tags]


def routing_problems(document: PolicyDocument) -> list[tuple[tuple[Any, ...], str]]:
    """Fallback lists naming unknown models or the model itself, and strategy settings needing other
    sections, as (YAML path, message)."""
    problems = kv_problems(document)
    for name, model in document.models.items():
        for kind in ("default", "context_window", "content_policy"):
            for index, other in enumerate(getattr(model.fallbacks, kind)):
                where = ("models", name, "fallbacks", kind, index)
                if other == name:
                    problems.append((where, "a model cannot fall back to itself"))
                elif other not in document.models:
                    problems.append((where, f"unknown model {other!r}; defined: " + ", ".join(sorted(document.models))))
    return problems


# Each model's route plan, by model name: `Model.plan` (gateway/compiled/policy.py hands them out).
ROUTES = PolicyPart("route_plans", check=routing_problems, build=lambda compiling: {
    name: build_plan(name, model) for name, model in compiling.document.models.items()})
