"""Shadow traffic: a sampled share of a model's requests mirrored to a candidate, off the client's path.

`ShadowTraffic.mirror` is the pipeline's hook, called once a request is
admitted and about to go upstream. It samples, and when the model's shadow
calls are below `max_concurrent` starts a task and returns: the client's
request never awaits it, so a shadow upstream that hangs or fails cannot
delay or change the client's answer (a saturated model's sampled request is
dropped and counted, `switchboard_shadow_dropped`, instead of queueing).

The mirrored call is a request of its own, through the same steps as the
client's (route with the candidate's retries, relay, settle) but with its own
`Exchange` and `Settlement`: its own gateway id (the client's request id is
kept, to correlate the two), its own ledger row marked `variant: shadow`,
its own trace (a child of the client's when that is traced) and its own
per-variant metrics. Its cost is the team's **shadow spend**: on the ledger,
and in a per-team, per-UTC-day counter in the state store that
`/admin/usage` reports (`shadow_spend`). It is not charged to the team's
enforced limits or budgets: the team did not choose the experiment, and a
shadow call that spent its budget would change the answers of its real
requests, which shadow traffic must never do.

At shutdown the calls still running are cancelled, and each is settled (its
row says `client_disconnected`: nobody waited for it any longer).
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

from gateway.accounting.settlement import Settlement
from gateway.errors import GatewayError
from gateway.exchange import Exchange, InferenceRequest
from gateway.pipeline import call_upstream, complete_reply, internal_error, relay_stream
from gateway.policy.experiment_schema import SHADOW
from gateway.routing.experiments import Shadow
from gateway.routing.resilience import route_and_call
from gateway.routing.streams import PrimedStream
from providers.base import Call

if TYPE_CHECKING:
    from gateway.compiled.policy import Model
    from gateway.exchange import Exchange, InferenceRequest, Services
    from gateway.telemetry.experiments_metrics import VariantMetrics
    from gateway.tokens.counter import PromptCount

log = logging.getLogger("switchboard.shadow_traffic")


class ShadowTraffic:
    """The app's shadow calls in flight: bounded per model, each settled on its own, cancelled at shutdown."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: dict[str, int] = {}
        self._closing = False
        self.metrics: VariantMetrics | None = None  # where dropped calls are counted, when metrics are on

    def mirror(self, services: Services, exchange: Exchange, model: Model) -> None:
        """Maybe mirror the request to `model`'s shadow candidate; returns at once, never raises."""
        policy = exchange.settlement.policy
        plan = policy.experiments.get(model.name) if policy is not None else None
        shadow = plan.shadow if plan is not None else None
        if shadow is None or self._closing or shadow.share <= 0:
            return
        if shadow.share < 1 and self._rng.random() >= shadow.share:
            return
        name = model.name
        try:
            if self._in_flight.get(name, 0) >= shadow.max_concurrent:
                if self.metrics is not None:
                    self.metrics.dropped(name)
                return
            mirrored = _mirrored_exchange(services, exchange, shadow)
            admission = exchange.settlement.admission
            prompt = admission.prompt_count if admission is not None else None
            self._in_flight[name] = self._in_flight.get(name, 0) + 1
            task = asyncio.get_running_loop().create_task(self._run(services, mirrored, shadow, name, prompt))
        except Exception:  # the client's request goes on whatever happens here
            log.exception("could not start a shadow call for request %s", exchange.request_id)
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, services: Services, exchange: Exchange, shadow: Shadow, name: str,
                   prompt: PromptCount | None) -> None:
        try:
            await serve_shadow(services, exchange, shadow.model, prompt)
        finally:
            self._in_flight[name] -= 1

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop mirroring; cancel the calls still running and wait (within `timeout_s`) for their settlements."""
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)


def _mirrored_exchange(services: Services, parent: Exchange, shadow: Shadow) -> Exchange:
    """The shadow call's own exchange and settlement: the client's caller, request and policy snapshot."""
    exchange = Exchange(parent.request_id, services.clock())
    settlement = exchange.settlement = Settlement(services, exchange)
    source = parent.settlement
    settlement.policy, settlement.caller, settlement.tags = source.policy, source.caller, source.tags
    settlement.end_user = source.end_user  # attributed to the same end user; never charged to its budget
    settlement.variant = SHADOW
    request = source.request
    assert request is not None
    if request.stream and not shadow.stream:
        request = _unstreamed(request)
    settlement.request = request
    parent_span = parent.trace.traceparent()  # the client's SERVER span, when it is traced
    exchange.trace = services.telemetry.start(request.endpoint.value,
                                              {"traceparent": parent_span} if parent_span else {}, exchange)
    return exchange


def _unstreamed(request: InferenceRequest) -> InferenceRequest:
    body = {k: v for k, v in request.body.items() if k not in ("stream", "stream_options")}
    return InferenceRequest(request.endpoint, body, request.model, False, False)


async def serve_shadow(services: Services, exchange: Exchange, model: Model, prompt: PromptCount | None = None
                       ) -> None:
    """Route the mirrored call to `model` and read its answer to the end, then settle it; raises nothing but
    cancellation. `prompt`: the client's prompt as admission counted it (a context-window check reuses it where
    the candidate counts alike, instead of counting again on the event loop)."""
    # The very steps a client's request takes after routing (reading a body, relaying a stream), so the
    # shadow's usage, TTFT, estimates and completion are recorded exactly as the client's are.
    settlement = exchange.settlement
    request, policy, caller = settlement.request, settlement.policy, settlement.caller
    assert request is not None and policy is not None and caller is not None
    try:
        call = Call(request.endpoint, request.body, model.targets[0].upstream_model, request.stream,
                    request.client_wants_usage)
        routed = await route_and_call(services, policy, model, call, exchange, {}, call_upstream, prompt, caller.team)
        settlement.target = routed.target
        if isinstance(routed.response, PrimedStream):
            settlement.holds(routed.response)
            async for _ in relay_stream(services, exchange, routed.call, routed.response):
                pass  # read to the end, as a client would: usage, TTFT and completion are recorded on the way
        else:
            await complete_reply(services, exchange, routed.call, routed.response)
    except GatewayError as error:
        settlement.failed(error)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("shadow call for request %s failed", exchange.request_id)
        settlement.failed(internal_error(exchange.request_id))
    finally:
        settlement.close()  # its record reaches `ShadowSpend` with the other usage sinks
