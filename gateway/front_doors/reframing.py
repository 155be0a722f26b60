"""Re-framing the pipeline's chat stream for another API's clients, batch for batch."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from providers.sse import SseDecoder


class EventStream(Protocol):
    """One stream's re-framing state: `feed` takes one chat `data:` payload and returns the encoded
    events it becomes; `done` turns true after the stream's terminal event."""

    done: bool

    def feed(self, data: bytes) -> list[bytes]: ...


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
