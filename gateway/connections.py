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

Idle keep-alive connections are closed by uvicorn's own `timeout_keep_alive`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.policy_schema import ServerPolicy

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
    """uvicorn's httptools protocol with a connection cap, head and body deadlines and a head size bound."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = _server_policy_of(self.app)
        self._deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        # "head" (waiting for a complete request head), "body", "serving" or "idle" (between requests).
        self._phase = "head"

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limits = self._limits()
        if len(self.connections) > limits.max_connections:
            transport.close()  # connection_lost removes it from the set
            return
        self._arm(limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == "idle":  # a keep-alive connection starts its next request
            self._phase = "head"
            self._head_bytes = 0
            self._arm(self._limits().header_timeout_s)
        super().data_received(data)

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._phase = "body"
        self._arm(self._limits().body_timeout_s)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._phase = "serving"
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._phase == "serving":
            self._phase = "idle"
        super().on_response_complete()

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self._limits().max_header_bytes and not self.transport.is_closing():
            self.transport.write(_TOO_LARGE % (len(_TOO_LARGE_BODY), _TOO_LARGE_BODY))
            self.transport.close()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info("closing a connection whose request %s did not arrive in time",
                     "headers" if self._phase == "head" else "body")
            self.transport.close()
