"""The request id on the way upstream, and what a client learns when an upstream refuses without saying why.

Each provider sends the request id under its own header, or not at all
(`providers.<name>.request_id`, defaults per kind in the adapters'
`Capabilities`). Servers differ in what they accept there: llama-cpp-python
validates `x-request-id` as a UUID and answers anything else with an empty 400,
which had failed every call through the gateway. So by default an id goes to a
self-hosted server as a UUID: the id itself when it is one (the gateway's own
ids are UUIDv7s, used when a client sends none), else a UUID derived
from it with uuid5, which an operator can recompute from the id in the logs:
`uuid.uuid5(uuid.NAMESPACE_URL, "switchboard:" + request_id)`.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

from providers.base import Call, UpstreamFailure

if TYPE_CHECKING:
    from gateway.compiled.policy import Provider

_PREFIX = "switchboard:"


def upstream_request_id(request_id: str, as_uuid: bool) -> str:
    """The id as the upstream gets it: unchanged, or as a UUID (itself if it is one)."""
    if not as_uuid:
        return request_id
    try:
        return str(uuid.UUID(request_id)) if len(request_id) == 36 else _derived(request_id)
    except ValueError:
        return _derived(request_id)


def _derived(request_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, _PREFIX + request_id))


def stamp_request_id(provider: Provider, headers: MutableMapping[str, str], request_id: str,
                     is_uuid: bool = False) -> None:
    """Put the request id on an upstream request's headers the way `provider` takes it (or not at all).

    `is_uuid`: the id is known to be a UUID already (the gateway made it). Set last, over the provider's
    own `headers:`, so a policy cannot end up sending two ids.
    """
    header = provider.request_id_header
    if header is not None:
        headers[header] = request_id if is_uuid else upstream_request_id(request_id, provider.request_id_uuid)


def explain_silent_refusal(failure: UpstreamFailure, body: bytes, provider: Provider, call: Call
                           ) -> UpstreamFailure:
    """An error whose body said nothing, reworded to say which upstream refused which request.

    Without this a client saw only `upstream returned HTTP 400`, with no hint that the gateway's own
    request (not the client's) could be what the upstream objected to.
    """
    if body.strip():
        return failure
    message = (f"upstream `{provider.name}` (kind {provider.settings.kind}) refused the {call.endpoint.value} "
               f"request for model `{call.upstream_model}` with HTTP {failure.status} and an empty body")
    return dataclasses.replace(failure, message=message, code=failure.code or "upstream_refused")
