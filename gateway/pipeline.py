"""A request's journey through the gateway, as a sequence of named steps.

    authenticate -> parse -> resolve model -> admit (limits, budgets) -> cache lookup
                 -> route and call (strategy, retries, fallbacks) -> relay (body or stream)
                 -> settle (usage, cost, limits, sinks, trace)

Each step is a plain function with explicit inputs, most of them in a module
of its own; the policy snapshot taken at the start is the one the whole
request uses, so a reload never changes a request halfway.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from operator import attrgetter
from typing import Any

import orjson

from gateway.accounting.hierarchy import EMPTY as EMPTY_HIERARCHY
from gateway.accounting.hierarchy import request_end_user
from gateway.accounting.limits import stream_allowance
from gateway.accounting.settlement import CACHE_HIT, UPSTREAM_ERROR, Settlement
from gateway.accounting.tags import request_tags
from gateway.auth import authenticate
from gateway.cache import recording_stream, remember
from gateway.compiled.policy import KeyEntry, Model, Policy, Target
from gateway.errors import ErrorKind, GatewayError, from_upstream, render, render_stream_error
from gateway.exchange import Exchange, InferenceRequest, Reply, Services, StreamReply
from gateway.request_checks import check_request
from gateway.routing.experiments import choose_variant
from gateway.routing.resilience import ReadResponse, route_and_call
from gateway.routing.streams import PrimedStream
from gateway.upstream.answer_contract import fill_usage, guard_stream
from gateway.upstream.pools import UpstreamResponse
from gateway.upstream.request_ids import explain_silent_refusal, stamp_request_id
from providers.base import Call, Endpoint, StreamChunk, UpstreamFailed, Usage
from providers.canonical import load_exact, lost_integers
from providers.sse import DONE_EVENT, encode_event

log = logging.getLogger("switchboard.server")

_REQUIRED_FIELD = {Endpoint.CHAT: "messages", Endpoint.COMPLETIONS: "prompt", Endpoint.EMBEDDINGS: "input",
                   Endpoint.RESPONSES: "input"}
# Members as module names, and `_value_` rather than `.value`: on Python 3.11 reading a member off its enum class is
# an unspecialized lookup through EnumType's `__getattr__` hook, and `.value` a Python-level property (~15 and ~5
# times the cost of reading a global or a plain attribute), both on every request.
_COMPLETIONS, _EMBEDDINGS = Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS
# A stream batch's fields read in C (`map`), not by a Python loop per chunk.
_usage_of, _data_of = attrgetter("usage"), attrgetter("data")
# Fewer chunks (a server that writes one event per read, the usual case) are encoded one by one: the one-join path
# has a fixed cost that pays from a few chunks on.
_IN_ONE_PASS = 3


async def handle_inference(
    services: Services, endpoint: Endpoint, exchange: Exchange, headers: Mapping[str, str], body: bytes
) -> Reply | StreamReply:
    """Serve one chat, completions, embeddings or natively passed-through Responses API request.

    Every step records what it learns on the exchange's settlement, which the
    code sending the response closes exactly once (gateway/accounting/settlement.py); no
    failure, expected or not, leaves this function as anything but a reply.
    """
    settlement = exchange.settlement
    authenticated = exchange.authenticated
    policy = settlement.policy = authenticated[0] if authenticated is not None else services.policy()
    exchange.trace = services.telemetry.start(endpoint._value_, headers, exchange)
    try:
        caller = settlement.caller = authenticated[1] if authenticated is not None else authenticate(policy, headers)
        request = settlement.request = parse_request(endpoint, body)
        model = resolve_model(policy, caller, request.model)
        steps = policy.steps  # what this policy uses at all: the other steps have nothing to do
        if steps.tags:
            settlement.tags = request_tags(policy.tags, caller.team.name, headers)
        if steps.end_users:
            settlement.end_user = request_end_user(policy.rules.hierarchy if policy.rules else EMPTY_HIERARCHY,
                                                   caller.team.name, headers, request.body)
        # `limits.admit`'s work, spelled out: a coroutine less to create and run per request.
        if steps.admission and (limiter := services.limiter) is not None:
            admission = settlement.admission = await limiter.admit(policy, caller, endpoint, request.body, model,
                                                                   exchange.response_headers, exchange.trace,
                                                                   settlement.end_user)
            model = admission.model if admission else model
        served = await choose_variant(services, exchange, model) if policy.experiments else model
        # A canary neither reads nor fills the cache (gateway/routing/experiments.py).
        if served is model and steps.response_cache:
            settlement.cache = await services.cache.lookup(services, policy, caller, model, request,
                                                           headers, exchange, call_upstream)
            if settlement.cache is not None and settlement.cache.hit:
                return _cached_reply(services, exchange, settlement)
        if policy.experiments:
            services.shadows.mirror(services, exchange, model)  # off the client's path: returns at once
        call = Call(endpoint, request.body, served.targets[0].upstream_model, request.stream,
                    request.client_wants_usage)
        routed = await route_and_call(services, policy, served, call, exchange, headers, call_upstream,
                                      settlement.admission.prompt_count if settlement.admission else None,
                                      caller.team)
        settlement.target, call, response = routed.target, routed.call, routed.response
        if settlement.cache is not None:
            settlement.cache.served_by(routed.model.name, routed.target)
        if isinstance(response, PrimedStream):  # what a streamed call's attempt returns
            return _stream_reply(services, exchange, call, response)
        return await complete_reply(services, exchange, call, response)
    except GatewayError as error:
        return _error_reply(services, exchange, error)
    except Exception:  # a bug, not the client's doing: a 500 that shows only the request id, still settled
        log.exception("unexpected error serving request %s", exchange.request_id)
        return _error_reply(services, exchange, internal_error(exchange.request_id))


def parse_request(endpoint: Endpoint, body: bytes) -> InferenceRequest:
    """Decode and minimally validate the client's JSON; the upstream validates the rest."""
    payload = decode_object(body)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(ErrorKind.BAD_REQUEST, "You must provide a model parameter.", param="model",
                           code="missing_required_parameter")
    required = _REQUIRED_FIELD[endpoint]
    if endpoint is _COMPLETIONS and "prompt" in payload and payload["prompt"] is None:
        payload["prompt"] = ""  # OpenAI's spec makes `prompt` nullable; servers take the empty prompt it means
    if payload.get(required) is None:
        raise GatewayError(ErrorKind.BAD_REQUEST, f"Missing required parameter: '{required}'.", param=required,
                           code="missing_required_parameter")
    if payload[required] == []:  # OpenAI refuses it too; forwarded, some upstreams answer an empty prompt
        raise GatewayError(ErrorKind.BAD_REQUEST, f"Invalid '{required}': empty array. Expected an array with "
                           "minimum length 1, but got an empty array instead.", param=required, code="empty_array")
    stream = payload.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise GatewayError(ErrorKind.BAD_REQUEST, "'stream' must be a boolean.", param="stream",
                           code="invalid_type")
    if stream and endpoint is _EMBEDDINGS:
        raise GatewayError(ErrorKind.BAD_REQUEST, "Embeddings cannot be streamed.", param="stream")
    check_request(endpoint, body, payload)
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
    return load_exact(body) if lost_integers(payload) else payload


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


