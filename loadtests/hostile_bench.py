"""Hostile-tenant benchmark (issue 14): a light tenant's latency while another sends 4 MB prompts and cache misses.

    .venv/bin/python loadtests/hostile_bench.py                      # this checkout, ~2-4 minutes
    .venv/bin/python loadtests/hostile_bench.py --src /tmp/before    # another source tree (e.g. `git archive`)

One gateway process (one worker) on core 0; the fake upstream (1,536-dimension embeddings) and this
load generator on core 1. Two teams:

- `light`: one small chat request at a time (the probes), a model without cache or limits;
- `heavy`: a token limit (so admission counts its prompts) and a semantic cache of `--entries` questions
  in one partition, filled first; during the attack it sends 4 MB prompts one after another and, at the
  same time, two streams of never-seen questions (each a semantic-cache miss: an embedding call and a
  scan of the whole partition).

Phases: `alone` (light probes, nothing else running) and `attacked` (light probes during the attack).
Reported: the light tenant's p50/p99/max latency in each phase, and how many heavy requests ran.

    .venv/bin/python loadtests/hostile_bench.py --index [--src DIR]   # the semantic index alone, ~1 minute

times `SemanticIndex.nearest` of the source tree over one partition of 1,000 and 10,000 1,536-dim vectors
(median of 20 lookups, in a child process that imports `gateway` from --src).
"""

# ruff: noqa: TID251 - a load generator, not gateway code: the single-upstream-client rule does not apply.
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
from procs import Child, free_port, install_cleanup

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
LIGHT, HEAVY = "sk-light-tenant", "sk-heavy-tenant"
SUT_CORE, HARNESS_CORE = 0, 1


def policy(upstream_port: int, entries: int) -> str:
    light, heavy = (hashlib.sha256(k.encode()).hexdigest() for k in (LIGHT, HEAVY))
    return f"""
version: 1
server: {{max_body_bytes: 8388608}}
providers:
  fake:
    kind: openai_compatible
    base_url: http://127.0.0.1:{upstream_port}/v1
    timeouts: {{connect_s: 5, first_byte_s: 120, total_s: 300}}
models:
  light:
    targets: [{{provider: fake, model: gpt-4o-mini}}]
  heavy:
    targets: [{{provider: fake, model: gpt-4o-mini}}]
    cache:
      mode: semantic
      semantic: {{embedding_model: embed, threshold: 0.99, max_entries: {entries}}}
  embed:
    targets: [{{provider: fake, model: text-embedding-3-small}}]
teams:
  light:
    keys: [{{id: light, hash: "sha256:{light}"}}]
    models: [light]
  heavy:
    keys: [{{id: heavy, hash: "sha256:{heavy}"}}]
    models: [heavy, embed]
    limits: {{tpm: 1000000000}}
"""


def chat(model: str, question: str) -> bytes:
    return orjson.dumps({"model": model, "max_tokens": 16, "temperature": 0,
                         "messages": [{"role": "system", "content": "Answer briefly."},
                                      {"role": "user", "content": question}]})


