"""Routing: which of a model's targets serves a request.

Each model gets a `RoutePlan` when the policy loads: its strategy object and
its (frozen) settings. A strategy ranks the targets that may be tried now; the
first is the choice, the rest the order for retries. What strategies learn from
traffic - in-flight counts, latency averages, breaker state, scraped load,
prefix ownership - lives in `RouteState`, which the app owns for its whole
life and keys by a target's stable identity, so a policy reload keeps it.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from gateway.errors import redact
from gateway.routing.breaker import CircuitBreaker
from gateway.routing.deadlines import AttemptDeadlines

if TYPE_CHECKING:
    from gateway.compiled.policy import Target
    from gateway.policy.model_schema import ModelPolicy
    from providers.base import UpstreamFailure

TargetKey = tuple[str, str, str]
# Scraped load older than this many scrape intervals is ignored (the scraper died or the replica did).
_SCRAPE_FRESHNESS = 3.0


def target_key(target: Target) -> TargetKey:
    """A target's identity across reloads: provider name, its URL and the upstream model."""
    return target.key


@dataclass(slots=True)
class TargetState:
    """What this gateway knows about one target right now."""

    key: TargetKey
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    in_flight: int = 0
    ewma_s: float | None = None
    requests: int = 0
    failures: int = 0
    last_error: str | None = None
    # An upstream's Retry-After: other targets are preferred until then.
    hold_until: float = 0.0
    # Set by active health checks (gateway/routing/health.py).
    healthy: bool = True
    # Scraped from the replica's /metrics: running + waiting requests, the waiting ones alone, KV-cache usage.
    scraped_load: float | None = None
    scraped_waiting: float | None = None
    kv_cache_usage: float | None = None
    scraped_at: float = 0.0
    scrape_interval_s: float = 0.0

    def load(self, now: float) -> float:
        """Requests this target is busy with: ours, or the replica's own count when freshly scraped."""
        if self.scraped_load is not None and self.fresh(now):
            return max(float(self.in_flight), self.scraped_load)
        return float(self.in_flight)

    def observe_latency(self, seconds: float, alpha: float) -> None:
        """A successful attempt took `seconds`: folded into the latency EWMA with weight `alpha`."""
        self.ewma_s = seconds if self.ewma_s is None else alpha * seconds + (1 - alpha) * self.ewma_s

    def fresh(self, now: float) -> bool:
        """Whether the scraped numbers are recent enough to trust."""
        return self.scraped_at > 0 and now - self.scraped_at <= _SCRAPE_FRESHNESS * self.scrape_interval_s


class RouteState:
    """Runtime state of every target and affinity table, and the attempts' deadlines; one per app, surviving
    policy reloads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        self.clock = clock
        self.rng = rng or random.Random()
        self._targets: dict[TargetKey, TargetState] = {}
        self._affinity: dict[str, AffinityTable] = {}
        # Per-model tables of other strategies (gateway/routing/kv_scoring.py), kept across reloads like the above.
        self.tables: dict[tuple[str, str], Any] = {}
        # The deadlines of the attempts in flight, under one event-loop timer (gateway/routing/deadlines.py).
        self.deadlines = AttemptDeadlines()

    def state(self, target: Target) -> TargetState:
        key = target.key
        state = self._targets.get(key)
        if state is None:
            state = self._targets[key] = TargetState(key)
        return state

    def states(self) -> list[TargetState]:
        return list(self._targets.values())

    def affinity(self, model: str, size: int) -> AffinityTable:
        table = self._affinity.get(model)
        if table is None or table.size != size:
            table = self._affinity[model] = AffinityTable(size)
        return table

    def available(self, target: Target, now: float) -> bool:
        """Not ejected by its breaker and not failing health checks."""
        state = self.state(target)
        return state.healthy and state.breaker.allows(now)

    def observe_latency(self, target: Target, seconds: float, alpha: float) -> None:
        self.state(target).observe_latency(seconds, alpha)

    def snapshot(self) -> list[dict[str, Any]]:
        """Every known target's state, for GET /admin/targets."""
        now = self.clock()
        rows = []
        for state in self._targets.values():
            provider, base_url, model = state.key
            breaker = state.breaker
            rows.append({
                "provider": provider, "base_url": base_url, "model": model,
                "state": breaker.state(now).value if state.healthy else "unhealthy",
                "breaker": breaker.state(now).value, "healthy": state.healthy,
                "reopens_in_s": round(breaker.reopens_in(now), 3), "trips": breaker.trips,
                "in_flight": state.in_flight,
                "latency_ewma_ms": None if state.ewma_s is None else round(state.ewma_s * 1000, 3),
                "requests": state.requests, "failures": state.failures, "last_error": state.last_error,
                "scraped_load": state.scraped_load, "scraped_waiting": state.scraped_waiting,
                "kv_cache_usage": state.kv_cache_usage,
            })
        return rows