async def call_upstream(services: Services, target: Target, call: Call, exchange: Exchange) -> UpstreamResponse:
    """Send the call and return a successful response; upstream errors become `GatewayError`s."""
    provider = target.provider
    if call.endpoint not in provider.adapter.capabilities.endpoints:
        raise GatewayError(ErrorKind.BAD_REQUEST,
                           f"The model `{call.body.get('model')}` does not support this endpoint.",
                           code="unsupported_endpoint")
    try:
        request = provider.adapter.build_request(target.settings or provider.settings, call)
    except UpstreamFailed as exc:  # a translating adapter met something it cannot express upstream
        raise from_upstream(exc.failure) from exc
    stamp_request_id(provider, request.headers, exchange.request_id, exchange.request_id is exchange.gateway_id)
    secrets = (provider.settings.api_key or "",)
    clock = services.clock
    waited_from = clock()
    try:
        response = await exchange.trace.send(services.pools.client_for(provider), request, target, call)
        if response.status >= 400:
            error_body = await response.read()
            failure = explain_silent_refusal(provider.adapter.classify_error(response.status, response.headers,
                                                                             error_body), error_body, provider, call)
            # Chained to the classified failure so retries can tell what kind it was.
            raise from_upstream(failure, secrets) from UpstreamFailed(failure)
    except UpstreamFailed as exc:
        raise from_upstream(exc.failure, secrets) from exc
    finally:
        exchange.upstream_wait_s += clock() - waited_from
    return response


async def complete_reply(services: Services, exchange: Exchange, call: Call, response: UpstreamResponse) -> Reply:
    settlement = exchange.settlement
    target = settlement.target
    assert target is not None
    clock = services.clock
    if isinstance(response, ReadResponse):  # what route_and_call returns: the body was read (and timed) there
        raw = response.body
    else:
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
    parsed = fill_usage(parsed, call, target, services.counter)
    headers = _success_headers(exchange, clock())
    remember(settlement.cache, parsed)
    exchange.trace.responded(parsed.body, parsed.response_model, parsed.finish_reasons)
    settlement.completed(parsed.usage)
    if parsed.usage is not None:
        settlement.priced(parsed.usage)
    return Reply(200, parsed.body, headers)


def _cached_reply(services: Services, exchange: Exchange, settlement: Settlement) -> Reply | StreamReply:
    """Answer from the cache: no upstream call, nothing billed, the hit recorded."""
    assert settlement.cache is not None
    settlement.completed(Usage())
    settlement.outcome = CACHE_HIT
    return settlement.cache.reply(_success_headers(exchange, services.clock()), settlement)


