"""Client connections: how many, how slow, how big a request head may be.

uvicorn bounds none of these: a client may open connections without limit,
send its headers a byte every few seconds (slowloris) or its body just as
slowly, and every such connection holds memory and a task. The protocol here
is uvicorn's httptools protocol plus four bounds read from the live policy's
`server` block (so they apply on reload):

- `max_connections`: a connection beyond it is closed as soon as it is accepted;
- `header_timeout_s`: the request line and headers must be complete within it
  of the connection's (or the request's) first byte, or the connection is closed;
- `body_timeout_s`: the body must be complete within it of the headers;
- `max_header_bytes`: a longer head gets 431 and the connection is closed.

It also tells the request being served when its client goes away: uvicorn only
marks the cycle disconnected and drops later writes, which a request waiting on
a stalled upstream would never notice. The app sets a callable under
`DISCONNECT_HOOK` in the scope (gateway/http/asgi.py) instead of running a task per
request that waits on `receive()`.

Idle keep-alive connections are closed by uvicorn's own `timeout_keep_alive`. Response heads are written by
gateway/http/response_head.py, byte for byte as uvicorn would, in a few C calls instead of a pass per header.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.http.asgi import DISCONNECT_HOOK
from gateway.http.response_head import lean_send
from gateway.policy.schema import ServerPolicy

log = logging.getLogger("switchboard.server")

_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
              b"connection: close\r\ncontent-length: %d\r\n\r\n%s")
_TOO_LARGE_BODY = (b'{"error":{"message":"The request line and headers are too large.","type":'
                   b'"invalid_request_error","param":null,"code":"request_header_too_large"}}')


def _server_policy_of(app: Any) -> Callable[[], ServerPolicy]:
    """The live policy's `server` block, found through whatever uvicorn wrapped around the gateway app."""
    seen = 0
    while app is not None and seen < 8:
        services = getattr(getattr(app, "state", None), "services", None)
        if services is not None:
            return lambda: services.policy().server  # type: ignore[no-any-return]
        app, seen = getattr(app, "app", None), seen + 1
    default = ServerPolicy()
    return lambda: default


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a connection cap, head and body deadlines, a head size bound, and
    a lost connection reported to the request being served (`DISCONNECT_HOOK`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = _server_policy_of(self.app)
        # One timer per connection, re-armed lazily: a phase sets `_due` (loop time) and only a timer that fires
        # before it re-arms itself, so a busy keep-alive connection makes a timer per `header_timeout_s`, not two
        # per request.
        self._timer: asyncio.TimerHandle | None = None
        self._due: float | None = None
        self._head_bytes = 0
        # "head" (waiting for a complete request head), "body", "serving", "idle" (between requests) or
        # "refused" (a head over the bound was answered 431; nothing more is read).
        self._phase = "head"
        self._head_sent = self.loop.create_future()  # what an awaited response head returns: it is written at once
        self._head_sent.set_result(None)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limits = self._limits()
        if len(self.connections) > limits.max_connections:
            transport.close()  # connection_lost removes it from the set
            return
        self._arm(limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._due = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        cycle = self.cycle
        super().connection_lost(exc)
        if cycle is not None and cycle.disconnected:  # the client left before its response was complete
            hook = cycle.scope.get(DISCONNECT_HOOK)
            if hook is not None:
                hook()
            vars(cycle).pop("send", None)  # as `on_response_complete` does: no cycle left for the collector

    def data_received(self, data: bytes) -> None:
        if self._phase == "idle":  # a keep-alive connection starts its next request
            self._phase = "head"
            self._head_bytes = 0
            self._arm(self._limits().header_timeout_s)
        if self._phase == "head":
            # Counted per read, not per header (a Python call each): only a read that takes the head past the
            # bound is looked into, for where the head ends, and refused before the parser sees it.
            size = self._head_bytes + len(data)
            limit = self._limits().max_header_bytes
            if size > limit:
                end = data.find(b"\r\n\r\n")
                if end < 0 or self._head_bytes + end + 4 > limit:
                    self._refuse_head()
                    return
            self._head_bytes = size
        elif self._phase == "refused":
            return
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._phase = "body"
        self._arm(self._limits().body_timeout_s)
        # Present from here on: the app may set it to a callable that the connection calls if it is lost.
        self.scope[DISCONNECT_HOOK] = None  # type: ignore[literal-required]
        super().on_headers_complete()
        # The cycle's task has not run yet: the app will be handed this `send` (gateway/http/response_head.py).
        cycle = self.cycle
        assert cycle is not None  # uvicorn has just made it
        cycle.send = lean_send(cycle, cycle.send, self._head_sent, self.loop)  # type: ignore[method-assign]

    def on_message_complete(self) -> None:
        self._phase = "serving"
        self._due = None
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._phase == "serving":
            self._phase = "idle"
        if self.cycle is not None:
            # The lean `send` holds its cycle and the cycle holds it: unlinked once the response is complete, the
            # request's objects are freed by reference counting as the app returns, not left for the collector
            # (~24 objects a request, each generation-0 pass of which took ~4 ms under load).
            vars(self.cycle).pop("send", None)
        super().on_response_complete()

    def _refuse_head(self) -> None:
        self._phase = "refused"
        if not self.transport.is_closing():
            self.transport.write(_TOO_LARGE % (len(_TOO_LARGE_BODY), _TOO_LARGE_BODY))
            self.transport.close()

    def _arm(self, seconds: float) -> None:
        due = self.loop.time() + seconds
        self._due = due
        if self._timer is None:
            self._timer = self.loop.call_at(due, self._check)
        elif self._timer.when() > due:  # a shorter deadline than the one the timer waits for
            self._timer.cancel()
            self._timer = self.loop.call_at(due, self._check)

    def _check(self) -> None:
        self._timer = None
        due = self._due
        if due is None:
            return  # serving or idle: the next request arms it again
        if self.loop.time() < due:  # the deadline moved on since the timer was set
            self._timer = self.loop.call_at(due, self._check)
            return
        self._due = None
        if not self.transport.is_closing():
            log.info("closing a connection whose request %s did not arrive in time",
                     "headers" if self._phase == "head" else "body")
            self.transport.close()
