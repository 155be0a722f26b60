"""Cost of rate limits and budgets, and replicas sharing Redis, in one run.

    .venv/bin/python loadtests/limits_bench.py                 # everything, ~6 minutes
    .venv/bin/python loadtests/limits_bench.py --quick         # smoke run, ~2 minutes
    .venv/bin/python loadtests/limits_bench.py --only micro    # or: e2e, replicas (any subset)

micro: the Limiter's admit + settle in-process for one request with team, key and model limits and a
budget (7 counters), on each store: CPU µs per request and admission wall-time percentiles.

e2e: `python -m gateway serve` pinned to core 0 (loadtests/bench.py's layout: fake upstreams and load
generator on core 1) with limits off, on with the memory store, the embedded durable store, and Redis.
Per config: a closed loop (c=32, 0 ms upstream) gives gateway CPU µs per request; an open loop at 200 req/s
(50 ms upstream) gives latency p50/p99; both are reported as the difference to "off". Configs are
interleaved per round so drift hits each alike; the load average is recorded per cell.

replicas: 1, 2, 3 gateways sharing Redis (unpinned: on a 2-core box they share the cores with the harness),
a round-robin closed loop across their ports: aggregate req/s and gateway CPU µs per request, then whether
the limits held: the shared request counter equals the 200s the clients got, a team capped at N requests
per day gets exactly N through all replicas at once, and a token budget hammered through all replicas is
never passed and equals the usage the responses reported.

Uses the shared Redis at 127.0.0.1:6379 (DB 12) with a fresh key prefix per configuration.
"""

# ruff: noqa: T201, TID251 - a benchmark script: prints its report, and its load generator is its own client.
from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import uvloop

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
SHARED_TIKTOKEN = HERE.parents[1] / "shared" / "tiktoken"
if SHARED_TIKTOKEN.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))

import bench  # noqa: E402
import loadgen  # noqa: E402
import report  # noqa: E402
from procs import Child, cpu_seconds, free_port, install_cleanup, machine_busy_seconds, stop, track  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/12"
ADMIN_KEY = "sk-bench-admin"
CAPPED_REQUESTS = 400  # capped-requests team: requests per day
CAPPED_TOKENS = 5000  # capped-tokens team: token budget per day
BENCH_LIMITS = """    limits: {rpm: 10000000, tpm: 1000000000, rpd: 1000000000}
    model_limits:
      bench-model: {rpm: 10000000, tpm: 1000000000}
      bench-model-slow: {rpm: 10000000, tpm: 1000000000}
    budget: {tokens: 100000000000, period: monthly, soft_thresholds: [0.99]}
"""


def _hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def policy_yaml(fast: str, slow: str, state: str | None) -> str:
    """Two models (0 ms and 50 ms upstreams); with `state`, limits on every scope plus two capped teams."""
    text = f"""version: 1
admin:
  keys: [{{id: ops, hash: "{_hash(ADMIN_KEY)}"}}]
providers:
  fast: {{kind: openai_compatible, base_url: "{fast}", api_key: sk-upstream-secret}}
  slow: {{kind: openai_compatible, base_url: "{slow}", api_key: sk-upstream-secret}}
models:
  bench-model: {{targets: [{{provider: fast, model: fake-model}}]}}
  bench-model-slow: {{targets: [{{provider: slow, model: fake-model}}]}}
teams:
  bench:
    models: ["*"]
    keys:
      - id: bench
        hash: "{_hash(bench.BENCH_KEY)}"
"""
    if state is None:
        return text
    text = text.replace('        hash: "', "        limits: {rpm: 10000000}\n        hash: \"", 1)
    text += BENCH_LIMITS
    for team, limits in (("capped-requests", f"limits: {{rpd: {CAPPED_REQUESTS}}}"),
                         ("capped-tokens", f"budget: {{tokens: {CAPPED_TOKENS}, period: daily}}")):
        text += f"""  {team}:
    models: ["*"]
    {limits}
    keys: [{{id: {team}, hash: "{_hash('sk-' + team)}"}}]
"""
    return text + state


# --- micro: in-process admit + settle ----------------------------------------------------------


