"""gateway/http/response_head.py writes what uvicorn's own `send` writes, byte for byte, and leaves the same state.

Each case runs the same messages (a `http.response.start`, then body messages) through two fresh uvicorn request
cycles: one with its own `send`, one with `lean_send` in front of it. The bytes written, the cycle's framing state
afterwards, and any error raised must be equal. (Serving through the real protocol is covered by every test that
starts the gateway.)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from gateway.http.response_head import lean_send

DEFAULTS = [(b"date", b"Sat, 05 Dec 2026 04:50:00 GMT"), (b"server", b"uvicorn")]
STATE = ("response_started", "keep_alive", "chunked_encoding", "expected_content_length", "waiting_for_100_continue",
         "response_complete")


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    @property
    def written(self) -> bytes:
        return b"".join(self.writes)

    def write(self, data: bytes) -> None:
        if data:
            self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class _Flow:
    write_paused = False


def _cycle(method: str, keep_alive: bool, defaults: list[tuple[bytes, bytes]],
           completed: list[str] | None = None) -> RequestResponseCycle:
    scope: Any = {"type": "http", "method": method, "http_version": "1.1" if keep_alive else "1.0", "path": "/",
                  "query_string": b"", "client": ("127.0.0.1", 1)}
    return RequestResponseCycle(scope=scope, transport=_Transport(), flow=_Flow(), logger=logging.getLogger("t"),  # type: ignore[arg-type]
                                access_logger=logging.getLogger("t.access"), access_log=False,
                                default_headers=defaults, message_event=asyncio.Event(), expect_100_continue=True,
                                keep_alive=keep_alive,
                                on_response=lambda: completed.append("response") if completed is not None else None)


def _outcome(cycle: RequestResponseCycle, lean: bool, *messages: dict[str, Any]) -> tuple[Any, ...]:
    """Send `messages` through the cycle's own `send` or through `lean_send` in front of it, in one turn of the
    event loop, then let the turn end; what was written and the state."""
    async def run() -> BaseException | None:
        send = cycle.send
        if lean:
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            done.set_result(None)
            send = lean_send(cycle, cycle.send, done, loop)
        try:
            for message in messages:
                await send(message)
        except Exception as exc:
            return exc
        finally:
            await asyncio.sleep(0)  # the end of the turn: a head still held goes out
        return None

    error = asyncio.run(run())
    transport: Any = cycle.transport
    return (transport.written, tuple(getattr(cycle, name) for name in STATE), transport.closed,
            cycle.message_event.is_set(), type(error), str(error) if error else None)


CASES = [
    pytest.param("POST", True, DEFAULTS, 200, [(b"content-type", b"application/json"), (b"content-length", b"17"),
                                             (b"x-request-id", b"0193a-req")], id="json-with-length"),
    pytest.param("POST", True, DEFAULTS, 200,
                 [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
                 id="stream-chunked-by-default"),
    pytest.param("HEAD", True, [], 200, [(b"content-type", b"application/json")], id="head-no-framing"),
    pytest.param("POST", True, DEFAULTS, 204, [(b"x-a", b"1")], id="204-no-framing"),
    pytest.param("POST", False, DEFAULTS, 200, [(b"content-length", b"2")], id="http10-connection-close-added"),
    pytest.param("POST", True, [], 200, [(b"Connection", b"Keep-Alive, Close"), (b"Content-Length", b"5")],
                 id="app-says-close-mixed-case"),
    pytest.param("POST", True, [], 200, [(b"Transfer-Encoding", b"CHUNKED"), (b"X-Trace", b"a b\tc")],
                 id="explicit-chunked"),
    pytest.param("POST", True, [], 200, [(b"transfer-encoding", b"gzip")], id="other-coding"),
    pytest.param("POST", True, [], 200, [(b"content-length", b"1"), (b"content-length", b"2")], id="length-twice"),
    pytest.param("POST", True, [], 200, [(b"content-length", b"3"), (b"transfer-encoding", b"chunked")],
                 id="length-and-chunked"),
    pytest.param("POST", True, [], 200, [(b"content-length", b" 7")], id="length-with-space"),
    pytest.param("POST", True, [], 200, [(b"x-content-length", b"9"), (b"x-connection", b"close")],
                 id="lookalike-names"),
    pytest.param("POST", True, [], 200, [(b"x-evil", b"a\r\nset-cookie: b")], id="line-break-in-value"),
    pytest.param("POST", True, [], 200, [(b"x evil", b"a")], id="space-in-name"),
    pytest.param("POST", True, [], 200, [("x-str", "a")], id="str-pair"),
    pytest.param("POST", True, [], 999, [(b"x-a", b"1")], id="unknown-status"),
    pytest.param("POST", True, DEFAULTS, 200, [(b"X-Upper", b"A"), (b"content-type", b"text/plain"),
                                             (b"CONTENT-LENGTH", b"3")], id="capitals-among-lower-case-names"),
    pytest.param("POST", True, [], 200, [(b"x:evil", b"a")], id="colon-in-name"),
    pytest.param("POST", True, [], 200, [(b"x-del", b"a\x7fb")], id="delete-in-value"),
    pytest.param("POST", True, [], 200, [(b"x-nul", b"a\x00b")], id="nul-in-value"),
    pytest.param("POST", True, [], 200, [(b"x-tab", b"a\tb"), (b"x-high", b"caf\xe9")], id="tab-and-latin-1-in-value"),
    pytest.param("POST", True, [], 200, [(b"x-a", b"1", b"extra")], id="three-items"),
    pytest.param("POST", True, [], 200, [(b"x-a", b"1"), (b"x-b", b"2", b"extra")], id="one-header-of-three-items"),
    pytest.param("POST", True, [], 200, [(b"x-a",)], id="one-item"),
    pytest.param("POST", True, [], 200, [], id="no-header-at-all"),
    pytest.param("POST", True, [], 200, [(bytearray(b"X-A"), b"1")], id="bytearray-name"),
    pytest.param("POST", True, [], 200, [(b"x-a", bytearray(b"1"))], id="bytearray-value"),
    pytest.param("POST", True, [], 200, [(memoryview(b"x-a"), b"1")], id="memoryview-name"),
    pytest.param("POST", True, [], 200, [(b"content-length", memoryview(b"1"))], id="memoryview-length"),
    pytest.param("POST", True, [], 200, [(b"content-length", b"+1")], id="length-with-sign"),
    pytest.param("POST", True, [], 200, [(b"connection", b" keep-alive ,  CLOSE ")], id="close-among-tokens"),
    pytest.param("POST", True, [], 200, [(b"connection", b"closed")], id="close-lookalike"),
    pytest.param("POST", True, [], 200, [(b"connection", b"close"), (b"Connection", b"close")],
                 id="connection-twice"),
    pytest.param("POST", True, [], 200, [(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")],
                 id="chunked-twice"),
    pytest.param("POST", True, DEFAULTS, 429, [(f"x-ratelimit-h{i}".encode(), str(i).encode()) for i in range(14)]
                 + [(b"content-length", b"120")], id="many-rate-limit-headers"),
]


@pytest.mark.parametrize(("method", "keep_alive", "defaults", "status", "headers"), CASES)
def test_the_lean_head_is_uvicorns_head(method: str, keep_alive: bool, defaults: list[tuple[bytes, bytes]],
                                        status: int, headers: list[tuple[Any, Any]]) -> None:
    message = {"type": "http.response.start", "status": status, "headers": headers}
    plain = _cycle(method, keep_alive, defaults)
    expected = _outcome(plain, False, dict(message))
    lean = _cycle(method, keep_alive, defaults)
    assert _outcome(lean, True, dict(message)) == expected


def _body(body: Any, more: bool = False) -> dict[str, Any]:
    return {"type": "http.response.body", "body": body, "more_body": more}


LENGTH_17 = [(b"content-type", b"application/json"), (b"content-length", b"17")]
BODY_CASES = [
    pytest.param("POST", True, LENGTH_17, [_body(b'{"object":"chat"}')], id="whole-reply"),
    pytest.param("POST", False, LENGTH_17, [_body(b'{"object":"chat"}')], id="whole-reply-then-close"),
    pytest.param("POST", True, LENGTH_17, [_body(b'{"obj'), _body(b'ect":"chat"}')], id="reply-in-two-parts"),
    pytest.param("POST", True, LENGTH_17, [_body(b'{"obj', more=True), _body(b'ect":"chat"}')],
                 id="reply-in-two-announced-parts"),
    pytest.param("POST", True, LENGTH_17, [_body(b"{}")], id="shorter-than-its-length"),
    pytest.param("POST", True, LENGTH_17, [_body(b"x" * 18)], id="longer-than-its-length"),
    pytest.param("POST", True, LENGTH_17, [_body(b"x" * 18, more=True)], id="longer-than-its-length-announced"),
    pytest.param("POST", True, [(b"content-length", b"70000")], [_body(b"x" * 70_000)], id="large-body"),
    pytest.param("POST", True, [(b"content-type", b"text/event-stream")],
                 [_body(b"data: 1\n\n", more=True), _body(b"data: 2\n\n", more=True), _body(b"")], id="stream"),
    pytest.param("POST", True, [(b"content-type", b"text/event-stream")], [_body(b"")], id="empty-stream"),
    pytest.param("POST", True, [(b"content-type", b"text/event-stream")], [_body(b"", more=True), _body(b"x")],
                 id="stream-starting-empty"),
    pytest.param("HEAD", True, LENGTH_17, [_body(b"")], id="head-request"),
    pytest.param("POST", True, [], [_body(b"")], id="chunked-by-default-empty", marks=[]),
    pytest.param("POST", True, [(b"content-length", b"2")], [_body(bytearray(b"{}"))], id="bytearray-body"),
    pytest.param("POST", True, [(b"content-length", b"2")], [{"type": "http.response.start", "status": 200}],
                 id="second-start"),
]


@pytest.mark.parametrize(("method", "keep_alive", "headers", "bodies"), BODY_CASES)
def test_the_head_written_with_the_first_body_is_what_uvicorn_writes(
        method: str, keep_alive: bool, headers: list[tuple[bytes, bytes]], bodies: list[dict[str, Any]]) -> None:
    """The bytes, state, completion (the connection closed or kept, the protocol told) and errors are uvicorn's."""
    messages = [{"type": "http.response.start", "status": 200, "headers": headers}, *bodies]
    plain_completed: list[str] = []
    plain = _cycle(method, keep_alive, DEFAULTS, plain_completed)
    expected = _outcome(plain, False, *map(dict, messages))
    lean_completed: list[str] = []
    lean = _cycle(method, keep_alive, DEFAULTS, lean_completed)
    assert _outcome(lean, True, *map(dict, messages)) == expected
    assert lean_completed == plain_completed


