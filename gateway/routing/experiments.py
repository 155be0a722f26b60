"""Experiments on a model: a sticky canary split and mirrored shadow traffic.

    models:
      chat:
        targets: [...]
        canary: {model: chat-next, share: 0.05, sticky_by: key}       # or target: {provider, model}
        shadow: {target: {provider: lab, model: chat-v3}, share: 0.1}

Every request to a model with experiments is in one variant, named in the
`x-switchboard-variant` response header, on its ledger row, its span and the
per-variant metrics:

- `control`: served as the model always is;
- `canary`: a caller the hash of (seed, model, key id or end user) puts below
  `share` is served by the candidate instead. The hash needs no shared state,
  so every replica agrees, and a caller keeps its variant while the share
  stays; raising the share only adds canary callers. A canary `model` is
  accounted like a fallback to it (its team x model limits are reserved,
  gateway/accounting/fallback_limits.py; when they refuse, the request is served as
  control). Canary requests neither read nor fill the response cache: a
  cached control answer must not be measured as the canary's, nor the
  reverse;
- `shadow`: not the client's request at all. A sampled share of requests is
  mirrored to a candidate by gateway/shadow_traffic.py, off the client's path.

The client's answer is never the shadow's, and its variant is `control` or
`canary` (a request can be both a canary and mirrored).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from gateway.accounting.fallback_limits import admit_fallback
from gateway.policy.experiment_schema import (
    CANARY,
    CONTROL,
    CanaryPolicy,
    CandidateTarget,
    ShadowTrafficPolicy,
)
from gateway.policy.model_schema import FallbackPolicy, TargetPolicy
from gateway.policy.parts import PolicyPart
from gateway.routing.plan import build_plan

if TYPE_CHECKING:
    from gateway.compiled.policy import KeyEntry, Model, Policy, Provider
    from gateway.exchange import Exchange, Services
    from gateway.policy.model_schema import ModelPolicy
    from gateway.policy.schema import PolicyDocument

VARIANT_HEADER = "x-switchboard-variant"
EVENT = "switchboard.experiment"
# The hash is read as a 64-bit fraction: a caller is in the canary when it falls below share x 2**64.
_SCALE = 1 << 64
# An end user id is the client's text: only its hash is used, and only this much of it.
_MAX_USER_CHARS = 256


@dataclass(frozen=True, slots=True)
class Canary:
    """A model's canary, resolved: the model that serves it and who is in it."""

    model: Model
    share: float
    sticky_by: str
    salt: bytes
    threshold: int

    def assigns(self, caller: KeyEntry, body: Mapping[str, Any], end_user: str | None = None) -> bool:
        """Whether this caller (or the request's end user) is in the canary."""
        return self.threshold > 0 and \
            sticky_hash(self.salt, sticky_value(self.sticky_by, caller, body, end_user)) < self.threshold


@dataclass(frozen=True, slots=True)
class Shadow:
    """A model's shadow traffic, resolved: where it is mirrored, how often, how much at once."""

    model: Model
    share: float
    max_concurrent: int
    stream: bool  # a streamed request is mirrored streamed


@dataclass(frozen=True, slots=True)
class ModelExperiments:
    canary: Canary | None = None
    shadow: Shadow | None = None


def sticky_value(sticky_by: str, caller: KeyEntry, body: Mapping[str, Any], end_user: str | None = None) -> str:
    """What decides a caller's variant: its key id, or its end user (the key when the request names none).

    The end user is the one the budget hierarchy settles the request under (`end_user`: the team's
    `end_users.header`, else the `user` field, validated), so a user keeps one variant and one budget
    whichever way the team names them; for a team that tracks no end users, the OpenAI `user` field.
    """
    if sticky_by == "end_user":
        user = end_user or body.get("user")
        if isinstance(user, str) and user:
            return "u:" + user[:_MAX_USER_CHARS]
    return "k:" + caller.key_id


def sticky_hash(salt: bytes, value: str) -> int:
    """A stable 64-bit hash: the same on every replica, release and platform (not Python's `hash`)."""
    return int.from_bytes(hashlib.blake2b(salt + value.encode(), digest_size=8).digest(), "big")


def canary_salt(model: str, seed: str) -> bytes:
    return f"{seed}\x00{model}\x00".encode()


# --- policy -----------------------------------------------------------------------------------------------


