"""Resilience: retries, fallbacks, deadlines and the streaming contract.

`route_and_call` is the pipeline's route step. For the requested model it
ranks the targets (gateway/routing/strategies.py), sends one attempt at a time through
the pipeline's single-attempt function, and on a retryable failure backs off
(exponential, full jitter, at least an upstream's Retry-After when only the
same target is left) and tries again, up to the model's `retries`. When the
model cannot answer it moves along the requested model's fallback list for
that kind of failure: `default`, `context_window` or `content_policy`. Every
attempt is kept in the trail sent back as `x-switchboard-route`.

An attempt only succeeds once nothing can go wrong that another target could
fix: a whole body has been read, or a stream has produced its first content
chunk (the role-only preamble does not count) within `ttft_timeout_s`. Until
then nothing has reached the client, so a stream that opens and dies or stalls
is retried invisibly. After that, the relay owns the stream; a failure there
ends it with an in-band error and no `[DONE]` (see gateway/pipeline.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from gateway.accounting.fallback_limits import admit_fallback
from gateway.errors import ErrorKind, GatewayError, from_upstream
from gateway.policy.model_schema import ModelPolicy
from gateway.routing.deadlines import Expiry
from gateway.routing.plan import pinned_targets
from gateway.routing.strategies import RouteRequest, RouteState, record_failure
from gateway.routing.streams import PrimedStream, TargetOutcome, prime_stream
from gateway.telemetry.decisions import fallback_event, no_route_event, retry_event, route_event
from gateway.tokens.counter import PromptCount, requested_completion
from gateway.upstream.pools import UpstreamResponse
from providers.base import Call, FailureKind, UpstreamFailed, UpstreamFailure

if TYPE_CHECKING:
    from gateway.compiled.policy import Model, Policy, Target, Team
    from gateway.exchange import Exchange, Services

ROUTE_HEADER = "x-switchboard-route"
MODEL_HEADER = "x-switchboard-model"

Attempt = Callable[["Services", "Target", Call, "Exchange"], Awaitable[UpstreamResponse]]


@dataclasses.dataclass(slots=True)
class Routed:
    """The attempt that succeeded: its response (body read, or stream primed), target and call."""

    response: UpstreamResponse | PrimedStream
    target: Target
    call: Call
    model: Model


class _ModelFailed(Exception):
    """Every allowed attempt at one model failed; `reason` picks the fallback list."""

    def __init__(self, reason: str, error: GatewayError) -> None:
        super().__init__(error.message)
        self.reason = reason
        self.error = error


async def route_and_call(services: Services, policy: Policy, model: Model, call: Call, exchange: Exchange,
                         headers: Mapping[str, str], attempt: Attempt, prompt: PromptCount | None = None,
                         team: Team | None = None) -> Routed:
    """Serve `call` from `model` or its fallbacks; raises the last `GatewayError` when nothing could.

    `prompt` is the prompt as admission counted it; the context-window check reuses it where it applies.
    A fallback the caller's `team` may not use (nor is allowed as a fallback) is skipped.
    `team` is also who an answered 5xx is counted against in the breakers (gateway/routing/breaker.py).
    """
    run = _Run(services, exchange, headers, attempt, model.plan.config.deadline_s, prompt,
               team.name if team is not None else None)
    tried: set[str] | None = None  # the models tried, once one failed
    current = model
    try:
        while True:
            try:
                return await run.serve(current, call)
            except _ModelFailed as failed:
                if run.expired():
                    raise failed.error from None
                if tried is None:
                    tried = {model.name}
                following = await _next_fallback(run, policy, model, current, failed, tried, team)
                if following is None:
                    raise failed.error from None
                current = following
    finally:
        exchange.response_headers[ROUTE_HEADER] = ",".join(run.trail)


async def _next_fallback(run: _Run, policy: Policy, model: Model, current: Model, failed: _ModelFailed,
                         tried: set[str], team: Team | None) -> Model | None:
    """The next fallback the caller may be served, its own limits reserved; None when there is none.

    A fallback the team may not use is passed over silently (its name is not the caller's to learn); one whose
    limits or budgets refuse the request is skipped and recorded in the route trail as `<model>:<code>`.
    """
    trace = run.exchange.trace
    cause = failed.error.code or failed.error.kind.name.lower()
    for name in _fallbacks(model, failed.reason):
        if name in tried or name not in policy.models or (team is not None and not team.may_fall_back_to(name)):
            continue
        tried.add(name)
        fallback = policy.models[name]
        refusal = await admit_fallback(run.services, run.exchange, fallback)
        if trace.recording:
            event = fallback_event(current.name, name, failed.reason, cause)
            if refusal is not None:
                event["switchboard.fallback.skipped"] = refusal.code or refusal.kind.name.lower()
            trace.decision("switchboard.fallback", event)
        if refusal is None:
            return fallback
        run.trail.append(f"{name}:{refusal.code}")
    return None


def _fallbacks(model: Model, reason: str) -> list[str]:
    """The requested model's fallback list for this kind of failure."""
    fallbacks = model.plan.config.fallbacks
    if reason == "context_window":
        return fallbacks.context_window
    return fallbacks.content_policy if reason == "content_policy" else fallbacks.default


class _Run:
    """One request's attempts across models and targets."""

    def __init__(self, services: Services, exchange: Exchange, headers: Mapping[str, str], attempt: Attempt,
                 deadline_s: float | None, prompt: PromptCount | None = None, caller: str | None = None) -> None:
        self.services = services
        self.states: RouteState = services.routes
        self.exchange = exchange
        self.headers = headers
        self.attempt = attempt
        self.clock = clock = services.clock
        self.deadline = None if deadline_s is None else clock() + deadline_s
        self.trail: list[str] = []
        # The prompt as admission counted it, and the team whose request this is (see `route_and_call`).
        self.prompt = prompt
        self.caller = caller
        # Targets whose answered 5xx this request may have caused; confirmed theirs if another target serves it.
        self.suspects: list[Target] = []

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.clock()

    def expired(self) -> bool:
        remaining = self.remaining()
        return remaining is not None and remaining <= 0

    async def serve(self, model: Model, call: Call) -> Routed:
        config = model.plan.config
        if config.context_window is not None and not self._fits(model, call):
            self.trail.append(f"{model.name}:context_window")
            raise _ModelFailed("context_window", GatewayError(
                ErrorKind.CONTEXT_LENGTH, f"This model's maximum context length is {config.context_window} tokens; "
                "the request is longer.", param="messages", code="context_length_exceeded"))
        targets = pinned_targets(model.plan, model.targets, self.headers)
        if not targets:
            raise GatewayError(ErrorKind.BAD_REQUEST, f"No deployment of `{model.name}` matches the "
                               f"{self.headers.get('x-switchboard-tags')!r} tags.", code="no_matching_target")
        request: RouteRequest | None = None  # made for a strategy that looks at the request, when one does
        error: GatewayError | None = None
        previous: Target | None = None
        states = self.states
        for number in range(config.retries + 1):
            now = states.clock()
            # `RouteState.available`, spelled out: asked for every target of every request.
            available = [t for t in targets if (state := states.state(t)).healthy and state.breaker.allows(now)]
            if not available:
                if self.exchange.trace.recording:
                    self.exchange.trace.decision("switchboard.route", no_route_event(model, targets, self.states,
                                                                                     now, number + 1))
                self.trail.append(f"{model.name}:no_healthy_target")
                wait = min(self.states.state(t).breaker.reopens_in(now) for t in targets)
                raise _ModelFailed("default", error or GatewayError(
                    ErrorKind.UNAVAILABLE, f"Every deployment of `{model.name}` is failing; retry later.",
                    code="no_healthy_target", retry_after=wait or None))
            # Held targets (Retry-After) go last; a retry prefers a target other than the one that just failed.
            # A lone target needs no ranking (no strategy's ranking changes anything for one).
            if len(available) == 1:
                ranked = available
            else:
                if request is None:
                    request = RouteRequest(call.body)
                ranked = sorted(model.plan.strategy.rank(available, self.states, request),
                                key=lambda t: (self.states.state(t).hold_until > now, t is previous))
            target = ranked[0]
            if self.exchange.trace.recording:
                self.exchange.trace.decision("switchboard.route", route_event(model, ranked, targets, self.states,
                                                                              now, number + 1, previous))
            if model.plan.strategy.watches_attempts:
                if request is None:
                    request = RouteRequest(call.body)
                model.plan.strategy.on_attempt(target, self.states, request)
            sent = call if call.upstream_model == target.upstream_model else dataclasses.replace(
                call, upstream_model=target.upstream_model)
            try:
                response = await self._attempt(model, target, sent)
            except _AttemptFailed as failed:
                error, previous = failed.error, target
                reason = _FALLBACK_REASON.get(failed.failure.kind)
                if reason is not None:
                    raise _ModelFailed(reason, failed.error) from None
                if not failed.failure.retryable:
                    raise failed.error from None
                if number == config.retries or not await self._back_off(model, number, failed.failure, ranked):
                    break
                continue
            self.exchange.response_headers[MODEL_HEADER] = model.name
            if self.suspects:
                self._confirm_suspects(target, config)
            return Routed(response, target, sent, model)
        assert error is not None
        raise _ModelFailed("default", error)

    def _confirm_suspects(self, served: Target, config: ModelPolicy) -> None:
        now = self.states.clock()
        for suspect in self.suspects:
            if suspect.key != served.key and config.circuit_breaker.enabled:
                self.states.state(suspect).breaker.confirm(now, config.circuit_breaker)

    async def _back_off(self, model: Model, number: int, failure: UpstreamFailure, ranked: list[Target]) -> bool:
        """Wait before the next attempt; False when the deadline leaves no room for it."""
        backoff = model.plan.config.backoff
        delay = self.states.rng.uniform(0, min(backoff.max_s, backoff.initial_s * 2 ** number))
        if failure.retry_after is not None and len(ranked) == 1:
            # Only the target that asked us to wait is left: honour it, but never past the longest backoff. A
            # request waiting holds its reservation and a connection; the client can wait as well as we can.
            if failure.retry_after > backoff.max_s:
                return False
            delay = max(delay, failure.retry_after)
        remaining = self.remaining()
        if remaining is not None and delay + _MIN_ATTEMPT_S >= remaining:
            return False
        if self.exchange.trace.recording:
            self.exchange.trace.decision("switchboard.retry", retry_event(model, ranked[0], number + 1, failure, delay))
        if delay > 0:
            await asyncio.sleep(delay)
            self.exchange.upstream_wait_s += delay
        return True

    def _fits(self, model: Model, call: Call) -> bool:
        counter = self.services.counter
        body = call.body
        name = model.targets[0].upstream_model
        family = model.targets[0].provider.adapter.capabilities.tokenizer
        known = self.prompt
        if (known is not None and known.endpoint == call.endpoint.value and known.upstream_model == name
                and known.family == family):
            tokens = known.tokens
        else:
            tokens = counter.count_prompt(call.endpoint, body, name, family)
        window = model.plan.config.context_window
        assert window is not None
        return tokens + (requested_completion(body) or 0) <= window

    async def _attempt(self, model: Model, target: Target, call: Call) -> UpstreamResponse | PrimedStream:
        """One try at one target with `call` already aimed at it; raises `_AttemptFailed`."""
        config = model.plan.config
        states, clock = self.states, self.clock
        state = states.state(target)
        timeout = None if self.deadline is None else self.deadline - clock()  # `remaining()`
        if call.stream and config.ttft_timeout_s is not None:
            timeout = config.ttft_timeout_s if timeout is None else min(timeout, config.ttft_timeout_s)
        started = clock()
        state.in_flight += 1
        state.requests += 1
        state.breaker.on_attempt(states.clock())
        response: UpstreamResponse | PrimedStream | None = None
        try:
            if timeout is None:  # no timer at all: even asyncio.timeout(None) costs a handle per request
                response = await self.attempt(self.services, target, call, self.exchange)
                response = await self._read(response, target, call, config)
            else:
                with Expiry(states.deadlines, max(timeout, 0.0)):
                    response = await self.attempt(self.services, target, call, self.exchange)
                    response = await self._read(response, target, call, config)
        except BaseException as exc:
            state.in_flight -= 1
            if response is not None:
                response.close()
            failure, error = _classify(exc, target, timeout)
            if failure is None:
                state.breaker.on_abandon()
                raise
            if response is not None or isinstance(exc, TimeoutError):
                # Failed after the upstream answered (or the TTFT timeout cut the call): the trace's attempt
                # span and the upstream-error metric learn why here.
                self.exchange.trace.attempt_failed(failure.kind.value, target.provider.name)
            if response is not None:  # it had started answering: it bills the prompt whatever happens next
                self.exchange.settlement.attempt_billed(target, call)
            if failure.retryable:
                caller = self.caller if _maybe_the_requests_fault(failure) else None
                if caller is not None:
                    self.suspects.append(target)
                record_failure(states, target, config, failure, caller)
            else:
                # The upstream answered: it is alive, whatever it thought of the request.
                state.breaker.on_success(states.clock(), config.circuit_breaker)
            outcome = failure.status if failure.kind is not FailureKind.TIMEOUT else "timeout"
            self.trail.append(f"{model.name}@{target.provider.name}:{outcome}")
            raise _AttemptFailed(failure, error) from exc
        state.observe_latency(clock() - started, config.routing.latency_alpha)
        state.breaker.on_success(states.clock(), config.circuit_breaker)
        if not call.stream:
            state.in_flight -= 1  # a stream stays in flight until the relay closes it
        self.trail.append(f"{model.name}@{target.key[0]}:ok")  # the key starts with the provider's name
        return response

    async def _read(self, response: UpstreamResponse, target: Target, call: Call, config: ModelPolicy
                    ) -> UpstreamResponse | PrimedStream:
        """The whole body, or a stream primed up to its first content; time spent waiting is the upstream's."""
        clock = self.clock
        read_from = clock()
        try:
            if call.stream:
                return await prime_stream(response, target, call, config.stream_idle_timeout_s,
                                    TargetOutcome(self.states, target, config), self.exchange, clock)
            return ReadResponse(response.status, response.headers, await response.read())
        finally:
            self.exchange.upstream_wait_s += clock() - read_from


# No retry is started with less time than this left before the deadline: it could not get an answer, and the
# event loop's timers fire up to a millisecond early, so a deadline-bounded attempt can end just short of it.
_MIN_ATTEMPT_S = 0.01


class _AttemptFailed(Exception):
    def __init__(self, failure: UpstreamFailure, error: GatewayError) -> None:
        super().__init__(error.message)
        self.failure = failure
        self.error = error


_FALLBACK_REASON = {FailureKind.CONTEXT_LENGTH: "context_window", FailureKind.CONTENT_FILTER: "content_policy"}


def _classify(exc: BaseException, target: Target, timeout: float | None
              ) -> tuple[UpstreamFailure, GatewayError] | tuple[None, None]:
    secrets = (target.provider.settings.api_key or "",)
    if isinstance(exc, UpstreamFailed):
        return exc.failure, from_upstream(exc.failure, secrets)
    if isinstance(exc, GatewayError):
        cause = exc.__cause__
        if isinstance(cause, UpstreamFailed):
            return cause.failure, exc
        # Refused by the gateway before sending (e.g. unsupported endpoint): not the target's fault.
        return UpstreamFailure(FailureKind.BAD_REQUEST, exc.http_status, exc.message), exc
    if isinstance(exc, TimeoutError):
        failure = UpstreamFailure(FailureKind.TIMEOUT, 504, f"the upstream sent no content within {timeout:.3g}s")
        return failure, from_upstream(failure)
    return None, None


def _maybe_the_requests_fault(failure: UpstreamFailure) -> bool:
    """An answered 5xx: some servers answer a request they cannot parse that way (not overload, not a timeout)."""
    return failure.kind is FailureKind.UPSTREAM_ERROR and failure.status >= 500


class ReadResponse:
    """A non-streamed response whose body was already read (so a cut-short body could be retried).

    What a non-streamed call's successful attempt returns: the reply step takes `body` as it is.
    """

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    async def read(self) -> bytes:
        return self.body

    async def chunks(self) -> AsyncIterator[bytes]:
        yield self.body

    def close(self) -> None:
        pass

    def finish(self) -> None:
        pass
