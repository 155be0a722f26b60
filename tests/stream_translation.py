"""Drive an adapter's stream translator over raw upstream bytes, the way the gateway's relay does."""

from __future__ import annotations

from collections.abc import Iterable

from providers.base import Adapter, Call, StreamChunk
from providers.sse import SseDecoder


def translate_bytes(adapter: Adapter, call: Call, chunks: Iterable[bytes]) -> list[StreamChunk]:
    """Every canonical chunk the adapter makes of `chunks`; raises what the translator raises."""
    decoder, translator = SseDecoder(), adapter.stream_translator(call)
    out: list[StreamChunk] = []
    for chunk in chunks:  # one network read at a time
        out.extend(translator.feed_all(decoder.feed(chunk)))
        if translator.finished:
            return out
    out.extend(translator.feed_all(decoder.end()))
    if translator.finished:
        return out
    out.extend(translator.end())
    return out
