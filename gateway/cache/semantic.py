"""Semantic matching: the embedding call, and the normalized vectors the indexes compare.

The indexes themselves: in process, gateway/cache/vector_index.py (numpy, loaded only by a policy that keeps
one); shared through Redis, gateway/cache/shared_index.py.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from gateway.accounting.pricing import charge
from gateway.errors import GatewayError, redact
from providers.base import Call, Endpoint, UpstreamFailed, Usage

if TYPE_CHECKING:
    from gateway.compiled.policy import Policy
    from gateway.exchange import Exchange, Services
    from gateway.routing.resilience import Attempt

log = logging.getLogger("switchboard.cache")


def normalized(vector: Sequence[float]) -> list[float] | None:
    norm = math.sqrt(sum(x * x for x in vector))
    if norm == 0 or not math.isfinite(norm):
        return None
    return [x / norm for x in vector]


@dataclass(frozen=True, slots=True)
class Embedded:
    """What embedding a question gave and cost: the normalized vector (None: exact matching only), and the
    usage and USD the upstream billed for it (None when it answered nothing it bills)."""

    vector: list[float] | None
    usage: Usage | None = None
    cost_usd: float | None = None


_NOT_EMBEDDED = Embedded(None)


async def embed(services: Services, policy: Policy, model_name: str, text: str, exchange: Exchange,
                attempt: Attempt) -> Embedded:
    """The normalized embedding of `text` from the policy's model, through the gateway's own call path.

    Any failure is logged and answered without a vector: semantic matching is
    an optimisation and must never fail the request it serves. An upstream
    that answered bills the call whatever the body held, so its usage (counted
    by the gateway when the upstream sent none) and cost come back either way:
    the request that needed the embedding pays for it (cache overhead).
    """
    model = policy.models.get(model_name)
    if model is None:
        return _NOT_EMBEDDED
    target = model.targets[0]
    call = Call(Endpoint.EMBEDDINGS, {"model": model_name, "input": text}, target.upstream_model, False)
    usage: Usage | None = None
    vector: Any = None
    answered = False
    try:
        response = await attempt(services, target, call, exchange)
        raw = await response.read()
        answered = True
        parsed = target.provider.adapter.parse_response(call, raw)
        usage = parsed.usage
        vector = orjson.loads(parsed.body)["data"][0]["embedding"]
    except (GatewayError, UpstreamFailed, orjson.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        log.warning("response cache: embedding with %s failed (%s); exact matching only", model_name,
                    redact(str(exc), (target.provider.settings.api_key or "",)))
    if answered and usage is None:  # billed, but the upstream did not say for how much: the gateway's count
        usage = Usage(prompt_tokens=services.counter.count_embedding_input(
            call.body, target.upstream_model, target.provider.adapter.capabilities.tokenizer), estimated=True)
    cost = charge(policy.prices, target, usage)[0] if usage is not None else None
    exchange.trace.side_call(usage, cost)
    if not isinstance(vector, list) or not all(isinstance(x, int | float) for x in vector):
        return Embedded(None, usage, cost)
    return Embedded(normalized(vector), usage, cost)