class AffinityTable:
    """Which replica last served each conversation prefix block (bounded LRU)."""

    __slots__ = ("_owners", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._owners: OrderedDict[bytes, TargetKey] = OrderedDict()

    def lookup(self, hashes: Sequence[bytes], min_blocks: int = 1) -> TargetKey | None:
        """The owner of the longest known prefix of at least `min_blocks` blocks."""
        owners = self._owners
        for digest in reversed(hashes[min_blocks - 1:]):
            owner = owners.get(digest)
            if owner is not None:
                owners.move_to_end(digest)
                return owner
        return None

    def record(self, hashes: Sequence[bytes], owner: TargetKey) -> None:
        owners = self._owners
        for digest in hashes:
            owners[digest] = owner
            owners.move_to_end(digest)
        while len(owners) > self.size:
            owners.popitem(last=False)


class RouteRequest:
    """What strategies may look at in a request; prefix hashes are computed only if asked for."""

    __slots__ = ("_blocks", "_hashes", "_sizes", "body", "memo")

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = body
        self._blocks: list[bytes] | None = None
        self._hashes: list[bytes] | None = None
        self._sizes: list[int] | None = None
        # What a strategy derived from the body and may need again on a retry (e.g. token block keys).
        self.memo: dict[Any, Any] = {}

    def prefix_hashes(self, block_chars: int) -> list[bytes]:
        if self._hashes is None:
            self._hashes = _chain(self._prompt_blocks(block_chars))
        return self._hashes

    def prefix_sizes(self, block_chars: int) -> list[int]:
        """Cumulative length in bytes of the prompt up to and including each block (a proxy for tokens)."""
        if self._sizes is None:
            total, sizes = 0, []
            for block in self._prompt_blocks(block_chars):
                total += len(block)
                sizes.append(total)
            self._sizes = sizes
        return self._sizes

    def _prompt_blocks(self, block_chars: int) -> list[bytes]:
        if self._blocks is None:
            self._blocks = _prompt_blocks(self.body, block_chars)
        return self._blocks


def prefix_hashes(body: Mapping[str, Any], block_chars: int = 1024) -> list[bytes]:
    """Cumulative hashes of the rendered prompt, one per block.

    A chat prompt's first block is its tools and leading system messages; each
    later message is a block, so turn N+1 of a conversation shares turn N's
    hashes and finds the replica holding that KV prefix. A plain-text prompt
    is cut into `block_chars` blocks.
    """
    return _chain(_prompt_blocks(body, block_chars))


def _prompt_blocks(body: Mapping[str, Any], block_chars: int) -> list[bytes]:
    blocks: list[bytes] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        head = [body.get("tools") or []]
        index = 0
        while index < len(messages) and isinstance(messages[index], dict) and (
            messages[index].get("role") in ("system", "developer")
        ):
            head.append(messages[index])
            index += 1
        blocks.append(orjson.dumps(head, option=orjson.OPT_SORT_KEYS))
        blocks.extend(orjson.dumps(m, option=orjson.OPT_SORT_KEYS) for m in messages[index:])
    else:
        prompt = body.get("prompt")
        text = prompt.encode() if isinstance(prompt, str) else orjson.dumps(prompt)
        blocks.extend(text[i:i + block_chars] for i in range(0, max(len(text), 1), block_chars))
    return blocks


def _chain(blocks: Sequence[bytes]) -> list[bytes]:
    hashes, previous = [], b""
    for block in blocks:
        previous = hashlib.blake2b(previous + block, digest_size=16).digest()
        hashes.append(previous)
    return hashes


class Strategy(Protocol):
    """Ranks the targets that may be tried now; the first one gets the request."""

    name: str
    # Whether `on_attempt` does anything: the route step calls it only then (gateway/routing/resilience.py).
    watches_attempts: bool

    def rank(self, targets: Sequence[Target], states: RouteState, request: RouteRequest) -> list[Target]: ...

    def on_attempt(self, target: Target, states: RouteState, request: RouteRequest) -> None: ...


class _Base:
    name = ""
    watches_attempts = False

    def on_attempt(self, target: Target, states: RouteState, request: RouteRequest) -> None:
        pass


class PriorityStrategy(_Base):
    """Targets in the order listed: the first healthy one serves, the others are failover."""

    name = "priority"

    def rank(self, targets: Sequence[Target], states: RouteState, request: RouteRequest) -> list[Target]:
        return list(targets)


class WeightedStrategy(_Base):
    """Smooth weighted round-robin (nginx): exact shares over every window of sum(weights) picks."""

    name = "weighted"

    def __init__(self) -> None:
        self._current: dict[TargetKey, float] = {}

    def rank(self, targets: Sequence[Target], states: RouteState, request: RouteRequest) -> list[Target]:
        current = self._current
        total = 0.0
        best, best_value = targets[0], float("-inf")
        for target in targets:
            key = target_key(target)
            value = current.get(key, 0.0) + target.weight
            current[key] = value
            total += target.weight
            if value > best_value:
                best, best_value = target, value
        current[target_key(best)] -= total
        return [best, *sorted((t for t in targets if t is not best), key=lambda t: -t.weight)]


class LeastBusyStrategy(_Base):
    """Fewest requests in flight (from this gateway, or scraped); the higher weight wins a tie."""

    name = "least-busy"

    def rank(self, targets: Sequence[Target], states: RouteState, request: RouteRequest) -> list[Target]:
        now = states.clock()
        order = {id(t): i for i, t in enumerate(targets)}
        return sorted(targets, key=lambda t: (states.state(t).load(now), -t.weight, order[id(t)]))


class LatencyStrategy(_Base):
    """Lowest latency EWMA; untried targets first, and a random pick now and then to re-measure."""

    name = "latency"

    def __init__(self, exploration: float) -> None:
        self.exploration = exploration

    def rank(self, targets: Sequence[Target], states: RouteState, request: RouteRequest) -> list[Target]:
        ranked = sorted(targets, key=lambda t: states.state(t).ewma_s or 0.0)
        if len(ranked) > 1 and states.rng.random() < self.exploration:
            pick = ranked.pop(states.rng.randrange(1, len(ranked)))
            ranked.insert(0, pick)
        return ranked


class CostStrategy(_Base):
    """Cheapest first by each target's `cost`; targets without one come last."""

    name = "cost"

    def rank(self, targets: Sequence[Target], states: RouteState, request: RouteRequest) -> list[Target]:
        order = {id(t): i for i, t in enumerate(targets)}
        return sorted(targets, key=lambda t: (t.cost is None, t.cost or 0.0, order[id(t)]))


class PrefixAffinityStrategy(_Base):
    """Send a conversation where its KV prefix lives, unless that replica is much busier than the rest."""

    name = "prefix-affinity"
    watches_attempts = True

    def __init__(self, model: str, spill_margin: int, table_size: int, block_chars: int, min_blocks: int) -> None:
        self.model = model
        self.min_blocks = min_blocks
        self.spill_margin = spill_margin
        self.table_size = table_size
        self.block_chars = block_chars

    def rank(self, targets: Sequence[Target], states: RouteState, request: RouteRequest) -> list[Target]:
        now = states.clock()
        hashes = request.prefix_hashes(self.block_chars)
        owner = states.affinity(self.model, self.table_size).lookup(hashes, self.min_blocks)
        loads = {id(t): states.state(t).load(now) for t in targets}
        # Ties between equally loaded replicas go by rendezvous hashing of the conversation's leading
        # blocks, which stay the same from turn to turn: new conversations spread out instead of piling
        # onto the first replica, and a later turn's tie-break picks where its first turn went.
        seed = hashes[min(len(hashes), self.min_blocks) - 1] if hashes else b""
        by_load = sorted(targets, key=lambda t: (loads[id(t)], rendezvous(seed, t)))
        least = loads[id(by_load[0])]
        chosen = next((t for t in targets if target_key(t) == owner), None)
        if chosen is None or loads[id(chosen)] > least + self.spill_margin:
            return by_load
        return [chosen, *(t for t in by_load if t is not chosen)]

    def on_attempt(self, target: Target, states: RouteState, request: RouteRequest) -> None:
        # Claimed at send time, so concurrent turns of one conversation follow each other.
        states.affinity(self.model, self.table_size).record(request.prefix_hashes(self.block_chars),
                                                              target_key(target))


def rendezvous(seed: bytes, target: Target) -> bytes:
    """Highest-random-weight hashing: every gateway ranks the targets the same way for the same seed."""
    return hashlib.blake2b(seed + repr(target_key(target)).encode(), digest_size=8).digest()


def record_failure(states: RouteState, target: Target, config: ModelPolicy, failure: UpstreamFailure,
                    caller: str | None = None) -> None:
    state = states.state(target)
    now = states.clock()
    state.failures += 1
    # Shown on /admin/targets: scrubbed like a client's copy (credentials, the operator's account).
    secrets = (target.provider.settings.api_key or "",)
    state.last_error = redact(f"{failure.kind.value}: {failure.message}", secrets)[:200]
    if failure.retry_after:
        state.hold_until = now + failure.retry_after
    breaker = config.circuit_breaker
    if breaker.enabled:
        state.breaker.on_failure(now, breaker, caller)