async def micro_one(store: Any, iterations: int) -> dict[str, float]:
    from gateway.accounting.limits import Limiter
    from gateway.compiled.policy import parse_policy
    from gateway.tokens.counter import TokenCounter
    from providers.base import Endpoint, Usage

    await store.start()
    policy = parse_policy(policy_yaml("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1", ""))
    limiter = Limiter(store, TokenCounter())
    caller = next(k for k in policy.keys.values() if k.key_id == "bench")
    model = policy.models["bench-model"]
    body = {"model": "bench-model", "messages": [{"role": "user", "content": "Say hello in five words."}],
            "max_tokens": 32}
    usage = Usage(prompt_tokens=14, completion_tokens=9)
    for _ in range(200):  # warm up: encodings, script load, connections
        limiter.settle(await limiter.admit(policy, caller, Endpoint.CHAT, body, model, {}), usage, 200)
    await limiter.flush()
    waits = []
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
    return {"cpu_us": 1e6 * cpu / iterations, "admit_p50_us": 1e6 * waits[len(waits) // 2],
            "admit_p99_us": 1e6 * waits[int(len(waits) * 0.99)], "wall_us": 1e6 * wall / iterations}


def micro(iterations: int) -> dict[str, dict[str, float]]:
    from gateway.state.durable import DurableStore
    from gateway.state.memory import MemoryStore
    from gateway.state.redis import RedisStore

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {
            "memory": lambda: MemoryStore(),
            "durable": lambda: DurableStore(Path(tmp) / "bench.sqlite"),
            "redis": lambda: RedisStore(REDIS_URL, key_prefix=f"bench:{uuid.uuid4().hex[:8]}:"),
        }
        for name, make in stores.items():
            results[name] = uvloop.run(micro_one(make(), iterations))  # the loop the gateway serves on
            row = results[name]
            print(f"micro {name:8} {row['cpu_us']:6.1f} µs CPU per admit+settle   admit p50 "
                  f"{row['admit_p50_us']:6.1f} µs  p99 {row['admit_p99_us']:6.1f} µs", flush=True)
    return results


# --- e2e: one gateway, limits off / memory / durable / redis ------------------------------------


def quiet(args: argparse.Namespace) -> None:
    if args.quiet_wait > 0:
        bench.wait_for_quiet(args.quiet_wait)


def start_gateway(policy_text: str, tmp: Path, core: int | None) -> tuple[Child, int]:
    port = free_port()
    policy = tmp / f"policy-{port}.yaml"
    policy.write_text(policy_text)
    argv = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--host", "127.0.0.1",
            "--port", str(port), "--no-access-log"]
    child = Child(f"gateway-{port}", argv, tmp, core, bench.REPO)
    child.wait_http_ok(f"http://127.0.0.1:{port}/readyz", timeout=60)
    return child, port


def e2e_configs() -> dict[str, str | None]:
    return {
        "off": None,
        "memory": "state: {backend: memory}\n",
        "durable": "state: {backend: durable}\n",
        "redis": f"state: {{url: '{REDIS_URL}', key_prefix: 'bench:{uuid.uuid4().hex[:8]}:'}}\n",
    }


def e2e(args: argparse.Namespace, tmp: Path, fast: bench.Upstream, slow: bench.Upstream) -> list[dict[str, Any]]:
    closed = bench.Mode(f"closed c={args.concurrency}", "closed", False)
    opened = bench.Mode(f"open {args.rate:g}/s", "open", False)
    cells: dict[str, list[dict[str, Any]]] = {}
    for round_no in range(args.repeat):
        for name, state in e2e_configs().items():  # a fresh Redis prefix per round: nothing carried over
            child, port = start_gateway(policy_yaml(fast.base_url, slow.base_url, state), tmp, bench.SUT_CORE)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            try:
                quiet(args)
                load = os.getloadavg()[0]
                cpu_cell = bench.run_cell(bench.Target(url, bench.BENCH_KEY, "bench-model", child), fast, closed, args)
                quiet(args)
                lat_cell = bench.run_cell(bench.Target(url, bench.BENCH_KEY, "bench-model-slow", child), slow, opened,
                                          args)
            finally:
                child.stop()
            cell = {"config": name, "round": round_no, "load1": load, "closed_rps": cpu_cell["rps"],
                    "cpu_us": cpu_cell["sut_cpu_us"], "closed_foreign": cpu_cell["foreign_busy"],
                    "p50_ms": lat_cell["p50_ms"], "p99_ms": lat_cell["p99_ms"], "open_rps": lat_cell["rps"],
                    "open_foreign": lat_cell["foreign_busy"],
                    "errors": cpu_cell["errors"] + lat_cell["errors"]}
            cells.setdefault(name, []).append(cell)
            print(f"e2e round {round_no} {name:8} closed {cell['closed_rps']:6.0f} req/s  CPU {cell['cpu_us']:5.0f} "
                  f"µs/req | open {cell['open_rps']:5.0f} req/s p50 {cell['p50_ms']:6.2f} ms p99 "
                  f"{cell['p99_ms']:6.2f} ms | errors {cell['errors']}  load1 {load:.2f}  other load "
                  f"{cell['closed_foreign']:.2f}/{cell['open_foreign']:.2f} cores", flush=True)
    rows = []
    for name, group in cells.items():
        row: dict[str, Any] = {"config": name, "cells": group, "errors": sum(c["errors"] for c in group)}
        for field in ("cpu_us", "closed_rps", "p50_ms", "p99_ms", "open_rps", "load1"):
            values = [c[field] for c in group]
            row[field] = statistics.median(values)
            row[field + "_range"] = (min(values), max(values))
        # The round least disturbed by other load on the box: the cleanest single comparison.
        row["quietest"] = min(group, key=lambda c: max(c["closed_foreign"], c["open_foreign"]))
        rows.append(row)
    return rows


