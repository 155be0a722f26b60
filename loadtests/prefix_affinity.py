"""Prefix-affinity benchmark: KV prefix-cache hit rate and latency, `weighted` vs `prefix-affinity`, one run.

    .venv/bin/python loadtests/prefix_affinity.py             # ~1 minute
    .venv/bin/python loadtests/prefix_affinity.py --quick

Many concurrent multi-turn conversations (each turn resends the whole conversation, as chat clients do) go
through a real gateway process to fake vLLM replicas (tests/fakes/vllm_replica.py) that simulate a prefix
cache: a request extending a conversation prefix the replica served before answers after `--hit-ms`, any
other after `--miss-ms` (the prefill it has to redo). Fresh replicas per strategy, so both start cold.
The gateway runs pinned to core 0; replicas and the load generator share the rest of the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import Child, free_port, install_cleanup  # noqa: E402

from tests.fakes.routing_policy import key_hash  # noqa: E402
from tests.fakes.vllm_replica import FakeVLLMReplica  # noqa: E402

KEY = "sk-bench-prefix"


def _policy(replicas: list[FakeVLLMReplica], strategy: str, spill_margin: int) -> str:
    providers = "".join(f"  r{i}:\n    kind: vllm\n    base_url: {r.base_url}\n" for i, r in enumerate(replicas))
    targets = "".join(f"      - {{provider: r{i}, model: llama}}\n" for i in range(len(replicas)))
    return f"""
version: 1
server: {{reload: {{watch: false}}}}
providers:
{providers}models:
  chat:
    routing: {{strategy: {strategy}, prefix_affinity: {{spill_margin: {spill_margin}}}}}
    targets:
{targets}teams:
  bench:
    keys: [{{id: bench, hash: "{key_hash(KEY)}"}}]
    models: ["*"]
"""


async def _conversation(
    session: aiohttp.ClientSession,  # noqa: TID251
    url: str,
    number: int,
    turns: int,
    latencies: list[tuple[int, float]],
    gate: asyncio.Semaphore,
) -> None:
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are a concise assistant. " * 20}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"conversation {number}, question {turn}: " + "text " * 30})
        async with gate:
            started = time.perf_counter()
            async with session.post(url, json={"model": "chat", "messages": messages}) as response:
                payload = await response.json()
            latencies.append((turn, time.perf_counter() - started))
        if response.status != 200:
            raise RuntimeError(f"gateway answered {response.status}: {payload}")
        messages.append({"role": "assistant", "content": payload["choices"][0]["message"]["content"]})


async def _drive(base_url: str, args: argparse.Namespace) -> tuple[list[tuple[int, float]], float]:
    latencies: list[tuple[int, float]] = []
    gate = asyncio.Semaphore(args.concurrency)
    headers = {"authorization": f"Bearer {KEY}"}
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:  # noqa: TID251 - load client
        started = time.perf_counter()
        await asyncio.gather(
            *(
                _conversation(session, base_url + "/v1/chat/completions", n, args.turns, latencies, gate)
                for n in range(args.conversations)
            )
        )
        return latencies, time.perf_counter() - started


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_strategy(strategy: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    replicas = [
        FakeVLLMReplica(f"r{i}", hit_ms=args.hit_ms, miss_ms=args.miss_ms).start() for i in range(args.replicas)
    ]
    try:
        policy = tmp / f"{strategy}.yaml"
        policy.write_text(_policy(replicas, strategy, args.spill_margin))
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--policy",
            str(policy),
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        gateway = Child(f"gateway-{strategy}", argv, tmp, 0, REPO)
        try:
            base_url = f"http://127.0.0.1:{port}"
            gateway.wait_http_ok(base_url + "/readyz")
            latencies, elapsed = asyncio.run(_drive(base_url, args))
        finally:
            gateway.stop()
        later = [seconds * 1000 for turn, seconds in latencies if turn > 0]
        return {
            "strategy": strategy,
            "hit_rate": sum(r.hits for r in replicas) / max(1, sum(r.queries for r in replicas)),
            "requests_per_replica": [r.requests for r in replicas],
            "later_turns_p50_ms": _percentile(later, 0.5),
            "later_turns_p95_ms": _percentile(later, 0.95),
            "all_turns_mean_ms": sum(s for _, s in latencies) * 1000 / len(latencies),
            "requests_per_s": len(latencies) / elapsed,
        }
    finally:
        for replica in replicas:
            replica.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--conversations", type=int, default=96)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--hit-ms", type=float, default=5.0)
    parser.add_argument("--miss-ms", type=float, default=60.0)
    parser.add_argument("--spill-margin", type=int, default=8, help="routing.prefix_affinity.spill_margin")
    parser.add_argument("--quick", action="store_true", help="24 conversations x 4 turns")
    parser.add_argument("--out", type=Path, default=REPO / "loadtests" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.conversations, args.turns = 24, 4
    install_cleanup()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_strategy(strategy, args, Path(tmp)) for strategy in ("weighted", "prefix-affinity")]
    lines = [
        f"prefix-affinity benchmark: {args.replicas} replicas, {args.conversations} conversations x {args.turns} "
        f"turns, concurrency {args.concurrency}, cache hit {args.hit_ms:g} ms / miss {args.miss_ms:g} ms, "
        f"spill margin {args.spill_margin}",
        "",
        "| strategy | cache hit rate | later turns p50 | later turns p95 | mean (all turns) | req/s | per replica |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['strategy']} | {r['hit_rate']:.1%} | {r['later_turns_p50_ms']:.1f} ms | "
        f"{r['later_turns_p95_ms']:.1f} ms | {r['all_turns_mean_ms']:.1f} ms | {r['requests_per_s']:.0f} | "
        f"{r['requests_per_replica']} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d_%H%M%S")
    (args.out / f"prefix_affinity_{stamp}.md").write_text(text)
    (args.out / f"prefix_affinity_{stamp}.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
