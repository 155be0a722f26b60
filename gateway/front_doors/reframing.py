"""Re-framing the pipeline's chat stream for another API's clients, batch for batch."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import orjson

from providers.sse import DONE, SseDecoder


class EventStream(Protocol):
    """One stream's re-framing state: `feed` takes one chat `data:` payload and returns the encoded
    events it becomes; `done` turns true after the stream's terminal event."""

    done: bool

    def feed(self, data: bytes) -> list[bytes]: ...


class ChatStream:
    """An `EventStream` over the pipeline's chat stream: `[DONE]` closes it, an in-band error object ends it
    (`failed`), and every other payload is a chat chunk (`chunk`). Subclasses render the other API's events."""

    def __init__(self) -> None:
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        if data == DONE:
            self.done = True
            return self.closing()
        chunk = orjson.loads(data)
        if "error" in chunk and "choices" not in chunk:
            self.done = True
            return self.failed(chunk["error"] or {})
        return self.chunk(chunk)

    def chunk(self, chunk: Mapping[str, Any]) -> list[bytes]:
        raise NotImplementedError

    def closing(self) -> list[bytes]:
        raise NotImplementedError

    def failed(self, error: Mapping[str, Any]) -> list[bytes]:
        raise NotImplementedError


async def reframed(chunks: AsyncIterator[bytes], stream: EventStream) -> AsyncIterator[bytes]:
    """`chunks` re-framed by `stream`: what one batch of the pipeline's relay carried goes out in one write.

    A stream that ends without `done` is left unterminated, as the pipeline left it.
    """
    decoder = SseDecoder()
    try:
        async for batch in chunks:
            out: list[bytes] = []
            for data in decoder.feed(batch):
                out += stream.feed(data)
                if stream.done:
                    break
            if out:
                yield b"".join(out)
            if stream.done:
                return
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]
