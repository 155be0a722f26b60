"""The only module that talks to upstreams.

One pooled client per provider, kept across policy reloads while the
provider's connection settings are unchanged. Network failures reach the
layers above as `UpstreamFailed` only.

The client is the project's own HTTP/1.1 client (gateway/upstream/http1.py):
it measured N x less CPU per proxied request than aiohttp's, which had
replaced httpx's for 5.4x less than that one (loadtests/README.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any, Protocol

from gateway.upstream.http1 import Http1Client
from providers.base import EngineReply, InProcessEngine, TokenCounting, UpstreamRequest
from providers.sse import encode_event

if TYPE_CHECKING:
    from gateway.compiled.policy import Policy, Provider

log = logging.getLogger("switchboard.upstream")


def _user_agent() -> str:
    try:
        return f"switchboard/{metadata.version('switchboard')}"
    except metadata.PackageNotFoundError:
        return "switchboard"


USER_AGENT = _user_agent()


class UpstreamResponse(Protocol):
    status: int
    headers: Mapping[str, str]

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    def close(self) -> None:
        """Abandon the response: the connection is dropped, which tells the upstream to stop."""

    def finish(self) -> None:
        """The caller has all it wanted (a stream's end event): keep the connection for the next call if it can."""


class UpstreamClient(Protocol):
    async def open(self, request: UpstreamRequest) -> UpstreamResponse: ...

    async def close(self) -> None: ...


class _InProcessResponse:
    def __init__(self, reply: EngineReply) -> None:
        self.status = reply.status
        self.headers: Mapping[str, str] = {
            "content-type": "text/event-stream" if reply.streamed else "application/json"
        }
        self._reply = reply

    async def read(self) -> bytes:
        return self._reply.body

    async def chunks(self) -> AsyncIterator[bytes]:
        interval = self._reply.event_interval_s
        for index, event in enumerate(self._reply.events):
            if interval and index:
                await asyncio.sleep(interval)
            yield encode_event(event)
        yield b"data: [DONE]\n\n"

    def close(self) -> None:
        pass

    def finish(self) -> None:
        pass


class InProcessClient:
    """Serves a provider whose engine runs inside the gateway (the mock)."""

    def __init__(self, engine: InProcessEngine) -> None:
        self._engine = engine

    async def open(self, request: UpstreamRequest) -> UpstreamResponse:
        reply = self._engine.respond(request)
        if reply.first_delay_s:
            await asyncio.sleep(reply.first_delay_s)
        return _InProcessResponse(reply)

    async def close(self) -> None:
        pass


class UpstreamPools:
    """Owns every provider's client for the lifetime of the app.

    Clients are keyed by the provider's connection settings, so a policy
    reload that leaves a provider unchanged keeps its warm connections, and
    one that changes it gets a new pool while in-flight calls finish on the old.
    """

    def __init__(self, counter: TokenCounting) -> None:
        self._counter = counter
        self._clients: dict[tuple[Any, ...], UpstreamClient] = {}
        # Each provider object's client, by the object's id (the object is held, so the id stays its own): hashing
        # `pool_identity` per request hashes its settings' options, a pydantic model hashed in Python. Emptied
        # whenever `_clients` loses an entry or a policy is prepared, so it only ever repeats `_clients`' answer.
        self._by_provider: dict[int, tuple[Provider, UpstreamClient]] = {}

    def client_for(self, provider: Provider) -> UpstreamClient:
        known = self._by_provider.get(id(provider))
        if known is not None and known[0] is provider:
            return known[1]
        client = self._clients.get(provider.pool_identity)
        if client is None:
            client = self._clients[provider.pool_identity] = self._new_client(provider)
        self._by_provider[id(provider)] = (provider, client)
        return client

    def prepare(self, policy: Policy) -> None:
        """Create the pools a policy needs up front, so no request pays for it."""
        self._by_provider = {}  # providers of earlier policies are not kept alive by it
        for provider in policy.providers.values():
            self.client_for(provider)

    async def retire_unused(self, policy: Policy, grace_s: float) -> None:
        """Close the pools the current policy no longer uses, once in-flight calls had time to end."""
        wanted = {p.pool_identity for p in policy.providers.values()}
        stale = {key: client for key, client in self._clients.items() if key not in wanted}
        for key in stale:
            del self._clients[key]
        if stale:
            self._by_provider = {}
            await asyncio.sleep(grace_s)
            for client in stale.values():
                await client.close()

    async def close(self) -> None:
        clients, self._clients, self._by_provider = list(self._clients.values()), {}, {}
        for client in clients:
            await client.close()

    def _new_client(self, provider: Provider) -> UpstreamClient:
        adapter = provider.adapter
        if adapter.capabilities.in_process:
            return InProcessClient(adapter.engine(provider.settings.options, self._counter))  # type: ignore[attr-defined]
        return Http1Client(provider, USER_AGENT)
