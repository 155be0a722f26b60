"""The upstream HTTP/1.1 client (gateway/upstream/http1.py) against real loopback servers that write raw bytes.

The gateway-level behaviour (retries, trails, streams cut in-band, pool and timeouts changed by a reload) is
covered by the resilience, reload and fault suites through the fake upstreams; these tests pin what only a
server that controls every byte can show: connection reuse and expiry, the pool's bound, bodies delimited or
encoded in each way HTTP/1.1 allows, timeouts between reads, TLS, and refusals of what must never be sent.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
import subprocess
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.upstream.http1 import Http1Client
from providers.base import FailureKind, UpstreamFailed, UpstreamRequest

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _provider(**settings: float) -> Any:
    values = {"max_connections": 10, "keepalive_s": 30.0, "connect_timeout_s": 2.0, "first_byte_timeout_s": 5.0,
              "total_timeout_s": 10.0}
    values.update(settings)
    return SimpleNamespace(**values)


class Server:
    """A loopback HTTP/1.1 server: counts connections and requests, answers with what `answer` writes."""

    def __init__(self, answer: Callable[[int, asyncio.StreamWriter], Awaitable[None]], tls: ssl.SSLContext | None = None
                 ) -> None:
        self.answer = answer
        self.tls = tls
        self.connections = 0
        self.requests = 0
        self.closed_by_peer = asyncio.Event()
        self.heads: list[bytes] = []
        self.arrivals: asyncio.Queue[int] = asyncio.Queue()  # each request's number, as it arrives

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    def url(self, path: str = "/v1/chat/completions") -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.requests += 1
                self.arrivals.put_nowait(self.requests)
                await self.answer(self.requests, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_peer.set()
        finally:
            writer.close()


def _json(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body), b"".join(line + b"\r\n" for line in extra), body)


async def _ok(_: int, writer: asyncio.StreamWriter) -> None:
    writer.write(_json(b'{"ok": true}'))
    await writer.drain()


def _held_until(release: asyncio.Event) -> Callable[[int, asyncio.StreamWriter], Awaitable[None]]:
    """An answer that waits for `release`: the call holds its connection until then."""
    async def held(number: int, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        await _ok(number, writer)

    return held


def _request(server: Server, headers: dict[str, str] | None = None) -> UpstreamRequest:
    return UpstreamRequest("POST", server.url(), {"content-type": "application/json", **(headers or {})}, b'{"a": 1}')


def test_sequential_calls_reuse_one_connection_which_closes_once_idle_for_keepalive_s() -> None:
    async def run() -> None:
        async with Server(_ok) as server:
            client = Http1Client(_provider(keepalive_s=0.3), "switchboard-test")
            for _ in range(5):
                response = await client.open(_request(server))
                assert response.status == 200 and await response.read() == b'{"ok": true}'
            assert (server.connections, server.requests) == (1, 5)
            await asyncio.wait_for(server.closed_by_peer.wait(), 5)  # the client let the idle connection go
            response = await client.open(_request(server))  # and opens a new one for the next call
            assert await response.read() == b'{"ok": true}' and server.connections == 2
            await client.close()

    asyncio.run(run())


def test_with_keepalive_zero_or_connection_close_every_call_gets_its_own_connection() -> None:
    async def run() -> None:
        async with Server(_ok) as server:
            no_pool = Http1Client(_provider(keepalive_s=0), "t")
            for _ in range(3):
                await (await no_pool.open(_request(server))).read()
            pooled = Http1Client(_provider(), "t")
            for _ in range(2):
                await (await pooled.open(_request(server, {"connection": "close"}))).read()
            assert server.connections == 5
            await no_pool.close()
            await pooled.close()

    asyncio.run(run())


def test_the_pool_never_opens_more_than_max_connections_and_waiters_get_a_freed_one() -> None:
    async def run() -> None:
        release = asyncio.Event()
        async with Server(_held_until(release)) as server:
            client = Http1Client(_provider(max_connections=2), "t")

            async def call() -> bytes:
                return await (await client.open(_request(server))).read()

            calls = [asyncio.ensure_future(call()) for _ in range(5)]
            await server.arrivals.get()
            await server.arrivals.get()
            assert server.connections == 2 and not any(c.done() for c in calls)
            release.set()
            assert await asyncio.gather(*calls) == [b'{"ok": true}'] * 5
            assert server.connections == 2 and server.requests == 5
            await client.close()

    asyncio.run(run())


def test_a_call_that_waits_longer_than_connect_s_for_a_free_connection_times_out() -> None:
    async def run() -> None:
        release = asyncio.Event()
        async with Server(_held_until(release)) as server:
            client = Http1Client(_provider(max_connections=1, connect_timeout_s=0.2), "t")
            first = asyncio.ensure_future(client.open(_request(server)))
            await server.arrivals.get()
            with pytest.raises(UpstreamFailed) as waited:
                await client.open(_request(server))
            assert waited.value.failure.kind is FailureKind.TIMEOUT and waited.value.failure.status == 504
            release.set()
            assert await (await first).read() == b'{"ok": true}'
            await client.close()

    asyncio.run(run())


def test_gzip_deflate_chunked_and_close_delimited_bodies_arrive_whole() -> None:
    text = b'{"choices": [' + b'{"text": "hello"},' * 200 + b'{}]}'

    async def answer(number: int, writer: asyncio.StreamWriter) -> None:
        if number == 1:
            writer.write(_json(gzip.compress(text), b"content-encoding: gzip"))
        elif number == 2:
            writer.write(_json(zlib.compress(text), b"Content-Encoding: deflate"))
        elif number == 3:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            for piece in (text[:100], text[100:2000], text[2000:]):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            writer.write(b"0\r\n\r\n")
        else:  # neither a length nor chunks: the body ends with the connection
            writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + text)
            await writer.drain()
            writer.close()
            return
        await writer.drain()

    async def run() -> None:
        async with Server(answer) as server:
            client = Http1Client(_provider(), "t")
            for _ in range(4):
                response = await client.open(_request(server))
                assert await response.read() == text
            streamed = await client.open(_request(server))  # the fifth, on a new connection: close-delimited again
            assert b"".join([chunk async for chunk in streamed.chunks()]) == text
            await client.close()

    asyncio.run(run())


def test_silence_longer_than_first_byte_s_mid_stream_is_a_timeout_and_total_s_bounds_a_talking_stream() -> None:
    async def answer(number: int, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for index in range(1000):
            writer.write(b"%x\r\n%s\r\n" % (len(b"data: x\n\n"), b"data: x\n\n"))
            await writer.drain()
            # The first call's upstream falls silent after 3 events; the second's keeps talking, every 20 ms.
            await asyncio.sleep(10 if number == 1 and index == 2 else 0.02)

    async def run() -> None:
        async with Server(answer) as server:
            silent = Http1Client(_provider(first_byte_timeout_s=0.3), "t")
            response = await silent.open(_request(server))
            received = []
            with pytest.raises(UpstreamFailed) as cut:
                async for chunk in response.chunks():
                    received.append(chunk)
            assert cut.value.failure.kind is FailureKind.TIMEOUT and len(received) >= 3
            talking = Http1Client(_provider(first_byte_timeout_s=0.3, total_timeout_s=0.5), "t")
            response = await talking.open(_request(server))
            with pytest.raises(UpstreamFailed) as bounded:
                async for _ in response.chunks():
                    pass
            assert bounded.value.failure.kind is FailureKind.TIMEOUT
            await silent.close()
            await talking.close()

    asyncio.run(run())


def test_a_line_break_in_a_header_is_refused_before_anything_is_sent() -> None:
    async def run() -> None:
        async with Server(_ok) as server:
            client = Http1Client(_provider(), "t")
            with pytest.raises(ValueError, match="line break"):
                await client.open(_request(server, {"x-tenant": "acme\r\nx-injected: 1"}))
            assert server.connections == 0
            await client.close()

    asyncio.run(run())


def test_a_response_that_is_not_http_and_a_refused_connection_are_502s() -> None:
    async def garbage(_: int, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()

    async def run() -> None:
        async with Server(garbage) as server:
            client = Http1Client(_provider(), "t")
            with pytest.raises(UpstreamFailed) as malformed:
                await client.open(_request(server))
            assert malformed.value.failure.kind is FailureKind.CONNECTION and malformed.value.failure.status == 502
            port = server.port
        with pytest.raises(UpstreamFailed) as refused:
            await client.open(UpstreamRequest("POST", f"http://127.0.0.1:{port}/v1/x", {}, b"{}"))
        assert refused.value.failure.message == "could not connect to the upstream"
        await client.close()

    asyncio.run(run())


def test_tls_upstreams_are_verified_against_the_trusted_certificates(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    serving.load_cert_chain(cert, key)

    async def run() -> None:
        async with Server(_ok, tls=serving) as server:
            untrusting = Http1Client(_provider(), "t")
            with pytest.raises(UpstreamFailed) as refused:
                await untrusting.open(_request(server))
            assert refused.value.failure.kind is FailureKind.CONNECTION
            monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # OpenSSL's default verify paths honour it
            trusting = Http1Client(_provider(), "t")
            for _ in range(2):
                response = await trusting.open(_request(server))
                assert await response.read() == b'{"ok": true}'
            assert server.requests == 2 and server.connections == 1  # the refused handshake never got this far
            await untrusting.close()
            await trusting.close()

    asyncio.run(run())


@pytest.mark.parametrize("with_end", [False, True], ids=["alone", "with-the-end"])
def test_a_body_that_does_not_decode_fails_as_malformed(with_end: bool) -> None:
    # The body's pieces are decoded when a read has been parsed, or at the message's end inside the parser's
    # callback: either way the call fails as a malformed answer, and the connection is not reused.
    async def answer(number: int, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"10\r\nthis is not gzip\r\n" + (b"0\r\n\r\n" if with_end else b""))
        await writer.drain()

    async def run() -> None:
        async with Server(answer) as server:
            client = Http1Client(_provider(), "t")
            response = await client.open(_request(server))
            with pytest.raises(UpstreamFailed) as failed:
                await response.read()
            assert failed.value.failure.message == "the upstream's response was not valid HTTP"
            await client.close()

    asyncio.run(run())
