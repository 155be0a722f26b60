"""Admission: rate limits and budgets, checked and reserved before a request runs.

Every request of a team with limits is admitted in one store operation: the
request and its token estimate (prompt counted with tiktoken, plus
`max_tokens`) are reserved against every scope that applies — team, key,
team x model rate limits, organisation, team, end-user and key budgets — all
or nothing (an organisation's counters are under their own hash tag: see
gateway/accounting/hierarchy.py). When the response or stream ends the reservation is
settled to actual usage.

Rate limits use fixed windows aligned to the clock (minute, UTC day).
Boundaries are exact for every scope: `used + requested <= limit` is admitted.
Successful responses and 429s carry OpenAI's `x-ratelimit-*` headers for the
tightest request and token limit that applied. A stream under a budget with
`hard_stop_streams` gets an allowance at admission and is cut by `hard_stop`
when it runs out; usage reports live in gateway/accounting/usage_report.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.accounting import hierarchy, shadow
from gateway.accounting.budget_events import BudgetEvents, settled_key
from gateway.accounting.budgets import (
    MICROS,
    Budget,
    CostFunction,
    StreamAllowance,
    ThresholdEvent,
    log_threshold,
    policy_cost,
)
from gateway.accounting.plans import Frame, Meter, Plan, build_frame, rate_headers, refusal, settle_rows
from gateway.accounting.rules import Rules
from gateway.accounting.usage_report import usage_report
from gateway.errors import ErrorKind, GatewayError
from gateway.state import UNLIMITED, Check, Delta, StateStore, StoreUnavailable, Verdict, across_tags, backend_for
from gateway.telemetry.decisions import admission_event, admission_shape, near_limit, settlement_event
from gateway.telemetry.request_trace import NO_TRACE, Trace
from gateway.tokens.counter import PromptCount, requested_completion
from providers.base import Endpoint, Usage

if TYPE_CHECKING:
    from gateway.compiled.policy import KeyEntry, Model, Policy, Target

log = logging.getLogger("switchboard.limits")

# --- admission -----------------------------------------------------------------------------


@dataclass(slots=True)
class Admission:
    """An admitted request's reservation, settled once when it ends."""

    model: Model
    policy: Policy
    checks: tuple[Check, ...]
    meters: tuple[Meter, ...]
    used: tuple[int, ...]
    prompt_tokens: int
    reserved_tokens: int
    reserved_usd: int
    downgraded_from: str | None = None
    settled: bool = False
    # Set for a stream under a `hard_stop_streams` budget: what it may generate before the relay cuts it.
    allowance: StreamAllowance | None = None
    # The request's trace when its admission made an event, for the reconciliation event at settlement.
    trace: Trace | None = None
    # The prompt as admission counted it, for the context-window check to reuse (None: not counted that way).
    prompt_count: PromptCount | None = None
    # Checks of shadow rules that would have refused this request: their reservations were taken back at
    # admission, as enforcement would never have made them, so settlement leaves them alone.
    unreserved: tuple[int, ...] = ()
    # The frame the checks came from: its `settle_rows` say what settlement reconciles while `meters` are its.
    frame: Frame | None = None




