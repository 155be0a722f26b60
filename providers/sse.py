"""Server-sent events: incremental decoding of upstream streams, encoding for clients."""

from __future__ import annotations

from collections.abc import AsyncIterator

DONE = b"[DONE]"


async def iter_sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Yield the `data` payload of each event in a byte stream, as it completes.

    Network chunk boundaries fall anywhere, so bytes are buffered until a blank
    line ends an event. Multi-line data is joined with newlines, per the SSE
    spec; `event:`, `id:`, `retry:` and comment lines carry nothing the adapters
    need (Anthropic and Gemini repeat the event type inside the JSON).
    """
    buffer = b""
    async for chunk in chunks:
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer += chunk
        while True:
            end = buffer.find(b"\n\n")
            if end < 0:
                break
            block, buffer = buffer[:end], buffer[end + 2 :]
            data = _data_of(block)
            if data is not None:
                yield data
    if buffer.strip():
        # A stream that ends without the final blank line still delivered its event.
        data = _data_of(buffer)
        if data is not None:
            yield data


def _data_of(block: bytes) -> bytes | None:
    if block.startswith(b"data:") and b"\n" not in block:
        # The common case: one `data:` line per event.
        return block[6:] if block[5:6] == b" " else block[5:]
    parts = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            parts.append(line[6:] if line[5:6] == b" " else line[5:])
    return b"\n".join(parts) if parts else None


def encode_event(data: bytes) -> bytes:
    """One SSE event as OpenAI writes them: a `data:` line and a blank line."""
    return b"data: " + data + b"\n\n"


def encode_named_event(event: str, data: bytes) -> bytes:
    """An SSE event with an `event:` line, as Anthropic's Messages API writes them."""
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


DONE_EVENT = encode_event(DONE)
