"""Single-flight: identical cacheable requests in flight at once share one upstream call.

The first request (the leader) publishes its stream's canonical chunks as
they arrive and then its outcome; requests that arrive meanwhile (followers)
replay those chunks, or wait for the whole answer. Per process: replicas each
lead their own flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from gateway.cache.entry import Entry
from providers.sse import encode_event

RUNNING, COMPLETED, FAILED = 0, 1, 2


class Flight:
    """One upstream call's progress, shared by the requests that wait on it."""

    __slots__ = ("_waiters", "_woken", "chunks", "entry", "state", "tail")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []  # canonical chunk payloads, without the usage-only chunk
        self.entry: Entry | None = None  # the answer once COMPLETED
        self.tail = b""  # the usage event followers that asked for usage end with
        self.state = RUNNING
        self._woken: asyncio.Event | None = None
        self._waiters = 0

    @property
    def waiting(self) -> int:
        return self._waiters

    def publish(self, data: bytes) -> None:
        self.chunks.append(data)
        if self._waiters:
            self._wake()

    def complete(self, entry: Entry) -> None:
        if self.state == RUNNING:
            self.entry, self.tail, self.state = entry, entry.usage_event, COMPLETED
            self._wake()

    def fail(self) -> None:
        if self.state == RUNNING:
            self.state = FAILED
            self._wake()

    async def changed(self) -> None:
        """Return after the next publish or outcome."""
        if self._woken is None:
            self._woken = asyncio.Event()
        woken = self._woken
        self._waiters += 1
        try:
            await woken.wait()
        finally:
            self._waiters -= 1

    async def started(self) -> None:
        """Return once the first chunk is out or the flight has ended."""
        while self.state == RUNNING and not self.chunks:
            await self.changed()

    async def finished(self) -> None:
        while self.state == RUNNING:
            await self.changed()

    async def replay(self) -> AsyncIterator[bytes]:
        """The chunks published so far and as they come, batched as SSE events; ends with the flight."""
        sent = 0
        while True:
            chunks = self.chunks
            if sent < len(chunks):
                batch = chunks[sent:]
                sent = len(chunks)
                yield b"".join(map(encode_event, batch))
            elif self.state != RUNNING:
                return
            else:
                await self.changed()

    def _wake(self) -> None:
        if self._woken is not None:
            self._woken.set()
            self._woken = None
