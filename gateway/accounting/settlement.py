"""Settling a request: its one usage record, its limits reconciled, its trace ended — exactly once.

A `Settlement` is made for every inference request before anything can fail,
and owned by the code that sends the response (`gateway/http/asgi.py:respond`),
which closes it in a `finally`. Everything else only records facts on it as
they become known: who called, what was admitted, which target answered,
what usage the upstream reported, which chunks a stream relayed, whether the
stream's terminal event was seen. So settlement does not depend on any
generator being run to its end, on any consumer noticing a disconnect, or on
the kind of exception that ended the request: `close` runs once, and a
second call is a no-op.

    settlement.caller = ...            # the pipeline's steps record facts
    settlement.completed()             # the terminal event ([DONE], or a whole body) was seen
    settlement.failed(error)           # the reply is an error
    settlement.count()                 # the owner, before a whole reply goes out: limits, budgets, cost
    settlement.close()                 # the owner, once: (what `count` did not do,) usage record, metrics, trace
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.accounting.budgets import MICROS
from gateway.accounting.hierarchy import organization_of
from gateway.accounting.pricing import COST_HEADER, charge, format_usd, mark_estimated, with_cost
from gateway.accounting.tags import Tags
from gateway.accounting.usage import UsageRecord
from gateway.errors import ErrorKind, GatewayError
from providers.base import StreamChunk, Usage

if TYPE_CHECKING:
    from gateway.accounting.limits import Admission, Limiter
    from gateway.cache import Ticket
    from gateway.cache.semantic import Embedded
    from gateway.compiled.policy import KeyEntry, Policy, Target
    from gateway.exchange import Exchange, InferenceRequest, Services
    from providers.base import Call

log = logging.getLogger("switchboard.settlement")

# What the trace of a request that never authenticated is ended with, when no error was recorded on it.
_UNSETTLED = GatewayError(ErrorKind.INTERNAL, "request ended before it was settled", code="internal_error")

# Shared until an attempt is billed (never written to): no dict per request.
_NONE_WASTED: dict[str, int] = {}
# What `_failed_attempts` finds when no attempt failed (nearly every request): nothing to count or price.
_NO_FAILED_ATTEMPTS: tuple[Usage, float | None] = (Usage(estimated=True), None)

# What `Settlement._count` leaves for `_record` when the request never authenticated: no team, nothing counted.
_NOTHING_COUNTED: tuple[Any, ...] = ()

# Outcomes a record can carry besides an error's code.
COMPLETED = "completed"
CLIENT_DISCONNECTED = "client_disconnected"
UPSTREAM_ERROR = "upstream_error"
CACHE_HIT = "cache_hit"
INTERNAL_ERROR = "internal_error"
# A client that went away before its answer: nginx's 499, the de facto status for it.
CLIENT_CLOSED_STATUS = 499


@dataclass(slots=True)
class _Stream:
    """What the relay saw of a stream: enough to estimate usage when the upstream never reported it."""

    call: Call
    seen: list[StreamChunk]
    first_token_at: float | None = None


class Settlement:
    """One request's accounting, closed exactly once by the code that sends its response."""

    __slots__ = ("_billed_attempts", "_closed", "_counted", "_held", "_priced_usage", "_services", "_wasted",
                 "_wasted_by_model", "admission", "cache", "caller", "cost_usd", "end_user", "error", "exchange",
                 "outcome", "policy", "price_version", "request", "status", "stream", "tags", "target", "usage",
                 "variant")

    def __init__(self, services: Services, exchange: Exchange) -> None:
        self._services = services
        self.exchange = exchange
        self._closed = False
        self._counted: tuple[Any, ...] | None = None  # what `count` settled, for `close` to record
        self._held: Any = None  # an upstream stream to release at close, whether or not its relay ran
        # The policy snapshot the request started on: its prices bill the request even if a reload lands midway.
        self.policy: Policy | None = None
        self.caller: KeyEntry | None = None
        self.request: InferenceRequest | None = None
        self.admission: Admission | None = None
        self.cache: Ticket | None = None
        self.target: Target | None = None
        self.stream: _Stream | None = None
        self.usage: Usage | None = None
        self.tags: Tags = ()  # cost attribution (gateway/accounting/tags.py), read once from the request's header
        self.variant: str | None = None  # control, canary or shadow on a model with experiments (experiments.py)
        self.end_user: str | None = None  # the end user the request named (gateway/accounting/hierarchy.py), validated
        self.status = 200
        self.outcome: str | None = None  # None until known: a stream that never saw its end was cut short
        self.error: GatewayError | None = None
        self.cost_usd: float | None = None
        self.price_version: str | None = None
        self._priced_usage: Usage | None = None  # the usage `cost_usd` was priced for: a second pricing is skipped
        # Attempts that failed after the upstream had started answering: it billed at least their prompt.
        self._billed_attempts: tuple[tuple[Target, Call], ...] = ()
        self._wasted: tuple[Usage, float | None] | None = _NO_FAILED_ATTEMPTS
        self._wasted_by_model: dict[str, int] = _NONE_WASTED  # the same prompts by the model that failed them

    # -- facts, recorded by the pipeline's steps --

    def completed(self, usage: Usage | None = None) -> None:
        """The answer is whole: a body was read, or a stream's terminal event was seen."""
        if usage is not None:
            self.usage = usage
        if self.outcome is None:
            self.outcome = COMPLETED

    def failed(self, error: GatewayError, outcome: str | None = None) -> None:
        """The request ends in `error`: a refused or failed request, or a stream cut by an in-band error."""
        self.error = error
        if self.outcome is None:
            self.outcome = outcome or error.code or error.kind.name.lower()

    def streaming(self, call: Call) -> list[StreamChunk]:
        """A stream's relay begins; returns the list the relay appends each relayed chunk to."""
        self.stream = _Stream(call, [])
        return self.stream.seen

    def holds(self, stream: Any) -> None:
        """`stream` (with a `close()`) is released at settlement: a relay that never started cannot leak it."""
        self._held = stream

    def first_token(self, now: float) -> None:
        if self.stream is not None and self.stream.first_token_at is None:
            self.stream.first_token_at = now

    def attempt_billed(self, target: Target, call: Call) -> None:
        """An attempt failed after `target` had answered (a stream that died or stalled before its first
        content, a body cut short): the upstream bills its prompt, so the request is charged for it too."""
        self._billed_attempts += ((target, call),)
        self._wasted = None
        self._priced_usage = None  # a price figured before this attempt failed no longer includes it

    def priced(self, usage: Usage) -> str | None:
        """Price `usage` now (for a header); the same figure, failed attempts included, is billed at close."""
        self._price(usage)
        if self.cost_usd is None:
            return None
        text = format_usd(self.cost_usd)
        self.exchange.response_headers[COST_HEADER] = text
        return text

    def stamped(self, data: bytes, usage: Usage) -> bytes:
        """A stream's usage chunk with the cost the request is billed, failed attempts included."""
        self._price(usage)
        if self.cost_usd is None or self.price_version is None:
            return mark_estimated(data) if usage.estimated else data
        return with_cost(data, self.cost_usd, self.price_version, estimated=usage.estimated)

    def _price(self, usage: Usage) -> None:
        if self.policy is None or usage is self._priced_usage:  # priced already (for a header), nothing since
            return
        cost, self.price_version = charge(self.policy.prices, self.target, usage)
        if self._billed_attempts:
            _, wasted_cost = self._failed_attempts()
            if wasted_cost is not None:
                cost = (cost or 0.0) + wasted_cost
        overhead = self.cache.overhead if self.cache is not None else None
        if overhead is not None and overhead.cost_usd is not None:
            cost = (cost or 0.0) + overhead.cost_usd
        self.cost_usd = cost
        self._priced_usage = usage

    def _settle_limits(self, limiter: Limiter, usage: Usage | None, wasted: Usage, overhead: Embedded | None) -> None:
        """Reconcile the admission: the limits count what the upstreams billed (failed attempts and the cache's
        embedding included), and each model's own limits what was used on it."""
        admission = self.admission
        assert admission is not None
        micros = math.ceil(self.cost_usd * MICROS) if self.cost_usd else 0
        served = self.cache.counted_hit_usage() if self.cache is not None else None
        billed = usage
        if wasted.prompt_tokens:
            billed = _plus(usage, wasted)
        by_model = None
        target = self.target
        if self._billed_attempts or (target is not None and target.public_model != admission.model.name) or \
                overhead is not None:
            by_model = self._tokens_by_model(usage, served, admission.model.name)
        if overhead is not None and overhead.usage is not None and (billed is not None or self.status >= 400):
            billed = _plus(billed, overhead.usage)  # the team's and key's limits; not the requested model's
            served = _plus(served, overhead.usage) if served is not None else None
        limiter.settle(admission, billed, self.status, target, served=served, usd_micros=micros, model_tokens=by_model)

    def _tokens_by_model(self, usage: Usage | None, served: Usage | None, admitted: str) -> dict[str, int] | None:
        """Tokens per public model for its team x model limits; None when the limiter's own estimate applies."""
        if served is not None or (self.cache is not None and self.cache.hit):
            return {admitted: served.total_tokens if served is not None else 0}
        if usage is None and not self._billed_attempts and self.status < 400:
            return None  # no usage known for an answered request: the limiter charges its estimate
        tokens: dict[str, int] = {}
        if usage is not None:
            name = self.target.public_model if self.target is not None else admitted
            tokens[name] = usage.total_tokens
        self._failed_attempts()
        for name, prompt in self._wasted_by_model.items():
            tokens[name] = tokens.get(name, 0) + prompt
        return tokens

    def _failed_attempts(self) -> tuple[Usage, float | None]:
        """Prompt tokens and cost of the attempts the upstreams billed without giving an answer (estimated)."""
        if self._wasted is None:
            prompt, cost = 0, None
            self._wasted_by_model = {}
            for target, call in self._billed_attempts:
                tokens = self._services.counter.count_prompt(call.endpoint, call.body, target.upstream_model,
                                                             target.provider.adapter.capabilities.tokenizer)
                prompt += tokens
                self._wasted_by_model[target.public_model] = self._wasted_by_model.get(target.public_model, 0) + tokens
                if self.policy is not None:
                    priced, _ = charge(self.policy.prices, target, Usage(prompt_tokens=tokens))
                    if priced is not None:
                        cost = (cost or 0.0) + priced
            self._wasted = (Usage(prompt_tokens=prompt, estimated=True), cost)
        return self._wasted

    # -- the one close --

    def count(self) -> None:
        """Reconcile limits and budgets and bill: what the client's answer waits for, so that a request it sends
        on receiving it finds this one counted. Runs at most once, before `close`, which records the rest."""
        if self._closed or self._counted is not None:
            return
        try:
            self._counted = self._count(None)
        except Exception:  # as in `close`: logged, and nothing more is attempted
            self._closed = True
            log.exception("settling request %s failed", self.exchange.request_id)

    def close(self, crashed: BaseException | None = None) -> None:
        """Settle: reconcile limits, bill (unless `count` did), write the usage record, end the trace. Runs once;
        later calls return.

        `crashed`: the unexpected exception that ended the request, if one did (a 500, logged by the caller);
        after `count`, the request's status and outcome stand as counted. A request that never authenticated
        has no team to bill: only the metrics and trace hear of it.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self._record(self._counted if self._counted is not None else self._count(crashed))
        except Exception:  # settlement must never turn an answered request into a failure
            log.exception("settling request %s failed", self.exchange.request_id)

    def _count(self, crashed: BaseException | None) -> tuple[Any, ...]:
        """The request's status and outcome, its usage priced and settled with the limiter; returns what
        `_record` needs: (outcome, usage, the failed attempts' usage and cost), or `_NOTHING_COUNTED`."""
        services, stream, cache = self._services, self.stream, self.cache
        if self._held is not None:
            self._held.close()
        if crashed is not None and self.error is None:
            # Whatever the upstream finished, the client did not get it whole; usage is still what was produced.
            self.outcome = INTERNAL_ERROR
            if stream is None:
                self.status = 500
        if self.error is not None and stream is None:
            self.status = self.error.http_status
        if self.caller is None:
            return _NOTHING_COUNTED
        outcome = self.outcome or CLIENT_DISCONNECTED
        target = self.target
        if outcome == CLIENT_DISCONNECTED and stream is None and target is None and self.error is None:
            self.status = CLIENT_CLOSED_STATUS  # gone before any upstream answered: nothing was produced
        usage = self.usage
        if usage is None and stream is not None and target is not None:
            usage = services.counter.estimate_usage(
                stream.call.endpoint, stream.call.body, [c.data for c in stream.seen],
                target.upstream_model, target.provider.adapter.capabilities.tokenizer)
        wasted, wasted_cost = self._failed_attempts() if self._billed_attempts else _NO_FAILED_ATTEMPTS
        overhead = cache.overhead if cache is not None else None
        if self.cost_usd is None and (usage is not None or wasted_cost is not None or overhead is not None):
            self._price(usage or Usage())
        if services.limiter is not None and self.admission is not None:
            self._settle_limits(services.limiter, usage, wasted, overhead)
        if cache is not None:
            cache.settled(outcome == COMPLETED)
        return outcome, usage, wasted, wasted_cost

    def _record(self, counted: tuple[Any, ...]) -> None:
        """The usage record to the sinks (ledger, access log, metrics) and the end of the trace."""
        services, exchange, stream, cache, caller = self._services, self.exchange, self.stream, self.cache, self.caller
        if caller is None or not counted:
            exchange.trace.failed(self.error or _UNSETTLED, settled=False)
            return
        outcome, usage, wasted, wasted_cost = counted
        request, target, policy, team = self.request, self.target, self.policy, caller.team.name
        started = exchange.started
        elapsed = services.clock() - started
        ttft = None
        if stream is not None and stream.first_token_at is not None:
            ttft = (stream.first_token_at - started) * 1000
        model = request.model if request else ""
        if len(model) > _UNKNOWN_MODEL_CHARS:
            model = _bounded_model_name(model, policy)
        # Positional, in the fields' order: calling a class with keywords packs them into a dict for `__init__` and
        # unpacks them again, which for this record's 24 keywords cost three times the construction itself (19,000
        # against 6,000 instructions). Each line names its field.
        record = UsageRecord(
            exchange.request_id,  # request_id
            team,  # team
            caller.key_id,  # key_id
            request.endpoint._value_ if request else "unknown",  # endpoint (`.value` is a Python-level property)
            model,  # public_model
            target.key[0] if target else None,  # provider (a target's key starts with its name: no property call)
            target.upstream_model if target else None,  # upstream_model
            request.stream if request else False,  # stream
            self.status,  # status
            usage,  # usage
            elapsed * 1000,  # duration_ms
            max(0.0, (elapsed - exchange.upstream_wait_s) * 1000),  # overhead_ms: `Exchange.overhead_ms`, written out
            ttft,  # time_to_first_token_ms
            outcome,  # outcome
            self.cost_usd,  # cost_usd
            self.price_version,  # price_version
            exchange.trace.trace_id,  # trace_id
            None, 0, None,  # cache, cache_tokens, cost_saved_usd: the cache's own fields, set below on a ticket
            exchange.gateway_id,  # gateway_id
            wasted.prompt_tokens,  # failed_attempt_tokens
            wasted_cost,  # failed_attempt_cost_usd
            0, None,  # cache_overhead_tokens, cache_overhead_cost_usd: as the cache's fields
            self.tags,  # tags
            self.variant,  # variant
            organization_of(policy.rules, team) if policy is not None and policy.steps.organizations
            else None,  # organization
            self.end_user,  # end_user
        )
        if cache is not None:
            for name, value in cache.usage_fields().items():
                setattr(record, name, value)
        if stream is not None:
            exchange.trace.streamed(stream.seen)
        if self.error is not None:
            exchange.trace.failed(self.error, settled=True)
        services.recorder.settle(record)
        exchange.trace.finish(record)


# A model name the policy does not define is the client's text: kept for the operator (a typo, a probe), but
# bounded, since it lands in every sink (access log, ledger, spans) once per request.
_UNKNOWN_MODEL_CHARS = 64


def _bounded_model_name(name: str, policy: Policy | None) -> str:
    if len(name) <= _UNKNOWN_MODEL_CHARS or (policy is not None and name in policy.models):
        return name
    return name[:_UNKNOWN_MODEL_CHARS] + "…"


def _plus(usage: Usage | None, wasted: Usage) -> Usage:
    if usage is None:
        return wasted
    return dataclasses.replace(usage, prompt_tokens=usage.prompt_tokens + wasted.prompt_tokens)
