"""A model's experiments in the policy: `models.<m>.canary` and `models.<m>.shadow` (gateway/routing/experiments.py).

Kept apart from gateway/policy/schema.py, which includes them in `ModelPolicy`; references (the candidate
model or provider) are checked against the whole document by `experiments.experiment_problems`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from gateway.policy.common import Strict

# Which arm of a model's experiment served a request (the `x-switchboard-variant` header, ledger column,
# span attribute and metric label): the model's own targets, its canary, or a shadow call.
CONTROL = "control"
CANARY = "canary"
SHADOW = "shadow"
VARIANTS = (CONTROL, CANARY, SHADOW)

class CandidateTarget(Strict):
    """One deployment to try: served under the experimenting model's own routing, retries and price."""

    provider: str = Field(description="Name of an entry under `providers`.")
    model: str = Field(min_length=1, description="The model name the upstream knows.")


class _Candidate(Strict):
    model: str | None = Field(None, min_length=1, description="Another public model under `models` that serves "
                              "the candidate with its own targets, routing, retries, fallbacks and price.")
    target: CandidateTarget | None = Field(None, description="Or one deployment, served with this model's own "
                                           "settings and billed at this model's price.")

    @model_validator(mode="after")
    def _one_candidate(self) -> _Candidate:
        if (self.model is None) == (self.target is None):
            raise ValueError("give the candidate as exactly one of `model` (a public model) or `target` "
                             "(provider and upstream model)")
        return self


class CanaryPolicy(_Candidate):
    """A sticky share of the model's requests served by a candidate instead (the `canary` variant).

    Who gets the canary is decided by a hash of the caller (`sticky_by`) and `seed`: every gateway replica
    decides alike with no shared state, a caller keeps its variant while `share` is unchanged, and raising
    `share` only moves callers from control to canary (never back).
    """

    share: float = Field(ge=0, le=1, description="Share of callers served by the canary, 0 to 1 (0: off).")
    sticky_by: Literal["key", "end_user"] = Field(
        "key", description="key: the API key decides; end_user: the request's end user decides, as the team's "
        "budget hierarchy names it (`teams.<team>.end_users.header`, else the OpenAI `user` field); requests that "
        "name none fall back to the key.")
    seed: str = Field("", max_length=64, description="Mixed into the hash: change it to draw a new set of "
                      "canary callers at the same share.")


class ShadowTrafficPolicy(_Candidate):
    """A sampled share of the model's requests mirrored to a candidate, off the client's path (`shadow`).

    The client's answer never waits for, and never comes from, the shadow call; its failures are the
    gateway's to count, not the client's to see. Each shadow call is settled on its own ledger row
    (`variant: shadow`) and counted as the team's shadow spend, apart from its enforced budgets.
    """

    share: float = Field(ge=0, le=1, description="Share of requests mirrored, 0 to 1, sampled per request.")
    max_concurrent: int = Field(16, ge=1, le=10_000, description="Shadow calls of this model in flight per "
                                "gateway process; a request sampled beyond it is not mirrored (counted in "
                                "switchboard_shadow_dropped).")
    stream: Literal["as_client", "never"] = Field(
        "as_client", description="as_client: a streamed request is mirrored streamed (its TTFT measured); "
        "never: mirrored as one non-streamed call.")
