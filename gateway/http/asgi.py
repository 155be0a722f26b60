"""ASGI plumbing: request ids, reading bodies, sending replies, noticing disconnects.

Written as plain ASGI rather than Starlette's Request/Response classes because
this is the hot path: streams in particular need prompt cancellation on
disconnect without a task group per response.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import orjson

from gateway.accounting.settlement import Settlement
from gateway.errors import ErrorKind, GatewayError, render
from gateway.exchange import Exchange, GatewayIds, Reply, Services, StreamReply, new_gateway_id
from gateway.routing.deadlines import running_task

Scope = dict[str, Any]
log = logging.getLogger("switchboard.server")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

# Set when the client sent no usable x-request-id and the request id is the gateway's own id.
OWN_ID = "switchboard.own_id"

# The gate's (policy, caller), authenticated from the headers (gateway/http/gate.py): the request starts from them.
AUTHENTICATED = "switchboard.authenticated"

# Set on the scope of every request that arrived on the admin listener (gateway/http/admin_surface.py).
ON_ADMIN_LISTENER = "switchboard.admin_listener"

# A scope key a server sets (to None) when it can report a lost connection to the request it serves: the app
# puts a callable there, and the server calls it if the client goes away before the response is complete
# (gateway/http/connections.py). Without it, `respond` watches `receive()` with a task of its own.
DISCONNECT_HOOK = "switchboard.on_disconnect"

# The app's `HeaderNames`, left on the scope of each request it serves for whoever sends that request's reply.
HEADER_NAMES = "switchboard.header_names"


class GatewayApp:
    """The ASGI entry point: request ids, hot-route dispatch, and an OpenAI-shaped body for any failure.

    Every request gets an id (a well-formed incoming `x-request-id` is honoured) echoed on its response.
    The inference endpoints are dispatched by exact (method, path) straight from here: Starlette's
    error middleware and regex router cost a few percent of a proxied request's CPU and they need
    neither, as they render their own errors. Everything else, lifespan included, goes to `app`. An
    unexpected exception is logged with its stack and answered with a 500 carrying only the request id.
    """

    def __init__(self, app: Any, hot_routes: Mapping[tuple[str, str], Any], gate: Any = None,
                 surfaces: Any = None) -> None:
        self.app = app
        self.state = app.state
        self._hot = dict(hot_routes)
        # Request side (gateway/http/gate.py, gateway/http/admin_surface.py): who may reach a route, decided from the
        # headers before any body is read.
        self._gate = gate
        self._surfaces = surfaces
        # The app's own memo of header names (requests and replies repeat the same few), for its lifetime.
        self._names = HeaderNames()
        self._ids = GatewayIds()  # request ids (gateway/exchange.py)
        # What every response carries after its request id: nothing, or during a drain `connection: close`.
        self._closing: tuple[tuple[bytes, bytes], ...] = ()

    def begin_draining(self) -> None:
        """SIGTERM with a drain (gateway/http/draining.py): /readyz answers 503, and every response from now on
        closes its connection, so a keep-alive client reconnects (to another replica) before the listener closes.
        Only sets flags: it runs in a signal handler."""
        self.state.draining = True
        self._closing = ((b"connection", b"close"),)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope["switchboard.started"] = time.perf_counter()
        names = scope[HEADER_NAMES] = self._names
        scope["switchboard.headers"] = headers = names.decoded(scope["headers"])  # what `request_headers` returns
        incoming = headers.get("x-request-id")
        if incoming and _REQUEST_ID.match(incoming):
            request_id = incoming
        else:
            # The gateway's own id (a UUIDv7) serves as the request id too: one id to quote, already in the
            # form every upstream accepts (gateway/upstream/request_ids.py), and nothing derived from it per request.
            request_id = scope[OWN_ID] = self._ids()
        scope["switchboard.request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode())
        closing = self._closing
        started = False

        # A plain function returning the server's awaitable: no coroutine of its own per message, which
        # matters for streams (one message per upstream read).
        def send_with_id(message: dict[str, Any]) -> Awaitable[None]:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", ()), id_header, *closing]
            return send(message)

        # The hot routes hold the app's services from when it was built: unlike Starlette's routes, they need no
        # scope["app"].
        route = self._hot.get((scope["method"], scope["path"]))
        try:
            # An inference route on the tenant listener is no operator surface: none of their rules applies.
            tenant_inference = route is not None and ON_ADMIN_LISTENER not in scope
            refusal = self._surfaces.refusal(scope) if self._surfaces is not None and not tenant_inference else None
            if refusal is not None:
                await self._surfaces.refuse(send_with_id, refusal)
            elif route is not None and self._gate is not None:
                await self._gate(scope, receive, send_with_id, route)
            else:
                await (route or self.app)(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error serving request %s", request_id)
            if not started:
                error = GatewayError(ErrorKind.INTERNAL,
                                     f"The gateway failed to process the request (request id {request_id}).",
                                     code="internal_error")
                await send_reply(send_with_id, Reply(*render(error)), names)


class HeaderNames:
    """Header names as text and as bytes, kept as they are first met; one per app (`GatewayApp`), for its lifetime.

    Requests and replies repeat the same few names, and a dict lookup costs a fraction of a codec call
    (`decode("latin-1")` is an argument parse and a codec-name normalisation each time). Bounded, so a client
    inventing names cannot grow them: past `size` names each way, a new one is converted every time.
    """

    __slots__ = ("_raw", "_size", "_text")

    def __init__(self, size: int = 512) -> None:
        self._text: dict[bytes, str] = {}
        self._raw: dict[str, bytes] = {}
        self._size = size

    def decoded(self, raw: Any) -> dict[str, str]:
        """ASGI request headers as text (names are lower-cased by the server already)."""
        names = self._text
        headers = {}
        try:
            for key, value in raw:
                name = names.get(key)
                if name is None:
                    name = key.decode("latin-1")
                    if len(names) < self._size:
                        names[key] = name
                headers[name] = value.decode("latin-1")
        except TypeError:  # a name that is no `bytes` (a bytearray cannot be a dict key): each one decoded as it is
            return _decoded(raw)
        return headers

    def encoded(self, headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
        """A reply's headers as ASGI pairs."""
        names = self._raw
        try:
            return [(names[name], value.encode("latin-1")) for name, value in headers.items()]
        except KeyError:  # a name not met yet (or past the bound): learnt, or converted, one by one
            pass
        encoded = []
        for name, value in headers.items():
            raw = names.get(name)
            if raw is None:
                raw = name.encode("latin-1")
                if len(names) < self._size:
                    names[name] = raw
            encoded.append((raw, value.encode("latin-1")))
        return encoded


