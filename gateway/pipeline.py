"""A request's journey through the gateway, as a sequence of named steps.

    authenticate -> parse -> resolve model -> admit (limits, budgets) -> cache lookup
                 -> route and call (strategy, retries, fallbacks) -> relay (body or stream)
                 -> settle (usage, cost, limits, sinks, trace)

Each step is a plain function with explicit inputs, most of them in a module
of its own; the policy snapshot taken at the start is the one the whole
request uses, so a reload never changes a request halfway.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.auth import authenticate
from gateway.cache import ResponseCache, Ticket, hit_tokens, remember, usage_fields, watch_stream
from gateway.errors import ErrorKind, GatewayError, from_upstream, render, render_stream_error
from gateway.limits import Admission, Limiter, admit, stream_allowance
from gateway.policy import KeyEntry, Model, Policy, Target
from gateway.pricing import COST_HEADER, charge, format_usd, stamp_cost
from gateway.resilience import PrimedStream, route_and_call
from gateway.routing import RouteState
from gateway.telemetry import NO_TRACE, Telemetry, Trace
from gateway.tokens import TokenCounter
from gateway.upstream import UpstreamPools, UpstreamResponse
from gateway.usage import UsageRecord, UsageRecorder
from providers.base import Call, Endpoint, StreamChunk, UpstreamFailed, Usage
from providers.sse import DONE_EVENT, encode_event

_REQUIRED_FIELD = {Endpoint.CHAT: "messages", Endpoint.COMPLETIONS: "prompt", Endpoint.EMBEDDINGS: "input",
                   Endpoint.RESPONSES: "input"}


@dataclass(frozen=True, slots=True)
class Services:
    """What the pipeline needs from the app, injected once at startup."""

    policy: Callable[[], Policy]
    pools: UpstreamPools
    counter: TokenCounter
    recorder: UsageRecorder
    clock: Callable[[], float] = time.perf_counter
    # Target state (in-flight, latency, breakers) for the app's lifetime, across policy reloads.
    routes: RouteState = field(default_factory=RouteState)
    # Traces (gateway/telemetry.py); off unless the policy or the app factory turns them on.
    telemetry: Telemetry = field(default_factory=Telemetry)
    # Rate limits and budgets (gateway/limits.py); None when the app runs without a state store.
    limiter: Limiter | None = None
    # Response caching (gateway/cache/): stores and in-flight requests, across policy reloads.
    cache: ResponseCache = field(default_factory=ResponseCache)


@dataclass(slots=True)
class Exchange:
    """Per-request bookkeeping: identity and where the time went."""

    request_id: str
    started: float
    upstream_wait_s: float = 0.0
    response_headers: dict[str, str] = field(default_factory=dict)
    # The request's spans (gateway/telemetry.py); NO_TRACE when tracing is off.
    trace: Trace = NO_TRACE

    def overhead_ms(self, now: float) -> float:
        return max(0.0, (now - self.started - self.upstream_wait_s) * 1000)


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class StreamReply:
    headers: Mapping[str, str]
    events: AsyncIterator[bytes]


@dataclass(slots=True)
class InferenceRequest:
    endpoint: Endpoint
    body: Mapping[str, Any]
    model: str
    stream: bool
    client_wants_usage: bool


@dataclass(slots=True)
class _Settlement:
    """The facts of a request gathered for its usage record."""

    # The policy snapshot the request started on: its prices bill the request even if a reload lands mid-stream.
    policy: Policy
    caller: KeyEntry | None = None
    request: InferenceRequest | None = None
    target: Target | None = None
    admission: Admission | None = None
    cache: Ticket | None = None


async def handle_inference(
    services: Services, endpoint: Endpoint, exchange: Exchange, headers: Mapping[str, str], body: bytes
) -> Reply | StreamReply:
    """Serve one chat, completions, embeddings or natively passed-through Responses API request."""
    policy = services.policy()
    facts = _Settlement(policy)
    exchange.trace = services.telemetry.start(endpoint.value, headers, exchange)
    try:
        facts.caller = authenticate(policy, headers)
        facts.request = parse_request(endpoint, body)
        model = resolve_model(policy, facts.caller, facts.request.model)
        facts.admission = await admit(services.limiter, policy, facts.caller, endpoint, facts.request.body, model,
                                      exchange.response_headers, exchange.trace)
        model = facts.admission.model if facts.admission else model
        facts.cache = await services.cache.lookup(services, policy, facts.caller, model, facts.request, headers,
                                                  exchange, call_upstream)
        if facts.cache is not None and facts.cache.hit:
            return _cached_reply(services, exchange, facts)
        call = Call(endpoint, facts.request.body, model.targets[0].upstream_model, facts.request.stream,
                    facts.request.client_wants_usage)
        routed = await route_and_call(services, policy, model, call, exchange, headers, call_upstream,
                                      facts.admission.prompt_count if facts.admission else None,
                                      facts.caller.team)
        facts.target, call, response = routed.target, routed.call, routed.response
        if isinstance(response, PrimedStream):  # what a streamed call's attempt returns
            return _stream_reply(services, exchange, facts, call, response)
        return await _complete_reply(services, exchange, facts, call, response)
    except GatewayError as error:
        return _error_reply(services, exchange, facts, error)


def parse_request(endpoint: Endpoint, body: bytes) -> InferenceRequest:
    """Decode and minimally validate the client's JSON; the upstream validates the rest."""
    payload = decode_object(body)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(ErrorKind.BAD_REQUEST, "You must provide a model parameter.", param="model",
                           code="missing_required_parameter")
    required = _REQUIRED_FIELD[endpoint]
    if payload.get(required) is None:
        raise GatewayError(ErrorKind.BAD_REQUEST, f"Missing required parameter: '{required}'.", param=required,
                           code="missing_required_parameter")
    stream = payload.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise GatewayError(ErrorKind.BAD_REQUEST, "'stream' must be a boolean.", param="stream",
                           code="invalid_type")
    if stream and endpoint is Endpoint.EMBEDDINGS:
        raise GatewayError(ErrorKind.BAD_REQUEST, "Embeddings cannot be streamed.", param="stream")
    options = payload.get("stream_options")
    wants_usage = bool(stream and isinstance(options, dict) and options.get("include_usage"))
    return InferenceRequest(endpoint, payload, model, bool(stream), wants_usage)


