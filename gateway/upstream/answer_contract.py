"""What OpenAI's clients count on from an answer, supplied where an upstream falls short.

Two promises, both met by the gateway when a real server does not keep them:

- **The cap holds.** A stream never carries more completion chunks than the client's `max_completion_tokens` /
  `max_tokens` allow. Adapters already send the cap under the field each kind reads (providers/openai_compat.py
  `token_cap`); should an upstream still run past it, the stream is cut there, ends with `finish_reason:
  "length"` and `[DONE]`, and the upstream connection is dropped so it stops generating. What was relayed is
  what is billed (estimated, as for any stream cut short). Every content chunk carries at least one token, so
  counting chunks (the role announcement aside) is exact for servers that stream token by token (llama.cpp,
  vLLM and SGLang by default) and otherwise cuts late, never early. Only single-choice chat and completions
  streams are guarded.
- **Usage is reported.** A client that asked for `stream_options.include_usage` gets exactly one usage chunk,
  as OpenAI sends it; when the upstream sent none (llama-cpp-python ignores the option), the gateway sends
  one before `[DONE]`, counted with the model family's tokenizer, with `"switchboard": {"usage_estimated":
  true}` beside `usage`. A non-streamed answer without `usage` gets one the same way. The usage record, the
  ledger row (`usage_estimated`) and the span (`switchboard.usage_estimated`) say it was estimated.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import orjson

from gateway.tokens.counter import TokenCounter
from providers.base import Call, Endpoint, ParsedResponse, StreamChunk, Usage

if TYPE_CHECKING:
    from gateway.compiled.policy import Target
    from gateway.routing.streams import PrimedStream

_CAPPED = frozenset({Endpoint.CHAT, Endpoint.COMPLETIONS})
# Module names for members read per request: on Python 3.11 `Endpoint.CHAT` is an unspecialized lookup through
# EnumType's `__getattr__` hook, ~15 times the cost of reading a global.
_CHAT, _EMBEDDINGS, _RESPONSES = Endpoint.CHAT, Endpoint.EMBEDDINGS, Endpoint.RESPONSES
# A batch's fields read in C (`map`), not by a Python loop per chunk.
_usage_of, _finish_of, _data_of = attrgetter("usage"), attrgetter("finish_reason"), attrgetter("data")
# Reads of fewer chunks (a server that writes one event per read, the usual case) go chunk by chunk: judging a
# read in one pass has a fixed cost that pays from 4 chunks on (counted in bytecodes: 3 cost more, 4 less).
_IN_ONE_PASS = 4


def stream_cap(call: Call) -> int | None:
    """The completion cap a guarded stream is held to, or None when it is not guarded."""
    if call.endpoint not in _CAPPED or call.body.get("n") not in (None, 1):
        return None
    body = call.body
    cap = body.get("max_completion_tokens") if body.get("max_completion_tokens") is not None else body.get(
        "max_tokens")
    return cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else None


def guard_stream(stream: PrimedStream, call: Call, target: Target, counter: TokenCounter
                 ) -> AsyncIterator[list[StreamChunk]]:
    """The relay's batches, held to the cap and completed with a usage chunk where the client needs them."""
    cap = stream_cap(call)
    if cap is None and not call.client_wants_usage:
        return stream.batches()  # nothing to hold: no wrapper on the hot path
    return _guarded(stream, call, target, counter, cap)


async def _guarded(stream: PrimedStream, call: Call, target: Target, counter: TokenCounter, cap: int | None
                   ) -> AsyncIterator[list[StreamChunk]]:
    inner = stream.batches()
    counted = 0  # completion chunks relayed: every chunk from the first token on but for finish and usage chunks
    started = False  # chunks before the first token (the role announcement, empty deltas) are not counted
    usage_seen = False
    relayed: list[bytes] = []  # what the client got, in order: its last item is the envelope for added chunks
    try:
        async for batch in inner:
            cut = False
            kept: list[StreamChunk] = []
            rest: Sequence[StreamChunk] = batch
            if not started and cap is not None:
                lead = _first_token(batch)
                started = lead < len(batch)
                if lead:  # chunks before the first token (the role announcement, empty deltas): not counted
                    kept += batch[:lead]
                    relayed += map(_data_of, kept)
                    usage_seen = usage_seen or list(map(_usage_of, kept)).count(None) != lead
                    rest = batch[lead:]
            # From here on `rest` is past the first token, if the stream is capped.
            if len(rest) >= _IN_ONE_PASS:
                # A read is content deltas as a rule, but for its last events (the finish reason, the usage): the
                # chunks before those are judged by scans in C and, when the cap has room for all of them, counted
                # at once and kept as they came. Only the rest go chunk by chunk.
                plain = len(rest)
                while plain and (rest[plain - 1].usage is not None or rest[plain - 1].finish_reason is not None):
                    plain -= 1
                head = rest[:plain]
                if plain and (cap is None or counted + plain <= cap) and \
                        list(map(_usage_of, head)).count(None) == plain and \
                        list(map(_finish_of, head)).count(None) == plain:
                    counted += plain
                    kept += head
                    relayed += map(_data_of, head)
                    rest = rest[plain:]
            for chunk in rest:
                if chunk.usage is not None:
                    usage_seen = True
                elif chunk.finish_reason is None and cap is not None:
                    counted += 1
                    if counted > cap:
                        cut = True
                        break
                kept.append(chunk)
                relayed.append(chunk.data)
            if cut:  # after a chunk that counted: `relayed` is not empty
                ending = _length_chunk(call, relayed[-1])
                kept.append(ending)
                relayed.append(ending.data)
            if (cut or stream.finished) and call.client_wants_usage and not usage_seen:
                # The envelope comes from the upstream's last chunk relayed, not from the ending added to it.
                last = relayed[-2] if cut else relayed[-1] if relayed else None
                kept.append(_usage_chunk(call, target, counter, relayed, last))
                usage_seen = True
            if kept:
                yield kept
            if cut:
                return
        if call.client_wants_usage and not usage_seen:  # closed without an end event (e.g. Gemini's streams)
            yield [_usage_chunk(call, target, counter, relayed, relayed[-1] if relayed else None)]
    finally:
        await inner.aclose()  # type: ignore[attr-defined]