def request_headers(scope: Scope) -> dict[str, str]:
    """Header names lowercased (ASGI already does), values decoded; decoded once per request (by `GatewayApp`)."""
    headers = scope.get("switchboard.headers")
    if headers is None:  # a scope that did not come through `GatewayApp` (tests, the admin listener's own app)
        headers = scope["switchboard.headers"] = _decoded(scope["headers"])
    return headers


def _decoded(raw: Any) -> dict[str, str]:
    return {key.decode("latin-1"): value.decode("latin-1") for key, value in raw}


async def read_body(scope: Scope, receive: Any, limit: int) -> bytes:
    """The request body, refusing anything over `limit` bytes with a 413."""
    declared = request_headers(scope).get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    message = await receive()
    if message["type"] == "http.disconnect":
        raise asyncio.CancelledError("client disconnected while sending the request")
    chunk = message.get("body", b"")
    if len(chunk) > limit:
        raise _too_large(limit)
    if not message.get("more_body", False):
        return chunk  # nearly every body: all of it in its one message
    chunks = [chunk]
    size = len(chunk)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError("client disconnected while sending the request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(ErrorKind.PAYLOAD_TOO_LARGE, f"The request body exceeds the limit of {limit} bytes.",
                        code="request_too_large")


def _encoded(headers: Mapping[str, str], names: HeaderNames | None) -> list[tuple[bytes, bytes]]:
    if names is not None:
        return names.encoded(headers)
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]


