"""`POST /v1/responses` served natively: the request goes to upstreams that speak the Responses API.

A model is served natively when every deployment that could answer it — its
targets and, transitively, its fallback models' — declares `Endpoint.RESPONSES`
in its adapter's capabilities (OpenAI, vLLM). Mixing would make the same
request behave differently by which target answered, so such models, and every
other provider, go through the chat translation in `responses.py` instead.

The pipeline relays a native stream as `data:` events ending in `[DONE]`, as
it does for chat; `relay_events` restores the Responses framing: an `event:`
line per event, no `[DONE]`, and a mid-stream failure as the `error` event.
A stateful request (stored, or continuing a stored response) gets the
gateway's identity (id, store, previous_response_id) on every Response object
the upstream sends, and its terminal event waits until the response is kept
(front_doors/conversation.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import orjson

from gateway.compiled.policy import Policy, Target
from gateway.errors import ErrorKind, GatewayError, render_stream_error
from gateway.front_doors.reframing import reframed
from providers.base import Endpoint
from providers.sse import DONE, encode_named_event

# Conversations live on one upstream account and background responses need a job
# queue: neither is kept by the gateway, whichever way the request is served.
# (`previous_response_id` is served from the gateway's store: conversation.py.)
STATEFUL_FIELDS = ("conversation", "background")
_TYPE = b'"type":"'
# Events that carry the whole Response object; the terminal ones end the answer.
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_CARRY_RESPONSE = _TERMINAL | {"response.created", "response.in_progress", "response.queued"}


def deployments(policy: Policy, name: Any) -> Iterator[Target | None]:
    """Every target that could answer model `name`, its fallback models' included; None for an unknown one."""
    pending, seen = [name], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        model = policy.models.get(current) if isinstance(current, str) else None
        if model is None:
            yield None
            continue
        yield from model.targets
        fallbacks = model.plan.config.fallbacks
        pending.extend([*fallbacks.default, *fallbacks.context_window, *fallbacks.content_policy])


def serves_natively(policy: Policy, request: Mapping[str, Any]) -> bool:
    """Whether this request's model is answered only by upstreams that serve the Responses API."""
    return all(t is not None and Endpoint.RESPONSES in t.provider.adapter.capabilities.endpoints
               for t in deployments(policy, request.get("model")))


def served_only_by(policy: Policy, model: Any, kinds: frozenset[str]) -> bool:
    """Whether every deployment that could answer `model` is of one of the provider `kinds`."""
    return all(t is not None and t.provider.settings.kind in kinds for t in deployments(policy, model))


def refuse_stateful(request: Mapping[str, Any]) -> None:
    """A clear 400 for the stateful Responses features this gateway does not keep."""
    for name in STATEFUL_FIELDS:
        if request.get(name):
            raise GatewayError(ErrorKind.BAD_REQUEST,
                               f"'{name}' is not supported by this gateway; send the conversation as `input`, "
                               "or chain turns with `previous_response_id`.",
                               param=name, code="unsupported_parameter")


def relay_events(events: AsyncIterator[bytes], stream: NativeStream | None = None) -> AsyncIterator[bytes]:
    """Re-frame the pipeline's `data:` events of a native stream as Responses SSE events."""
    return reframed(events, stream or NativeStream())


class NativeStream:
    """Names each native Responses event for its SSE frame; the pipeline's in-band failure becomes `error`.

    With an `identity`, every Response object the upstream sends gets it, and
    the terminal event is held back as `final` until `terminal()` is asked for.
    """

    def __init__(self, identity: Mapping[str, Any] | None = None) -> None:
        self.done = False
        self.final: dict[str, Any] | None = None
        self._identity = identity
        self._sequence = 0
        self._terminal: dict[str, Any] = {}

    def feed(self, data: bytes) -> list[bytes]:
        if data == DONE:
            return []
        if data.startswith(b'{"error"'):  # the pipeline's own in-band failure, after the stream began
            self.done = True
            error = orjson.loads(data).get("error") or {}
            return [self._error(error.get("code") or error.get("type"), error.get("message"), error.get("param"))]
        self._sequence += 1
        kind = event_type(data)
        if self._identity is not None and kind in _CARRY_RESPONSE:
            event = orjson.loads(data)
            if isinstance(event.get("response"), dict):
                event["response"].update(self._identity)
                if kind in _TERMINAL:
                    self._terminal, self.final = event, event["response"]
                    self._sequence -= 1  # an `error` sent instead of it takes its number
                    return []
                data = orjson.dumps(event)
        return [encode_named_event(kind, data)]

    def terminal(self) -> bytes:
        return encode_named_event(self._terminal["type"], orjson.dumps(self._terminal))

    def failure(self, error: GatewayError) -> bytes:
        body = orjson.loads(render_stream_error(error))["error"]
        return self._error(body.get("code"), body.get("message"), body.get("param"))

    def _error(self, code: Any, message: Any, param: Any) -> bytes:
        payload = {"type": "error", "sequence_number": self._sequence, "code": code, "message": message,
                   "param": param}
        return encode_named_event("error", orjson.dumps(payload))


def event_type(data: bytes) -> str:
    """The top-level `type` of a Responses event, without decoding it when the layout allows.

    OpenAI writes `type` first; engines serialising the SDK's pydantic models
    (vLLM) write it last, as fields are declared alphabetically. Anything else
    is decoded.
    """
    if data.startswith(b'{"type":"'):
        return data[9 : data.index(b'"', 9)].decode()
    at = data.rfind(_TYPE)
    if at >= 0:
        end = data.find(b'"', at + len(_TYPE))
        if end >= 0 and data[end + 1 :].strip() == b"}":
            return data[at + len(_TYPE) : end].decode()
    kind = orjson.loads(data).get("type")
    return kind if isinstance(kind, str) else "message"
