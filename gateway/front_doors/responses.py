"""`POST /v1/responses`: the OpenAI Responses API for any provider.

Models served only by upstreams with the Responses API (OpenAI, vLLM) are passed
through natively (responses_passthrough.py); every other one is translated to
chat and back (responses_translation.py). `previous_response_id` and storing
are served from the gateway's own response store on both paths
(conversation.py); `conversation` and `background` are refused with a 400.
Errors are OpenAI-shaped already and pass through unchanged.

Nothing model-specific happens before the caller is known to be allowed the
model: an unknown and a forbidden model get the pipeline's one answer, so the
body's validation cannot tell them apart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from gateway.auth import authenticate
from gateway.compiled.policy import KeyEntry, Policy
from gateway.errors import ErrorKind, GatewayError, render
from gateway.exchange import Exchange, Reply, Services, StreamReply
from gateway.front_doors.conversation import (
    Turn,
    keep,
    kept_events,
    open_turn,
    rules_for,
    upstream_input,
    with_identity,
)
from gateway.front_doors.org_resources import refuse_unlisted
from gateway.front_doors.reframing import reframed
from gateway.front_doors.responses_passthrough import (
    NativeStream,
    refuse_stateful,
    relay_events,
    served_only_by,
    serves_natively,
)
from gateway.front_doors.responses_translation import ResponseStream, chat_request, response
from gateway.http.asgi import request_headers, respond
from gateway.pipeline import decode_object, handle_inference
from gateway.request_checks import check_request
from gateway.response_store import ResponseStore
from providers.base import Endpoint

# Provider kinds whose prompt caching the gateway steers for chained turns: Anthropic by cache_control
# breakpoints, OpenAI by a prompt_cache_key shared by the conversation's turns.
_BREAKPOINT_KINDS = frozenset({"anthropic"})
_CACHE_KEY_KINDS = frozenset({"openai"})


class ResponsesRoute:
    """ASGI endpoint for POST /v1/responses.

    Given the app's services and response store when the app is built, as `InferenceRoute` is: reading them
    from Starlette's `app.state` on every request goes through a failed attribute lookup (an AttributeError
    made and dropped).
    """

    def __init__(self, services: Services, store: ResponseStore) -> None:
        self.services = services
        self.store = store

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        services, store = self.services, self.store
        headers = request_headers(scope)

        async def serve(exchange: Exchange, raw: bytes) -> Reply | StreamReply:
            policy = services.policy()
            try:
                caller = authenticate(policy, headers)  # 401 before anything about the body is said
                request = decode_object(raw)
            except GatewayError as error:
                return Reply(*render(error))
            if not _may_use(policy, caller, request.get("model")):
                # The pipeline's own 400 (missing field) or 404, the same for an unknown and a forbidden model.
                return await handle_inference(services, Endpoint.RESPONSES, exchange, headers, raw)
            try:
                turn, native, body = await _prepare(policy, store, caller, request, raw)
            except GatewayError as error:
                status, error_body, error_headers = render(error)
                return Reply(status, error_body, {**exchange.response_headers, **error_headers})
            reply = await handle_inference(services, Endpoint.RESPONSES if native else Endpoint.CHAT, exchange,
                                           headers, body)
            if isinstance(reply, StreamReply):
                return StreamReply(reply.headers, _events(reply, request, turn, store, native))
            if reply.status >= 400:
                return reply
            return await _finished(reply, request, turn, store, native)

        await respond(scope, receive, send, services, serve)


def _may_use(policy: Policy, caller: KeyEntry, model: Any) -> bool:
    return isinstance(model, str) and model in policy.models and caller.team.may_use(model)


async def _prepare(policy: Policy, store: ResponseStore, caller: KeyEntry, request: Mapping[str, Any],
                   raw: bytes) -> tuple[Turn, bool, bytes]:
    """The turn, whether it is served natively, and the body for the pipeline."""
    rules = rules_for(policy.responses, caller)
    refuse_stateful(request)
    refuse_unlisted(request, rules)
    native = serves_natively(policy, request)
    if not native:
        # The pipeline checks what it is given: for a translated request, the chat request, whose fields have other
        # names (`max_tokens`, a system message). The client's own fields are checked here, under their names.
        check_request(Endpoint.RESPONSES, raw, request)
    turn = await open_turn(store, rules, caller, request)
    outgoing = {k: v for k, v in request.items() if k != "previous_response_id"}
    sent_before = 0
    if turn.previous_id is not None:
        outgoing["input"], sent_before = upstream_input(turn, native)
    model = request.get("model")
    if native:
        if not rules.upstream_store:  # kept on the operator's account only where the policy says so
            outgoing["store"] = False
        if turn.stateful and "prompt_cache_key" not in outgoing and served_only_by(policy, model, _CACHE_KEY_KINDS):
            outgoing["prompt_cache_key"] = turn.cache_key()
        return turn, True, _encoded(outgoing)
    breakpoints = turn.keep and served_only_by(policy, model, _BREAKPOINT_KINDS)
    chat = chat_request(outgoing, sent_before if breakpoints else None, mark_end=breakpoints)
    return turn, False, _encoded(chat)


def _encoded(body: Mapping[str, Any]) -> bytes:
    """The pipeline's request body. (Only around the encoding: orjson's error is a TypeError, and anything else
    raising one is a bug to report as such, not a request nested too deeply.)"""
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:  # more than 255 levels deep: no upstream request can carry it
        raise GatewayError(ErrorKind.BAD_REQUEST, "The request is nested too deeply.", param="input",
                           code="nesting_too_deep") from None


async def _finished(reply: Reply, request: Mapping[str, Any], turn: Turn, store: ResponseStore,
                    native: bool) -> Reply:
    """The Response for a successful non-streamed reply, kept first when the turn is stored."""
    if native and not turn.stateful:
        return reply  # passed through byte for byte
    result = with_identity(orjson.loads(reply.body), turn) if native else \
        response(orjson.loads(reply.body), request, turn.identity())
    if turn.keep:
        try:
            await keep(store, turn, result)
        except GatewayError as error:
            status, body, headers = render(error)
            return Reply(status, body, {**reply.headers, **headers})
    return Reply(reply.status, orjson.dumps(result), reply.headers)


def _events(reply: StreamReply, request: Mapping[str, Any], turn: Turn, store: ResponseStore,
            native: bool) -> AsyncIterator[bytes]:
    async def keeper(final: dict[str, Any]) -> None:
        await keep(store, turn, final)

    if native and not turn.stateful:
        return relay_events(reply.events)
    stream: NativeStream | ResponseStream
    if native:
        stream = NativeStream(turn.identity())
        events = relay_events(reply.events, stream)
    else:
        stream = ResponseStream(request, turn.identity())
        events = reframed(reply.events, stream)
    return kept_events(events, stream, keeper if turn.keep else None)
