"""Semantic matching: an in-process index of embedded questions, and the embedding call.

Vectors are kept normalized, so similarity is a dot product. Entries are
grouped by partition (a hash of everything in the request but its last user
turn), so only questions asked in the same context ever match; a lookup scans
its partition, which `max_entries` bounds.
"""

from __future__ import annotations

import logging
import math
import operator
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from gateway.errors import GatewayError, redact
from providers.base import Call, Endpoint, UpstreamFailed

if TYPE_CHECKING:
    from gateway.pipeline import Exchange, Services
    from gateway.policy import Policy
    from gateway.resilience import Attempt

log = logging.getLogger("switchboard.cache")


def normalized(vector: Sequence[float]) -> list[float] | None:
    norm = math.sqrt(sum(x * x for x in vector))
    if norm == 0 or not math.isfinite(norm):
        return None
    return [x / norm for x in vector]


class SemanticIndex:
    """Entry keys by their question's vector, LRU-bounded to `max_entries`."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._where: OrderedDict[bytes, bytes] = OrderedDict()  # entry key -> partition
        self._partitions: dict[bytes, dict[bytes, tuple[list[float], float]]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def add(self, partition: bytes, key: bytes, vector: list[float], expires_at: float) -> None:
        self.discard(key)
        self._where[key] = partition
        self._partitions.setdefault(partition, {})[key] = (vector, expires_at)
        while len(self._where) > self.max_entries:
            self.discard(next(iter(self._where)))

    def discard(self, key: bytes) -> None:
        partition = self._where.pop(key, None)
        if partition is not None:
            members = self._partitions[partition]
            del members[key]
            if not members:
                del self._partitions[partition]

    def nearest(self, partition: bytes, vector: list[float], threshold: float, now: float
                ) -> tuple[bytes, float] | None:
        """The closest live entry at or above `threshold`, with its similarity."""
        members = self._partitions.get(partition)
        if not members:
            return None
        best, best_score = None, threshold
        expired = []
        for key, (candidate, expires_at) in members.items():
            if now >= expires_at:
                expired.append(key)
                continue
            if len(candidate) != len(vector):
                continue
            score = sum(map(operator.mul, candidate, vector))
            if score >= best_score:
                best, best_score = key, score
        for key in expired:
            self.discard(key)
        if best is None:
            return None
        self._where.move_to_end(best)
        return best, best_score

    async def find(self, partition: bytes, vector: list[float], threshold: float, now: float
                   ) -> tuple[bytes, float] | None:
        """`nearest`, behind the same awaitable interface as the Redis index (gateway/cache/shared_index.py)."""
        return self.nearest(partition, vector, threshold, now)

    async def close(self) -> None:
        pass


async def embed(services: Services, policy: Policy, model_name: str, text: str, exchange: Exchange,
                attempt: Attempt) -> list[float] | None:
    """The normalized embedding of `text` from the policy's model, through the gateway's own call path.

    Any failure is logged and answered with None: semantic matching is an
    optimisation and must never fail the request it serves.
    """
    model = policy.models.get(model_name)
    if model is None:
        return None
    target = model.targets[0]
    call = Call(Endpoint.EMBEDDINGS, {"model": model_name, "input": text}, target.upstream_model, False)
    try:
        response = await attempt(services, target, call, exchange)
        raw = await response.read()
        parsed = target.provider.adapter.parse_response(call, raw)
        vector: Any = orjson.loads(parsed.body)["data"][0]["embedding"]
    except (GatewayError, UpstreamFailed, orjson.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        log.warning("response cache: embedding with %s failed (%s); exact matching only", model_name,
                    redact(str(exc), (target.provider.settings.api_key or "",)))
        return None
    if not isinstance(vector, list) or not all(isinstance(x, int | float) for x in vector):
        return None
    return normalized(vector)
