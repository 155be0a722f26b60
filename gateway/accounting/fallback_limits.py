"""A fallback model's own limits: reserved before it is tried; a fallback they refuse is skipped.

A request is admitted against the model it asked for (gateway/accounting/limits.py).
When that model fails and routing moves to a fallback, the team's limits of
the fallback model (`teams.<t>.model_limits`) and its price against the USD
budgets must hold too, or a team could reach a model beyond its limits just
by asking for a failing one. The reservation joins the request's admission,
so settlement reconciles it once, against the model that served.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.errors import ErrorKind, GatewayError

if TYPE_CHECKING:
    from gateway.compiled.policy import Model
    from gateway.exchange import Exchange, Services

# Refusals that make a fallback skipped; anything else (a fail-closed store that is down) ends the request.
_SKIPPED = frozenset({ErrorKind.RATE_LIMITED, ErrorKind.BUDGET_EXCEEDED})


async def admit_fallback(services: Services, exchange: Exchange, fallback: Model) -> GatewayError | None:
    """Reserve `fallback`'s limits for this request; the refusal when they do not admit it (nothing reserved)."""
    limiter, settlement = services.limiter, exchange.settlement
    caller, request, policy = settlement.caller, settlement.request, settlement.policy
    if limiter is None or caller is None or request is None or policy is None:
        return None
    try:
        if settlement.admission is None:  # nothing applied to the requested model: the fallback's own plan may
            # The fallback's rate headers reach the client only if it is served: a skipped model's would
            # describe a limit of a model the client never asked for.
            headers: dict[str, str] = {}
            settlement.admission = await limiter.admit(policy, caller, request.endpoint, request.body, fallback,
                                                       headers, exchange.trace, settlement.end_user)
            exchange.response_headers.update(headers)
        else:
            await limiter.extend(settlement.admission, caller.team.name, fallback, exchange.trace)
    except GatewayError as refusal:
        if refusal.kind not in _SKIPPED:
            raise
        return refusal
    return None
