"""KV-cache-aware routing, simulated: the gateway's real strategies over modelled vLLM replicas, in simulated time.

    .venv/bin/python loadtests/kv_routing_sim.py            # every strategy x 1/3 gateways x 3 rates, ~3 min
    .venv/bin/python loadtests/kv_routing_sim.py --quick    # fewer requests

What is real: the routing code. Each simulated gateway replica is a `RouteState` plus the strategy objects
`gateway.routing.plan.build_plan` makes from a policy, ranking the same request bodies (chat messages) the
gateway would see, with `in_flight` counted as gateway/routing/resilience.py counts it and `/metrics` numbers
scraped every `--scrape-s` as gateway/routing/health.py does. The precise index is gateway/routing/kv_events.py's
`ReplicaBlocks`, fed msgpack-encoded `KVEventBatch`es in vLLM's wire format after `--event-delay-s`.
`random` is the only strategy that is not gateway code (a uniform pick, the baseline).

What is modelled (a discrete-event simulation; nothing sleeps):
- a replica is a vLLM engine with a prefix cache of `--kv-tokens` tokens (an 8B model on one 80 GB GPU holds
  ~400k tokens of KV at 128 KiB a token) in blocks of `--block` tokens, evicted LRU, blocks of running requests
  pinned and shared between the requests using them;
- prefill runs one request at a time at `--prefill-tps` tokens/s over the tokens not found in the cache (+5 ms),
  a request waits in the queue while its blocks do not fit beside the running ones; TTFT = queue + prefill;
- decode takes `--tpot-ms` per output token, in parallel with other requests (it does not slow prefill);
- the workload: `--tenants` tenants, each with a `--context` token shared system prompt (Zipf-popular,
  s=0.8); conversations of `--turns` turns arrive as a Poisson process, each turn 100-400 user tokens and a
  100-300 token reply, `--think-s` (exponential) between a reply and the next turn; each request goes to a
  random gateway replica.

Reported per strategy, gateway count and offered rate: prompt-token cache hit rate (what vLLM's
prefix_cache_hits/queries counters measure), TTFT p50/p90 and completed requests/s, over requests after the
first `--warmup` share.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gateway.compiled.policy import Policy, Target, parse_policy  # noqa: E402
from gateway.routing.kv_events import ReplicaBlocks, chain_keys  # noqa: E402
from gateway.routing.strategies import RouteRequest, RouteState  # noqa: E402

STRATEGIES = {
    "random": None,
    "least-busy": "{strategy: least-busy}",
    "approximate prefix": "{strategy: prefix-affinity}",
    "load-aware prefix": "{strategy: kv-aware}",
    "precise": "{strategy: kv-aware, kv_aware: {index: precise}}",
}
_FILLER = "lorem ipsum dolor sit amet " * 2000  # message text: 4 characters a token, as routing sees it


def _policy(strategy: str, replicas: int, block: int) -> Policy:
    events = ", kv_events: {endpoint: 'tcp://127.0.0.1:1', encoding: sim, stale_after_s: 30}"
    providers = "".join(f"  r{i}: {{kind: vllm, base_url: 'http://10.0.0.{i + 1}:8000/v1'{events}}}\n"
                        for i in range(replicas))
    targets = "".join(f"      - {{provider: r{i}, model: llama}}\n" for i in range(replicas))
    return parse_policy(f"""
version: 1
providers:
{providers}models:
  chat:
    routing: {strategy}
    targets:
{targets}teams:
  t: {{keys: [{{id: k, hash: "sha256:{'0' * 64}"}}], models: ["*"]}}