def experiment_problems(document: PolicyDocument) -> list[tuple[tuple[str | int, ...], str]]:
    """Candidates naming unknown models or providers, the model itself, or a model with experiments of its own."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for name, model in document.models.items():
        for section in ("canary", "shadow"):
            config: CanaryPolicy | ShadowTrafficPolicy | None = getattr(model, section)
            if config is None:
                continue
            where: tuple[str | int, ...] = ("models", name, section)
            if config.model is not None:
                other = document.models.get(config.model)
                if config.model == name:
                    problems.append(((*where, "model"), f"a model cannot be its own {section}; name another "
                                     "model, or a `target`"))
                elif other is None:
                    problems.append(((*where, "model"), f"unknown model {config.model!r}; defined: "
                                     + ", ".join(sorted(document.models))))
                elif other.canary is not None or other.shadow is not None:
                    problems.append(((*where, "model"), f"model {config.model!r} has a canary or shadow of its "
                                     "own; experiments do not chain: serve the candidate from a model without"))
            elif config.target is not None and config.target.provider not in document.providers:
                problems.append(((*where, "target", "provider"), f"unknown provider {config.target.provider!r}; "
                                 "defined: " + ", ".join(sorted(document.providers))))
    return problems


def build_experiments(document: PolicyDocument, models: Mapping[str, Model],
                      providers: Mapping[str, Provider]) -> Mapping[str, ModelExperiments]:
    """Each experimenting model's canary and shadow, candidates resolved (the document is valid)."""
    built: dict[str, ModelExperiments] = {}
    for name, config in document.models.items():
        if config.canary is None and config.shadow is None:
            continue
        model = models[name]
        canary = shadow = None
        if config.canary is not None:
            serving = _candidate(model, config, config.canary.model, config.canary.target, models, providers)
            canary = Canary(serving, config.canary.share, config.canary.sticky_by,
                            canary_salt(name, config.canary.seed), int(config.canary.share * _SCALE))
        if config.shadow is not None:
            serving = _candidate(model, config, config.shadow.model, config.shadow.target, models, providers)
            # A failed shadow call is the candidate's result to measure: no fallback answers in its place (and
            # none reserves the team's limits, which a fallback would).
            serving = replace(serving, plan=replace(serving.plan, config=serving.plan.config.model_copy(
                update={"fallbacks": FallbackPolicy()})))
            shadow = Shadow(serving, config.shadow.share, config.shadow.max_concurrent,
                            config.shadow.stream == "as_client")
        built[name] = ModelExperiments(canary, shadow)
    return built


def _candidate(model: Model, config: ModelPolicy, other: str | None, target: CandidateTarget | None,
               models: Mapping[str, Model], providers: Mapping[str, Provider]) -> Model:
    """The model a candidate is served as: another public model, or `target` under this model's settings."""
    if other is not None:
        return models[other]
    assert target is not None
    provider = providers[target.provider]
    # The model's own per-provider settings (e.g. Anthropic prompt caching) when it has a target there.
    settings = next((t.settings for t in model.targets if t.provider is provider), None)
    served = replace(model.targets[0], provider=provider, upstream_model=target.model, weight=1.0, tags=frozenset(),
                     cost=None, public_model=model.name, settings=settings)
    candidate = config.model_copy(update={"targets": [TargetPolicy(provider=target.provider, model=target.model)],
                                          "canary": None, "shadow": None})
    return replace(model, targets=(served,), plan=build_plan(model.name, candidate))


def explain_experiments(policy: Policy, model: str) -> list[str]:
    """The model's canary and shadow in words (`switchboard policy explain`)."""
    plan = policy.experiments.get(model)
    if plan is None:
        return []
    lines = []
    canary, shadow = plan.canary, plan.shadow
    if canary is not None:
        who = "end users (the end-user header or `user` field; the key without one)" \
            if canary.sticky_by == "end_user" else "keys"
        lines.append(f"  canary: {canary.share * 100:g}% of {who}, sticky, served by "
                     f"{_served_by(canary.model, model)}; x-switchboard-variant: canary")
    if shadow is not None:
        how = "streamed like the client's" if shadow.stream else "non-streamed"
        lines.append(f"  shadow: {shadow.share * 100:g}% of requests mirrored ({how}) to "
                     f"{_served_by(shadow.model, model)}, at most {shadow.max_concurrent} at once per process; "
                     "billed as the team's shadow spend")
    return lines


def _served_by(candidate: Model, model: str) -> str:
    if candidate.name != model:
        return f"model {candidate.name}"
    target = candidate.targets[0]
    return f"target {target.provider.name}/{target.upstream_model}"


# --- the request path ---------------------------------------------------------------------------------------


async def choose_variant(services: Services, exchange: Exchange, model: Model) -> Model:
    """The model that serves this request: `model` (control), or its canary for a caller the hash puts there.

    Sets the variant on the settlement and in the response headers; a model without experiments costs a
    dict lookup.
    """
    settlement = exchange.settlement
    policy, caller, request = settlement.policy, settlement.caller, settlement.request
    assert policy is not None and caller is not None and request is not None
    plan = policy.experiments.get(model.name)
    if plan is None:
        return model
    variant, served, refused = CONTROL, model, None
    canary = plan.canary
    if canary is not None and canary.assigns(caller, request.body, settlement.end_user):
        # A canary model is another model's limits: reserved like a fallback's; refused, control serves.
        refusal = None if canary.model.name == model.name else await admit_fallback(services, exchange,
                                                                                      canary.model)
        if refusal is None:
            variant, served = CANARY, canary.model
        else:
            refused = refusal.code or refusal.kind.name.lower()
    settlement.variant = variant
    exchange.response_headers[VARIANT_HEADER] = variant
    trace = exchange.trace
    if trace.recording:
        event: dict[str, Any] = {"switchboard.variant": variant, "switchboard.experiment.model": model.name}
        if canary is not None:
            event["switchboard.experiment.canary_share"] = canary.share
        if variant == CANARY and served.name != model.name:
            event["switchboard.experiment.canary_model"] = served.name
        if refused is not None:
            event["switchboard.experiment.canary_refused"] = refused
        trace.decision(EVENT, event)
    return served


# Canary and shadow settings that name other models, providers or each other (built with the models:
# gateway/compiled/policy.py `_build`).
EXPERIMENTS = PolicyPart("experiments", check=experiment_problems)
