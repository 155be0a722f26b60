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

from gateway.policy.schema import ModelPolicy, PolicyDocument
from gateway.routing.breaker import CircuitBreaker

if TYPE_CHECKING:
    from gateway.compiled.policy import Model, Policy, Target

TargetKey = tuple[str, str, str]
TAGS_HEADER = "x-switchboard-tags"
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

    def fresh(self, now: float) -> bool:
        """Whether the scraped numbers are recent enough to trust."""
        return self.scraped_at > 0 and now - self.scraped_at <= _SCRAPE_FRESHNESS * self.scrape_interval_s


class RouteState:
    """Runtime state of every target and affinity table; one per app, surviving policy reloads."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        self.clock = clock
        self.rng = rng or random.Random()
        self._targets: dict[TargetKey, TargetState] = {}
        self._affinity: dict[str, AffinityTable] = {}
        # Per-model tables of other strategies (gateway/routing/kv_scoring.py), kept across reloads like the above.
        self.tables: dict[tuple[str, str], Any] = {}

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
        state = self.state(target)
        state.ewma_s = seconds if state.ewma_s is None else alpha * seconds + (1 - alpha) * state.ewma_s

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

    def rank(self, targets: Sequence[Target], states: RouteState, request: RouteRequest) -> list[Target]: ...

    def on_attempt(self, target: Target, states: RouteState, request: RouteRequest) -> None: ...


class _Base:
    name = ""

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


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """A model's routing and resilience, built once per policy load."""

    strategy: Strategy
    config: ModelPolicy


def build_plan(name: str, config: ModelPolicy) -> RoutePlan:
    """The runtime routing of one model (called by gateway.compiled.policy while building a policy)."""
    routing = config.routing
    strategy: Strategy
    if routing.strategy == "weighted":
        strategy = WeightedStrategy()
    elif routing.strategy == "least-busy":
        strategy = LeastBusyStrategy()
    elif routing.strategy == "latency":
        strategy = LatencyStrategy(routing.exploration)
    elif routing.strategy == "cost":
        strategy = CostStrategy()
    elif routing.strategy == "kv-aware":
        from gateway.routing.kv_scoring import KVAwareStrategy  # the scorers build on this module's state

        strategy = KVAwareStrategy(name, routing.kv_aware)
    elif routing.strategy == "prefix-affinity":
        affinity = routing.prefix_affinity
        strategy = PrefixAffinityStrategy(name, affinity.spill_margin, affinity.table_size, affinity.block_chars,
                                          affinity.min_blocks)
    else:
        strategy = PriorityStrategy()
    return RoutePlan(strategy, config)


def pinned_targets(plan: RoutePlan, targets: Sequence[Target], headers: Mapping[str, str]) -> Sequence[Target]:
    """The targets matching `x-switchboard-tags: k=v,...` when the model allows pinning; all of them otherwise."""
    raw = headers.get(TAGS_HEADER)
    if not raw or not plan.config.routing.allow_tag_pinning:
        return targets
    wanted = set()
    for part in raw.split(","):
        name, sep, value = part.partition("=")
        if sep and name.strip():
            wanted.add((name.strip(), value.strip()))
    return [t for t in targets if wanted <= t.tags]


def routing_problems(document: PolicyDocument) -> list[tuple[tuple[Any, ...], str]]:
    """Fallback lists naming unknown models or the model itself, and strategy settings needing other
    sections, as (YAML path, message)."""
    from gateway.routing.kv_scoring import kv_problems  # the scorers build on this module's state

    problems = kv_problems(document)
    for name, model in document.models.items():
        for kind in ("default", "context_window", "content_policy"):
            for index, other in enumerate(getattr(model.fallbacks, kind)):
                where = ("models", name, "fallbacks", kind, index)
                if other == name:
                    problems.append((where, "a model cannot fall back to itself"))
                elif other not in document.models:
                    problems.append((where, f"unknown model {other!r}; defined: " + ", ".join(sorted(document.models))))
    return problems


def explain_route(policy: Policy, model_name: str, *, team: str | None = None, body: Mapping[str, Any] | None = None,
                  count_prompt: Callable[[Mapping[str, Any], str], int] | None = None) -> list[str]:
    """The route a request would take, as lines of text (`switchboard policy explain`).

    Ranks the targets as a freshly started gateway would (no traffic seen yet).
    """
    model = policy.models.get(model_name)
    if model is None:
        raise KeyError(f"unknown model {model_name!r}; defined: " + ", ".join(sorted(policy.models)))
    lines: list[str] = []
    seen: set[str] = set()
    _explain_model(policy, model, body or {}, count_prompt, lines, seen, "")
    if team is not None:
        lines.extend(_explain_team(policy, team, model_name))
    return lines


