"""KV-cache-aware routing: filter -> weighted score -> pick.

The `kv-aware` strategy ranks a model's replicas by a weighted sum of scorers,
each giving a candidate 0-1 (higher is better):

- prefix: the share of the prompt the replica is believed to hold in its KV
  cache. Precise when the replica publishes KV-cache events
  (gateway/routing/kv_events.py), else approximate: learned from where this gateway sent
  earlier prompts, plus a rendezvous-hashed *home* per leading prefix.
- queue: scraped waiting requests, relative to the policy's `max_waiting`.
- kv_usage: 1 - the scraped KV-cache usage.
- in_flight: this gateway's own requests in flight, relative to the busiest
  candidate.

Before scoring, replicas whose queue or KV cache is past the policy's limits are
filtered out (unless all are): a cache hit there would wait longer than a miss
elsewhere.

Why a home: several gateway replicas each learn only from their own traffic, so
a conversation whose next turn reaches another gateway would look new there. The
home of a prompt is the rendezvous winner for its leading blocks (by default
tools + system prompt), which do not change from turn to turn, so every gateway
computes the same home without talking to the others. A gateway that has not
seen the previous turn credits the home with holding it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.policy.model_schema import KVAwarePolicy
from gateway.policy.schema import PolicyDocument
from gateway.routing.holders import HolderTable, holder_table
from gateway.routing.kv_events import ReplicaBlocks, replica_blocks, request_block_keys
from gateway.routing.prefix_sharing import SHARE_KEY
from gateway.routing.strategies import RouteRequest, RouteState, rendezvous

if TYPE_CHECKING:
    from gateway.compiled.policy import Target

SCORERS = ("prefix", "queue", "kv_usage", "in_flight")
@dataclass(frozen=True, slots=True)
class Scores:
    """One candidate's scorer values (0-1) and weighted total; `filtered` if left out before scoring."""

    prefix: float
    queue: float
    kv_usage: float
    in_flight: float
    total: float
    filtered: bool = False
    precise: bool = False


