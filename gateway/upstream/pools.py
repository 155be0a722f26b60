"""The only module that talks to upstreams.

One pooled client per provider, kept across policy reloads while the
provider's connection settings are unchanged. Network exceptions are
translated into `UpstreamFailed` here, by one table, so nothing above this
module sees an aiohttp type.

aiohttp is the client because it measured 5.4x less CPU per proxied request
than httpx's default transport on the target machine (loadtests/README.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from yarl import URL

from providers.base import (
    EngineReply,
    FailureKind,
    InProcessEngine,
    TokenCounting,
    UpstreamFailed,
    UpstreamFailure,
    UpstreamRequest,
)
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


class _AiohttpResponse:
    __slots__ = ("_client", "_response", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse, client: AiohttpClient) -> None:
        self._response = response
        self._client = client
        self.status = response.status
        self.headers = response.headers

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except _NETWORK_ERRORS as exc:
            raise _translate(exc) from exc
        finally:
            self._response.release()

    def chunks(self) -> AsyncIterator[bytes]:
        return _AiohttpChunks(self)

    def close(self) -> None:
        # Closing (not releasing) drops the connection, which is how the
        # upstream learns that a stream was abandoned and stops generating.
        if not self._response.closed:
            self._response.close()

    def finish(self) -> None:
        # A stream's end event usually comes a read before the end of the HTTP body (the chunked
        # terminator): closing there would cost the next call a new connection, and over TLS a handshake.
        if self._response.content.is_eof():
            self._response.release()
        elif not self._response.closed:
            self._client.drain_later(self._response)


class _AiohttpChunks:
    """The body as it arrives, network errors translated; the response is closed at the end.

    A class rather than an async generator: a generator abandoned after `[DONE]` is finalized
    through the event loop's thread-safe wake-up, which cost a syscall and a task per stream.
    """

    __slots__ = ("_read", "_response")

    def __init__(self, response: _AiohttpResponse) -> None:
        self._response = response
        self._read = response._response.content.readany

    def __aiter__(self) -> _AiohttpChunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._read()
        except _NETWORK_ERRORS as exc:
            self._response.close()
            raise _translate(exc) from exc
        except BaseException:
            self._response.close()
            raise
        if not chunk:
            self._response.close()
            raise StopAsyncIteration
        return chunk


class AiohttpClient:
    """The pooled HTTP client of one provider."""

    def __init__(self, provider: Provider) -> None:
        connector = aiohttp.TCPConnector(
            limit=provider.max_connections,
            keepalive_timeout=provider.keepalive_s or None,
            force_close=provider.keepalive_s == 0,
            ttl_dns_cache=300,
        )
        # A default User-Agent rather than `skip_auto_headers`, which made aiohttp copy and extend the
        # headers of every request to find what to skip. No cookie jar: every team shares this session, and
        # a cookie an upstream set for one caller would otherwise be sent with everyone's later requests.
        self._session = aiohttp.ClientSession(  # noqa: TID251 - this module is the one place for it
            connector=connector, auto_decompress=True, headers={"user-agent": USER_AGENT},
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        # Parsed URLs by string: an adapter builds the same few URLs again and again, and parsing one
        # cost more than the rest of aiohttp's request setup. Bounded, as a URL may carry a model name.
        self._urls: dict[str, URL] = {}
        self._timeout = aiohttp.ClientTimeout(
            total=provider.total_timeout_s, connect=provider.connect_timeout_s,
            sock_read=provider.first_byte_timeout_s,
        )
        self._draining: set[asyncio.Task[None]] = set()

    async def open(self, request: UpstreamRequest) -> UpstreamResponse:
        try:
            response = await self._session.request(
                request.method, self._url(request.url), data=request.body, headers=request.headers,
                timeout=self._timeout,
            )
        except _NETWORK_ERRORS as exc:
            raise _translate(exc) from exc
        return _AiohttpResponse(response, self)

    def drain_later(self, response: aiohttp.ClientResponse) -> None:
        """Read what is left of a finished response off the request path, then pool its connection."""
        task = asyncio.get_running_loop().create_task(_drain(response))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def close(self) -> None:
        for task in list(self._draining):
            task.cancel()
        await self._session.close()

    def _url(self, url: str) -> URL:
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) >= _MAX_CACHED_URLS:
                self._urls.clear()
            parsed = self._urls[url] = URL(url)
        return parsed


_MAX_CACHED_URLS = 256
# How long a finished stream's last bytes may take to arrive before its connection is dropped instead of pooled.
_DRAIN_S = 1.0


async def _drain(response: aiohttp.ClientResponse) -> None:
    try:
        async with asyncio.timeout(_DRAIN_S):
            while await response.content.readany():
                pass  # anything after the end event carries nothing the caller wanted
    except _NETWORK_ERRORS:  # a timeout included: the connection is not worth keeping
        response.close()
    except BaseException:
        response.close()
        raise
    else:
        response.release()


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
        if stale:
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
        return AiohttpClient(provider)


# The one table from network exceptions to failure kinds; order matters
# (subclasses before their bases).
_EXCEPTION_KINDS: tuple[tuple[type[BaseException], FailureKind, str], ...] = (
    (aiohttp.ServerTimeoutError, FailureKind.TIMEOUT, "the upstream did not answer in time"),
    (TimeoutError, FailureKind.TIMEOUT, "the upstream did not answer in time"),
    (aiohttp.ClientConnectorError, FailureKind.CONNECTION, "could not connect to the upstream"),
    (aiohttp.ServerDisconnectedError, FailureKind.CONNECTION, "the upstream closed the connection"),
    (aiohttp.ClientPayloadError, FailureKind.CONNECTION, "the upstream response was cut short"),
    (aiohttp.ClientError, FailureKind.CONNECTION, "the connection to the upstream failed"),
    (OSError, FailureKind.CONNECTION, "the connection to the upstream failed"),
)


_NETWORK_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)


def _translate(exc: BaseException) -> UpstreamFailed:
    kind, message = next(
        ((kind, message) for exc_type, kind, message in _EXCEPTION_KINDS if isinstance(exc, exc_type)),
        (FailureKind.CONNECTION, "the connection to the upstream failed"),
    )
    status = 504 if kind is FailureKind.TIMEOUT else 502
    return UpstreamFailed(UpstreamFailure(kind, status, message))
