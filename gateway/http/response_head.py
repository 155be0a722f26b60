"""Writing a response's status line and headers in a handful of C calls instead of a Python pass per header.

uvicorn's `RequestResponseCycle.send` checks each header with two regular expressions, lower-cases it and
compares it with three names, in Python: ~30 bytecodes a header, and a gateway response carries 10 to 25 of them
(request id, route, cost, overhead, and a dozen rate-limit and budget headers under a full policy). Counted as
served, that was the largest single function of a request (loadtests/README.md, "The response head").

`lean_send` answers the `http.response.start` message itself when the message is an ordinary one, and hands
everything else to uvicorn's own `send`: the body messages, a start message while the transport is paused or the
client gone, uvicorn's access log, any header uvicorn would refuse (so it raises the same error), a header that is
not a pair of bytes, a status it has no line for, and heads that name content-length, transfer-encoding or
connection more than once. For the rest it writes what uvicorn writes (tests/test_response_head.py compares the
two on the same messages): the same checks on every name and value, the same framing decisions and state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from operator import itemgetter
from typing import Any

from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE

_LINE = b"%s: %s\r\n".__mod__
_NAME = itemgetter(0)
_VALUE = itemgetter(1)
_NO_BODY_STATUSES = (204, 304)

Send = Callable[[dict[str, Any]], Awaitable[None]]


def lean_send(cycle: Any, send: Send, sent: asyncio.Future[None]) -> Send:
    """`send` of uvicorn's request cycle `cycle`, with its response head written here. `sent`: a done future, what
    an awaited head write returns (the write itself is synchronous, as in uvicorn)."""

    def lean(message: dict[str, Any]) -> Awaitable[None]:
        if (message["type"] != "http.response.start" or cycle.response_started or cycle.disconnected
                or cycle.flow.write_paused or cycle.access_log or not _write_head(cycle, message)):
            return send(message)
        return sent

    return lean


def _write_head(cycle: Any, message: dict[str, Any]) -> bool:
    """Write the head as uvicorn would and return True, or return False having changed nothing."""
    status = message["status"]
    line = STATUS_LINE.get(status)
    if line is None:
        return False
    headers = [*cycle.default_headers, *message.get("headers", ())]
    try:  # names lower-cased as uvicorn writes them; map and zip keep the per-header work in C
        names = list(map(bytes.lower, map(_NAME, headers)))
        values = list(map(_VALUE, headers))
        lines = b"".join(map(_LINE, zip(names, values, strict=True)))
        if HEADER_RE.search(b"".join(names)) or HEADER_VALUE_RE.search(b"".join(values)):
            return False
    except (TypeError, IndexError, ValueError):  # not pairs of bytes: uvicorn's own send says what is wrong
        return False
    probe = b"\r\n" + lines.lower()  # names and values lower-cased, as uvicorn compares them
    length_at = probe.find(b"\r\ncontent-length: ")
    coding_at = probe.find(b"\r\ntransfer-encoding: ")
    connection_at = probe.find(b"\r\nconnection: ")
    if (length_at >= 0 and probe.count(b"\r\ncontent-length: ") > 1) or (coding_at >= 0 and (
            length_at >= 0 or probe.count(b"\r\ntransfer-encoding: ") > 1)) or (
            connection_at >= 0 and probe.count(b"\r\nconnection: ") > 1):
        return False
    expected_length = 0
    if length_at >= 0:
        text = _value_at(probe, length_at + 18)
        if not text.isdigit():
            return False  # uvicorn's int() would raise: let it
        expected_length = int(text)
    has_connection_close = connection_at >= 0 and b"close" in [
        token.strip() for token in _value_at(probe, connection_at + 14).split(b",")]

    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    if length_at >= 0:
        cycle.expected_content_length = expected_length
        cycle.chunked_encoding = False
    elif coding_at >= 0 and _value_at(probe, coding_at + 21) == b"chunked":
        cycle.expected_content_length = 0
        cycle.chunked_encoding = True
    if has_connection_close:
        cycle.keep_alive = False
    parts = [line, lines]
    if not cycle.keep_alive and not has_connection_close:
        parts.append(b"connection: close\r\n")
    if cycle.chunked_encoding is None and cycle.scope["method"] != "HEAD" and status not in _NO_BODY_STATUSES:
        cycle.chunked_encoding = True
        parts.append(b"transfer-encoding: chunked\r\n")
    parts.append(b"\r\n")
    cycle.transport.write(b"".join(parts))
    return True


def _value_at(probe: bytes, start: int) -> bytes:
    return probe[start:probe.index(b"\r\n", start)]
