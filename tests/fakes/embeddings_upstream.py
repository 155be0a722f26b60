"""A fake OpenAI upstream whose embeddings have controllable similarity.

The shared fake's vectors are random per text, so any two texts are about as
far apart as any other two. Here a text's vector counts its words (lower-cased,
punctuation stripped), each word in its own dimension, so the cosine
similarity of two texts is their word overlap and a test can pick phrasings
above or below a threshold; `similarity(a, b)` computes the expected value.
Chat and completions are the shared fake's.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from typing import Any

import orjson
from aiohttp import web

from tests.fakes.openai_upstream import FakeOpenAIUpstream, _Exchange

DIMENSIONS = 1024
_WORD = re.compile(r"[a-z0-9]+")


def vector(text: str, dimensions: int = DIMENSIONS) -> list[float]:
    """Word counts, one dimension per word (by hash)."""
    values = [0.0] * dimensions
    for word, count in Counter(_WORD.findall(text.lower())).items():
        values[int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") % dimensions] += count
    return values


def similarity(a: str, b: str) -> float:
    """The cosine similarity the gateway will compute between the two texts."""
    va, vb = vector(a), vector(b)
    dot = sum(x * y for x, y in zip(va, vb, strict=True))
    return dot / (math.sqrt(sum(x * x for x in va)) * math.sqrt(sum(y * y for y in vb)))


class WordEmbeddingsUpstream(FakeOpenAIUpstream):
    """FakeOpenAIUpstream with bag-of-words embeddings; counts embedding calls in `requests` like any other."""

    async def _embeddings(self, request: web.Request, exchange: _Exchange, body: dict[str, Any],
                          behaviour: Any) -> web.StreamResponse:
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else list(raw or [])
        data = [{"object": "embedding", "index": i, "embedding": vector(str(text))} for i, text in enumerate(inputs)]
        tokens = sum(len(_WORD.findall(str(text))) for text in inputs)
        payload = {"object": "list", "data": data, "model": body.get("model", "fake-embedding"),
                   "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        return web.Response(body=orjson.dumps(payload), content_type="application/json")
