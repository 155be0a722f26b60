"""A minimal pipelined Redis client: one connection, RESP2, for the admission hot path.

redis-py's asyncio client costs ~60-80 µs of CPU per command on this
project's benchmark box (connection-pool checkout, command packing, a
stream reader); admission needs one EVALSHA per request within a 150 µs
budget for admission plus settlement. This client writes each command
straight to the transport and matches replies to waiters in order, so
concurrent requests share one connection (pipelined by Redis for free) and
no pool can run dry under load. It speaks only what the store needs:
commands in, integers, bulk strings, arrays and errors out.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import re
import ssl
from collections.abc import Awaitable
from typing import Any
from urllib.parse import unquote, urlparse


class RedisReplyError(Exception):
    """Redis answered a command with an error reply (e.g. NOSCRIPT)."""


class ConnectionLost(ConnectionError):
    """The connection closed with commands still waiting for their replies."""


def encode(args: tuple[Any, ...]) -> bytes:
    """A command in RESP: an array of bulk strings.

    Admission's scripts carry ~40 arguments (keys, limits, amounts, expiries), all ASCII text or integers:
    built as one str and encoded once, they cost ~35% less than formatting each into bytes.
    """
    if bytes in map(type, args):  # binary values (cached bodies) go as they are
        return _encode_bytes(args)
    text = "".join([f"${len(arg)}\r\n{arg}\r\n" for arg in map(str, args)])
    if text.isascii():  # a character is a byte: the lengths above are byte lengths
        return f"*{len(args)}\r\n{text}".encode()
    return _encode_bytes(args)


def _encode_bytes(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


def bulk(text: str) -> str:
    """`text` as a RESP bulk string, to be UTF-8 encoded with the rest of its command (its length in bytes)."""
    return f"${len(text.encode())}\r\n{text}\r\n"


class _Incomplete(Exception):
    pass


# An array of n integers (admission's replies), matched in one step: n+1 integers for n checks. Anything else
# (a bulk string among them, a reply not fully read yet) does not match and is parsed item by item.
_INT_ARRAYS = [re.compile(b":(-?[0-9]+)\r\n" * count) for count in range(33)]


def _parse(buffer: bytearray, start: int) -> tuple[Any, int]:
    """One reply from `buffer[start:]` and the index after it; raises `_Incomplete`."""
    end = buffer.find(b"\r\n", start)
    if end < 0:
        raise _Incomplete
    kind, line = buffer[start], buffer[start + 1:end]
    position = end + 2
    if kind == 42:  # '*' array (first: every admission's reply is one)
        count = int(line)
        if count < 0:
            return None, position
        if count < 33:
            match = _INT_ARRAYS[count].match(buffer, position)
            if match is not None:
                return list(map(int, match.groups())), match.end()
        items = []
        for _ in range(count):
            if buffer[position:position + 1] == b":":  # an integer, as admission's replies hold: read in place
                end = buffer.find(b"\r\n", position)
                if end < 0:
                    raise _Incomplete
                items.append(int(buffer[position + 1:end]))
                position = end + 2
            else:
                item, position = _parse(buffer, position)
                items.append(item)
        return items, position
    if kind == 58:  # ':' integer
        return int(line), position
    if kind == 36:  # '$' bulk string
        length = int(line)
        if length < 0:
            return None, position
        if len(buffer) < position + length + 2:
            raise _Incomplete
        return bytes(buffer[position:position + length]), position + length + 2
    if kind == 43:  # '+' simple string
        return line.decode(), position
    if kind == 45:  # '-' error
        return RedisReplyError(line.decode()), position
    raise ConnectionLost(f"unexpected reply type {chr(kind)!r}")


class _Deadlines:
    """The commands of one connection that must be answered by a deadline, watched by one timer.

    A timer per command (`call_at`, cancelled by the reply) costs a push and a pop through the event loop's
    heap, in Python comparisons, for every command. Here a command costs one push of a tuple onto a heap of
    its own; the timer waits for the earliest deadline still pending and, when it fires, expires what is due,
    drops what was answered, and waits for the next: about once per timeout period, however many commands.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, asyncio.Future[Any], float]] = []
        self._order = itertools.count()  # ties on a deadline go in send order, never comparing futures
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, loop: asyncio.AbstractEventLoop, deadline: float, waiter: asyncio.Future[Any],
              timeout_s: float) -> None:
        """Fail `waiter` with a timeout after `deadline` (loop time) unless its reply comes first."""
        heapq.heappush(self._heap, (deadline, next(self._order), waiter, timeout_s))
        timer = self._timer
        if timer is None or deadline < timer.when():
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._expire, loop, deadline)

    def stop(self) -> None:
        """The connection is gone (its waiters failed with it): nothing left to watch."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()

    def _expire(self, loop: asyncio.AbstractEventLoop, armed_for: float) -> None:
        # The loop may run a timer a clock tick early: what it was armed for is due all the same.
        due = max(loop.time(), armed_for)
        heap = self._heap
        while heap and (heap[0][0] <= due or heap[0][2].done()):
            _, _, waiter, timeout_s = heapq.heappop(heap)
            if not waiter.done():
                _expire_after_a_poll(loop, waiter, timeout_s, 2)
        self._timer = loop.call_at(heap[0][0], self._expire, loop, heap[0][0]) if heap else None


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.deadlines = _Deadlines()
        self.buffer = bytearray()
        self.transport: Any = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport subclasses

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        position = 0
        while position < len(buffer) and self.waiters:
            try:
                reply, position = _parse(buffer, position)
            except _Incomplete:
                break
            waiter = self.waiters.popleft()
            # A waiter whose caller timed out still owns this reply: skipping it
            # keeps every later reply matched to its own command.
            if not waiter.done():
                if isinstance(reply, RedisReplyError):
                    waiter.set_exception(reply)
                else:
                    waiter.set_result(reply)
        del buffer[:position]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.deadlines.stop()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionLost(f"connection to Redis lost: {exc or 'closed'}"))


def _expire_after_a_poll(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[Any], timeout_s: float,
                         hops: int) -> None:
    """Fail `waiter` with a timeout, unless a reply completes it first.

    Called `hops` more times through the ready queue: each hop is a loop turn, and one of them polls the
    sockets, whatever the loop's order of timers, ready callbacks and I/O within a turn.
    """
    if waiter.done():
        return
    if hops:
        loop.call_soon(_expire_after_a_poll, loop, waiter, timeout_s, hops - 1)
        return
    waiter.set_exception(TimeoutError(f"Redis did not answer within {timeout_s}s"))


class RespClient:
    """One multiplexed connection to the Redis at `url`, opened on first use and reopened after a loss."""

    def __init__(self, url: str, *, connect_timeout_s: float) -> None:
        parsed = urlparse(url)
        self._unix = parsed.scheme == "unix"
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 6379
        self._path = parsed.path
        self._ssl = ssl.create_default_context() if parsed.scheme == "rediss" else None
        self._username = unquote(parsed.username) if parsed.username else None
        self._password = unquote(parsed.password) if parsed.password else None
        db = (parsed.path or "/0").strip("/") if not self._unix else ""
        self._db = int(db) if db else 0
        self._connect_timeout = connect_timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None

    async def call(self, *args: Any) -> Any:
        """Send one command and await its reply; Redis error replies raise `RedisReplyError`."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        waiter = asyncio.get_running_loop().create_future()
        protocol.waiters.append(waiter)
        assert protocol.transport is not None
        protocol.transport.write(encode(args))
        return await waiter

    def call_within(self, timeout_s: float, *args: Any) -> Awaitable[Any]:
        """`call`, given up after `timeout_s` (TimeoutError) unless its reply is already here by then."""
        return self.send_within(timeout_s, "", encode(args))

    async def send_within(self, timeout_s: float, key: str, command: bytes) -> Any:
        """Send `command`, already in RESP, and await its reply within `timeout_s`; `key` is ignored (a Redis
        Cluster routes by it: gateway/state/cluster.py).

        A stalled event loop can run a timeout's callback in the same turn as
        the read that carries the reply, or before it (uvloop runs timers
        before polling sockets); `asyncio.timeout` would then throw the reply
        away and report a timeout for a command Redis did run. Here the timer
        only gives up after the loop has polled its sockets once more. One
        timer watches all of a connection's commands (`_Deadlines`).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        protocol = self._protocol
        if protocol is None or protocol.closed:
            async with asyncio.timeout(timeout_s):
                protocol = await self._connect()
        waiter = loop.create_future()
        protocol.waiters.append(waiter)
        assert protocol.transport is not None
        protocol.transport.write(command)
        protocol.deadlines.watch(loop, deadline, waiter, timeout_s)
        return await waiter  # a cancelled caller cancels it: its reply, when it comes, is skipped

    def abort(self) -> None:
        """Reset the connection at once; waiting commands fail with `ConnectionLost`."""
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.abort()
        self._protocol = None

    async def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None

    async def _connect(self) -> _Protocol:
        # Concurrent callers share one connection attempt.
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._open())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            if self._unix:
                _, protocol = await loop.create_unix_connection(_Protocol, self._path)
            else:
                _, protocol = await loop.create_connection(_Protocol, self._host, self._port, ssl=self._ssl)
            self._protocol = protocol
            setup = []
            if self._password is not None:
                setup.append(("AUTH", self._username, self._password) if self._username else ("AUTH", self._password))
            if self._db:
                setup.append(("SELECT", self._db))
            for command in setup:
                waiter = loop.create_future()
                protocol.waiters.append(waiter)
                assert protocol.transport is not None
                protocol.transport.write(encode(command))
                await waiter
        return protocol