def _stream_reply(services: Services, exchange: Exchange, call: Call, stream: PrimedStream) -> StreamReply:
    headers = _success_headers(exchange, services.clock())
    headers["content-type"] = "text/event-stream; charset=utf-8"
    headers["cache-control"] = "no-cache"
    headers["x-accel-buffering"] = "no"
    exchange.settlement.holds(stream)  # released at settlement even if the relay below never runs
    return StreamReply(headers, relay_stream(services, exchange, call, stream))


async def relay_stream(services: Services, exchange: Exchange, call: Call,
                        stream: PrimedStream) -> AsyncIterator[bytes]:
    """Pass the upstream's stream through as it arrives, recording on the settlement what it relays.

    Each batch is what one upstream read delivered, encoded as one write: no
    event waits for another. The batch that carries the upstream's end also
    carries `[DONE]`, and the stream counts as completed before that batch is
    handed on: a consumer that stops reading at `[DONE]` (a front door's
    re-framer) has still received a whole answer. Settling is not this
    generator's job; the request's owner settles whether or not it ran to its end.
    """
    settlement = exchange.settlement
    target = settlement.target
    assert target is not None
    clock = services.clock
    wants_usage = call.client_wants_usage
    seen = settlement.streaming(call)
    allowance = stream_allowance(settlement.admission)
    recording = recording_stream(settlement.cache)
    plain = allowance is None and recording is None  # nothing to do per chunk but for a usage chunk
    first = True  # the first batch's time is the stream's time to first token; later batches skip the clock
    try:
        async for batch in guard_stream(stream, call, target, services.counter):
            out: list[bytes] = []
            rest: Sequence[StreamChunk] = batch
            if plain and len(batch) >= _IN_ONE_PASS:
                # The chunks of a read before its usage chunk (if any), judged by a scan in C, are encoded by one
                # join: the same bytes as encoding their events one by one, without a Python loop per chunk.
                ordinary = len(batch)
                while ordinary and batch[ordinary - 1].usage is not None:
                    ordinary -= 1
                head = batch[:ordinary]
                if ordinary and list(map(_usage_of, head)).count(None) == ordinary:
                    seen += head
                    out.append(b"data: " + b"\n\ndata: ".join(map(_data_of, head)) + b"\n\n")
                    rest = batch[ordinary:]
            for chunk in rest:
                if allowance is not None and not allowance.take(chunk.data):
                    if out:  # what fitted the budget still reaches the client, then the in-band error
                        yield b"".join(out)
                    raise allowance.error()
                if recording is not None:
                    recording.observe(chunk)
                if chunk.usage is not None:
                    settlement.usage = chunk.usage
                    if chunk.usage_only and not wants_usage:
                        continue
                    if wants_usage:  # the same authoritative cost a non-streamed reply gets as a header
                        chunk.data = settlement.stamped(chunk.data, chunk.usage)
                seen.append(chunk)
                out.append(encode_event(chunk.data))
            if stream.finished:  # the upstream's last batch: end the client's stream in the same write
                out.append(DONE_EVENT)
                settlement.completed()
            if out:
                if first:
                    settlement.first_token(clock())
                    first = False
                yield b"".join(out)
        if settlement.outcome is None:
            settlement.completed()
            yield DONE_EVENT
    except UpstreamFailed as exc:
        # Content may already be on the wire: end with an in-band error and no
        # [DONE], so no client mistakes half an answer for a whole one.
        error = from_upstream(exc.failure, (target.provider.settings.api_key or "",))
        settlement.failed(error, UPSTREAM_ERROR)
        yield encode_event(render_stream_error(error))
    except GatewayError as error:  # a hard budget crossed mid-stream (gateway/accounting/budgets.py `StreamAllowance`)
        settlement.failed(error)
        yield encode_event(render_stream_error(error))
    finally:
        stream.close()


def _success_headers(exchange: Exchange, now: float) -> dict[str, str]:
    headers = exchange.response_headers
    headers["x-switchboard-overhead-ms"] = f"{exchange.overhead_ms(now):.3f}"
    return headers


def _error_reply(services: Services, exchange: Exchange, error: GatewayError) -> Reply:
    status, body, headers = render(error)
    headers.update(exchange.response_headers)
    headers["x-switchboard-overhead-ms"] = f"{exchange.overhead_ms(services.clock()):.3f}"
    exchange.settlement.failed(error)
    return Reply(status, body, headers)


def internal_error(request_id: str) -> GatewayError:
    """The only thing a client learns of a gateway bug: that it happened, and which request to quote."""
    return GatewayError(ErrorKind.INTERNAL, f"The gateway failed to process the request (request id {request_id}).",
                        code="internal_error")