def _explain_model(policy: Policy, model: Model, body: Mapping[str, Any],
                   count_prompt: Callable[[Mapping[str, Any], str], int] | None, lines: list[str], seen: set[str],
                   indent: str) -> None:
    seen.add(model.name)
    config: ModelPolicy = model.plan.config
    timing = ", ".join(f"{label} {value:g}s" for label, value in (
        ("deadline", config.deadline_s), ("ttft timeout", config.ttft_timeout_s),
        ("stream idle timeout", config.stream_idle_timeout_s)) if value is not None) or "no deadline"
    lines.append(f"{indent}model {model.name}: strategy {config.routing.strategy}, retries {config.retries}, {timing}")
    describe = getattr(model.plan.strategy, "describe", None)
    if describe is not None:
        lines.extend(f"{indent}  {line}" for line in describe())
    if config.routing.strategy == "weighted":
        # Which target goes first rotates from request to request; the shares are what is stable.
        ranked = sorted(model.targets, key=lambda t: -t.weight)
        total = sum(t.weight for t in ranked)
        lines.append(f"{indent}  targets, by share of traffic (the first pick rotates by weight):")
    else:
        ranked = model.plan.strategy.rank(list(model.targets), RouteState(rng=random.Random(0)), RouteRequest(body))
        lines.append(f"{indent}  targets, in the order a request would try them:")
    for number, target in enumerate(ranked, 1):
        extras = [f"weight {target.weight:g}"]
        if target.tags:
            extras.append("tags " + ",".join(f"{k}={v}" for k, v in sorted(target.tags)))
        if target.cost is not None:
            extras.append(f"cost {target.cost:g}")
        if config.routing.strategy == "weighted":
            extras.append(f"share {target.weight / total:.0%}")
        if describe is not None:
            extras.append(f"score {model.plan.strategy.total(target):g}")  # type: ignore[attr-defined]
        lines.append(f"{indent}    {number}. {target.provider.name} ({target.provider.settings.kind}) "
                     f"model {target.upstream_model}; " + ", ".join(extras))
    breaker = config.circuit_breaker
    lines.append(f"{indent}  circuit breaker: " + (
        f"{breaker.consecutive_failures} failures in a row or {breaker.failure_rate:.0%} of >= {breaker.min_requests} "
        f"in {breaker.window_s:g}s; cooldown {breaker.cooldown_s:g}s doubling to {breaker.max_cooldown_s:g}s"
        if breaker.enabled else "off"))
    if config.context_window is not None:
        verdict = ""
        if body and count_prompt is not None:
            # The gateway's own rule (resilience.py `_fits`): the prompt plus the completion it may ask for.
            tokens = count_prompt(body, model.targets[0].upstream_model)
            cap = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens") or 0
            reserve = cap if isinstance(cap, int) and not isinstance(cap, bool) else 0
            fits = tokens + reserve <= config.context_window
            asked = f" + max_tokens {reserve} = {tokens + reserve}" if reserve else ""
            verdict = f"; this request: {tokens} prompt tokens{asked}, " + (
                "fits" if fits else "too long -> context_window fallbacks")
        lines.append(f"{indent}  context window: {config.context_window} tokens{verdict}")
    for kind in ("default", "context_window", "content_policy"):
        names = getattr(config.fallbacks, kind)
        if names:
            lines.append(f"{indent}  fallbacks ({kind}): " + " -> ".join(names))
            for name in names:
                if name not in seen and name in policy.models:
                    _explain_model(policy, policy.models[name], body, count_prompt, lines, seen, indent + "    ")


def _explain_team(policy: Policy, team: str, model: str) -> list[str]:
    if team not in policy.teams:
        return [f"team {team}: unknown team"]
    if not policy.teams[team].may_use(model):
        return [f"team {team}: may NOT use {model} (requests get 404 model_not_found)"]
    lines = [f"team {team}: may use {model}"]
    rules = getattr(policy, "rules", None)
    if rules is not None:  # limits are gateway/accounting/limits.py's; shown when that module built them
        rates = (*getattr(rules, "team_rates", {}).get(team, ()),
                 *getattr(rules, "model_rates", {}).get((team, model), ()))
        lines.extend(f"  limit: {rule.limit} {rule.label} for {rule.who}" for rule in rates)
        budget = getattr(rules, "team_budgets", {}).get(team)
        if budget is not None:
            lines.append(f"  budget: {budget}")
        keys = getattr(rules, "key_rates", {})
        lines.extend(f"  limit: {rule.limit} {rule.label} for {rule.who}"
                     for key_id in getattr(rules, "team_keys", {}).get(team, ()) for rule in keys.get(key_id, ()))
    return lines
