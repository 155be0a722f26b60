"""An upstream stream primed to its first content, relayed in batches, and what its end tells routing.

A streamed attempt is not a success until content arrives: `prime_stream` reads
and translates until then (a failure before it can still be retried or fall
back), and the `PrimedStream` it returns relays the rest, enforcing the idle
timeout. `TargetOutcome` releases the target's in-flight slot once and records
a mid-stream failure against it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import orjson

from gateway.routing.strategies import RouteState, TargetState, record_failure
from providers.base import Call, FailureKind, StreamChunk, StreamTranslator, UpstreamFailed, UpstreamFailure
from providers.sse import SseDecoder

if TYPE_CHECKING:
    from gateway.compiled.policy import Target
    from gateway.exchange import Exchange
    from gateway.policy.model_schema import ModelPolicy
    from gateway.upstream.pools import UpstreamResponse


class TargetOutcome:
    """How a primed stream reports its end: in-flight released once, a mid-stream failure recorded."""

    __slots__ = ("config", "done", "states", "target")

    def __init__(self, states: RouteState, target: Target, config: ModelPolicy) -> None:
        self.states, self.target, self.config, self.done = states, target, config, False

    def finish(self, failure: UpstreamFailure | None) -> None:
        if self.done:
            return
        self.done = True
        state: TargetState = self.states.state(self.target)
        state.in_flight -= 1
        if failure is not None and failure.retryable:
            record_failure(self.states, self.target, self.config, failure)


async def prime_stream(response: UpstreamResponse, target: Target, call: Call, idle_s: float | None,
                 outcome: TargetOutcome, exchange: Exchange, clock: Callable[[], float]) -> PrimedStream:
    """Read and translate the stream until its first content chunk; return it ready to relay the rest.

    The adapter's own translator judges the events, so this works for every
    wire format; the chunks translated while priming are relayed first, and
    whatever the network delivered with them goes out in the same batch.
    """
    stream = PrimedStream(response, target.provider.adapter.stream_translator(call), idle_s, outcome, exchange,
                          clock)
    raw = stream.raw  # on failure the attempt closes `response`, which ends `raw` too
    while not stream.finished:
        try:
            chunk = await raw.__anext__()
        except StopAsyncIteration:
            stream.pending.extend(stream.drain())
            break
        except UpstreamFailed as exc:
            if exc.failure.kind is FailureKind.CONNECTION:
                # Cut before any content: the adapter may know what that means (llama-cpp-python ends a stream
                # this way on a context overflow); its `end` raises the failure it sees, if any.
                stream.drain()
            raise
        if stream.prime(chunk):
            break
    return stream


# Responses events before the first delta: nothing a client could mistake for an answer yet.
_RESPONSES_PREAMBLE = frozenset({"response.created", "response.in_progress", "response.queued",
                                 "response.output_item.added", "response.content_part.added"})


def _is_preamble(data: bytes) -> bool:
    """A canonical chunk that carries no content yet: the role announcement, empty deltas, filter results."""
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(payload, dict):
        return False
    if isinstance(kind := payload.get("type"), str):  # a Responses API event (native pass-through)
        return kind in _RESPONSES_PREAMBLE
    choices = payload.get("choices")
    if not choices:
        return payload.get("usage") is None
    for choice in choices:
        if not isinstance(choice, dict) or choice.get("finish_reason") or choice.get("text"):
            return False
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(v not in ("", None, [], {}) for k, v in delta.items() if k != "role"):
            return False
    return True


class PrimedStream:
    """A stream that has shown content, relayed as batches of canonical chunks: one batch per network read.

    Every event of one read is translated in a plain loop and handed on as one
    batch, which the relay writes to the client in one send; nothing waits for
    more bytes than the upstream already delivered. Enforces the stream idle
    timeout, reports the stream's end to the target's state, and counts the
    time spent waiting on the upstream (not gateway overhead) where the bytes
    are read.
    """

    __slots__ = ("_clock", "_closed", "_decoder", "_exchange", "_idle_s", "_leftover", "_outcome", "_response",
                 "_translator", "pending", "raw")

    def __init__(self, response: UpstreamResponse, translator: StreamTranslator, idle_s: float | None,
                 outcome: TargetOutcome, exchange: Exchange, clock: Callable[[], float]) -> None:
        self._response, self._translator, self._idle_s, self._outcome = response, translator, idle_s, outcome
        self._exchange, self._clock = exchange, clock
        self._closed = False
        self._decoder = SseDecoder()
        self.raw = response.chunks().__aiter__()
        # Chunks translated while priming, relayed as the first batch.
        self.pending: list[StreamChunk] = []
        # Payloads that arrived with the first content chunk, translated when the relay starts: a failure
        # among them comes after content, so it is the relay's in-band error, not a retry.
        self._leftover: list[bytes] = []

    @property
    def finished(self) -> bool:
        """The upstream has said everything: the batch that made this true is the stream's last."""
        return self._translator.finished

    def prime(self, chunk: bytes) -> bool:
        """Translate `chunk` up to its first content chunk; True once content (or the end) was seen."""
        payloads = self._decoder.feed(chunk)
        translator, pending = self._translator, self.pending
        for position, data in enumerate(payloads):
            translated = translator.feed(data)
            pending.extend(translated)
            if translator.finished:
                return True
            if any(not _is_preamble(c.data) for c in translated):
                self._leftover = payloads[position + 1:]
                return True
        return False

    def drain(self) -> list[StreamChunk]:
        """The upstream closed the stream: its last chunks, or `UpstreamFailed` if the answer was cut short."""
        out = self._translator.feed_all(self._decoder.end())
        if not self._translator.finished:
            out.extend(self._translator.end())
        return out

    async def batches(self) -> AsyncIterator[list[StreamChunk]]:
        """What priming translated, then one batch per network read until the upstream has finished."""
        failure = None
        try:
            batch, self.pending = self.pending, []
            if self._leftover:
                try:
                    batch += self._translator.feed_all(self._leftover)
                except UpstreamFailed:
                    yield batch  # the content before the failure, then the failure
                    raise
            if batch:
                yield batch
            raw, idle_s, exchange, clock = self.raw, self._idle_s, self._exchange, self._clock
            # Each read decoded and translated with the bound methods looked up once for the stream.
            translator, decode = self._translator, self._decoder.feed
            translate = translator.feed_all
            while not translator.finished:
                waited_from = clock()
                try:
                    if idle_s is None:
                        chunk = await raw.__anext__()
                    else:
                        async with asyncio.timeout(idle_s):
                            chunk = await raw.__anext__()
                except StopAsyncIteration:
                    batch = self.drain()
                    if batch:
                        yield batch
                    return
                except TimeoutError:
                    failure = UpstreamFailure(FailureKind.TIMEOUT, 504,
                                              f"the upstream stream stalled for more than {idle_s:g}s")
                    raise UpstreamFailed(failure) from None
                finally:
                    exchange.upstream_wait_s += clock() - waited_from
                batch = translate(decode(chunk))
                if batch:
                    yield batch
        except UpstreamFailed as exc:
            failure = exc.failure
            raise
        finally:
            self._outcome.finish(failure)

    def close(self) -> None:
        """Done with the stream: a finished one keeps its connection for reuse, any other is dropped. Idempotent:
        the relay closes it when it ends, and the request's settlement again in case the relay never ran."""
        if self._closed:
            return
        self._closed = True
        if self.finished:
            self._response.finish()
        else:
            self._response.close()
        self._outcome.finish(None)