async def send_reply(send: Any, reply: Reply, names: HeaderNames | None = None) -> None:
    """Send a whole reply; `names`: the app's memo (`HEADER_NAMES` in the scope), where the caller has it."""
    headers = _encoded(reply.headers, names)
    headers.append((b"content-type", b"application/json"))
    headers.append((b"content-length", str(len(reply.body)).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


async def send_json(send: Any, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
    await send_reply(send, Reply(status, orjson.dumps(payload), headers or {}))


def _as_sent(reply: Reply) -> Reply:
    return reply


async def respond(scope: Scope, receive: Any, send: Any, services: Services,
                  serve: Callable[[Exchange, bytes], Awaitable[Reply | StreamReply]],
                  refused: Callable[[Reply], Reply] = _as_sent) -> None:
    """Serve one inference request and send its reply; the one owner of the request's settlement.

    Reads the body (within `server.max_body_bytes`; a refusal goes out through
    `refused`, so a front door can reshape it), then runs `serve` watching for
    a disconnect (`_DisconnectWatch`): uvicorn drops writes to a closed
    connection silently and a stalled upstream would never reach a write, so a
    client that goes away cancels this task at whatever step it is in. Whatever
    ends the request (a reply, a stream's end, a disconnect, an exception),
    the settlement closes exactly once, here: after the last event of a
    stream; for a whole reply, its usage is counted (limits, budgets, cost)
    before the reply goes out, and recorded (usage sinks, metrics, trace)
    once it is written (the same loop turn, unless the client's connection
    is slow to take it): off the time the client waits.
    """
    authenticated = scope.get(AUTHENTICATED)
    names = scope.get(HEADER_NAMES)
    exchange = Exchange(scope["switchboard.request_id"], scope["switchboard.started"],
                        scope.get(OWN_ID) or new_gateway_id(), authenticated)
    settlement = exchange.settlement = Settlement(services, exchange)
    # The gate's policy snapshot when it authenticated the request: the one the whole request uses.
    policy = authenticated[0] if authenticated is not None else services.policy()
    try:
        body = await read_body(scope, receive, policy.server.max_body_bytes)
    except GatewayError as error:
        settlement.close()
        del exchange.settlement  # as below, once settled
        await send_reply(send, refused(Reply(*render(error))), names)
        return
    task = running_task(asyncio.get_running_loop())  # asyncio.current_task(), without its Python frame on 3.11
    assert task is not None
    watch = _DisconnectWatch(scope, receive, task)
    events: AsyncIterator[bytes] | None = None
    try:
        reply = await serve(exchange, body)
        if isinstance(reply, StreamReply):
            events = reply.events
            await send({"type": "http.response.start", "status": 200, "headers": _encoded(reply.headers, names)})
            async for event in events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await events.aclose()  # type: ignore[attr-defined]
            settlement.close()
            watch.answered()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            settlement.count()
            watch.answered()
            await send_reply(send, reply, names)
            settlement.close()
    except asyncio.CancelledError:
        if not watch.disconnected:
            raise
        task.uncancel()  # the client left: nothing more to send, and nothing to propagate
    except Exception as exc:
        settlement.close(crashed=exc)
        raise  # GatewayApp answers a 500 with the request id, if the response has not started
    finally:
        watch.stop()
        if events is not None:
            await events.aclose()  # type: ignore[attr-defined]
        settlement.close()
        # The exchange and its settlement refer to each other. Unlinked once the request is settled, the request's
        # objects are freed as it ends, not left for the garbage collector's next pass (one every few hundred
        # requests, which then walks them all).
        del exchange.settlement


class _DisconnectWatch:
    """Cancels the serving task when the client disconnects before its answer is complete.

    Told by the server through `DISCONNECT_HOOK` where it offers that (no task, no coroutine per request);
    otherwise a task waits on `receive()`.
    """

    __slots__ = ("_answered", "_scope", "_task", "_watcher", "disconnected")

    def __init__(self, scope: Scope, receive: Any, task: asyncio.Task[Any]) -> None:
        self._task = task
        self._answered = False  # uvicorn also reports a disconnect once the response is complete
        self.disconnected = False
        self._scope = scope
        self._watcher: asyncio.Future[None] | None = None
        if DISCONNECT_HOOK in scope:
            scope[DISCONNECT_HOOK] = self._lost
        else:
            self._watcher = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._lost()

    def _lost(self) -> None:
        if not self._answered and not self.disconnected:
            self.disconnected = True
            self._task.cancel()

    def answered(self) -> None:
        self._answered = True

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        else:
            self._scope[DISCONNECT_HOOK] = None