def decode_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why it is not one."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(ErrorKind.BAD_REQUEST, f"The request body is not valid JSON: {exc}",
                           code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise GatewayError(ErrorKind.BAD_REQUEST, "The request body must be a JSON object.", code="invalid_json")
    return payload


def resolve_model(policy: Policy, caller: KeyEntry, name: str) -> Model:
    """The public model, if it exists and the caller's team may use it.

    Both failures get the same answer, so a caller cannot learn which models
    other teams have.
    """
    model = policy.models.get(name)
    if model is None or not caller.team.may_use(name):
        raise GatewayError(ErrorKind.NOT_FOUND,
                           f"The model `{name}` does not exist or you do not have access to it.",
                           param="model", code="model_not_found")
    return model


def choose_target(model: Model) -> Target:
    """The deployment that serves this request: the model's first target."""
    return model.targets[0]


async def call_upstream(services: Services, target: Target, call: Call, exchange: Exchange) -> UpstreamResponse:
    """Send the call and return a successful response; upstream errors become `GatewayError`s."""
    provider = target.provider
    if call.endpoint not in provider.adapter.capabilities.endpoints:
        raise GatewayError(ErrorKind.BAD_REQUEST,
                           f"The model `{call.body.get('model')}` does not support this endpoint.",
                           code="unsupported_endpoint")
    try:
        request = provider.adapter.build_request(provider.settings, call)
    except UpstreamFailed as exc:  # a translating adapter met something it cannot express upstream
        raise from_upstream(exc.failure) from exc
    request.headers["x-request-id"] = exchange.request_id
    secrets = (provider.settings.api_key or "",)
    clock = services.clock
    waited_from = clock()
    try:
        response = await exchange.trace.send(services.pools.client_for(provider), request, target, call)
        if response.status >= 400:
            error_body = await response.read()
            failure = provider.adapter.classify_error(response.status, response.headers, error_body)
            # Chained to the classified failure so retries can tell what kind it was.
            raise from_upstream(failure, secrets) from UpstreamFailed(failure)
    except UpstreamFailed as exc:
        raise from_upstream(exc.failure, secrets) from exc
    finally:
        exchange.upstream_wait_s += clock() - waited_from
    return response