# --- replicas: N gateways sharing Redis, a round-robin load generator ---------------------------


async def round_robin(urls: list[str], key: str, concurrency: int, duration: float, warmup: float,
                      model: str, parse_usage: bool) -> dict[str, Any]:
    """Closed loop over `urls` in turn; requests in flight at the end are finished, so every 200 is counted."""
    import aiohttp

    body = loadgen.build_body(model, False)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    turn = itertools.count()
    window = loadgen.Window()
    latencies: list[float] = []
    totals = {"ok": 0, "refused": 0, "other": 0, "tokens": 0}

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < window.end:
            url = urls[next(turn) % len(urls)]
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    raw = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError):
                status, raw = 0, b""
            ended = time.perf_counter()
            if status == 200:
                totals["ok"] += 1
                if parse_usage:
                    totals["tokens"] += orjson.loads(raw)["usage"]["total_tokens"]
                if window.contains(ended):
                    latencies.append(ended - started)
            elif status == 429:
                totals["refused"] += 1
            else:
                totals["other"] += 1

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        await loadgen.run_window(argparse.Namespace(warmup=warmup, duration=duration), window)
        await asyncio.gather(*tasks)
    return {**totals, "completed": len(latencies), "rps": len(latencies) / duration,
            "p50_ms": loadgen.percentile(latencies, 50), "p99_ms": loadgen.percentile(latencies, 99)}


def run_round_robin(urls: list[str], key: str, args: argparse.Namespace, duration: float, warmup: float,
                    pids: list[int], parse_usage: bool = False) -> dict[str, Any]:
    """The round-robin load generator in its own process on the harness core; CPU sampled at its MARKs."""
    argv = ["taskset", "-c", str(bench.HARNESS_CORE), sys.executable, str(Path(__file__)), "--round-robin",
            orjson.dumps({"urls": urls, "key": key, "concurrency": args.concurrency, "duration": duration,
                          "warmup": warmup, "model": "bench-model", "parse_usage": parse_usage}).decode()]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=bench.REPO, start_new_session=True)
    track(proc)
    marks: dict[str, tuple[float, float]] = {}
    result: dict[str, Any] = {}
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode().strip()
        if line.startswith("MARK "):
            marks[line[5:]] = (sum(cpu_seconds(pid) for pid in pids), machine_busy_seconds())
        elif line.startswith("{"):
            result = orjson.loads(line)
    proc.wait(timeout=60)
    stop(proc)
    if not result or "end" not in marks:
        raise RuntimeError("round-robin load generator failed")
    gateway_cpu = marks["end"][0] - marks["start"][0]
    result["cpu_us"] = 1e6 * gateway_cpu / result["completed"] if result["completed"] else None
    result["gateway_cores"] = gateway_cpu / duration
    result["machine_cores"] = (marks["end"][1] - marks["start"][1]) / duration
    return result


