"""RespClient.call_within's deadlines: one timer per connection watches every command (gateway/state/resp.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from gateway.state.resp import ConnectionLost, RespClient


@asynccontextmanager
async def fake_redis(delay: Callable[[bytes], float | None]) -> AsyncIterator[str]:
    """A server that answers each RESP command `+OK`, in order, `delay(command)` seconds after reading it; None:
    never, nor anything after it on that connection (as a hung Redis would)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung = False
        while True:
            header = await reader.readline()
            if not header:
                break
            command = b""
            for _ in range(int(header[1:])):
                length = int((await reader.readline())[1:])
                command += (await reader.readexactly(length + 2))[:-2] + b" "
            seconds = delay(command)
            hung = hung or seconds is None
            if not hung:
                await asyncio.sleep(seconds or 0)  # the server's own slowness, not a test's synchronisation
                writer.write(b"+OK\r\n")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"redis://127.0.0.1:{port}/0"


def test_a_later_command_with_a_shorter_timeout_expires_first() -> None:
    async def main() -> None:
        async with fake_redis(lambda command: None) as url:
            client = RespClient(url, connect_timeout_s=2)
            started = time.monotonic()
            slow = asyncio.ensure_future(client.call_within(2.0, "GET", "slow"))
            fast = asyncio.ensure_future(client.call_within(0.1, "GET", "fast"))
            with pytest.raises(TimeoutError):
                await fast
            assert time.monotonic() - started < 1.5
            assert not slow.done()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(slow, 10)  # its own TimeoutError at 2 s; wait_for's only if it never fires
            assert 2.0 <= time.monotonic() - started < 5.0
            client.abort()

    asyncio.run(main())


def test_answered_commands_outlive_their_deadlines_and_the_connection_keeps_working() -> None:
    async def main() -> None:
        async with fake_redis(lambda command: 0.5 if b"slow" in command else 0.0) as url:
            client = RespClient(url, connect_timeout_s=2)
            answered = [await client.call_within(0.05, "PING") for _ in range(50)]
            # Answered at 0.5 s, well within its own timeout: the deadlines of the 50 above pass meanwhile, and
            # the one timer that drops them must leave this command alone.
            assert await client.call_within(2.0, "GET", "slow") == "OK"
            assert answered == ["OK"] * 50
            assert await client.call_within(0.5, "PING") == "OK"
            await client.close()

    asyncio.run(main())


def test_a_lost_connection_fails_its_commands_once_and_no_deadline_fires_after() -> None:
    async def main() -> None:
        async with fake_redis(lambda command: None if b"hang" in command else 0.0) as url:
            client = RespClient(url, connect_timeout_s=2)
            assert await client.call_within(1.0, "PING") == "OK"  # connected
            waiting = asyncio.ensure_future(client.call_within(0.2, "GET", "hang"))
            await asyncio.sleep(0)  # one loop turn: the command is written before the connection is reset
            client.abort()
            started = time.monotonic()
            with pytest.raises(ConnectionLost):
                await waiting
            assert time.monotonic() - started < 0.2  # failed by the loss, not by its deadline
            # A new connection: its own deadlines, none inherited from the lost one.
            assert await client.call_within(1.0, "PING") == "OK"
            await client.close()

    asyncio.run(main())