async def _complete_reply(services: Services, exchange: Exchange, facts: _Settlement, call: Call,
                          response: UpstreamResponse) -> Reply:
    target = facts.target
    assert target is not None
    clock = services.clock
    waited_from = clock()
    try:
        raw = await response.read()
    except UpstreamFailed as exc:
        raise from_upstream(exc.failure, (target.provider.settings.api_key or "",)) from exc
    finally:
        exchange.upstream_wait_s += clock() - waited_from
    try:
        parsed = target.provider.adapter.parse_response(call, raw)
    except UpstreamFailed as exc:
        raise from_upstream(exc.failure) from exc
    headers = _success_headers(exchange, clock())
    remember(facts.cache, parsed)
    exchange.trace.responded(parsed.body, parsed.response_model, parsed.finish_reasons)
    _settle(services, exchange, facts, 200, parsed.usage)
    return Reply(200, parsed.body, headers)


def _cached_reply(services: Services, exchange: Exchange, facts: _Settlement) -> Reply | StreamReply:
    """Answer from the cache: no upstream call, nothing billed, the hit recorded."""
    assert facts.cache is not None
    return facts.cache.reply(_success_headers(exchange, services.clock()),
                             lambda: _settle(services, exchange, facts, 200, Usage(), outcome="cache_hit"))


def _stream_reply(services: Services, exchange: Exchange, facts: _Settlement, call: Call,
                  stream: PrimedStream) -> StreamReply:
    headers = _success_headers(exchange, services.clock())
    headers["content-type"] = "text/event-stream; charset=utf-8"
    headers["cache-control"] = "no-cache"
    headers["x-accel-buffering"] = "no"
    return StreamReply(headers, _relay_stream(services, exchange, facts, call, stream))


async def _relay_stream(services: Services, exchange: Exchange, facts: _Settlement, call: Call,
                        stream: PrimedStream) -> AsyncIterator[bytes]:
    """Pass the upstream's stream through as it arrives, then settle its usage.

    Each batch is what one upstream read delivered, encoded as one write: no
    event waits for another. Runs in the task serving the client: when the
    client goes away the task is cancelled, the upstream connection is closed
    in `finally`, and the usage seen so far (or estimated from the chunks
    relayed) is still settled.
    """
    target = facts.target
    assert target is not None
    clock = services.clock
    wants_usage = call.client_wants_usage
    seen: list[StreamChunk] = []
    usage: Usage | None = None
    outcome = "client_disconnected"
    first_token_at: float | None = None
    done_sent = False
    allowance = stream_allowance(facts.admission)
    batches = watch_stream(facts.cache, stream.batches())
    try:
        async for batch in batches:
            out: list[bytes] = []
            for chunk in batch:
                if allowance is not None and not allowance.take(chunk.data):
                    if out:  # what fitted the budget still reaches the client, then the in-band error
                        yield b"".join(out)
                    raise allowance.error()
                if chunk.usage is not None:
                    usage = chunk.usage
                    if chunk.usage_only and not wants_usage:
                        continue
                    if wants_usage:  # the same authoritative cost a non-streamed reply gets as a header
                        chunk.data = stamp_cost(chunk.data, facts.policy.prices, target, usage)
                seen.append(chunk)
                out.append(encode_event(chunk.data))
            if stream.finished:  # the upstream's last batch: end the client's stream in the same write
                out.append(DONE_EVENT)
                done_sent = True
            if out:
                if first_token_at is None:
                    first_token_at = clock()
                yield b"".join(out)
        outcome = "completed"
        if not done_sent:
            yield DONE_EVENT
    except UpstreamFailed as exc:
        # Content may already be on the wire: end with an in-band error and no
        # [DONE], so no client mistakes half an answer for a whole one.
        outcome = "upstream_error"
        error = from_upstream(exc.failure, (target.provider.settings.api_key or "",))
        yield encode_event(render_stream_error(error))
    except GatewayError as error:  # a hard budget crossed mid-stream (gateway/budgets.py `StreamAllowance`)
        outcome = error.code or "error"
        yield encode_event(render_stream_error(error))
    finally:
        await batches.aclose()  # type: ignore[attr-defined]
        stream.close()
        if usage is None:
            usage = _estimate_stream_usage(services.counter, call, target, seen)
        ttft = (first_token_at - exchange.started) * 1000 if first_token_at is not None else None
        exchange.trace.streamed(seen)
        _settle(services, exchange, facts, 200, usage, outcome=outcome, time_to_first_token_ms=ttft)


