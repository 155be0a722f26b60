"""Cost of rate limits and budgets: in-process CPU per admission, and added latency at 200 req/s.

    .venv/bin/python loadtests/limits_bench.py            # micro + end-to-end, ~1.5 minutes
    .venv/bin/python loadtests/limits_bench.py --micro    # in-process only, ~10 s

Micro: the Limiter's admit + settle for one request with team, key and model limits and a budget
(7 counters), on each store; CPU µs per request (process time, so it includes redis-py's client work)
and admission wall-time percentiles (one Redis round trip on loopback).

End-to-end (one run, same upstream): the gateway with limits off, on with the embedded durable store, and
on with Redis, at an open-loop 200 req/s against a 50 ms upstream; gateway CPU µs per request and latency
p50/p99, with the difference to "off". Uses the shared Redis at 127.0.0.1:6379 (DB 12, own key prefix).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import uvloop

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
SHARED_TIKTOKEN = HERE.parents[1] / "shared" / "tiktoken"
if SHARED_TIKTOKEN.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))

import bench  # noqa: E402
from procs import Child, free_port, install_cleanup  # noqa: E402

from gateway.limits import Limiter  # noqa: E402
from gateway.policy import parse_policy  # noqa: E402
from gateway.state.durable import DurableStore  # noqa: E402
from gateway.state.memory import MemoryStore  # noqa: E402
from gateway.state.redis import RedisStore  # noqa: E402
from gateway.tokens import TokenCounter  # noqa: E402
from providers.base import Endpoint, Usage  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/12"
LIMITS = """    limits: {rpm: 10000000, tpm: 1000000000}
    model_limits:
      bench-model: {rpm: 10000000, tpm: 1000000000}
    budget: {tokens: 100000000000, period: monthly, soft_thresholds: [0.99]}
"""


def policy_yaml(upstream: str, state: str) -> str:
    anchor = '    models: ["bench-model"]\n'
    text = bench.policy_yaml(upstream).replace(anchor, anchor + LIMITS)
    text = text.replace("        hash: ", "        limits: {rpm: 10000000}\n        hash: ", 1)
    return text + state


async def micro_one(store: Any, iterations: int) -> dict[str, float]:
    await store.start()
    policy = parse_policy(policy_yaml("http://127.0.0.1:9/v1", ""))
    limiter = Limiter(store, TokenCounter())
    caller = next(iter(policy.keys.values()))
    model = policy.models["bench-model"]
    body = {
        "model": "bench-model",
        "messages": [{"role": "user", "content": "Say hello in five words."}],
        "max_tokens": 32,
    }
    usage = Usage(prompt_tokens=14, completion_tokens=9)
    waits = []
    for _ in range(200):  # warm up: encodings, script load, connections
        limiter.settle(await limiter.admit(policy, caller, Endpoint.CHAT, body, model, {}), usage, 200)
    await limiter.flush()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(iterations):
        started = time.perf_counter()
        admission = await limiter.admit(policy, caller, Endpoint.CHAT, body, model, {})
        waits.append(time.perf_counter() - started)
        limiter.settle(admission, usage, 200)
    await limiter.flush()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await limiter.close()
    waits.sort()
    return {
        "cpu_us": 1e6 * cpu / iterations,
        "admit_p50_us": 1e6 * waits[len(waits) // 2],
        "admit_p99_us": 1e6 * waits[int(len(waits) * 0.99)],
        "wall_us": 1e6 * wall / iterations,
    }


def micro(iterations: int) -> dict[str, dict[str, float]]:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {
            "memory": lambda: MemoryStore(),
            "durable": lambda: DurableStore(Path(tmp) / "bench.sqlite"),
            "redis": lambda: RedisStore(REDIS_URL, key_prefix=f"bench:{uuid.uuid4().hex[:8]}:"),
        }
        for name, make in stores.items():
            results[name] = uvloop.run(micro_one(make(), iterations))  # the loop the gateway serves on
            print(  # noqa: T201
                f"micro {name:8} {results[name]['cpu_us']:7.1f} µs CPU per admit+settle   "
                f"admit p50 {results[name]['admit_p50_us']:6.1f} µs  p99 {results[name]['admit_p99_us']:6.1f} µs"
            )
    return results


def e2e(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    configs = {
        "limits off": None,
        "durable": "state: {backend: durable}\n",
        "redis": f"state: {{url: '{REDIS_URL}', key_prefix: 'bench:{uuid.uuid4().hex[:8]}:'}}\n",
    }
    mode = bench.Mode(f"open {args.rate:g}/s chat", "open", False)
    with tempfile.TemporaryDirectory(prefix="switchboard-limits-bench-") as tmp_name:
        tmp = Path(tmp_name)
        upstream = bench.start_upstream("upstream", args.open_latency_ms, args, tmp)
        try:
            for name, state in configs.items():
                port = free_port()
                policy = tmp / f"policy-{port}.yaml"
                text = bench.policy_yaml(upstream.base_url) if state is None else policy_yaml(upstream.base_url, state)
                policy.write_text(text)
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
                ]
                child = Child(f"gateway-{port}", argv, tmp, bench.SUT_CORE, bench.REPO)
                try:
                    child.wait_http_ok(f"http://127.0.0.1:{port}/readyz", timeout=60)
                    target = bench.Target(
                        f"http://127.0.0.1:{port}/v1/chat/completions", bench.BENCH_KEY, "bench-model", child
                    )
                    cells = [bench.run_cell(target, upstream, mode, args) for _ in range(args.repeat)]
                finally:
                    child.stop()
                row = {
                    "config": name,
                    "errors": sum(c["errors"] for c in cells),
                    **{k: statistics.median(c[k] for c in cells) for k in ("rps", "p50_ms", "p99_ms", "sut_cpu_us")},
                }
                rows.append(row)
                print(  # noqa: T201
                    f"e2e {name:11} {row['rps']:6.0f} req/s  p50 {row['p50_ms']:6.2f} ms  "
                    f"p99 {row['p99_ms']:6.2f} ms  gateway CPU {row['sut_cpu_us']:6.0f} µs/req  "
                    f"errors {row['errors']}"
                )
        finally:
            upstream.child.stop()
    base = rows[0]
    for row in rows[1:]:
        print(  # noqa: T201
            f"    {row['config']:11} adds {row['sut_cpu_us'] - base['sut_cpu_us']:+6.0f} µs CPU/req, "
            f"p50 {row['p50_ms'] - base['p50_ms']:+.2f} ms, p99 {row['p99_ms'] - base['p99_ms']:+.2f} ms"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro", action="store_true", help="in-process figures only")
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--open-latency-ms", type=float, default=50.0)
    parser.add_argument("--stream-chunks", type=int, default=20)
    parser.add_argument("--upstream-module", default="tests.fakes.openai_upstream")
    args = parser.parse_args()
    micro(args.iterations)
    if not args.micro:
        install_cleanup()
        e2e(args)


if __name__ == "__main__":
    main()
