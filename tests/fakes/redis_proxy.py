"""A TCP proxy in front of Redis that can lose a reply: Redis ran the command, the client never hears of it.

`cut_next_reply()` makes the proxy drop the next bytes Redis sends and reset
the client's connection, the way a network fault or an aborted shared
connection loses replies to commands that were already applied. Runs on the
test's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib


class ReplyCuttingProxy:
    def __init__(self, redis_port: int) -> None:
        self._redis_port = redis_port
        self._server: asyncio.Server | None = None
        self._cut = False
        self.cuts = 0
        self.cut_made = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cut_next_reply(self) -> None:
        self._cut = True

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", self._redis_port)
        upward = asyncio.create_task(self._pump(client_reader, redis_writer))
        try:
            while data := await redis_reader.read(65536):
                if self._cut:
                    self._cut = False
                    self.cuts += 1
                    self.cut_made.set()
                    client_writer.transport.abort()  # the reply is dropped; the client sees a reset
                    break
                client_writer.write(data)
                await client_writer.drain()
        except ConnectionError:
            pass
        finally:
            upward.cancel()
            redis_writer.close()
            client_writer.transport.abort()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