def usage_rows(port: int, team: str) -> dict[tuple[str, str], float]:
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/admin/usage?team={team}",
                                     headers={"authorization": f"Bearer {ADMIN_KEY}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        report_body = orjson.loads(response.read())
    return {(row["scope"], row["limit_type"]): row["used"] for row in report_body["usage"]}


def settled_usage(port: int, team: str, row: tuple[str, str]) -> float:
    """The counter once every replica's settlements have reached Redis (sent within 20 ms; wait until stable)."""
    last, stable_since = None, time.monotonic()
    while time.monotonic() - stable_since < 0.3:
        value = usage_rows(port, team)[row]
        if value != last:
            last, stable_since = value, time.monotonic()
        time.sleep(0.05)
    assert last is not None
    return last


def replicas(args: argparse.Namespace, tmp: Path, fast: bench.Upstream, slow: bench.Upstream) -> list[dict[str, Any]]:
    rows = []
    for count in args.replicas:
        state = f"state: {{url: '{REDIS_URL}', key_prefix: 'bench:{uuid.uuid4().hex[:8]}:'}}\n"
        text = policy_yaml(fast.base_url, slow.base_url, state)
        started = [start_gateway(text, tmp, None) for _ in range(count)]
        ports = [port for _, port in started]
        urls = [f"http://127.0.0.1:{port}/v1/chat/completions" for port in ports]
        pids = [child.pid for child, _ in started]
        try:
            quiet(args)
            load = os.getloadavg()[0]
            run = run_round_robin(urls, bench.BENCH_KEY, args, args.duration, args.warmup, pids)
            counted = settled_usage(ports[0], "bench", ("team", "requests per day"))
            capped = run_round_robin(urls, "sk-capped-requests", args, args.hammer_s, 0.0, pids)
            capped_counted = settled_usage(ports[-1], "capped-requests", ("team", "requests per day"))
            budget = run_round_robin(urls, "sk-capped-tokens", args, args.hammer_s, 0.0, pids, parse_usage=True)
            spent = settled_usage(ports[-1], "capped-tokens", ("team", "daily budget"))
        finally:
            for child, _ in started:
                child.stop()
        held = {
            "requests_counted_equal_200s": counted == run["ok"],
            "cap_exact": capped["ok"] == CAPPED_REQUESTS == capped_counted,
            "budget_not_passed": spent <= CAPPED_TOKENS,
            "budget_equals_reported_usage": spent == budget["tokens"],
        }
        row = {"replicas": count, "load1": load, **{k: run[k] for k in ("rps", "p50_ms", "p99_ms", "cpu_us",
                                                                         "gateway_cores", "machine_cores")},
               "ok": run["ok"], "counted": counted, "errors": run["other"] + run["refused"],
               "capped_ok": capped["ok"], "capped_refused": capped["refused"], "capped_counted": capped_counted,
               "budget_ok": budget["ok"], "budget_spent": spent, "budget_reported": budget["tokens"],
               "held": held}
        rows.append(row)
        print(f"replicas {count}: {row['rps']:6.0f} req/s  gateway CPU {row['cpu_us']:5.0f} µs/req on "
              f"{row['gateway_cores']:.2f} cores (machine {row['machine_cores']:.2f})  p50 {row['p50_ms']:.2f} ms | "
              f"200s {run['ok']} counted {counted:.0f} | cap {CAPPED_REQUESTS}: {capped['ok']} ok, "
              f"{capped['refused']} refused, counted {capped_counted:.0f} | budget {CAPPED_TOKENS}: spent "
              f"{spent:.0f}, responses reported {budget['tokens']} | held: {all(held.values())}  load1 {load:.2f}",
              flush=True)
    return rows


# --- report ---------------------------------------------------------------------------------------


def markdown(facts: dict[str, Any], micro_rows: dict[str, dict[str, float]], e2e_rows: list[dict[str, Any]],
             replica_rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"Run {facts['date']}, {facts['nproc']} cores ({facts['cpu']}), load average at start "
             f"{' / '.join(f'{v:.2f}' for v in facts['loadavg_at_start'])}.", ""]
    if micro_rows:
        lines += ["In-process admit + settle (7 counters: team rpm/tpm, key rpm, team x model rpm/tpm, budget):", "",
                  "| store | CPU µs/request | admission p50 | admission p99 |", "|---|---|---|---|"]
        lines += [f"| {name} | {row['cpu_us']:.1f} | {row['admit_p50_us']:.1f} µs | {row['admit_p99_us']:.1f} µs |"
                  for name, row in micro_rows.items()]
        lines.append("")
    if e2e_rows:
        base = e2e_rows[0]
        lines += [f"Through the gateway (`python -m gateway serve` on core 0; medians of {args.repeat} rounds, "
                  f"ranges in brackets): CPU from a closed loop c={args.concurrency} on a 0 ms upstream, latency "
                  f"from an open loop at {args.rate:g} req/s on a {args.open_latency_ms:g} ms upstream.", "",
                  "| limits | gateway CPU µs/req | added CPU | p50 | added p50 | p99 | added p99 | errors |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in e2e_rows:
            lo, hi = row["cpu_us_range"]
            p50lo, p50hi = row["p50_ms_range"]
            lines.append(
                f"| {row['config']} | {row['cpu_us']:.0f} [{lo:.0f}-{hi:.0f}] | "
                f"{row['cpu_us'] - base['cpu_us']:+.0f} | "
                f"{row['p50_ms']:.2f} ms [{p50lo:.2f}-{p50hi:.2f}] | {row['p50_ms'] - base['p50_ms']:+.2f} ms | "
                f"{row['p99_ms']:.2f} ms | {row['p99_ms'] - base['p99_ms']:+.2f} ms | {row['errors']} |")
        lines += ["", "The quietest round of each config (least other load on the box during its two cells):", "",
                  "| limits | other load (cores) | gateway CPU µs/req | added CPU | p50 | added p50 | p99 "
                  "| added p99 |",
                  "|---|---|---|---|---|---|---|---|"]
        quiet_base = base["quietest"]
        for row in e2e_rows:
            cell = row["quietest"]
            lines.append(
                f"| {row['config']} | {max(cell['closed_foreign'], cell['open_foreign']):.2f} | "
                f"{cell['cpu_us']:.0f} | {cell['cpu_us'] - quiet_base['cpu_us']:+.0f} | {cell['p50_ms']:.2f} ms | "
                f"{cell['p50_ms'] - quiet_base['p50_ms']:+.2f} ms | {cell['p99_ms']:.2f} ms | "
                f"{cell['p99_ms'] - quiet_base['p99_ms']:+.2f} ms |")
        lines.append("")
    if replica_rows:
        lines += ["Replicas sharing Redis (unpinned, round-robin closed loop c="
                  f"{args.concurrency} from core 1, 0 ms upstream):", "",
                  "| replicas | aggregate req/s | gateway CPU µs/req | gateway cores busy | machine cores busy | "
                  "counted = 200s | capped team | budget spent / reported / limit | limits held |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in replica_rows:
            lines.append(
                f"| {row['replicas']} | {row['rps']:.0f} | {row['cpu_us']:.0f} | {row['gateway_cores']:.2f} | "
                f"{row['machine_cores']:.2f} | {row['counted']:.0f} = {row['ok']} | {row['capped_ok']} of "
                f"{CAPPED_REQUESTS} ({row['capped_refused']} refused) | {row['budget_spent']:.0f} / "
                f"{row['budget_reported']} / {CAPPED_TOKENS} | {'yes' if all(row['held'].values()) else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=["micro", "e2e", "replicas"],
                        default=["micro", "e2e", "replicas"])
    parser.add_argument("--quick", action="store_true", help="3 s cells, one round, fewer micro iterations")
    parser.add_argument("--iterations", type=int, default=20_000, help="micro: admissions per store")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=2, help="e2e rounds (configs interleaved per round)")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--open-latency-ms", type=float, default=50.0)
    parser.add_argument("--stream-chunks", type=int, default=20)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--hammer-s", type=float, default=3.0, help="replicas: seconds hammering each capped team")
    parser.add_argument("--quiet-wait", type=float, default=10.0, help="wait up to S s for other load before a cell")
    parser.add_argument("--upstream-module", default="tests.fakes.openai_upstream")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--round-robin", help=argparse.SUPPRESS)  # internal: run as the load generator
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup, args.repeat, args.iterations, args.quiet_wait = 3.0, 1.0, 1, 3000, 0.0
    args.gateway_workers, args.gateway_args = 1, "--no-access-log"  # for report.machine_facts
    return args


def main() -> None:
    args = parse_args()
    if args.round_robin:
        spec = orjson.loads(args.round_robin)
        result = uvloop.run(round_robin(spec["urls"], spec["key"], spec["concurrency"], spec["duration"],
                                        spec["warmup"], spec["model"], spec["parse_usage"]))
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        return
    install_cleanup()
    facts = report.machine_facts(args)
    micro_rows = micro(args.iterations) if "micro" in args.only else {}
    e2e_rows: list[dict[str, Any]] = []
    replica_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="switchboard-limits-bench-") as tmp_name:
        tmp = Path(tmp_name)
        fast = bench.start_upstream("upstream-fast", 0, args, tmp)
        slow = bench.start_upstream("upstream-slow", args.open_latency_ms, args, tmp)
        try:
            if "e2e" in args.only:
                e2e_rows = e2e(args, tmp, fast, slow)
            if "replicas" in args.only:
                replica_rows = replicas(args, tmp, fast, slow)
        finally:
            fast.child.stop()
            slow.child.stop()
    facts["loadavg_at_end"] = os.getloadavg()
    text = markdown(facts, micro_rows, e2e_rows, replica_rows, args)
    print("\n" + text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    (args.out_dir / f"limits_{stamp}.md").write_text(text + "\n")
    (args.out_dir / f"limits_{stamp}.json").write_bytes(orjson.dumps(
        {"facts": facts, "micro": micro_rows, "e2e": e2e_rows, "replicas": replica_rows}, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