def test_a_whole_reply_is_one_write_and_a_stream_head_goes_out_at_the_end_of_the_turn() -> None:
    handed: list[dict[str, Any]] = []

    async def uvicorn_send(message: dict[str, Any]) -> None:
        handed.append(message)

    def done() -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    async def reply() -> list[bytes]:
        cycle = _cycle("POST", True, DEFAULTS)
        sent = done()
        send = lean_send(cycle, uvicorn_send, sent, asyncio.get_running_loop())
        assert send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}) is sent
        assert cycle.transport.writes == []  # type: ignore[attr-defined]  # held for the body
        await send({"type": "http.response.body", "body": b"{}"})
        assert cycle.response_complete
        return cycle.transport.writes  # type: ignore[attr-defined, no-any-return]

    async def stream() -> list[bytes]:
        cycle = _cycle("POST", True, DEFAULTS)
        send = lean_send(cycle, uvicorn_send, done(), asyncio.get_running_loop())
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await asyncio.sleep(0)  # the turn ends with no body: an upstream that has not answered yet
        writes = list(cycle.transport.writes)  # type: ignore[attr-defined]
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        return writes

    (written,) = asyncio.run(reply())
    assert written.startswith(b"HTTP/1.1 200 OK\r\ndate: ") and written.endswith(b"\r\n\r\n{}")
    (head,) = asyncio.run(stream())
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"transfer-encoding: chunked\r\n\r\n")
    assert [message["body"] for message in handed] == [b"data: 1\n\n"]  # after the head: uvicorn's own send


def test_the_byte_checks_refuse_exactly_what_uvicorns_patterns_find() -> None:
    """The translate tables stand in for uvicorn's HEADER_RE and HEADER_VALUE_RE: they must agree on every byte."""
    from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE

    from gateway.http.response_head import _BAD_NAME, _BAD_VALUE

    for table, pattern in ((_BAD_NAME, HEADER_RE), (_BAD_VALUE, HEADER_VALUE_RE)):
        for byte in range(256):
            text = b"ab" + bytes((byte,)) + b"cd"
            assert (text.translate(table) != text) == (pattern.search(text) is not None), (pattern, byte)
