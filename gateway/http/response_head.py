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

It also holds the head for the first body message and writes the two at once, completing the response as
uvicorn does when that message is the last: a whole reply then costs one system call instead of two.
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


def lean_send(cycle: Any, send: Send, sent: asyncio.Future[None], loop: asyncio.AbstractEventLoop) -> Send:
    """`send` of uvicorn's request cycle `cycle`, with its response head written here. `sent`: a done future, what
    an awaited head write returns (the write itself is synchronous, as in uvicorn); `loop`: the connection's.

    The head is held until the first body message, and both go out in one write: a whole reply's body follows its
    head at once (one system call and one TCP segment instead of two). If no body comes in the same turn of the
    event loop (a stream waiting for its upstream), the head goes out alone at the end of that turn.
    """
    held: list[bytes] = []  # the head, while it waits for the first body message

    def write_held() -> None:
        if held:
            head = held.pop()
            if not cycle.disconnected:
                cycle.transport.write(head)

    def lean(message: dict[str, Any]) -> Awaitable[None]:
        if held:
            if (message["type"] == "http.response.body" and not cycle.disconnected and not cycle.flow.write_paused
                    and _write_with_body(cycle, held[0], message)):
                held.clear()
                return sent
            write_held()
            return send(message)
        if (message["type"] != "http.response.start" or cycle.response_started or cycle.disconnected
                or cycle.flow.write_paused or cycle.access_log):
            return send(message)
        head = _head(cycle, message)
        if head is None:
            return send(message)
        held.append(head)
        loop.call_soon(write_held)
        return sent

    return lean


# A body past this size is written on its own after the head rather than copied behind it.
_JOINED_BODY_BYTES = 65_536


def _write_with_body(cycle: Any, head: bytes, message: dict[str, Any]) -> bool:
    """Write `head` and the first body message in one write, as uvicorn writes a body, and complete the response
    as it does when that message is the last; or return False having changed nothing (uvicorn's `send` then
    handles it: a HEAD request's, a body that is no `bytes`, a large one, or one the content-length refuses)."""
    body = message.get("body", b"")
    more_body = message.get("more_body", False)
    if type(body) is not bytes or len(body) > _JOINED_BODY_BYTES or cycle.scope["method"] == "HEAD":
        return False
    if cycle.chunked_encoding:
        parts = [head, b"%x\r\n" % len(body), body, b"\r\n"] if body else [head]
        if not more_body:
            parts.append(b"0\r\n\r\n")
    elif len(body) == cycle.expected_content_length or (more_body and len(body) < cycle.expected_content_length):
        cycle.expected_content_length -= len(body)
        parts = [head, body]
    else:
        return False  # longer or shorter than its content-length: uvicorn raises its own error
    cycle.transport.write(b"".join(parts))
    if not more_body:
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()
    return True


def _head(cycle: Any, message: dict[str, Any]) -> bytes | None:
    """The head uvicorn would write, with the cycle's state changed as uvicorn changes it; or None having changed
    nothing."""
    status = message["status"]
    line = STATUS_LINE.get(status)
    if line is None:
        return None
    try:  # strict: a header of another length than its neighbours raises, as uvicorn's `name, value` unpacking does
        names, values = zip(*cycle.default_headers, *message.get("headers", ()), strict=True)
    except (TypeError, ValueError):  # not pairs (or no header at all): uvicorn's own send says what is wrong
        return None
    if not _BYTES.issuperset(map(type, names + values)):
        return None
    joined_names, joined_values = b"".join(names), b"".join(values)
    if (joined_names.translate(_BAD_NAME) != joined_names
            or joined_values.translate(_BAD_VALUE) != joined_values):
        return None  # a byte uvicorn refuses: it raises its error
    if not joined_names.islower():  # uvicorn writes names lower-cased; the gateway's own already are
        names = tuple(map(bytes.lower, names))
    lengths, codings = names.count(b"content-length"), names.count(b"transfer-encoding")
    connections = names.count(b"connection")
    if lengths + codings > 1 or connections > 1:  # twice, or a length and a coding: uvicorn's order of events decides
        return None
    if lengths:
        text = values[names.index(b"content-length")]
        if not text.isdigit():
            return None  # uvicorn's int() would raise, or read what isdigit() refuses: let it
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
    return b"".join(parts)