class Limiter:
    """Admits and settles requests against a `StateStore`; owned by the app lifespan."""

    def __init__(self, store: StateStore, counter: Any, *, clock: Callable[[], float] = time.time,
                 cost: CostFunction = policy_cost,
                 on_threshold: Callable[[ThresholdEvent], None] = log_threshold,
                 started_with: Policy | None = None) -> None:
        self.store = store
        self._counter = counter
        self._clock = clock
        self._cost = cost
        self._on_reject: Callable[[str, str, str], None] | None = None
        self._shadow_metric: Any = None
        # Soft thresholds and exhaustion, reported once per period across replicas (budget_events.py).
        self._events = BudgetEvents(store, on_threshold)
        self._end_users = hierarchy.EndUserTracker()
        self._state = _state_wanted(started_with) if started_with is not None else None
        # Request admission may use the store's local leases (state.leases): see `_admit_one`.
        self._admit_leased = functools.partial(store.admit, lease=True) if getattr(store, "leasing", False) \
            else None

    def attach_metrics(self, metrics: Any) -> None:
        """Count refusals and soft thresholds in the gateway's Prometheus registry (gateway/telemetry/metrics.py)."""
        from prometheus_client import Counter

        self._on_reject = metrics.rejected
        self._events.count_in(metrics.registry)
        self._shadow_metric = Counter(
            "switchboard_shadow_rejections", "Requests a shadow-mode limit or budget would have refused (they were "
            "served).", ("team", "scope", "rule"), registry=metrics.registry)
        self._end_users.attach_metrics(metrics)

    def send_alerts_to(self, alert: Callable[[ThresholdEvent], None]) -> None:
        """Hand each budget threshold and exhaustion, once fired (claimed in the store), to `alert`."""
        self._events.alert = alert

    def policy_applied(self, policy: Policy) -> None:
        """Warn when a reloaded policy wants another state store: the store is chosen at startup."""
        wanted = _state_wanted(policy)
        if self._state is not None and wanted != self._state:
            log.warning("the reloaded policy's state store (%s) differs from the one in use (%s); limits keep "
                        "counting in the one in use until the gateway restarts", wanted[1], self._state[1])

    async def start(self) -> None:
        await self.store.start()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Finish the budget reports in flight, then send what is pending to the store and close it, all within
        `timeout_s`: the store logs what is left.

        The reports wait for the store too: past the deadline they are cut short (a threshold's claim is given
        back, so the next look, on any replica, reports it) and the store still gets its turn, if only to log
        what it could not send. A caller cutting the whole close short would leave that unsaid.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._events.drain()
        await self.store.close(max(0.0, deadline - loop.time()))

    async def flush(self) -> None:
        """Wait for pending threshold checks and settlements (tests, shutdown)."""
        await self._events.drain()
        await self.store.flush()

    async def admit(self, policy: Policy, caller: KeyEntry, endpoint: Endpoint, body: Mapping[str, Any],
                    model: Model, headers: MutableMapping[str, str], trace: Trace = NO_TRACE,
                    end_user: str | None = None) -> Admission | None:
        """Reserve this request against every limit and budget that applies; raise 429/503 if refused.

        A budget with `on_exhaust: downgrade` that refuses switches the request
        to its cheaper model, which still counts against (but is not refused by)
        that budget.
        """
        rules = policy.rules
        if rules is None:
            return None
        team = caller.team.name
        now = self._clock()
        user_budget = await self._end_user_budget(rules, team, end_user, now) if end_user is not None else None
        plan = hierarchy.with_end_user(rules.plan(team, caller.key_id, model.name), user_budget)
        if plan is None:
            return None
        prompt = completion = 0
        counted = None
        if plan.needs_tokens:
            prompt, completion = self._estimate(endpoint, body, model, rules.default_completion_tokens)
            # Counted by the rule the context-window check uses (TokenCounter.count_prompt), so it reuses this.
            first = model.targets[0]
            counted = PromptCount(prompt, endpoint._value_, first.upstream_model,  # `.value`: a Python property
                                  first.provider.adapter.capabilities.tokenizer)
        relaxed: set[int] = set()
        downgraded_from = None
        while True:
            usd = self._usd(policy, model, prompt, completion) if plan.needs_usd else 0
            frame = build_frame(plan, now, relaxed) if relaxed else plan.frame(now)
            checks, meters = frame.checks_for(prompt + completion, usd), frame.meters
            try:  # not through `_reserve`: a coroutine less to enter and resume per request
                # One hash tag (no organisation budget): `across_tags.reserve` would hand it to the store as it is.
                groups = frame.tag_groups
                verdict = await (self._admit_one(plan, body)(checks) if len(groups) <= 1 else
                                 across_tags.reserve(self.store, checks, groups))
            except StoreUnavailable as exc:
                raise _unavailable() from exc
            if isinstance(headers, dict):
                rate_headers(frame, checks, verdict, now, headers)
                hierarchy.budget_headers(frame, checks, verdict, now, end_user, headers)
            else:
                headers.update(rate_headers(frame, checks, verdict, now))
                headers.update(hierarchy.budget_headers(frame, checks, verdict, now, end_user))
            if verdict.admitted:
                unreserved = ()
                if plan.shadowed:
                    unreserved = self._shadow_refusals(meters, checks, verdict, team, headers, trace,
                                                       rules.shadow_header)
                # A routine admission makes no event under `admission_events: notable` (nor its settlement one):
                # the request's span already says it went through.
                noted = trace.recording and (
                    downgraded_from is not None or policy.telemetry.traces.admission_events == "all"
                    or near_limit(frame.admission_shape, checks, verdict))
                if noted:
                    trace.decision("switchboard.admission", admission_event(
                        "admitted", model.name, frame.admission_shape, checks, verdict, prompt + completion, usd))
                allowance = None
                if body.get("stream") is True and any(b.hard_stop_streams for b in plan.budgets):
                    allowance = self._allowance(policy, model, meters, verdict, prompt, relaxed)
                # Positional, in the fields' order: keywords would be packed into a dict and unpacked again.
                return Admission(model, policy, checks, meters, verdict.used, prompt, prompt + completion, usd,
                                 downgraded_from, False, allowance, trace if noted else None, counted,
                                 unreserved, frame)
            assert verdict.denied is not None
            meter = meters[verdict.denied]
            budget = meter.budget
            if budget is not None:
                self._events.exhausted(meter.budget, meter.window, meter.unit, meter.limit,
                                      checks[verdict.denied].amount, verdict.used[verdict.denied])
            if budget is not None and budget.on_exhaust == "downgrade" and id(budget) not in relaxed:
                cheaper = policy.models.get(budget.downgrade_to or "")
                if cheaper is not None:
                    if trace.recording:
                        trace.decision("switchboard.admission", {**admission_event(
                            "downgraded", model.name, frame.admission_shape, checks, verdict, prompt + completion, usd),
                            "switchboard.admission.downgraded_to": cheaper.name})
                    log.info("budget of %s spent: %s downgraded to %s", budget.who, model.name, cheaper.name)
                    downgraded_from = downgraded_from or model.name
                    relaxed.add(id(budget))
                    model = cheaper
                    plan = hierarchy.with_end_user(rules.plan(team, caller.key_id, model.name), user_budget) or plan
                    headers["x-switchboard-downgraded-from"] = downgraded_from
                    continue
            if trace.recording:
                trace.decision("switchboard.admission", admission_event(
                    "refused", model.name, frame.admission_shape, checks, verdict, prompt + completion, usd))
            self._rejected(team, meter)
            raise refusal(meter, checks[verdict.denied], verdict.used[verdict.denied], now)

    async def extend(self, admission: Admission, team: str, fallback: Model, trace: Trace = NO_TRACE) -> None:
        """A fallback to `fallback`: reserve what it adds to the admission, or raise its refusal (reserving nothing).

        It adds the team's own rate limits of that model (`model_limits`) and,
        when it costs more than the reservation so far, the difference against
        every USD budget. The request's token estimate is the admission's (the
        first model's tokenizer): counting a big prompt again costs more than
        the difference is worth. Team and key limits already hold this request.
        """
        policy = admission.policy
        rules = policy.rules
        rates = rules.model_rates.get((team, fallback.name), ()) if rules is not None else ()
        now = self._clock()
        tokens = admission.reserved_tokens
        checks: tuple[Check, ...] = ()
        meters: tuple[Meter, ...] = ()
        if rates:
            frame = Plan(rates, (), True, False).frame(now)
            checks, meters = frame.checks_for(tokens, 0), frame.meters
        extra, topped = 0, []
        if any(meter.unit == "usd" for meter in admission.meters):
            prompt = admission.prompt_tokens
            extra = self._usd(policy, fallback, prompt, tokens - prompt) - admission.reserved_usd
            if extra > 0:
                topped = [i for i, meter in enumerate(admission.meters) if meter.unit == "usd"]
                checks += tuple(dataclasses.replace(admission.checks[i], amount=extra) for i in topped)
                meters += tuple(admission.meters[i] for i in topped)
        if not checks:
            self._reallow(admission, fallback)
            return
        verdict = await self._reserve(checks)
        if trace.recording:
            trace.decision("switchboard.admission", {**admission_event(
                "admitted" if verdict.admitted else "refused", fallback.name, admission_shape(meters), checks, verdict,
                tokens, max(0, extra)), "switchboard.admission.fallback": True})
        if not verdict.admitted:
            assert verdict.denied is not None
            meter = meters[verdict.denied]
            self._rejected(team, meter)
            raise refusal(meter, checks[verdict.denied], verdict.used[verdict.denied], now)
        # A top-up joins its budget's reservation, so settlement reconciles one amount per counter.
        merged = list(admission.checks)
        for i in topped:
            merged[i] = dataclasses.replace(merged[i], amount=merged[i].amount + extra)
        count = len(rates)
        admission.checks = (*merged, *checks[:count])
        admission.meters = (*admission.meters, *meters[:count])
        admission.used = (*admission.used, *verdict.used[:count])
        if topped:
            admission.reserved_usd += extra
        self._reallow(admission, fallback)

    def _reallow(self, admission: Admission, fallback: Model) -> None:
        """A hard-stopped stream's allowance at the price of the model that will produce it."""
        if admission.allowance is None:
            return
        relaxed = {id(meter.budget) for meter, check in zip(admission.meters, admission.checks, strict=True)
                   if meter.budget is not None and check.limit == UNLIMITED}
        admission.allowance = self._allowance(admission.policy, fallback, admission.meters,
                                              Verdict(True, admission.used), admission.prompt_tokens, relaxed)

    async def _end_user_budget(self, rules: Rules, team: str, end_user: str | None, now: float) -> Budget | None:
        """The end user's budget (its own or the shared `other` one), when the team gives end users one."""
        users = rules.hierarchy.end_users.get(team) if end_user is not None else None
        if users is None or users.template is None:
            return None
        assert end_user is not None
        try:
            return await self._end_users.budget(self.store, users, end_user, now)
        except StoreUnavailable as exc:
            raise _unavailable() from exc

    async def _reserve(self, checks: tuple[Check, ...],
                       tag_groups: tuple[tuple[int, ...], ...] | None = None) -> Verdict:
        try:
            return await across_tags.reserve(self.store, checks, tag_groups)
        except StoreUnavailable as exc:
            raise _unavailable() from exc

    def _rejected(self, team: str, meter: Meter) -> None:
        if self._on_reject is not None:
            self._on_reject(team, meter.rule.scope if meter.rule else meter.budget.scope,  # type: ignore[union-attr]
                            "budget_exceeded" if meter.budget else "rate_limited")

    def settle(self, admission: Admission | None, usage: Usage | None, status: int,
               target: Target | None = None, *, served: Usage | None = None, usd_micros: int | None = None,
               model_tokens: Mapping[str, int] | None = None) -> None:
        """Reconcile the reservation with what the request used: refund or charge the difference.

        `target` is the deployment that actually served the request (it may
        differ from the model's first after a fallback); USD is priced on it,
        unless `usd_micros` says what the request was billed (the settlement
        passes the figure it puts on the ledger, so the two cannot disagree).
        `served` is a cache hit's usage when its tokens count (gateway/cache/):
        tokens, and the USD of `usd_micros` (a semantic lookup's embedding).
        `model_tokens` splits the tokens by public model for the team x model
        limits: after a fallback, each model's counters get what was used on it
        (a model that only failed gets its reservation back); None: all of it
        is the admitted model's.
        """
        if admission is None or admission.settled:
            return
        admission.settled = True
        if served is not None:
            tokens, usd = served.total_tokens, usd_micros or 0
        elif usage is not None:
            tokens = usage.total_tokens
            if usd_micros is not None:
                usd = usd_micros
            else:
                priced = any(m.unit == "usd" for m in admission.meters)
                cost = self._cost(admission.policy, target or admission.model.targets[0], usage) if priced else None
                usd = math.ceil(cost * MICROS) if cost else 0
        elif status >= 400:
            tokens = usd = 0  # refused or failed before anything was generated: full refund
        else:
            tokens, usd = admission.prompt_tokens, admission.reserved_usd
        deltas = []
        checks, meters, unreserved = admission.checks, admission.meters, admission.unreserved
        frame = admission.frame
        rows = frame.settle_rows if frame is not None and frame.meters is meters else settle_rows(meters)
        for index, in_tokens, model, soft in rows:
            if unreserved and index in unreserved:
                continue
            actual = tokens if in_tokens else usd
            if model is not None and model_tokens is not None:
                actual = model_tokens.get(model, 0)
            check = checks[index]
            if actual != check.amount:
                deltas.append(Delta(check.slices[-1], actual - check.amount, check.expires_at))
            if soft:
                if actual:
                    deltas.append(Delta(settled_key(check.slices[-1]), actual, check.expires_at))
                meter = meters[index]
                self._events.crossed(meter.budget, meter.window, meter.unit, meter.limit,  # type: ignore[arg-type]
                                     admission.used[index] + actual, check.slices)
        if deltas:
            self.store.settle(deltas)
        if admission.trace is not None:
            admission.trace.decision("switchboard.admission.settled", settlement_event(
                admission.reserved_tokens, tokens, admission.reserved_usd, usd))

    def _estimate(self, endpoint: Endpoint, body: Mapping[str, Any], model: Model, default: int) -> tuple[int, int]:
        upstream = model.targets[0].upstream_model
        # The provider family decides the counting method: exact for OpenAI, a documented estimate elsewhere.
        family = model.targets[0].provider.adapter.capabilities.tokenizer
        prompt = self._counter.count_prompt(endpoint, body, upstream, family)
        if endpoint is Endpoint.EMBEDDINGS:
            return prompt, 0
        return prompt, completion_reservation(body, default)

    def _allowance(self, policy: Policy, model: Model, meters: tuple[Meter, ...], verdict: Verdict, prompt: int,
                   relaxed: set[int]) -> StreamAllowance | None:
        """The tightest room left under the plan's hard-stop budgets, in completion tokens.

        Room = limit - counted before this request (other requests' reservations
        included) - this request's prompt: the stream may always use its own
        completion reservation, and beyond it what nobody else has reserved.
        USD room is turned into tokens at the model's output price.
        """
        tightest = None
        for index, meter in enumerate(meters):
            budget = meter.budget
            if budget is None or not budget.hard_stop_streams or budget.shadow or id(budget) in relaxed:
                continue
            room = meter.limit - verdict.used[index]
            if meter.unit == "tokens":
                tokens = room - prompt
            else:
                # Micro-USD per output token equals USD per 1M output tokens.
                per_token = self._cost(policy, model.targets[0], Usage(completion_tokens=1_000_000))
                if not per_token:
                    continue  # unpriced: USD spend is not counted, so it cannot cut a stream
                tokens = math.floor((room - self._usd(policy, model, prompt, 0)) / per_token)
            if tightest is None or tokens < tightest.tokens:
                tightest = StreamAllowance(max(0, tokens), budget, meter.unit, meter.limit, meter.resets_at)
        return tightest

    def _usd(self, policy: Policy, model: Model, prompt: int, completion: int) -> int:
        cost = self._cost(policy, model.targets[0], Usage(prompt, completion))  # prompt_tokens, completion_tokens
        return math.ceil(cost * MICROS) if cost else 0

    def _admit_one(self, plan: Plan, body: Mapping[str, Any]) -> Callable[[tuple[Check, ...]], Any]:
        """How to admit a request under one hash tag: from leases when the store has them, except a stream a
        budget may cut (`hard_stop_streams`), whose allowance is what Redis says is left, not this process's
        view of it."""
        admit = self._admit_leased
        if admit is None or (body.get("stream") is True and any(b.hard_stop_streams for b in plan.budgets)):
            return self.store.admit
        return admit

    def _shadow_refusals(self, meters: tuple[Meter, ...], checks: tuple[Check, ...], verdict: Verdict, team: str,
                         headers: MutableMapping[str, str], trace: Trace, header: bool) -> tuple[int, ...]:
        """Report what this admitted request's shadow rules would have done (refuse it, or nothing), and undo
        their reservations for it; returns the indexes of the checks that would have refused."""
        refused = shadow.would_refuse(meters, checks, verdict)
        if not refused:
            return ()
        if header:
            headers[shadow.HEADER] = ", ".join(shadow.rule_id(meters[i]) for i in refused)
        if trace.recording:
            trace.decision(shadow.EVENT, shadow.shadow_event(meters, checks, verdict, refused))
        self.store.settle(shadow.unreserve(checks, refused))
        for index in refused:
            meter = meters[index]
            if self._shadow_metric is not None:
                scope = meter.rule.scope if meter.rule is not None else meter.budget.scope  # type: ignore[union-attr]
                self._shadow_metric.labels(team, scope, shadow.rule_name(meter)).inc()
            if meter.budget is not None:
                self._events.exhausted(meter.budget, meter.window, meter.unit, meter.limit, checks[index].amount,
                                      verdict.used[index])
        log.info("shadow rules would have refused a request of team %s: %s", team,
                 ", ".join(shadow.rule_id(meters[i]) for i in refused))
        return refused

    async def report(self, policy: Policy, team: str, period: str = "current",
                     end_user: str | None = None) -> dict[str, Any]:
        """Usage, limits and what remains for a team, its keys and its models (gateway/accounting/usage_report.py).

        Settlements this process has made are sent to the store first, so the report includes them (Redis
        otherwise receives them within 20 ms, with the team's next admission).
        """
        await self.store.flush()
        return await usage_report(self.store, policy, team, period, self._clock(), end_user)


def _unavailable() -> GatewayError:
    """503: the state store is unreachable and the policy fails closed."""
    return GatewayError(ErrorKind.UNAVAILABLE, "Rate limits and budgets cannot be checked right now: the state "
                        "store is unreachable and the policy says to fail closed. Retry shortly.",
                        code="state_store_unavailable", retry_after=1.0)


def _state_wanted(policy: Policy) -> tuple[Any, str]:
    return policy.state, backend_for(policy.state, bool(policy.rules and policy.rules.any))


def completion_reservation(body: Mapping[str, Any], default: int) -> int:
    """Completion tokens to reserve: the request's own cap times `n`, else the policy default."""
    value = requested_completion(body) or default
    choices = body.get("n")
    if isinstance(choices, int) and not isinstance(choices, bool) and choices > 1:
        value *= choices
    return value


def stream_allowance(admission: Admission | None) -> StreamAllowance | None:
    """Pipeline hook: what a stream may relay before a hard budget cuts it (`hard_stop_streams`); None: no cut."""
    return admission.allowance if admission is not None else None
