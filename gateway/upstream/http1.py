"""The upstream HTTP/1.1 client: one bounded pool per provider, on asyncio's transports and httptools' parser.

It replaced aiohttp's client on the request path (loadtests/README.md, "The upstream client"): a proxied call
ran ~3,600 Python bytecodes inside aiohttp (request and response objects, multidicts, payload wrappers, a stream
reader, a timer per read), more than the gateway's whole pipeline for a non-streamed chat request. Here a call
is one header block written with its body, httptools' C parser calling back per header and per body piece, and
one future per wait.

What it does: HTTP/1.1 keep-alive; TLS with the system's CA store and SNI; a pool bounded by
`pool.max_connections` whose idle connections live `pool.keepalive_s` (0: a connection per call); the three
`timeouts` of the provider (connect_s covers waiting for a free connection too; first_byte_s is the longest
silence while the gateway waits for the upstream; total_s bounds the whole call, a stream's reading included);
gzip and deflate bodies.

What it does not, on purpose: HTTP/2; proxies from the environment (the aiohttp session it replaced did not
read them either); cookies (one session serves every team: a cookie set for one caller must not ride along with
the next); redirects (an LLM API answers a POST, it does not redirect it; a 3xx goes back as the upstream's
answer, and the adapter treats it as an error).
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import httptools  # noqa: TID251 - this module is the one place for it

from providers.base import FailureKind, UpstreamFailed, UpstreamFailure, UpstreamRequest

if TYPE_CHECKING:
    from gateway.compiled.policy import Provider

# Bytes of a response buffered before the socket is paused: a client reading a stream slowly holds the upstream
# back instead of the gateway's memory.
_HIGH_WATER = 1 << 18
# How long a finished stream's last bytes (the chunked terminator after `[DONE]`) may take to arrive before its
# connection is dropped instead of pooled.
_DRAIN_S = 1.0
_MAX_CACHED_URLS = 256
# Bodies up to this size go out in one write with their header block (one syscall); larger ones are not copied.
_JOIN_BELOW = 1 << 16
_PATH_SAFE = "/?=&%:@!$'()*+,;-._~"
_HEADER_LINE = "{}: {}\r\n".format

_TIMED_OUT = UpstreamFailure(FailureKind.TIMEOUT, 504, "the upstream did not answer in time")
_REFUSED = UpstreamFailure(FailureKind.CONNECTION, 502, "could not connect to the upstream")
_CLOSED = UpstreamFailure(FailureKind.CONNECTION, 502, "the upstream closed the connection")
_CUT_SHORT = UpstreamFailure(FailureKind.CONNECTION, 502, "the upstream response was cut short")
_MALFORMED = UpstreamFailure(FailureKind.CONNECTION, 502, "the upstream's response was not valid HTTP")
_NO_POOL = UpstreamFailure(FailureKind.TIMEOUT, 504, "no connection to the upstream was free in time")


class _Target:
    """A URL as the client sends to it, parsed once."""

    __slots__ = ("host", "origin", "port", "request_line_tail", "tls")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.origin = (self.tls, self.host, self.port)
        # Quoted once here, '%' kept: a model name in a path (Gemini's) must not break the request line.
        path = quote((parts.path or "/") + ("?" + parts.query if parts.query else ""), safe=_PATH_SAFE)
        default_port = parts.port is None or parts.port == (443 if self.tls else 80)
        host_header = parts.netloc.rpartition("@")[2] if not default_port else _bracketed(self.host)
        self.request_line_tail = f" {path} HTTP/1.1\r\nhost: {host_header}\r\n"


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class Http1Response:
    """One upstream answer: status and headers once they arrived, then its body as it arrives."""

    __slots__ = ("_buffered", "_chunks", "_connection", "_decoder", "_drain_timer", "_error", "_waiter", "complete",
                 "deadline", "headers", "status")

    def __init__(self, connection: _Connection, deadline: float) -> None:
        self._connection = connection
        self.deadline = deadline
        self.status = 0
        self.headers: Mapping[str, str] = _NO_HEADERS
        self.complete = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamFailure | None = None
        self._decoder: Any = None
        self._drain_timer: asyncio.TimerHandle | None = None

    # -- what the gateway calls (gateway/upstream/pools.py's UpstreamResponse) --

    async def read(self) -> bytes:
        while not self.complete:
            await self._wait()
        body = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        self._chunks = []
        return body

    def chunks(self) -> Http1Response:
        return self

    def __aiter__(self) -> Http1Response:
        return self

    async def __anext__(self) -> bytes:
        # Everything that arrived since the last read, as one piece: httptools hands the body over a chunk of the
        # chunked encoding at a time (an SSE event each, as most servers write them), and every piece costs the
        # relay above a pass; what a read finds waiting goes up together.
        while True:
            chunks = self._chunks
            if chunks:
                self._chunks = []
                self._buffered = 0
                self._connection.resume()
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if self.complete:
                raise StopAsyncIteration
            await self._wait()

    def close(self) -> None:
        """Abandon the response: the connection is dropped, which tells the upstream to stop."""
        if not self.complete:
            self._connection.drop()

    def finish(self) -> None:
        """The caller has what it wanted (a stream's end event): pool the connection once the body ends."""
        if self.complete:
            return
        self._chunks = []
        self._buffered = 0
        self._connection.resume()
        if self._error is not None:
            return
        # A stream's end event usually comes a read before the chunked terminator: dropping the connection there
        # would cost the next call a new one (over TLS, a handshake). Whatever still comes is discarded.
        self._drain_timer = self._connection.loop.call_later(_DRAIN_S, self._connection.drop)

    # -- what the connection tells it --

    async def _wait(self) -> None:
        if self._error is not None:
            raise UpstreamFailed(self._error)
        waiter = self._waiter = self._connection.loop.create_future()
        self._connection.watch()
        try:
            await waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise UpstreamFailed(self._error)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def headers_arrived(self, status: int, raw: list[tuple[bytes, bytes]], encoding: bytes | None) -> None:
        self.status = status
        self.headers = _Headers(raw)
        if encoding is not None:
            self._decoder = _decoder_for(encoding.decode("latin-1").strip().lower())
        self._wake()

    def take(self, pieces: list[bytes]) -> None:
        """The body pieces of one network read (httptools: a chunk of the chunked encoding each), in order."""
        if self._drain_timer is not None:
            return  # finished: the rest of a stream's body is not wanted
        decoder = self._decoder
        if decoder is None:
            self._chunks += pieces
            return
        for data in pieces:
            if data := decoder.decompress(data):
                self._chunks.append(data)

    def ended(self) -> None:
        if self._decoder is not None and self._drain_timer is None:
            rest = self._decoder.flush()
            if rest:
                self._chunks.append(rest)
        self.complete = True
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self._wake()

    def fail(self, failure: UpstreamFailure) -> None:
        if self._error is None and not self.complete:
            self._error = failure
            self._wake()


class _Headers(Mapping[str, str]):
    """A response's headers by lower-case name, a repeated header's values joined with commas. Decoded when
    first looked at: an answered call's are usually never read (only a failure's, for its retry-after)."""

    __slots__ = ("_decoded", "_raw")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw
        self._decoded: dict[str, str] | None = None

    def _all(self) -> dict[str, str]:
        decoded = self._decoded
        if decoded is None:
            decoded = self._decoded = {}
            for name, value in self._raw:
                key = name.decode("latin-1").lower()
                text = value.decode("latin-1")
                decoded[key] = decoded[key] + ", " + text if key in decoded else text
        return decoded

    def __getitem__(self, name: str) -> str:
        return self._all()[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._all()

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


_NO_HEADERS: Mapping[str, str] = {}


def _decoder_for(encoding: str) -> Any:
    if encoding in ("identity", ""):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    raise ValueError(f"unsupported content-encoding {encoding!r}")


class _Connection(asyncio.Protocol):
    """One connection to an upstream: at most one response in flight."""

    def __init__(self, client: Http1Client, origin: tuple[bool, str, int]) -> None:
        self.client = client
        self.origin = origin
        self.loop = client.loop
        self.transport: asyncio.Transport | None = None
        self.response: Http1Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self.last_read = 0.0
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None
        # httptools calls `on_body` per piece of the body: a list's `append` collects them without a Python call
        # each (an SSE event is a piece, as most servers write them), and the read hands them on together.
        self._pieces: list[bytes] = []
        self.on_body = self._pieces.append
        self._parser = httptools.HttpResponseParser(self)
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._encoding: bytes | None = None
        self._reusable = True

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            self.drop()  # bytes nobody asked for: the connection's state is unknown
            return
        self.last_read = self.loop.time()
        pieces = self._pieces
        try:
            self._parser.feed_data(data)
            if pieces:  # a message that completed in this read took its own (on_message_complete)
                response.take(pieces)
                pieces.clear()
        # ValueError: a content-encoding this client does not decode; zlib.error: a body that does not decode
        # (raised inside httptools' callbacks, either comes as an HttpParserError).
        except (httptools.HttpParserError, ValueError, zlib.error):
            pieces.clear()
            response.fail(_MALFORMED)
            self.drop()
            return
        # What is buffered is counted in bytes as read (framing included): close enough for a high-water mark.
        response._buffered += len(data)
        if response._buffered >= _HIGH_WATER and not response.complete:
            self.pause()
        response._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client.forget(self)
        response = self.response
        if response is not None and response.status and "content-length" not in response.headers and \
                "transfer-encoding" not in response.headers:
            response.ended()  # a body delimited by the end of the connection (HTTP/1.0 style) is whole
        else:
            self._fail_unanswered()

    # -- httptools' callbacks --

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))
        if len(name) == 16 and name.lower() == b"content-encoding":
            self._encoding = value

    def on_headers_complete(self) -> None:
        self._pieces.clear()  # a body starts: nothing before it belongs to it
        raw, self._raw_headers = self._raw_headers, []
        encoding, self._encoding = self._encoding, None
        if self.response is not None:
            self.response.headers_arrived(self._parser.get_status_code(), raw, encoding)

    def on_message_complete(self) -> None:
        response = self.response
        pieces = self._pieces
        if response is None:
            pieces.clear()
            return
        if pieces:  # the body's last pieces come before its end
            response.take(pieces)
            pieces.clear()
        keep_alive = self._reusable and self._parser.should_keep_alive()
        response.ended()
        self.response = None
        if keep_alive and not self.closed:
            self.client.release(self)
        else:
            self.drop()

    # -- the client's side --

    def send(self, head: bytes, body: bytes | None, deadline: float, reusable: bool) -> Http1Response:
        response = self.response = Http1Response(self, deadline)
        self._reusable = reusable
        self.last_read = self.loop.time()
        transport = self.transport
        assert transport is not None
        if not body:
            transport.write(head)
        elif len(body) < _JOIN_BELOW:
            transport.write(head + body)
        else:
            transport.write(head)
            transport.write(body)
        return response

    def watch(self) -> None:
        """Someone waits on this connection: make sure a timer will end the wait at its deadline."""
        response = self.response
        if response is None:
            return
        due = self._due(response)
        timer = self._timer
        # A timer still armed for an earlier wait fires no later than this one's due time, and re-arms then.
        if timer is None or timer.when() > due:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(due, self._check)

    def _check(self) -> None:
        # One timer per connection, re-armed only while a wait is in progress: reads that keep arriving move the
        # silence deadline without touching the timer.
        self._timer = None
        response = self.response
        if response is None or response._waiter is None:
            return
        due = self._due(response)
        if self.loop.time() >= due:
            response.fail(_TIMED_OUT)
            self.drop()
        else:
            self._timer = self.loop.call_at(due, self._check)

    def _due(self, response: Http1Response) -> float:
        """When a wait on `response` ends: after `first_byte_s` of silence, or at the call's total deadline."""
        return min(self.last_read + self.client.first_byte_s, response.deadline)

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.last_read = self.loop.time()  # silence while paused was the gateway's, not the upstream's
            self.transport.resume_reading()

    def drop(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self.client.forget(self)
            self._fail_unanswered()

    def _fail_unanswered(self) -> None:
        """The connection is gone: a response still under way is cut short, or was never answered."""
        response = self.response
        if response is not None and not response.complete:
            response.fail(_CUT_SHORT if response.status else _CLOSED)


class Http1Client:
    """The pooled HTTP/1.1 client of one provider."""

    def __init__(self, provider: Provider, user_agent: str) -> None:
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # the loop of the first call
        self._limit = provider.max_connections
        self._keepalive_s = provider.keepalive_s
        self.connect_s = provider.connect_timeout_s
        self.first_byte_s = provider.first_byte_timeout_s
        self.total_s = provider.total_timeout_s
        self._fixed_headers = f"user-agent: {user_agent}\r\naccept-encoding: gzip, deflate\r\n"
        self._targets: dict[str, _Target] = {}
        self._idle: dict[tuple[bool, str, int], list[_Connection]] = {}
        self._counted: set[_Connection] = set()  # every connection open or opening: the pool's size
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    async def open(self, request: UpstreamRequest) -> Http1Response:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        target = self._targets.get(request.url)
        if target is None:
            target = self._target(request.url)
        head = self._head(request, target)
        deadline = self.loop.time() + self.total_s
        reusable = self._keepalive_s > 0 and request.headers.get("connection") != "close"
        connection = self._take_idle(target.origin)
        if connection is None:
            connection = await self._connect(target)
        response = connection.send(head, request.body, deadline, reusable)
        # No silent second try when a reused connection closes unanswered: the upstream may have taken the
        # request (and billed it). The failure goes up like any other, and the route's retries decide.
        try:
            while not response.status:
                await response._wait()
        except BaseException:
            # Failed, timed out, or cancelled (the client left): nobody will read this response, and dropping
            # the connection is how the upstream learns to stop.
            connection.drop()
            raise
        return response

    def _target(self, url: str) -> _Target:
        if len(self._targets) >= _MAX_CACHED_URLS:
            self._targets.clear()  # bounded: a URL may carry a model name
        target = self._targets[url] = _Target(url)
        return target

    def _head(self, request: UpstreamRequest, target: _Target) -> bytes:
        headers = request.headers
        body = request.body
        text = "".join((request.method, target.request_line_tail, self._fixed_headers,
                        "".join(map(_HEADER_LINE, headers.keys(), headers.values())),
                        f"content-length: {len(body)}\r\n\r\n" if body is not None else "\r\n"))
        # A value with a line break would smuggle a header (or a request) of its own: refused, as aiohttp did.
        if text.count("\n") != len(headers) + (6 if body is not None else 5):
            raise ValueError("a header name or value of an upstream request contains a line break")
        return text.encode()

    def _take_idle(self, origin: tuple[bool, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if not connection.closed:
                if self.loop.time() - connection.idle_since < self._keepalive_s:
                    return connection
                connection.drop()
        return None

    async def _connect(self, target: _Target) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_s):
                while len(self._counted) >= self._limit:
                    if not self._close_an_idle_connection():
                        waiter = self.loop.create_future()
                        self._slot_waiters.append(waiter)
                        try:
                            await waiter
                        finally:
                            if waiter in self._slot_waiters:
                                self._slot_waiters.remove(waiter)
                        connection = self._take_idle(target.origin)
                        if connection is not None:
                            return connection
                if self._closed:
                    raise UpstreamFailed(_CLOSED)
                connection = _Connection(self, target.origin)
                self._counted.add(connection)
                try:
                    await self.loop.create_connection(lambda: connection, target.host, target.port,
                                                      ssl=self._tls_context() if target.tls else None,
                                                      server_hostname=target.host if target.tls else None)
                except BaseException:
                    connection.closed = True
                    self.forget(connection)
                    raise
                return connection
        except TimeoutError:
            raise UpstreamFailed(_NO_POOL if len(self._counted) >= self._limit else _TIMED_OUT) from None
        except OSError as exc:  # refused, unreachable, a name that does not resolve, a TLS handshake that fails
            raise UpstreamFailed(_REFUSED) from exc

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def _close_an_idle_connection(self) -> bool:
        for connections in self._idle.values():
            while connections:
                connection = connections.pop(0)
                if not connection.closed:
                    connection.drop()
                    return True
        return False

    def release(self, connection: _Connection) -> None:
        """A response ended whole on a connection that may serve the next call."""
        if self._closed or connection.closed:
            connection.drop()
            return
        connection.idle_since = self.loop.time()
        self._idle.setdefault(connection.origin, []).append(connection)
        if self._slot_waiters:
            self._wake_one()
        if self._sweep is None:
            self._sweep = self.loop.call_at(connection.idle_since + self._keepalive_s, self._close_expired)

    def forget(self, connection: _Connection) -> None:
        """A connection is gone: its place in the pool is free."""
        if connection in self._counted:
            self._counted.discard(connection)
            if self._slot_waiters:
                self._wake_one()

    def _wake_one(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _close_expired(self) -> None:
        # One timer per client, armed while connections sit idle: each expires `keepalive_s` after its last use.
        self._sweep = None
        now = self.loop.time()
        oldest = None
        for connections in self._idle.values():
            for connection in list(connections):
                if connection.closed:
                    connections.remove(connection)
                elif now - connection.idle_since >= self._keepalive_s:
                    connections.remove(connection)
                    connection.drop()
                elif oldest is None or connection.idle_since < oldest:
                    oldest = connection.idle_since
        if oldest is not None:
            self._sweep = self.loop.call_at(oldest + self._keepalive_s, self._close_expired)

    async def close(self) -> None:
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
        for connections in self._idle.values():
            for connection in connections:
                connection.drop()
        self._idle.clear()
        for connection in list(self._counted):
            connection.drop()