def long_prompt(chars: int) -> str:
    rng = random.Random(5)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(4000)]
    return " ".join(rng.choices(words, k=chars // 5))[:chars]


async def post(session: aiohttp.ClientSession, url: str, key: str, payload: bytes, failures: list[str]) -> float:
    """Seconds until the answer (or the failure, which is noted in `failures`)."""
    started = time.perf_counter()
    try:
        async with session.post(url, data=payload, headers={"authorization": f"Bearer {key}",
                                                            "content-type": "application/json"}) as response:
            await response.read()
            if response.status != 200:
                failures.append(f"HTTP {response.status}: {(await response.text())[:120]}")
    except aiohttp.ClientError as exc:
        failures.append(f"{type(exc).__name__}: {exc}")
    return time.perf_counter() - started


async def probes(session: aiohttp.ClientSession, url: str, seconds: float, failures: list[str]) -> list[float]:
    latencies, until, i = [], time.perf_counter() + seconds, 0
    while time.perf_counter() < until:
        latencies.append(await post(session, url, LIGHT, chat("light", f"light question {i}"), failures))
        i += 1
    return latencies


async def run(args: argparse.Namespace, base: str) -> dict[str, object]:
    url = base + "/v1/chat/completions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16),
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        heavy_failures: list[str] = []
        for i in range(args.entries):  # fill the heavy tenant's semantic partition
            await post(session, url, HEAVY, chat("heavy", f"heavy question {i} {args.run}"), heavy_failures)
        fill_s = time.perf_counter() - started
        alone_failures: list[str] = []
        alone = await probes(session, url, args.seconds, alone_failures)
        stop = asyncio.Event()
        counts = {"huge": 0, "miss": 0}
        prompt = chat("heavy", long_prompt(4 * 1024 * 1024))

        async def huge() -> None:
            while not stop.is_set():
                await post(session, url, HEAVY, prompt, heavy_failures)
                counts["huge"] += 1

        async def misses(worker: int) -> None:
            i = 0
            while not stop.is_set():
                await post(session, url, HEAVY, chat("heavy", f"never seen {worker} {i} {args.run}"), heavy_failures)
                counts["miss"] += 1
                i += 1

        attackers = [asyncio.create_task(huge()), *(asyncio.create_task(misses(w)) for w in range(2))]
        await asyncio.sleep(1.0)  # the attack is under way before the first probe
        attacked_failures: list[str] = []
        attacked = await probes(session, url, args.seconds, attacked_failures)
        stop.set()
        await asyncio.gather(*attackers)
    return {"fill_s": fill_s, "alone": alone, "attacked": attacked, **counts, "failures": {
        "alone": alone_failures, "attacked": attacked_failures, "heavy": heavy_failures}}


INDEX_PROBE = """
import random, statistics, sys, time
from gateway.cache.semantic import normalized
from gateway.cache.vector_index import SemanticIndex
rng = random.Random(3)
for entries in (1000, 10000):
    index = SemanticIndex(entries)
    for i in range(entries):
        index.add(b"p", str(i).encode(), normalized([rng.gauss(0, 1) for _ in range(1536)]), 1e12)
    query = normalized([rng.gauss(0, 1) for _ in range(1536)])
    times = []
    for _ in range(20):
        started = time.perf_counter()
        index.nearest(b"p", query, 0.99, 0.0)
        times.append(time.perf_counter() - started)
    sys.stdout.write(f"{entries} entries x 1536 dims: {statistics.median(times) * 1000:.2f} ms per lookup\\n")
"""


def index_only(src: Path) -> None:
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    subprocess.run([PY, "-c", INDEX_PROBE], cwd=src.resolve(), env=env, check=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=REPO, help="gateway source tree to run (default: this one)")
    parser.add_argument("--entries", type=int, default=1000, help="semantic-cache entries in the heavy partition")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each probe phase")
    parser.add_argument("--index", action="store_true", help="time the semantic index alone")
    args = parser.parse_args()
    if args.index:
        index_only(args.src)
        return
    args.run = time.time_ns()
    install_cleanup()
    logs = Path(tempfile.mkdtemp(prefix="hostile-bench-"))
    upstream_port, gateway_port = free_port(), free_port()
    upstream = Child("upstream", [PY, "-m", "tests.fakes.openai_upstream", "--port", str(upstream_port),
                                  "--embedding-dimensions", "1536"], logs, HARNESS_CORE, REPO)
    upstream.wait_http_ok(f"http://127.0.0.1:{upstream_port}/health")
    policy_path = logs / "policy.yaml"
    policy_path.write_text(policy(upstream_port, args.entries))
    env_path = str(args.src.resolve())
    os.environ["PYTHONPATH"] = env_path  # the child imports `gateway` from --src
    gateway = Child("gateway", [PY, "-m", "gateway", "serve", "--policy", str(policy_path), "--host", "127.0.0.1",
                                "--port", str(gateway_port), "--log-level", "warning", "--no-access-log"], logs,
                    SUT_CORE, args.src.resolve())
    base = f"http://127.0.0.1:{gateway_port}"
    gateway.wait_http_ok(base + "/readyz")
    try:
        result = asyncio.run(run(args, base))
    finally:
        gateway.stop()
        upstream.stop()
    lines = [f"source: {env_path}; {args.entries} entries x 1536 dims filled in {result['fill_s']:.1f} s",
             f"{'phase':<9} {'probes':>6} {'failed':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"]
    failures = result["failures"]
    assert isinstance(failures, dict)
    for phase in ("alone", "attacked"):
        values = result[phase]
        assert isinstance(values, list)
        lines.append(f"{phase:<9} {len(values):>6} {len(failures[phase]):>6} {pct(values, 0.5):>8.1f} "
                     f"{pct(values, 0.99):>8.1f} {max(values) * 1000:>8.1f}")
    for phase, noted in failures.items():
        lines.extend(f"  {phase} failure: {text}" for text in sorted(set(noted))[:5])
    lines.append(f"heavy requests during the attack: {result['huge']} x 4 MB prompts, {result['miss']} cache misses")
    lines.append(f"logs: {logs}")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