class KVAwareStrategy:
    """Filter replicas past their queue / KV limits, score the rest, best total first."""

    name = "kv-aware"
    watches_attempts = True

    def __init__(self, model: str, config: KVAwarePolicy) -> None:
        self.model = model
        self.config = config
        # The scores of the latest rank(), for the route decision event that the pipeline records
        # right after ranking (no await in between, so no other request's ranking can interleave).
        self.last_scores: dict[int, Scores] = {}

    def table(self, states: RouteState) -> HolderTable:
        return holder_table(states, self.model, self.config.table_size)

    def rank(self, targets: Sequence[Target], states: RouteState, request: RouteRequest) -> list[Target]:
        config, weights = self.config, self.config.weights
        now = states.clock()
        hashes = request.prefix_hashes(config.block_chars)
        seed = hashes[min(len(hashes), config.home_blocks) - 1] if hashes else b""
        target_states = [states.state(t) for t in targets]
        waiting = [s.scraped_waiting if s.fresh(now) and s.scraped_waiting is not None else 0.0
                   for s in target_states]
        known_kv = [s.kv_cache_usage for s in target_states if s.fresh(now) and s.kv_cache_usage is not None]
        unknown_kv = sum(known_kv) / len(known_kv) if known_kv else 0.0
        usage = [s.kv_cache_usage if s.fresh(now) and s.kv_cache_usage is not None else unknown_kv
                 for s in target_states]
        flights = [float(s.in_flight) for s in target_states]
        over = [w >= config.max_waiting or u >= config.max_kv_usage for w, u in zip(waiting, usage, strict=True)]
        if all(over):
            over = [False] * len(targets)
        prefix, precise = self._prefix(targets, states, request, hashes, seed, now)
        most_flights = max(flights)
        scores: dict[int, Scores] = {}
        for index, target in enumerate(targets):
            # Against max_waiting, not the longest queue: one waiting request more is not a reason to
            # give up a cache hit, half the limit is.
            queue = 1.0 - min(waiting[index], config.max_waiting) / config.max_waiting if config.max_waiting else 1.0
            free = 1.0 - min(1.0, max(0.0, usage[index]))
            idle = 1.0 - flights[index] / most_flights if most_flights > 0 else 1.0
            total = (weights.prefix * prefix[index] + weights.queue * queue + weights.kv_usage * free
                     + weights.in_flight * idle)
            scores[id(target)] = Scores(prefix[index], queue, free, idle, total, over[index], precise[index])
        self.last_scores = scores
        # Equal totals (a cold start) go by rendezvous on the leading blocks, the same on every gateway.
        return sorted(targets, key=lambda t: (scores[id(t)].filtered, -scores[id(t)].total, rendezvous(seed, t)))

    def _prefix(self, targets: Sequence[Target], states: RouteState, request: RouteRequest,
                hashes: Sequence[bytes], seed: bytes, now: float) -> tuple[list[float], list[bool]]:
        """Each candidate's share of the prompt in its KV cache, and whether that came from its events."""
        sizes = request.prefix_sizes(self.config.block_chars)
        total = float(sizes[-1]) if sizes else 0.0
        learned = self._learned(targets, states, hashes, sizes, seed)
        shares = [learned[i] / total if total else 0.0 for i in range(len(targets))]
        precise = [False] * len(targets)
        if self.config.index == "precise":
            for index, target in enumerate(targets):
                blocks = replica_blocks(states, target)
                if blocks is None or not blocks.live(now):
                    continue  # no events lately: the approximate share stands
                shares[index] = _precise_share(blocks, request)
                precise[index] = True
        return shares, precise

    def _learned(self, targets: Sequence[Target], states: RouteState, hashes: Sequence[bytes],
                 sizes: Sequence[int], seed: bytes) -> list[float]:
        """Bytes of the prompt each candidate holds, as far as this gateway's own routing tells.

        A chat turn's prompt is the previous turn's prompt (blocks up to n-3), its reply (n-2) and the new
        message (n-1); the replica that served the previous prompt also holds the reply.
        """
        table = self.table(states)
        depths = table.depths(hashes)
        count = len(hashes)
        reply = count - 2
        held = [0.0] * len(targets)
        for index, target in enumerate(targets):
            depth = depths.get(target.key)
            if depth is not None:
                held[index] = float(sizes[reply if depth == reply - 1 else depth])
        # A first turn (its system block is shared with other conversations), or a later one whose previous
        # prompt this gateway did not route: assume the previous turn went home, as every gateway computes it.
        if reply >= 0 and targets and (reply == 0 or not table.knows(hashes[reply - 1])):
            home = min(range(len(targets)), key=lambda i: rendezvous(seed, targets[i]))
            held[home] = max(held[home], float(sizes[reply]))
        return held

    def on_attempt(self, target: Target, states: RouteState, request: RouteRequest) -> None:
        # Claimed at send time, so concurrent turns of one conversation follow each other.
        hashes = request.prefix_hashes(self.config.block_chars)
        self.table(states).record(hashes, target.key)
        if self.config.shared_table:
            sharer = states.tables.get(SHARE_KEY)
            if sharer is not None:  # gateway/routing/prefix_sharing.py, running while the policy asks for it
                sharer.offer(self.model, hashes, target.key)

    def score_attributes(self, considered: Sequence[Target]) -> dict[str, Any]:
        """Span attributes of the latest ranking: every scorer's value per candidate, in candidate order."""
        rows = [self.last_scores.get(id(t)) for t in considered]
        attributes: dict[str, Any] = {
            f"switchboard.route.score.{name}": tuple(-1.0 if r is None else round(getattr(r, name), 4) for r in rows)
            for name in SCORERS
        }
        attributes["switchboard.route.filtered"] = tuple(bool(r and r.filtered) for r in rows)
        if self.config.index == "precise":
            attributes["switchboard.route.precise"] = tuple(bool(r and r.precise) for r in rows)
        return attributes

    def total(self, target: Target) -> float:
        scores = self.last_scores.get(id(target))
        return -1.0 if scores is None else round(scores.total, 4)

    def describe(self) -> list[str]:
        """The scorers and filters, for `switchboard policy explain`."""
        config, weights = self.config, self.config.weights
        return [
            "scorers (0-1 each, higher is better) and weights: "
            + ", ".join(f"{name} x{getattr(weights, name):g}" for name in SCORERS),
            f"prefix index: {config.index}; home: rendezvous on the first {config.home_blocks} prompt block(s)"
            + ("; learned ownership shared through Redis" if config.shared_table else ""),
            f"filter: skip replicas with >= {config.max_waiting:g} waiting or KV cache >= {config.max_kv_usage:.0%} "
            "full (unless all are)",
        ]


def kv_problems(document: PolicyDocument) -> list[tuple[tuple[Any, ...], str]]:
    """`kv-aware` settings that need another section of the policy, as (YAML path, message)."""
    return [(("models", name, "routing", "kv_aware", "shared_table"),
             "needs a Redis to share through: set state.url (redis://...)")
            for name, model in document.models.items()
            if model.routing.strategy == "kv-aware" and model.routing.kv_aware.shared_table and not document.state.url]


def _precise_share(blocks: ReplicaBlocks, request: RouteRequest) -> float:
    memo = request.memo
    cache_key = ("kv-blocks", blocks.block_size, blocks.encoding)
    keys = memo.get(cache_key)
    if keys is None:
        keys = memo[cache_key] = request_block_keys(request.body, blocks.block_size, blocks.encoding)
    return blocks.matched(keys) / len(keys) if keys else 0.0
