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
import re
from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE, STATUS_LINE

_NO_BODY_STATUSES = (204, 304)
_BYTES = frozenset((bytes,))


def _marking(pattern: re.Pattern[bytes]) -> bytes:
    """A `bytes.translate` table that changes every byte `pattern` matches and no other.

    uvicorn's header patterns are classes of single bytes, so a text comes out of it unchanged exactly when
    `pattern.search` finds nothing in it: one pass over all the names (or values) in C, where the regular
    expression engine costs several times as much per byte.
    """
    return bytes(byte ^ 0x80 if pattern.fullmatch(bytes((byte,))) else byte for byte in range(256))


_BAD_NAME = _marking(HEADER_RE)
_BAD_VALUE = _marking(HEADER_VALUE_RE)

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
    try:  # strict: a header of another length than its neighbours raises, as uvicorn's `name, value` unpacking does
        names, values = zip(*cycle.default_headers, *message.get("headers", ()), strict=True)
    except (TypeError, ValueError):  # not pairs (or no header at all): uvicorn's own send says what is wrong
        return False
    if not _BYTES.issuperset(map(type, names + values)):
        return False
    joined_names, joined_values = b"".join(names), b"".join(values)
    if (joined_names.translate(_BAD_NAME) != joined_names
            or joined_values.translate(_BAD_VALUE) != joined_values):
        return False  # a byte uvicorn refuses: it raises its error
    if not joined_names.islower():  # uvicorn writes names lower-cased; the gateway's own already are
        names = tuple(map(bytes.lower, names))
    lengths, codings = names.count(b"content-length"), names.count(b"transfer-encoding")
    connections = names.count(b"connection")
    if lengths + codings > 1 or connections > 1:  # twice, or a length and a coding: uvicorn's order of events decides
        return False
    if lengths:
        text = values[names.index(b"content-length")]
        if not text.isdigit():
            return False  # uvicorn's int() would raise, or read what isdigit() refuses: let it
        expected_length = int(text)
    has_connection_close = connections > 0 and b"close" in [
        token.strip() for token in values[names.index(b"connection")].lower().split(b",")]

    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    if lengths:
        cycle.expected_content_length = expected_length
        cycle.chunked_encoding = False
    elif codings and values[names.index(b"transfer-encoding")].lower() == b"chunked":
        cycle.expected_content_length = 0
        cycle.chunked_encoding = True
    if has_connection_close:
        cycle.keep_alive = False
    # Each header's line is its name, ": ", its value and CRLF: the names and values go into every fourth slot of
    # one list, and one join makes the head (no bytes object per line).
    parts = [None, b": ", None, b"\r\n"] * len(names)
    parts[::4] = names
    parts[2::4] = values
    parts.insert(0, line)
    if not cycle.keep_alive and not has_connection_close:
        parts.append(b"connection: close\r\n")
    if cycle.chunked_encoding is None and cycle.scope["method"] != "HEAD" and status not in _NO_BODY_STATUSES:
        cycle.chunked_encoding = True
        parts.append(b"transfer-encoding: chunked\r\n")
    parts.append(b"\r\n")
    cycle.transport.write(b"".join(parts))
    return True