def _first_token(batch: Sequence[StreamChunk]) -> int:
    """Where the first chunk that carries a token is in a batch (its length if none does)."""
    for position, chunk in enumerate(batch):
        if chunk.usage is None and chunk.finish_reason is None and _carries_token(chunk.data):
            return position
    return len(batch)


def _carries_token(data: bytes) -> bool:
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return True
    for choice in payload.get("choices") or () if isinstance(payload, dict) else ():
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(choice, dict) and choice.get("text"):
            return True
        if isinstance(delta, dict) and any(v not in ("", None, [], {}) for k, v in delta.items() if k != "role"):
            return True
    return False


def _envelope(call: Call, last: bytes | None) -> dict[str, Any]:
    """id, object, created and model of the stream's own chunks, for a chunk the gateway adds to it."""
    try:
        previous = orjson.loads(last) if last else {}
    except orjson.JSONDecodeError:
        previous = {}
    previous = previous if isinstance(previous, dict) else {}
    obj = "chat.completion.chunk" if call.endpoint is _CHAT else "text_completion"
    return {"id": previous.get("id") or "chatcmpl-switchboard", "object": previous.get("object") or obj,
            "created": previous.get("created") or int(time.time()),
            "model": previous.get("model") or call.upstream_model}


def _length_chunk(call: Call, last: bytes | None) -> StreamChunk:
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
    if call.endpoint is _CHAT:
        choice["delta"] = {}
    else:
        choice["text"] = ""
    return StreamChunk(orjson.dumps({**_envelope(call, last), "choices": [choice]}), finish_reason="length")


def _usage_chunk(call: Call, target: Target, counter: TokenCounter, relayed: Sequence[bytes],
                 last: bytes | None) -> StreamChunk:
    usage = estimate_stream_usage(counter, call, target, relayed)
    payload = {**_envelope(call, last), "choices": [], "usage": usage_object(usage)}
    return StreamChunk(orjson.dumps(payload), usage=usage, usage_only=True)


def usage_object(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def estimate_stream_usage(counter: TokenCounter, call: Call, target: Target, relayed: Sequence[bytes]) -> Usage:
    """Usage of a stream the upstream reported none for: the prompt, and the completion relayed so far."""
    return counter.estimate_usage(call.endpoint, call.body, relayed, target.upstream_model,
                                  target.provider.adapter.capabilities.tokenizer)


def fill_usage(parsed: ParsedResponse, call: Call, target: Target, counter: TokenCounter) -> ParsedResponse:
    """A non-streamed answer with `usage` (estimated and marked so) when the upstream sent none."""
    if parsed.usage is not None or call.endpoint is _RESPONSES:
        return parsed
    try:
        payload = orjson.loads(parsed.body)
    except orjson.JSONDecodeError:
        return parsed
    if not isinstance(payload, dict):
        return parsed
    relayed = [] if call.endpoint is _EMBEDDINGS else [
        {"choices": [_as_delta(c) for c in payload.get("choices") or () if isinstance(c, dict)]}]
    usage = counter.estimate_usage(call.endpoint, call.body, relayed, target.upstream_model,
                                   target.provider.adapter.capabilities.tokenizer)
    payload["usage"] = usage_object(usage)
    payload["switchboard"] = {"usage_estimated": True}
    parsed.body = orjson.dumps(payload)
    parsed.usage = usage
    return parsed


def _as_delta(choice: dict[str, Any]) -> dict[str, Any]:
    """A complete choice in the shape the stream estimator reads (`delta` for chat, `text` for completions)."""
    message = choice.get("message")
    return {"index": choice.get("index", 0), "delta": message} if isinstance(message, dict) else choice
