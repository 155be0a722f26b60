"""Decision provenance: the attributes of the span events that say why a request went where it did.

Each decision point calls one builder here and hands the result to
`exchange.trace.decision(name, attributes)`, guarded by `trace.recording`, so
with tracing off nothing is built::

    if trace.recording:
        trace.decision("switchboard.route", route_event(...))

Events (all on the SERVER span; policies/README.md lists their attributes):

- `switchboard.admission` — one per store verdict: `admitted`, `refused` or
  `downgraded` (a budget refused and the request moved to its cheaper model),
  with every limit checked, its limit, use before this request, the amount
  asked for and what remains; `switchboard.admission.settled` reconciles the
  reservation with what the request actually used.
- `switchboard.cache` — hit, miss or bypass, the scope of the key, the mode,
  and for semantic hits the similarity.
- `switchboard.route` — one per attempt: the strategy, every candidate with its
  weight, breaker state and the strategy's score, the one chosen and why.
- `switchboard.retry` / `switchboard.fallback` — each hop and its cause.

Attribute values follow OpenTelemetry's rules: scalars or homogeneous tuples.
Scores appear for strategies that rank by live numbers (least-busy, latency, cost, prefix-affinity;
-1.0 when there is no number yet); the order of retries only when it differs from the candidates'.

What an event takes from the policy alone is built with the policy's objects, not per event, so a request
pays only for its own numbers: a compiled `Model` holds its targets' `Candidates` (labels, weights), and a
plan's `Frame` (gateway/accounting/plans.py) the `AdmissionShape` of its meters (labels and limits), once per
set of windows. Anything else (a route pinned to some of the targets by tags, a fallback's extra checks) is
described on the spot. A route decided by the policy alone (no live scores) is the same event for every request
that meets the same standing of the targets: the model's `Candidates` keep one per standing, shared
(`SharedAttributes`, encoded once), so most requests build no route event at all. Nothing else keeps state
between events.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import add, attrgetter, gt, sub, truediv
from typing import TYPE_CHECKING, Any

from gateway.telemetry.otlp import Doubles, SharedAttributes

if TYPE_CHECKING:
    from gateway.cache.service import Ticket
    from gateway.compiled.policy import Model, Target
    from gateway.routing.strategies import RouteState, TargetState
    from gateway.state import Check, Verdict
    from providers.base import UpstreamFailure

_MICROS = 1_000_000
_REASONS = {
    "priority": "first available target in listed order",
    "weighted": "its turn in smooth weighted round-robin",
    "least-busy": "fewest requests in flight",
    "latency": "lowest latency EWMA",
    "cost": "cheapest target",
    "prefix-affinity": "holds the conversation's prefix, or least loaded",
    "kv-aware": "highest weighted score (prefix, queue, KV-cache usage, in flight)",
}


def target_label(target: Target) -> str:
    """How events name a target: `provider/upstream-model`."""
    return f"{target.provider.name}/{target.upstream_model}"


# --- routing -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Candidates:
    """What a route event says of a list of targets whatever the request: their labels and weights, in order,
    and each target's label by `id()` (targets are compared by identity on the route path). A model's own also
    keeps the route events of strategies that rank by the policy alone, one per standing met (`shared`)."""

    labels: tuple[str, ...]
    weights: tuple[float, ...]
    by_id: dict[int, str]
    # (attempt, each target's standing, the chosen label, the reason, the order) -> the event every request with
    # that standing gets: built and encoded once (gateway/telemetry/otlp.py `SharedAttributes`), not per request.
    shared: dict[tuple[Any, ...], SharedAttributes] = field(default_factory=dict)


# Route events a model keeps (a standing is a combination of its targets' breaker states and health, so a few).
_SHARED_EVENTS = 64


def candidates(targets: Sequence[Target]) -> Candidates:
    """The `Candidates` of `targets` (a compiled model builds its own once: `Model.candidates`)."""
    labels = tuple([target_label(t) for t in targets])
    return Candidates(labels, tuple([float(t.weight) for t in targets]),
                      {id(t): label for t, label in zip(targets, labels, strict=True)})


def route_event(model: Model, ranked: Sequence[Target], considered: Sequence[Target], states: RouteState,
                now: float, attempt: int, previous: Target | None) -> dict[str, Any]:
    """The route decision of one attempt: every candidate, its standing, the choice and why."""
    strategy = model.plan.strategy.name
    # All the model's targets, unless the request pinned some by tags (gateway/routing/plan.py `pinned_targets`).
    shown = model.candidates if considered is model.targets else candidates(considered)
    labels, by_id = shown.labels, shown.by_id
    chosen = ranked[0]
    standing = []
    scores = [] if strategy in _DYNAMIC else None
    for target in considered:
        state = states.state(target)
        if not state.healthy:
            standing.append("unhealthy")
        elif state.hold_until > now and any(t is target for t in ranked):
            standing.append("held")  # asked to wait (Retry-After): ranked last
        else:
            standing.append(state.breaker.state(now).value)
        if scores is not None:
            scores.append(_score(strategy, target, state, now))
    states_shown = tuple(standing)
    chosen_label = by_id.get(id(chosen)) or target_label(chosen)
    reason = _reason(strategy, chosen, ranked, states, now, previous)
    order = None
    if len(ranked) > 1 and any(a is not b for a, b in zip(ranked, considered, strict=False)):
        order = tuple([by_id.get(id(t)) or target_label(t) for t in ranked])
    per_scorer = getattr(model.plan.strategy, "score_attributes", None)
    # Without live numbers the event follows from the standing alone: the model keeps one per standing.
    key = (attempt, states_shown, chosen_label, reason, order) \
        if scores is None and per_scorer is None and shown is model.candidates else None
    if key is not None and (shared := shown.shared.get(key)) is not None:
        return shared
    attributes: dict[str, Any] = {
        "switchboard.route.model": model.name,
        "switchboard.route.strategy": strategy,
        "switchboard.route.attempt": attempt,
        "switchboard.route.candidates": labels,
        "switchboard.route.weights": shown.weights,
        "switchboard.route.states": states_shown,
        "switchboard.route.chosen": chosen_label,
        "switchboard.route.reason": reason,
    }
    if scores is not None:
        attributes["switchboard.route.scores"] = tuple(scores)
    if per_scorer is not None:  # kv-aware: each scorer's value per candidate (gateway/routing/kv_scoring.py)
        attributes.update(per_scorer(considered))
        attributes["switchboard.route.scores"] = tuple(model.plan.strategy.total(t) for t in considered)
    if order is not None:
        attributes["switchboard.route.order"] = order
    if key is not None:
        if len(shown.shared) >= _SHARED_EVENTS:
            shown.shared.clear()
        attributes = shown.shared[key] = SharedAttributes(attributes)
    return attributes


# Strategies whose ranking depends on live numbers (shown as `scores`); the others rank by the policy alone.
_DYNAMIC = frozenset({"least-busy", "latency", "cost", "prefix-affinity", "kv-aware"})


def _reason(strategy: str, chosen: Target, ranked: Sequence[Target], states: RouteState, now: float,
            previous: Target | None) -> str:
    reason = _REASONS.get(strategy, strategy)
    if len(ranked) == 1:
        reason = "the only target available"
    elif strategy == "latency":
        ewma = states.state(chosen).ewma_s
        if ewma is not None and any((states.state(t).ewma_s or 0.0) < ewma for t in ranked[1:]):
            reason = "exploration: re-measuring a slower target"
    if previous is not None:
        reason = f"retry, preferring a target other than the one that failed; {reason}"
    if states.state(chosen).hold_until > now:
        reason = f"only held targets left; {reason}"
    return reason


def no_route_event(model: Model, considered: Sequence[Target], states: RouteState, now: float,
                   attempt: int) -> dict[str, Any]:
    """No candidate may be tried: every target is ejected by its breaker or failing health checks."""
    return {
        "switchboard.route.model": model.name,
        "switchboard.route.strategy": model.plan.strategy.name,
        "switchboard.route.attempt": attempt,
        "switchboard.route.candidates": (model.candidates.labels if considered is model.targets
                                         else tuple(target_label(t) for t in considered)),
        "switchboard.route.states": tuple(
            "unhealthy" if not states.state(t).healthy else states.state(t).breaker.state(now).value
            for t in considered),
        "switchboard.route.chosen": "",
        "switchboard.route.reason": "no healthy target",
    }


def _score(strategy: str, target: Target, state: TargetState, now: float) -> float:
    """The live number a dynamic strategy ranks by (lower is better)."""
    if strategy == "latency":
        return -1.0 if state.ewma_s is None else round(state.ewma_s * 1000, 3)
    if strategy == "cost":
        return -1.0 if target.cost is None else float(target.cost)
    return state.load(now)  # least-busy, prefix-affinity


def retry_event(model: Model, failed: Target, attempt: int, failure: UpstreamFailure, delay_s: float) -> dict[str, Any]:
    """A retry within one model: which attempt failed, why, and how long the gateway waits."""
    attributes: dict[str, Any] = {
        "switchboard.retry.model": model.name,
        "switchboard.retry.failed_target": target_label(failed),
        "switchboard.retry.failed_attempt": attempt,
        "switchboard.retry.cause": failure.kind.value,
        "switchboard.retry.status": failure.status,
        "switchboard.retry.backoff_s": round(delay_s, 6),
    }
    if failure.retry_after is not None:
        attributes["switchboard.retry.retry_after_s"] = failure.retry_after
    return attributes


def fallback_event(from_model: str, to_model: str, reason: str, cause: str) -> dict[str, Any]:
    """A hop to another model: the fallback list used (`default`, `context_window`, `content_policy`) and why."""
    return {"switchboard.fallback.from": from_model, "switchboard.fallback.to": to_model,
            "switchboard.fallback.reason": reason, "switchboard.fallback.cause": cause}


# --- admission ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdmissionShape:
    """What an admission event takes from its meters alone (the checks' `Meter`s, gateway/accounting/plans.py)."""

    labels: tuple[str, ...]
    limits: tuple[float, ...]  # in dollars for USD
    raw_limits: tuple[int, ...]  # as the store counts: micro-dollars for USD
    scales: tuple[int, ...]  # raw units per shown unit: micro-dollars per dollar, or 1
    # What each meter may count before an admission leaves it under `NEAR_LIMIT` of its room (`near_limit`).
    near: tuple[float, ...]


# An admission that leaves a limit or budget with less than this share of its room is worth an event of its own
# under `telemetry.traces.admission_events: notable` (`near_limit`).
NEAR_LIMIT = 0.1


def admission_shape(meters: Sequence[Any]) -> AdmissionShape:
    """The `AdmissionShape` of `meters` (a plan's `Frame` builds its own once: `Frame.admission_shape`)."""
    scales = tuple([_MICROS if meter.unit == "usd" else 1 for meter in meters])
    raw = tuple([meter.limit for meter in meters])
    return AdmissionShape(tuple([meter.label for meter in meters]), tuple(map(truediv, raw, scales)), raw, scales,
                          tuple([limit * (1 - NEAR_LIMIT) for limit in raw]))


def near_limit(shape: AdmissionShape, checks: Sequence[Check], verdict: Verdict) -> bool:
    """Whether an admitted request leaves any of its limits and budgets with less than `NEAR_LIMIT` of its room:
    counted before it plus what it reserved, past `shape.near` (compared in C, one check at a time)."""
    return any(map(gt, map(add, verdict.used, map(_AMOUNT, checks)), shape.near))


def admission_event(verdict_name: str, model: str, shape: AdmissionShape, checks: Sequence[Check],
                    verdict: Verdict, reserved_tokens: int, reserved_usd_micros: int) -> dict[str, Any]:
    """One admission verdict: every limit and budget checked, with its numbers (USD in dollars); `shape`
    describes the meters of `checks`, in their order."""
    labels, scales = shape.labels, shape.scales
    if len(labels) != len(checks):
        raise ValueError(f"{len(labels)} meters for {len(checks)} checks")
    # The per-request numbers, element by element in C (five checks for the full policy).
    amounts = tuple(map(_AMOUNT, checks))
    used = verdict.used
    taken = amounts if verdict.admitted else repeat(0)
    attributes: dict[str, Any] = {
        "switchboard.admission.verdict": verdict_name,
        "switchboard.admission.model": model,
        "switchboard.admission.checks": labels,
        "switchboard.admission.limits": shape.limits,
        # Quotients, so floats: `Doubles` spares the encoder checking each element's type.
        "switchboard.admission.used": Doubles(map(truediv, used, scales)),
        "switchboard.admission.requested": Doubles(map(truediv, amounts, scales)),
        # max(0, limit - used - taken) / scale
        "switchboard.admission.remaining": Doubles(map(truediv, map(max, repeat(0), map(
            sub, map(sub, shape.raw_limits, used), taken)), scales)),
        "switchboard.admission.reserved_tokens": reserved_tokens,
        "switchboard.admission.reserved_usd": reserved_usd_micros / _MICROS,
    }
    if verdict.denied is not None:
        attributes["switchboard.admission.denied"] = labels[verdict.denied]
    return attributes


_AMOUNT = attrgetter("amount")


def meter_label(meter: Any) -> str:
    """How events name a limit or budget: `team alpha: requests per minute`, `(shadow)` when it never refuses."""
    return limit_label(meter.rule, meter.budget, meter.unit)


def limit_label(rule: Any, budget: Any, unit: str) -> str:
    """`meter_label` of a meter of `rule` (a rate limit) or else of `budget` counting `unit`: made once per
    window with the meter (gateway/accounting/plans.py), not per event."""
    if rule is not None:
        return f"{rule.who}: {rule.label}{' (shadow)' if rule.shadow else ''}"
    return f"{budget.who}: {budget.period.kind} {unit} budget{' (shadow)' if budget.shadow else ''}"


def settlement_event(reserved_tokens: int, actual_tokens: int, reserved_usd_micros: int,
                     actual_usd_micros: int) -> dict[str, Any]:
    """The reservation reconciled with actual use: positive `refunded` values were given back."""
    return {
        "switchboard.admission.reserved_tokens": reserved_tokens,
        "switchboard.admission.actual_tokens": actual_tokens,
        "switchboard.admission.refunded_tokens": reserved_tokens - actual_tokens,
        "switchboard.admission.reserved_usd": reserved_usd_micros / _MICROS,
        "switchboard.admission.actual_usd": actual_usd_micros / _MICROS,
    }


# --- cache -------------------------------------------------------------------------------------


def cache_event(ticket: Ticket | None, *, reason: str | None = None, directive: str | None = None,
                similarity: str | None = None) -> dict[str, Any]:
    """The cache decision: `hit` (from the store, a semantic neighbour or a coalesced flight), `miss` or `bypass`."""
    if ticket is None:
        return {"switchboard.cache.result": "bypass", "switchboard.cache.reason": reason or "not cacheable"}
    rule = ticket.rule
    attributes: dict[str, Any] = {"switchboard.cache.result": ticket.status, "switchboard.cache.mode": rule.mode,
                                  "switchboard.cache.scope": rule.scope, "switchboard.cache.backend": rule.store.kind}
    if ticket.hit:
        if similarity is not None:
            attributes["switchboard.cache.source"] = "semantic"
            attributes["switchboard.cache.similarity"] = float(similarity)
            attributes["switchboard.cache.threshold"] = rule.semantic.threshold if rule.semantic else 0.0
        elif ticket.entry is None:
            attributes["switchboard.cache.source"] = "coalesced"  # following an identical request in flight
        else:
            attributes["switchboard.cache.source"] = "exact"
        if ticket.entry is not None:
            attributes["switchboard.cache.age_s"] = round(max(0.0, ticket.cache.clock() - ticket.entry.created), 3)
    elif directive is not None:
        attributes["switchboard.cache.directive"] = directive
    elif ticket.status == "miss" and ticket.flight is not None:
        attributes["switchboard.cache.coalescing"] = ticket.cache._flights.get(ticket.key) is ticket.flight
    return attributes
