"""Response cache benchmark: a hit vs a proxied miss, CPU per request and latency, in one run.

    .venv/bin/python loadtests/cache_bench.py            # ~30 s
    .venv/bin/python loadtests/cache_bench.py --quick    # ~10 s

The gateway runs alone on core 0 (one worker, access log on as in production);
the fake upstream and this load generator share core 1. Phases, each against
the same gateway process:

- proxied: a model without a cache (today's pass-through);
- miss:    a cached model, every request different (pass-through + key + store);
- hit:     a cached model, the same request again (answered from memory);
- hit-stream: the same, streamed (the entry replayed as SSE).

CPU is the gateway process's utime+stime over a closed-loop run divided by the
requests served; latency is client-side, one request at a time (p50/p99), plus
the gateway's own `x-switchboard-overhead-ms`. Target (issue 7): a hit costs at
most 40% of the CPU of a proxied miss, and is answered in under 1 ms p50.
"""

# ruff: noqa: TID251 - a load generator, not gateway code: the single-upstream-client rule does not apply.
from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
from procs import Child, cpu_seconds, free_port, install_cleanup

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
KEY = "sk-cache-bench"
SUT_CORE, HARNESS_CORE = 0, 1


def policy(upstream_port: int) -> str:
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    return f"""
version: 1
providers:
  fake:
    kind: openai_compatible
    base_url: http://127.0.0.1:{upstream_port}/v1
models:
  plain:
    targets: [{{provider: fake, model: gpt-4o-mini}}]
  cached:
    targets: [{{provider: fake, model: gpt-4o-mini}}]
    cache: {{mode: exact, ttl_s: 3600}}
teams:
  bench:
    keys: [{{id: bench, hash: "sha256:{digest}"}}]
    models: ["*"]
"""


def body(model: str, question: str, stream: bool = False) -> bytes:
    payload = {"model": model, "max_tokens": 64, "temperature": 0, "stream": stream,
               "messages": [{"role": "system", "content": "You are a helpful assistant."},
                            {"role": "user", "content": question}]}
    return orjson.dumps(payload)


async def closed_loop(session: aiohttp.ClientSession, url: str, bodies: list[bytes], concurrency: int) -> float:
    """Send every body with `concurrency` in flight; returns the wall time."""
    queue = iter(bodies)
    started = time.perf_counter()

    async def worker() -> None:
        for payload in queue:
            async with session.post(url, data=payload) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def sequential(session: aiohttp.ClientSession, url: str, bodies: list[bytes]) -> tuple[list[float], list[float],
                                                                                             set[str]]:
    """Latency of one request at a time (ms), the gateway's overhead header (ms), the cache header values."""
    latencies, overheads, verdicts = [], [], set()
    for payload in bodies:
        started = time.perf_counter()
        async with session.post(url, data=payload) as resp:
            await resp.read()
            latencies.append((time.perf_counter() - started) * 1000)
            overheads.append(float(resp.headers.get("x-switchboard-overhead-ms", "nan")))
            verdicts.add(resp.headers.get("x-switchboard-cache", "-"))
    return latencies, overheads, verdicts


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(args: argparse.Namespace, gateway_pid: int, base: str) -> list[dict[str, object]]:
    url = base + "/v1/chat/completions"
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=args.concurrency + 2)
    rows = []
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
        warm = [body("cached", "the cached question"), body("cached", "the cached question", stream=True)]
        await closed_loop(session, url, warm + [body("plain", f"warm {i}") for i in range(200)], 4)
        phases = {
            "proxied": lambda i: body("plain", f"question number {i}"),
            "miss": lambda i: body("cached", f"question number {i} {args.run}"),
            "hit": lambda i: body("cached", "the cached question"),
            "hit-stream": lambda i: body("cached", "the cached question", stream=True),
        }
        for name, make in phases.items():
            bodies = [make(i) for i in range(args.requests)]
            cpu_before = cpu_seconds(gateway_pid)
            wall = await closed_loop(session, url, bodies, args.concurrency)
            cpu = cpu_seconds(gateway_pid) - cpu_before
            probe = [make(args.requests + i) if name in ("proxied", "miss") else make(i) for i in range(args.probes)]
            latencies, overheads, verdicts = await sequential(session, url, probe)
            rows.append({"phase": name, "cpu_us_per_req": cpu / len(bodies) * 1e6, "rps": len(bodies) / wall,
                         "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99),
                         "overhead_p50_ms": statistics.median(overheads), "cache": ",".join(sorted(verdicts))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--requests", type=int, default=4000, help="requests per phase for CPU and throughput")
    parser.add_argument("--probes", type=int, default=1000, help="sequential requests per phase for latency")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.probes = 1000, 300
    args.run = time.time_ns()
    install_cleanup()
    logs = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    upstream_port, gateway_port = free_port(), free_port()
    upstream = Child("upstream", [PY, "-m", "tests.fakes.openai_upstream", "--port", str(upstream_port)], logs,
                     HARNESS_CORE, REPO)
    upstream.wait_http_ok(f"http://127.0.0.1:{upstream_port}/health")
    policy_path = logs / "policy.yaml"
    policy_path.write_text(policy(upstream_port))
    gateway = Child("gateway", [PY, "-m", "gateway", "serve", "--policy", str(policy_path), "--host", "127.0.0.1",
                                "--port", str(gateway_port), "--log-level", "warning"], logs, SUT_CORE, REPO)
    base = f"http://127.0.0.1:{gateway_port}"
    gateway.wait_http_ok(base + "/readyz")
    try:
        rows = asyncio.run(run(args, gateway.pid, base))
    finally:
        gateway.stop()
        upstream.stop()
    lines = [f"{'phase':<11} {'CPU µs/req':>10} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'overhead p50':>12}  cache"]
    for row in rows:
        lines.append(f"{row['phase']:<11} {row['cpu_us_per_req']:>10.0f} {row['rps']:>8.0f} {row['p50_ms']:>7.3f} "
                     f"{row['p99_ms']:>7.3f} {row['overhead_p50_ms']:>12.3f}  {row['cache']}")
    by = {row["phase"]: row for row in rows}
    ratio = by["hit"]["cpu_us_per_req"] / by["proxied"]["cpu_us_per_req"]  # type: ignore[operator]
    lines.append(f"\nhit CPU / proxied miss CPU = {ratio:.0%} (target <= 40%); hit p50 = {by['hit']['p50_ms']:.3f} ms "
                 "(target < 1 ms)")
    lines.append(f"logs: {logs}")
    sys.stdout.write("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
