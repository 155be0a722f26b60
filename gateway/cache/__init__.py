"""Response caching: exact and semantic, tenant-isolated, with request coalescing.

- `plan` — the policy's `cache:` blocks resolved into one rule per (team, model);
- `keys` — what may be cached and the keys answers are stored under;
- `entry` — a cached answer, replayable as a whole response or a stream;
- `backends` — the in-process LRU (bounded in bytes) and Redis;
- `flight` — single-flight coalescing of identical requests in flight;
- `semantic` — the vector index and the embedding call;
- `service` — `ResponseCache`, what the pipeline consults, and its hooks.
"""

from gateway.cache.plan import EMPTY_CACHE_PLAN, CachePlan, CacheRule, build_cache_plan, cache_problems
from gateway.cache.service import (
    CACHE_HEADER,
    ResponseCache,
    Ticket,
    recording_stream,
    remember,
)

__all__ = [
    "CACHE_HEADER",
    "EMPTY_CACHE_PLAN",
    "CachePlan",
    "CacheRule",
    "ResponseCache",
    "Ticket",
    "build_cache_plan",
    "cache_problems",
    "recording_stream",
    "remember",
]
