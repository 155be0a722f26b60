"""The stream guard judges most of a read in one pass (gateway/upstream/answer_contract.py `_guarded`): it must yield
exactly what judging every chunk one by one yields, for any mix of reads, caps and endings."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Sequence
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from gateway.upstream import answer_contract
from gateway.upstream.answer_contract import _carries_token, _length_chunk, _usage_chunk
from providers.base import Call, Endpoint, StreamChunk, Usage


class _Stream:
    """A primed stream's stand-in: the given batches, `finished` once the last one is handed on."""

    def __init__(self, batches: list[list[StreamChunk]], ends: bool) -> None:
        self._batches, self._ends, self.finished = batches, ends, False

    async def batches(self) -> AsyncIterator[list[StreamChunk]]:
        for position, batch in enumerate(self._batches):
            self.finished = self._ends and position == len(self._batches) - 1
            yield batch


class _Counter:
    def estimate_usage(self, endpoint: Endpoint, body: Any, relayed: Sequence[bytes], model: str,
                       tokenizer: Any) -> Usage:
        # The relayed payloads are the estimate's input: make them visible in the result.
        return Usage(prompt_tokens=len(relayed), completion_tokens=sum(map(len, relayed)), estimated=True)


_TARGET: Any = SimpleNamespace(upstream_model="m", provider=SimpleNamespace(
    adapter=SimpleNamespace(capabilities=SimpleNamespace(tokenizer=None))))


async def _chunk_by_chunk(stream: _Stream, call: Call, counter: Any, cap: int | None
                          ) -> AsyncIterator[list[StreamChunk]]:
    """The guard as it was written first: every chunk judged on its own."""
    counted, started, usage_seen = 0, False, False
    relayed: list[bytes] = []
    last: bytes | None = None
    async for batch in stream.batches():
        kept: list[StreamChunk] = []
        cut = False
        for chunk in batch:
            if chunk.usage is not None:
                usage_seen = True
            elif chunk.finish_reason is None and cap is not None and (started or _carries_token(chunk.data)):
                started = True
                counted += 1
                if counted > cap:
                    cut = True
                    break
            kept.append(chunk)
            relayed.append(chunk.data)
            last = chunk.data
        if cut:
            ending = _length_chunk(call, last)
            kept.append(ending)
            relayed.append(ending.data)
        if (cut or stream.finished) and call.client_wants_usage and not usage_seen:
            kept.append(_usage_chunk(call, _TARGET, counter, relayed, last))
            usage_seen = True
        if kept:
            yield kept
        if cut:
            return
    if call.client_wants_usage and not usage_seen:
        yield [_usage_chunk(call, _TARGET, counter, relayed, last)]


def _random_chunk(rng: random.Random, position: int) -> StreamChunk:
    kind = rng.choices(["role", "empty", "content", "finish", "usage"], [2, 1, 12, 1, 1])[0]
    envelope = {"id": f"c{position}", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    if kind == "usage":
        usage = Usage(prompt_tokens=3, completion_tokens=position)
        return StreamChunk(orjson.dumps({**envelope, "choices": [], "usage": {}}), usage=usage, usage_only=True)
    delta: dict[str, Any] = {"role": "assistant", "content": ""} if kind == "role" else \
        {} if kind == "empty" else {"content": f"t{position}"}
    finish = "stop" if kind == "finish" else None
    data = orjson.dumps({**envelope, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    return StreamChunk(data, finish_reason=finish)


async def _collect(batches: AsyncIterator[list[StreamChunk]]) -> list[list[tuple[Any, ...]]]:
    out = []
    async for batch in batches:
        out.append([(c.data, c.usage, c.usage_only, c.finish_reason) for c in batch])
    return out


def test_batched_judging_yields_what_chunk_by_chunk_judging_yields(monkeypatch: pytest.MonkeyPatch) -> None:
    # A chunk added to a stream that relayed nothing yet is dated now: one clock for both, or a second may tick.
    monkeypatch.setattr(answer_contract, "time", SimpleNamespace(time=lambda: 1.0))
    rng = random.Random(17)
    for _ in range(3000):
        chunks = [_random_chunk(rng, i) for i in range(rng.randint(0, 30))]
        cuts = sorted(rng.sample(range(1, len(chunks)), rng.randint(0, max(0, len(chunks) - 1)))) \
            if len(chunks) > 1 else []
        bounds = [0, *cuts, len(chunks)]
        batches = [chunks[a:b] for a, b in itertools.pairwise(bounds) if b > a]
        ends = rng.random() < 0.7
        cap = rng.choice([None, 1, 2, 3, 5, 10, 20, 40])
        wants_usage = rng.random() < 0.6
        call = Call(Endpoint.CHAT, {"max_tokens": cap}, "m", True, wants_usage)
        expected = asyncio.run(_collect(_chunk_by_chunk(_Stream(batches, ends), call, _Counter(), cap)))
        got = asyncio.run(_collect(answer_contract._guarded(_Stream(batches, ends), call, _TARGET,  # type: ignore[arg-type]
                                                            _Counter(), cap)))  # type: ignore[arg-type]
        assert got == expected, (batches, ends, cap, wants_usage)