def _estimate_stream_usage(counter: TokenCounter, call: Call, target: Target, seen: list[StreamChunk]) -> Usage:
    model, family = target.upstream_model, target.provider.adapter.capabilities.tokenizer
    if call.endpoint is Endpoint.CHAT:
        prompt = counter.count_chat_prompt(call.body, model, family)
    elif call.endpoint is Endpoint.RESPONSES:
        prompt = counter.count_responses_input(call.body, model, family)
    else:
        prompt = counter.count_completion_prompt(call.body, model, family)
    completion = counter.count_stream_output([c.data for c in seen], model, family)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, estimated=True)


def _success_headers(exchange: Exchange, now: float) -> dict[str, str]:
    headers = exchange.response_headers
    headers["x-switchboard-overhead-ms"] = f"{exchange.overhead_ms(now):.3f}"
    return headers


def _error_reply(services: Services, exchange: Exchange, facts: _Settlement, error: GatewayError) -> Reply:
    status, body, headers = render(error)
    headers.update(exchange.response_headers)
    headers["x-switchboard-overhead-ms"] = f"{exchange.overhead_ms(services.clock()):.3f}"
    exchange.trace.failed(error, settled=facts.caller is not None)
    if facts.caller is not None:
        _settle(services, exchange, facts, status, None, outcome=error.code or error.kind.name.lower())
    return Reply(status, body, headers)


def _settle(services: Services, exchange: Exchange, facts: _Settlement, status: int, usage: Usage | None, *,
            outcome: str = "completed", time_to_first_token_ms: float | None = None) -> None:
    now = services.clock()
    caller, request, target = facts.caller, facts.request, facts.target
    assert caller is not None
    if services.limiter is not None:
        services.limiter.settle(facts.admission, usage, status, target, served=hit_tokens(facts.cache))
    cost_usd, price_version = charge(facts.policy.prices, target, usage)
    if cost_usd is not None:
        exchange.response_headers[COST_HEADER] = format_usd(cost_usd)
    record = UsageRecord(
        request_id=exchange.request_id,
        team=caller.team.name,
        key_id=caller.key_id,
        endpoint=request.endpoint.value if request else "unknown",
        public_model=request.model if request else "",
        provider=target.provider.name if target else None,
        upstream_model=target.upstream_model if target else None,
        stream=request.stream if request else False,
        status=status,
        usage=usage,
        duration_ms=(now - exchange.started) * 1000,
        overhead_ms=exchange.overhead_ms(now),
        time_to_first_token_ms=time_to_first_token_ms,
        outcome=outcome,
        cost_usd=cost_usd,
        price_version=price_version,
        trace_id=exchange.trace.trace_id,
        **usage_fields(facts.cache),
    )
    services.recorder.settle(record)
    exchange.trace.finish(record)
