"""Server-sent events: incremental decoding of upstream streams, encoding for clients."""

from __future__ import annotations

DONE = b"[DONE]"


class SseDecoder:
    """Splits a byte stream into the `data` payloads of its events, as they complete.

    Network chunk boundaries fall anywhere, so bytes are buffered until a blank
    line ends an event. Multi-line data is joined with newlines, per the SSE
    spec; `event:`, `id:`, `retry:` and comment lines carry nothing the adapters
    need (Anthropic and Gemini repeat the event type inside the JSON).
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The payloads of the events this chunk completes (often several, sometimes none)."""
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer = self._buffer + chunk if self._buffer else chunk
        last = buffer.rfind(b"\n\n")
        if last < 0:
            self._buffer = buffer
            return []
        # The common case, checked by a few scans in C rather than per event: every complete event is one
        # `data: ` line, so the only newlines before the last blank line are the blank lines between events.
        if buffer.startswith(b"data: "):
            events = buffer.count(b"\n\ndata: ", 0, last) + 1
            if buffer.count(b"\n", 0, last) == 2 * (events - 1):
                self._buffer = buffer[last + 2:]
                return buffer[6:last].split(b"\n\ndata: ")
        return self._feed_event_by_event(buffer)

    def _feed_event_by_event(self, buffer: bytes) -> list[bytes]:
        payloads = []
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            if (data := _data_of(buffer[start:end])) is not None:
                payloads.append(data)
            start = end + 2
        self._buffer = buffer[start:] if start else buffer
        return payloads

    def end(self) -> list[bytes]:
        """The stream closed: an event that lacked only its final blank line still counts."""
        rest, self._buffer = self._buffer, b""
        data = _data_of(rest.rstrip(b"\n")) if rest.strip() else None
        return [] if data is None else [data]


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