""")


@dataclass(slots=True)
class Request:
    conversation: Conversation
    body: dict[str, Any]
    tokens: list[int]
    keys: list[bytes]
    output: int
    arrived: float
    gateway: int = 0
    target: Target | None = None
    cached: int = 0
    ttft: float = 0.0


@dataclass(slots=True)
class Conversation:
    tenant: int
    turns_left: int
    messages: list[dict[str, str]]
    tokens: list[int]


class Replica:
    """One modelled vLLM engine: FIFO prefill, LRU prefix cache of blocks with pinning, parallel decode."""

    def __init__(self, sim: Simulation, index: int, args: argparse.Namespace) -> None:
        self.sim, self.index, self.args = sim, index, args
        self.capacity = args.kv_tokens // args.block
        self.cache: OrderedDict[bytes, None] = OrderedDict()
        self.pins: dict[bytes, int] = {}
        self.queue: deque[Request] = deque()
        self.busy = False
        self.running = 0
        self.events: list[list[Any]] = []

    def arrive(self, request: Request) -> None:
        self.queue.append(request)
        self._next()

    def _next(self) -> None:
        if self.busy or not self.queue:
            return
        request = self.queue[0]
        fresh = sum(1 for k in request.keys if k not in self.pins)
        if self.pins and len(self.pins) + fresh > self.capacity:
            return  # no room for its KV blocks until a running request finishes
        self.queue.popleft()
        self.busy = True
        matched = 0
        for key in request.keys:
            if key not in self.cache:
                break
            matched += 1
        request.cached = min(matched * self.args.block, len(request.tokens))
        for key in request.keys[:matched]:
            self.cache.move_to_end(key)
        self._pin(request.keys)
        prefill = (len(request.tokens) - request.cached) / self.args.prefill_tps + 0.005
        self.sim.at(prefill, lambda: self._prefilled(request, matched))

    def _prefilled(self, request: Request, matched: int) -> None:
        request.ttft = self.sim.now - request.arrived
        self._store(request.tokens, request.keys, matched)
        self.busy = False
        self.running += 1
        self.sim.at(request.output * self.args.tpot_ms / 1000, lambda: self._finished(request))
        self._next()

    def _finished(self, request: Request) -> None:
        self.running -= 1
        self._unpin(request.keys)
        reply = self.sim.reply_tokens(request)
        full = request.tokens + reply
        keys = chain_keys(full, self.args.block)
        self._store(full, keys, len(request.keys))
        self.sim.done(request, reply)
        self._next()

    def _store(self, tokens: list[int], keys: list[bytes], known: int) -> None:
        cache, block = self.cache, self.args.block
        for key in keys:
            cache[key] = None
            cache.move_to_end(key)
        if known < len(keys):  # blocks computed by this request (those before `known` were cached)
            parent = keys[known - 1] if known else None
            self.events.append(["BlockStored", keys[known:], parent, tokens[known * block:len(keys) * block], block,
                                None, "GPU"])
        removed = []
        spins = 0
        while len(cache) > self.capacity and spins < len(cache):
            key, _ = cache.popitem(last=False)
            if key in self.pins:
                cache[key] = None  # in use by a running request: not evictable
                spins += 1
                continue
            removed.append(key)
        if removed:
            self.events.append(["BlockRemoved", removed, "GPU"])

    def _pin(self, keys: list[bytes]) -> None:
        pins = self.pins
        for key in keys:
            pins[key] = pins.get(key, 0) + 1

    def _unpin(self, keys: list[bytes]) -> None:
        pins = self.pins
        for key in keys:
            left = pins[key] - 1
            if left:
                pins[key] = left
            else:
                del pins[key]

    def flush_events(self) -> bytes | None:
        if not self.events:
            return None
        events, self.events = self.events, []
        return msgpack.packb([self.sim.now, events])


@dataclass
class Gateway:
    states: RouteState
    policy: Policy
    blocks: list[ReplicaBlocks] = field(default_factory=list)


class Simulation:
    def __init__(self, strategy: str, gateways: int, rate: float, args: argparse.Namespace) -> None:
        self.args, self.rate, self.strategy = args, rate, strategy
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.rng = random.Random(args.seed)
        self.replicas = [Replica(self, i, args) for i in range(args.replicas)]
        self.gateways = []
        for _ in range(gateways):
            policy = _policy(STRATEGIES[strategy] or "{strategy: priority}", args.replicas, args.block)
            gateway = Gateway(RouteState(clock=lambda: self.now, rng=random.Random(args.seed)), policy)
            for target in policy.models["chat"].targets:
                blocks = ReplicaBlocks("sim", 30.0)
                gateway.states.tables[("kv-blocks", target.provider.name, target.provider.settings.base_url)] = blocks
                gateway.blocks.append(blocks)
            self.gateways.append(gateway)
        self.tenant_tokens = [[self.rng.randrange(1, 100_000) for _ in range(args.context)]
                              for _ in range(args.tenants)]
        weights = [1 / (i + 1) ** 0.8 for i in range(args.tenants)]
        self._tenants = self.rng.choices(range(args.tenants), weights, k=args.requests)
        self.issued = 0
        self.finished: list[Request] = []

    # -- event loop --

    def at(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (self.now + delay, next(self._seq), action))

    def run(self) -> dict[str, Any]:
        self.at(0.0, self._new_conversation)
        self.at(0.0, self._scrape)
        self.at(0.0, self._publish)
        while self._heap and len(self.finished) < self.args.requests:
            self.now, _, action = heapq.heappop(self._heap)
            action()
        return self._report()

    # -- workload --

    def _new_conversation(self) -> None:
        if self.issued >= self.args.requests:
            return
        tenant = self._tenants[self.issued % len(self._tenants)]
        system = {"role": "system", "content": f"tenant {tenant}: " + _FILLER[:4 * self.args.context]}
        conversation = Conversation(tenant, self.args.turns, [system], list(self.tenant_tokens[tenant]))
        self._turn(conversation)
        self.at(self.rng.expovariate(self.rate / self.args.turns), self._new_conversation)

    def _turn(self, conversation: Conversation) -> None:
        if self.issued >= self.args.requests:
            return
        self.issued += 1
        words = self.rng.randrange(100, 401)
        conversation.messages.append({"role": "user", "content": f"{self.issued}: " + _FILLER[:4 * words]})
        conversation.tokens.extend(self.rng.randrange(1, 100_000) for _ in range(words))
        conversation.turns_left -= 1
        tokens = list(conversation.tokens)
        request = Request(conversation, {"model": "chat", "messages": list(conversation.messages)}, tokens,
                          chain_keys(tokens, self.args.block), self.rng.randrange(100, 301), self.now)
        self._route(request)

    def reply_tokens(self, request: Request) -> list[int]:
        return [self.rng.randrange(1, 100_000) for _ in range(request.output)]

    def done(self, request: Request, reply: list[int]) -> None:
        self.finished.append(request)
        gateway = self.gateways[request.gateway]
        assert request.target is not None
        gateway.states.state(request.target).in_flight -= 1
        conversation = request.conversation
        conversation.messages.append({"role": "assistant", "content": _FILLER[:4 * len(reply)]})
        conversation.tokens.extend(reply)
        if conversation.turns_left > 0:
            self.at(self.rng.expovariate(1 / self.args.think_s), lambda: self._turn(conversation))

    # -- the gateway --

    def _route(self, request: Request) -> None:
        request.gateway = self.rng.randrange(len(self.gateways))
        gateway = self.gateways[request.gateway]
        model = gateway.policy.models["chat"]
        targets = list(model.targets)
        if self.strategy == "random":
            target = self.rng.choice(targets)
        else:
            routed = RouteRequest(request.body)
            # The precise index's request keys, as gateway/kv_events.request_block_keys would make them from a
            # tokenizer; the simulated tokens stand in for tiktoken here.
            routed.memo[("kv-blocks", self.args.block, "sim")] = request.keys
            target = model.plan.strategy.rank(targets, gateway.states, routed)[0]
            model.plan.strategy.on_attempt(target, gateway.states, routed)
        request.target = target
        state = gateway.states.state(target)
        state.in_flight += 1
        state.requests += 1
        self.replicas[targets.index(target)].arrive(request)

    def _scrape(self) -> None:
        for gateway in self.gateways:
            for target, replica in zip(gateway.policy.models["chat"].targets, self.replicas, strict=True):
                state = gateway.states.state(target)
                state.scraped_load = float(replica.running + len(replica.queue) + replica.busy)
                state.scraped_waiting = float(len(replica.queue))
                state.kv_cache_usage = len(replica.pins) / replica.capacity
                state.scraped_at, state.scrape_interval_s = self.now, self.args.scrape_s
        self.at(self.args.scrape_s, self._scrape)

    def _publish(self) -> None:
        # vLLM publishes a batch per engine step; batching per interval keeps the simulation cheap.
        for index, replica in enumerate(self.replicas):
            payload = replica.flush_events()
            if payload is not None and self.strategy == "precise":
                for gateway in self.gateways:
                    self.at(self.args.event_delay_s, lambda b=gateway.blocks[index], p=payload: b.apply(p, self.now))
        self.at(self.args.event_delay_s, self._publish)

    # -- results --

    def _report(self) -> dict[str, Any]:
        measured = self.finished[int(len(self.finished) * self.args.warmup):]
        ttfts = sorted(r.ttft for r in measured)
        prompt = sum(len(r.tokens) for r in measured)
        span = max(self.now - min(r.arrived for r in measured), 1e-9)
        return {
            "strategy": self.strategy, "gateways": len(self.gateways), "rate": self.rate,
            "hit_rate": sum(r.cached for r in measured) / prompt,
            "ttft_p50_s": ttfts[len(ttfts) // 2], "ttft_p90_s": ttfts[int(len(ttfts) * 0.9)],
            "throughput_rps": len(measured) / span,
            "per_replica": [sum(1 for r in self.finished if r.target is t)
                            for t in self.gateways[0].policy.models["chat"].targets]
            if len(self.gateways) == 1 else None,
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--tenants", type=int, default=150)
    parser.add_argument("--context", type=int, default=6000, help="tokens of each tenant's shared system prompt")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--think-s", type=float, default=10.0)
    parser.add_argument("--rates", type=float, nargs="+", default=[3.0, 20.0, 60.0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--warmup", type=float, default=0.2)
    parser.add_argument("--kv-tokens", type=int, default=400_000)
    parser.add_argument("--block", type=int, default=256, help="cache block size in tokens (vLLM's is 16)")
    parser.add_argument("--prefill-tps", type=float, default=20_000)
    parser.add_argument("--tpot-ms", type=float, default=20.0)
    parser.add_argument("--scrape-s", type=float, default=2.0)
    parser.add_argument("--event-delay-s", type=float, default=0.05)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--gateways", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2000 requests at 60 req/s only")
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.rates = 2000, [60.0]
    rows = []
    started = time.perf_counter()
    for rate in args.rates:
        for strategy in args.strategies:
            for gateways in args.gateways:
                row = Simulation(strategy, gateways, rate, args).run()
                rows.append(row)
                sys.stderr.write(f"{row}\n")
    lines = [
        f"KV-routing simulation: {args.replicas} replicas x {args.kv_tokens} KV tokens (blocks of {args.block}), "
        f"{args.tenants} tenants x {args.context}-token contexts, {args.turns} turns, {args.requests} requests per "
        f"run ({args.warmup:.0%} warm-up not counted), prefill {args.prefill_tps:g} tok/s, {args.tpot_ms:g} ms/token "
        f"decode; {time.perf_counter() - started:.0f} s wall clock",
        "",
        "| req/s offered | strategy | gateways | cache hit rate | TTFT p50 | TTFT p90 | req/s completed |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['rate']:g} | {r['strategy']} | {r['gateways']} | {r['hit_rate']:.1%} | {r['ttft_p50_s'] * 1000:.0f} ms "
        f"| {r['ttft_p90_s'] * 1000:.0f} ms | {r['throughput_rps']:.1f} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d_%H%M%S")
    (args.out / f"kv_routing_sim_{stamp}.md").write_text(text)
    (args.out / f"kv_routing_sim_{stamp}.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
