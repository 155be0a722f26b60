"""`POST /v1/responses` served natively: the request goes to upstreams that speak the Responses API.

A model is served natively when every deployment that could answer it — its
targets and, transitively, its fallback models' — declares `Endpoint.RESPONSES`
in its adapter's capabilities (OpenAI, vLLM). Mixing would make the same
request behave differently by which target answered, so such models, and every
other provider, go through the chat translation in `responses.py` instead.

The pipeline relays a native stream as `data:` events ending in `[DONE]`, as
it does for chat; `relay_events` restores the Responses framing: an `event:`
line per event, no `[DONE]`, and a mid-stream failure as the `error` event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from gateway.errors import ErrorKind, GatewayError
from gateway.front_doors.reframing import reframed
from gateway.policy import Policy
from providers.base import Endpoint
from providers.sse import DONE, encode_named_event

# Stored conversation state is refused whichever way the request is served: the
# gateway routes across deployments, so a stored response may live on another one.
STATEFUL_FIELDS = ("previous_response_id", "conversation", "background")
_TYPE = b'"type":"'


def serves_natively(policy: Policy, request: Mapping[str, Any]) -> bool:
    """Whether this request's model is answered only by upstreams that serve the Responses API."""
    name = request.get("model")
    pending, seen = [name], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        model = policy.models.get(current) if isinstance(current, str) else None
        if model is None:
            return False  # unknown model (or fallback): the translated path reports it
        if any(Endpoint.RESPONSES not in t.provider.adapter.capabilities.endpoints for t in model.targets):
            return False
        fallbacks = model.plan.config.fallbacks
        pending.extend([*fallbacks.default, *fallbacks.context_window, *fallbacks.content_policy])
    return True


def refuse_stateful(request: Mapping[str, Any]) -> None:
    """A clear 400 for the stateful Responses features this gateway does not keep."""
    for name in STATEFUL_FIELDS:
        if request.get(name):
            raise GatewayError(ErrorKind.BAD_REQUEST,
                               f"'{name}' is not supported by this gateway: it keeps no response state; "
                               "send the whole conversation as `input` instead.",
                               param=name, code="unsupported_parameter")


def relay_events(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Re-frame the pipeline's `data:` events of a native stream as Responses SSE events."""
    return reframed(events, _NativeStream())


class _NativeStream:
    """Names each native Responses event for its SSE frame; the pipeline's in-band failure becomes `error`."""

    def __init__(self) -> None:
        self.done = False
        self._sequence = 0

    def feed(self, data: bytes) -> list[bytes]:
        if data == DONE:
            return []
        if data.startswith(b'{"error"'):  # the pipeline's own in-band failure, after the stream began
            self.done = True
            error = orjson.loads(data).get("error") or {}
            payload = {"type": "error", "sequence_number": self._sequence,
                       "code": error.get("code") or error.get("type"), "message": error.get("message"),
                       "param": error.get("param")}
            return [encode_named_event("error", orjson.dumps(payload))]
        self._sequence += 1
        return [encode_named_event(event_type(data), data)]


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
