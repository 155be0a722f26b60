"""Memory soak (issue 17): does RSS stay flat over a million requests of mixed traffic on 3 replicas?

    .venv/bin/python loadtests/soak.py                      # 1,000,000 requests, 30-60 min on 2 shared cores
    .venv/bin/python loadtests/soak.py --requests 50000     # a short run (~2 min)
    nice -n 10 .venv/bin/python loadtests/soak.py --out-dir loadtests/results/soak

Starts a private `redis-server` (free port), the fake OpenAI upstream, and `--replicas` `python -m gateway serve`
processes (unpinned) on one policy: `--teams` teams with hashed keys, Redis-backed limits and budgets set never
to refuse, an exact response cache (memory backend, 8 MiB per replica, so it fills early and then evicts),
OTLP traces at 100% to a fake collector, metrics on, the SQLite ledger on (one file per replica) and the access
log on (to each replica's log file).

The load generator runs in its own process (asyncio + aiohttp, closed loop, `--concurrency` in flight) and sends
request i to replica i mod N. Traffic, in blocks of 40 requests of one team (teams take turns per block):
14 chat and 10 streamed chat with never-seen prompts (cache misses), 6 + 6 chat / streamed repeats of one of
16 questions per team (cache hits once a replica has it), 2 with an unknown model (a new name each time: 404)
and 2 with a bad key (a new one each time: 401).

Every `--window` completed requests the generator prints a line; the parent then samples each replica's RSS
(VmRSS from /proc, summed over its process tree) and CPU time (procs.cpu_seconds). Written to `--out-dir`:
soak_<stamp>.csv / .json (the samples), .png (RSS per replica, p50/p99, CPU µs per request, vs requests served)
and .md (RSS per replica after the reference point, `--reference`, default a tenth of the run, and at the end;
growth in %; pass/fail against `--max-growth`). The run also fails if any request got an unexpected status, or
if a replica's ledger does not hold exactly one status-200 row per 200 the generator counted, per team.

`--diagnose census` snapshots replica 0's live objects by type at the reference point and at the end and writes
the growth into the report (free until a snapshot is taken); `--diagnose tracemalloc` records allocation sites
instead (several times slower: short runs only).
"""

# ruff: noqa: T201, TID251 - a load-test script: prints its progress, and its load generator is its own client.
from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import hashlib
import itertools
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]
SHARED_TIKTOKEN = REPO.parent / "shared" / "tiktoken"
if SHARED_TIKTOKEN.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))

import loadgen  # noqa: E402
from bench import LEASES  # noqa: E402
from procs import Child, cpu_seconds, descendants, free_port, install_cleanup, stop, track  # noqa: E402

PY = sys.executable
MODEL = "soak-model"
ADMIN_KEY = "sk-soak-admin"
FAQ_PER_TEAM = 16
# One block of traffic for one team: (kind, count). 40 requests; the order spreads kinds over the block.
BLOCK = [("chat", 14), ("stream", 10), ("faq_chat", 6), ("faq_stream", 6), ("unknown_model", 2), ("bad_key", 2)]
EXPECTED_STATUS = {"chat": 200, "stream": 200, "faq_chat": 200, "faq_stream": 200, "unknown_model": 404,
                   "bad_key": 401}


def team_key(team: int) -> str:
    return f"sk-soak-team-{team:02d}"


def _sha256(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def policy_yaml(upstream_base: str, redis_port: int, teams: int, ledger: Path, collector: str,
                leases: bool = False) -> str:
    """Every feature whose state could grow with traffic: limits, budgets, cache, traces, metrics, ledger, access
    log; with `leases`, admission from leases (state.leases, as bench.py's leased full policy)."""
    state_extra = LEASES if leases else ""
    lines = [f"""version: 1
admin:
  keys: [{{id: ops, hash: "{_sha256(ADMIN_KEY)}"}}]
providers:
  upstream: {{kind: openai_compatible, base_url: "{upstream_base}", api_key: sk-upstream-secret}}
prices:
  version: soak-2026-12
  targets:  # by provider name: every request is priced
    upstream:
      fake-model: {{input: 0.15, output: 0.60, effective_date: 2026-12-01}}
models:
  {MODEL}:
    targets: [{{provider: upstream, model: fake-model}}]
    cache: {{mode: exact, scope: team, backend: memory, max_bytes: 8388608, ttl_s: 86400}}
state: {{url: "redis://127.0.0.1:{redis_port}/0", key_prefix: "soak-{redis_port}:"{state_extra}}}
telemetry:
  traces: {{exporter: otlp_http, endpoint: "{collector}/v1/traces", sample_ratio: 1.0}}
  metrics: {{enabled: true}}
ledger:
  path: {ledger}
teams:"""]
    for team in range(teams):
        lines.append(f"""  team-{team:02d}:
    models: ["{MODEL}"]
    limits: {{rpm: 100000000, tpm: 100000000000}}
    model_limits:
      {MODEL}: {{rpm: 100000000, tpm: 100000000000}}
    budget: {{period: monthly, tokens: 1000000000000, usd: 1000000000}}
    keys:
      - id: key-{team:02d}
        limits: {{rpm: 100000000}}
        hash: "{_sha256(team_key(team))}\"""")
    return "\n".join(lines) + "\n"


# --- the load generator (its own process) ----------------------------------------------------------


def block_kinds() -> list[str]:
    """The 40 kinds of one block, interleaved (chat, stream, faq, ... rather than 14 chats in a row)."""
    remaining = dict(BLOCK)
    order: list[str] = []
    while any(remaining.values()):
        for kind, _ in BLOCK:
            if remaining[kind]:
                order.append(kind)
                remaining[kind] -= 1
    return order


@dataclass
class Tally:
    """What the generator saw; one window's latencies at a time, totals for the whole run."""

    completed: int = 0
    window_latencies: list[float] = field(default_factory=list)
    window_by_url: Counter[int] = field(default_factory=Counter)
    window_hits: int = 0
    ok_by_team: Counter[str] = field(default_factory=Counter)
    status_by_kind: dict[str, Counter[int]] = field(default_factory=dict)
    hits: int = 0
    unexpected: list[str] = field(default_factory=list)


def request_for(i: int, teams: int, kinds: list[str], run_id: str) -> tuple[str, int, bytes, dict[str, str]]:
    """Request i: its kind, team and body. Unique prompts carry the run id so a rerun never hits old entries."""
    kind = kinds[i % len(kinds)]
    team = (i // len(kinds)) % teams
    stream = kind in ("stream", "faq_stream")
    if kind.startswith("faq"):
        prompt = f"Question {(i // len(kinds)) % FAQ_PER_TEAM} of team {team}: say hello in five words."
    else:
        prompt = f"Request {run_id}-{i}: say hello in five words."
    model = f"soak-unknown-{i}" if kind == "unknown_model" else MODEL
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 32,
                            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    key = f"sk-soak-bad-{i}" if kind == "bad_key" else team_key(team)
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    return kind, team, orjson.dumps(body), headers


async def generate(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    urls, total, window, teams = spec["urls"], spec["requests"], spec["window"], spec["teams"]
    kinds = block_kinds()
    issued = itertools.count()
    tally = Tally(status_by_kind={kind: Counter() for kind in EXPECTED_STATUS})
    started = time.perf_counter()

    def report_window() -> None:
        lat = tally.window_latencies
        line = {"served": tally.completed, "elapsed_s": time.perf_counter() - started,
                "p50_ms": loadgen.percentile(lat, 50), "p99_ms": loadgen.percentile(lat, 99),
                "by_replica": [tally.window_by_url[r] for r in range(len(urls))], "hits": tally.window_hits}
        sys.stdout.write(orjson.dumps(line).decode() + "\n")
        sys.stdout.flush()
        tally.window_latencies, tally.window_by_url, tally.window_hits = [], Counter(), 0

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        kind, team, body, headers = request_for(i, teams, kinds, spec["run_id"])
        replica = i % len(urls)
        begun = time.perf_counter()
        hit, problem = False, None
        try:
            async with session.post(urls[replica], data=body, headers=headers) as response:
                status = response.status
                raw = await response.read()
                hit = response.headers.get("x-switchboard-cache") == "hit"
            if status == 200 and kind.endswith("stream") and not raw.rstrip().endswith(b"data: [DONE]"):
                problem = f"{kind} #{i}: stream ended without [DONE]"
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, problem = 0, f"{kind} #{i}: {type(exc).__name__}: {exc}"
        ended = time.perf_counter()
        if status != EXPECTED_STATUS[kind] and problem is None:
            problem = f"{kind} #{i}: HTTP {status}: {raw[:200]!r}"
        if problem and len(tally.unexpected) < 20:
            tally.unexpected.append(problem)
        tally.status_by_kind[kind][status] += 1
        if status == 200 and problem is None:
            tally.ok_by_team[f"team-{team:02d}"] += 1
            tally.window_latencies.append(ended - begun)
        tally.hits += hit
        tally.window_hits += hit
        tally.window_by_url[replica] += 1
        tally.completed += 1
        if tally.completed % window == 0 or tally.completed == total:
            report_window()

    async def worker(session: aiohttp.ClientSession) -> None:
        while (i := next(issued)) < total:
            await one(session, i)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(worker(session) for _ in range(spec["concurrency"])))
    return {"final": True, "completed": tally.completed, "ok_by_team": dict(tally.ok_by_team),
            "status_by_kind": {k: {str(s): n for s, n in c.items()} for k, c in tally.status_by_kind.items()},
            "hits": tally.hits, "unexpected": tally.unexpected, "elapsed_s": time.perf_counter() - started}


# --- diagnosis: tracemalloc or an object census in replica 0 ---------------------------------------


def traced_serve(snap_dir: Path, mode: str, gateway_argv: list[str]) -> int:
    """Run the gateway; a file `take-NAME` in snap_dir asks for a snapshot `NAME.snap` of its heap.

    `tracemalloc`: every allocation's traceback (costs several times the gateway's CPU: small runs only).
    `census`: live gc-tracked objects counted by type at each snapshot (free between snapshots), then how many
    a full collection frees, so uncollected cyclic garbage shows too.
    A polling thread rather than a signal: the gateway's event loop owns the signals it cares about.
    """
    import gc
    import tracemalloc

    from gateway.cli.main import main as gateway_main

    if mode == "tracemalloc":
        tracemalloc.start(12)

    def census(path: Path) -> None:
        # gateway/http/heap.py froze the startup heap (the app, its policy, module globals): thaw it so they are seen,
        # and freeze what lives afterwards, as the gateway does at startup.
        gc.unfreeze()
        objects = gc.get_objects()
        counts = Counter(_type_name(obj) for obj in objects)
        # A leak often grows one container rather than the number of objects; a dict holding only strings and
        # numbers is not even tracked by gc, so containers are found as the referents of tracked objects.
        big: dict[str, dict[str, Any]] = {}
        for owner in objects:
            for held in gc.get_referents(owner):
                if isinstance(held, _CONTAINERS) and len(held) >= 256 and str(id(held)) not in big:
                    sample = next(iter(held), None)
                    big[str(id(held))] = {"len": len(held), "what": f"{_type_name(held)} in {_type_name(owner)}",
                                          "sample": repr(sample)[:100]}
        del objects
        blocks = sys.getallocatedblocks()
        freed = gc.collect()
        gc.freeze()
        path.write_bytes(orjson.dumps({"types": counts, "containers": big, "allocated_blocks": blocks,
                                       "gc_freed": freed}))

    def watch() -> None:
        while True:
            for request in snap_dir.glob("take-*"):
                name = request.name.removeprefix("take-")
                partial = snap_dir / f"{name}.snap.tmp"
                if mode == "tracemalloc":
                    tracemalloc.take_snapshot().dump(str(partial))
                else:
                    census(partial)
                partial.rename(snap_dir / f"{name}.snap")
                request.unlink()
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True, name="soak-diagnosis").start()
    return gateway_main(gateway_argv)


_CONTAINERS = (dict, list, set, frozenset, collections.deque, bytearray)


def _type_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def request_snapshot(snap_dir: Path, name: str, timeout: float = 300.0) -> Path:
    (snap_dir / f"take-{name}").touch()
    done = snap_dir / f"{name}.snap"
    deadline = time.monotonic() + timeout
    while not done.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"heap snapshot {name} not written within {timeout:.0f} s")
        time.sleep(0.2)
    return done


def snapshot_growth(mode: str, first: Path, last: Path, top: int = 25) -> list[str]:
    if mode == "census":
        before, after = orjson.loads(first.read_bytes()), orjson.loads(last.read_bytes())
        lines = [f"allocated blocks {before['allocated_blocks']:,} -> {after['allocated_blocks']:,}; "
                 f"a full collection then freed {before['gc_freed']:,} / {after['gc_freed']:,} objects"]
        diff = Counter(after["types"])
        diff.subtract(before["types"])
        lines.append("objects by type, largest changes:")
        for name, grown in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:top]:
            lines.append(f"{grown:+9d}  {name}  ({before['types'].get(name, 0):,} -> {after['types'].get(name, 0):,})")
        lines.append("containers of 256+ items that grew (same object in both snapshots, or new):")
        grown_containers = [(c["len"] - before["containers"].get(ident, {}).get("len", 0), c)
                            for ident, c in after["containers"].items()]
        for grown, c in sorted(grown_containers, key=lambda gc_: -gc_[0])[:top]:
            if grown > 0:
                lines.append(f"{grown:+9d}  {c['what']} (now {c['len']:,}), e.g. {c['sample']}")
        return lines
    import tracemalloc

    snap_before, snap_after = tracemalloc.Snapshot.load(str(first)), tracemalloc.Snapshot.load(str(last))
    drop = [tracemalloc.Filter(False, tracemalloc.__file__)]
    stats = snap_after.filter_traces(drop).compare_to(snap_before.filter_traces(drop), "traceback")
    lines = []
    for stat in stats[:top]:
        # Innermost frame first (a Traceback is ordered oldest to newest).
        frames = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(stat.traceback[-5:]))
        lines.append(f"{stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks  {frames}")
    return lines


# --- the parent: processes, sampling, verdicts ------------------------------------------------------


def rss_bytes(root: int) -> int:
    """VmRSS summed over the process tree (a replica with --workers has children)."""
    total = 0
    for pid in descendants(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


@dataclass
class Replica:
    child: Child
    port: int
    ledger: Path


def start_replicas(args: argparse.Namespace, tmp: Path, upstream_base: str, redis_port: int, collector: str
                   ) -> list[Replica]:
    replicas = []
    for index in range(args.replicas):
        port, ledger = free_port(), tmp / f"ledger-{index}.sqlite"
        policy = tmp / f"policy-{index}.yaml"
        policy.write_text(policy_yaml(upstream_base, redis_port, args.teams, ledger, collector, args.leases))
        serve = ["serve", "--policy", str(policy), "--host", "127.0.0.1", "--port", str(port)]
        if args.diagnose and index == 0:
            argv = [PY, str(Path(__file__)), "--traced-serve", str(tmp / "snapshots"), "--diagnose", args.diagnose,
                    "--", *serve]
        else:
            argv = [PY, "-m", "gateway", *serve]
        replicas.append(Replica(Child(f"replica-{index}", argv, tmp, None, REPO), port, ledger))
    for replica in replicas:
        replica.child.wait_http_ok(f"http://127.0.0.1:{replica.port}/readyz", timeout=120)
    return replicas


def ledger_ok_rows(ledgers: list[Path]) -> tuple[Counter[str], Counter[int]]:
    """Status-200 rows per team and rows per status, over every replica's ledger."""
    per_team: Counter[str] = Counter()
    per_status: Counter[int] = Counter()
    for path in ledgers:
        with sqlite3.connect(path) as db:
            per_team.update(dict(db.execute("SELECT team, COUNT(*) FROM usage WHERE status = 200 GROUP BY team")))
            per_status.update(dict(db.execute("SELECT status, COUNT(*) FROM usage GROUP BY status")))
    return per_team, per_status


def sample(replicas: list[Replica], line: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"served": line["served"], "elapsed_s": line["elapsed_s"], "p50_ms": line["p50_ms"],
                           "p99_ms": line["p99_ms"], "hits": line["hits"], "load1": os.getloadavg()[0]}
    for index, replica in enumerate(replicas):
        row[f"rss_mib_{index}"] = rss_bytes(replica.child.pid) / 2**20
        row[f"cpu_s_{index}"] = cpu_seconds(replica.child.pid)
        served = line["by_replica"][index]
        row[f"served_{index}"] = served
        spent = row[f"cpu_s_{index}"] - (previous[f"cpu_s_{index}"] if previous else 0.0)
        row[f"cpu_us_per_req_{index}"] = 1e6 * spent / served if served and previous else None
    return row


def run_generator(args: argparse.Namespace, replicas: list[Replica], snap_dir: Path,
                  reference: int) -> tuple[list[dict[str, Any]], dict[str, Any], list[Path]]:
    spec = {"urls": [f"http://127.0.0.1:{r.port}/v1/chat/completions" for r in replicas],
            "requests": args.requests, "window": args.window, "teams": args.teams,
            "concurrency": args.concurrency, "run_id": os.urandom(4).hex()}
    proc = subprocess.Popen([PY, str(Path(__file__)), "--generate", orjson.dumps(spec).decode()],
                            stdout=subprocess.PIPE, cwd=REPO, start_new_session=True)
    track(proc)
    start = {"served": 0, "elapsed_s": 0.0, "p50_ms": None, "p99_ms": None, "hits": 0,
             "by_replica": [0] * len(replicas)}
    samples = [sample(replicas, start, None)]
    snapshots: list[Path] = []
    final: dict[str, Any] = {}
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = orjson.loads(raw)
        if line.get("final"):
            final = line
            continue
        samples.append(sample(replicas, line, samples[-1]))
        latest = samples[-1]
        rss = " ".join(f"{latest[f'rss_mib_{i}']:.1f}" for i in range(len(replicas)))
        cpu = " ".join(f"{latest[f'cpu_us_per_req_{i}'] or 0:.0f}" for i in range(len(replicas)))
        print(f"{latest['served']:>9,} served {latest['elapsed_s']:7.0f} s | RSS MiB {rss} | CPU µs/req {cpu} | "
              f"p99 {latest['p99_ms'] or 0:.1f} ms | hits {latest['hits']} | load1 {latest['load1']:.1f}", flush=True)
        first_due = latest["served"] >= reference and not snapshots
        if args.diagnose and (first_due or latest["served"] == args.requests):
            snapshots.append(request_snapshot(snap_dir, f"at-{latest['served']}"))
    proc.wait(timeout=60)
    stop(proc)
    if not final:
        raise RuntimeError(f"the load generator exited with {proc.returncode} without its totals")
    return samples, final, snapshots


def verdicts(args: argparse.Namespace, samples: list[dict[str, Any]], final: dict[str, Any],
             ledger_teams: Counter[str], reference: int) -> dict[str, Any]:
    ref = next(s for s in samples if s["served"] >= reference)
    end = samples[-1]
    per_replica = []
    for index in range(args.replicas):
        at_ref, at_end = ref[f"rss_mib_{index}"], end[f"rss_mib_{index}"]
        growth = 100 * (at_end - at_ref) / at_ref
        per_replica.append({"replica": index, "rss_start_mib": samples[0][f"rss_mib_{index}"],
                            "rss_ref_mib": at_ref, "rss_end_mib": at_end, "growth_pct": growth,
                            "peak_mib": max(s[f"rss_mib_{index}"] for s in samples),
                            "pass": growth <= args.max_growth})
    teams = sorted(set(final["ok_by_team"]) | set(ledger_teams))
    mismatched = {t: (final["ok_by_team"].get(t, 0), ledger_teams.get(t, 0)) for t in teams
                  if final["ok_by_team"].get(t, 0) != ledger_teams.get(t, 0)}
    return {"reference_served": ref["served"], "end_served": end["served"], "replicas": per_replica,
            "memory_pass": all(r["pass"] for r in per_replica), "ledger_mismatched_teams": mismatched,
            "ledger_pass": not mismatched and bool(teams), "traffic_pass": not final["unexpected"]}


def plot(samples: list[dict[str, Any]], replicas: int, reference: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    served = [s["served"] / 1000 for s in samples]
    fig, (rss, lat, cpu) = plt.subplots(3, 1, sharex=True, figsize=(10, 9))
    ref = next(s for s in samples if s["served"] >= reference)
    for index in range(replicas):
        line, = rss.plot(served, [s[f"rss_mib_{index}"] for s in samples], label=f"replica {index}")
        # The pass line: 10% above this replica's RSS at the reference point.
        rss.axhline(1.1 * ref[f"rss_mib_{index}"], color=line.get_color(), linestyle="--", linewidth=0.8)
        cpu.plot(served[1:], [s[f"cpu_us_per_req_{index}"] for s in samples[1:]], label=f"replica {index}")
    lat.plot(served[1:], [s["p99_ms"] for s in samples[1:]], label="p99 (200s)")
    lat.plot(served[1:], [s["p50_ms"] for s in samples[1:]], label="p50 (200s)")
    for axis, label in ((rss, "RSS (MiB)"), (lat, "latency (ms)"), (cpu, "CPU µs / request")):
        axis.set_ylabel(label)
        axis.axvline(reference / 1000, color="grey", linestyle=":")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize="small")
    cpu.set_ylim(bottom=0)
    cpu.set_xlabel("requests served (thousands, all replicas)")
    fig.suptitle("Switchboard memory soak, per-window samples (dotted: reference point; dashed: its RSS + 10%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(args: argparse.Namespace, result: dict[str, Any], final: dict[str, Any],
             ledger_status: Counter[int], growth: list[str]) -> str:
    v = result["verdicts"]
    lines = [f"Memory soak {result['date']}: {final['completed']:,} requests in {final['elapsed_s']:.0f} s "
             f"({final['completed'] / final['elapsed_s']:.0f} req/s), {args.replicas} replicas, {args.teams} teams, "
             f"{args.concurrency} in flight; load average at start / end "
             f"{result['loadavg_at_start']:.1f} / {result['loadavg_at_end']:.1f}.", "",
             f"| replica | RSS at start | RSS after {v['reference_served']:,} | RSS after {v['end_served']:,} | "
             f"peak | growth | within {args.max_growth:g}% |", "|---|---|---|---|---|---|---|"]
    for r in v["replicas"]:
        lines.append(f"| {r['replica']} | {r['rss_start_mib']:.1f} MiB | {r['rss_ref_mib']:.1f} MiB | "
                     f"{r['rss_end_mib']:.1f} MiB | {r['peak_mib']:.1f} MiB | {r['growth_pct']:+.1f}% | "
                     f"{'yes' if r['pass'] else 'NO'} |")
    statuses = ", ".join(f"{kind} {dict(sorted(c.items()))}" for kind, c in final["status_by_kind"].items())
    lines += ["", f"Statuses by kind: {statuses}; cache hits {final['hits']:,}.",
              f"Ledger: status-200 rows equal the generator's 200s for every team: "
              f"{'yes' if v['ledger_pass'] else 'NO ' + str(v['ledger_mismatched_teams'])}; "
              f"rows by status {dict(sorted(ledger_status.items()))}.",
              f"Unexpected answers: {len(final['unexpected'])}"
              + (f" (first: {final['unexpected'][:3]})" if final["unexpected"] else "") + ".",
              f"Verdict: memory {'PASS' if v['memory_pass'] else 'FAIL'}, ledger "
              f"{'PASS' if v['ledger_pass'] else 'FAIL'}, traffic {'PASS' if v['traffic_pass'] else 'FAIL'}."]
    if growth:
        lines += ["", f"{args.diagnose}, replica 0, growth between the two snapshots (top 25):", "", "```",
                  *growth, "```"]
    return "\n".join(lines) + "\n"


def soak(args: argparse.Namespace) -> int:
    install_cleanup()
    reference = args.reference or args.requests // 10
    stamp = time.strftime("%Y-%m-%d_%H%M%S", time.gmtime())
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "loadavg_at_start": os.getloadavg()[0],
                              "args": {k: str(v) for k, v in vars(args).items()}}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="switchboard-soak-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "snapshots").mkdir()
        redis_port, upstream_port = free_port(), free_port()
        redis = Child("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], tmp, None, REPO)
        upstream = Child("upstream", [PY, "-m", "tests.fakes.openai_upstream", "--host", "127.0.0.1", "--port",
                                      str(upstream_port), "--stream-chunks", str(args.stream_chunks)], tmp, None, REPO)
        upstream.wait_http_ok(f"http://127.0.0.1:{upstream_port}/health")
        collector_port = free_port()  # OTLP/HTTP traces at 100%: counts spans, keeps none
        collector = Child("collector", [PY, "-m", "tests.fakes.otlp_receiver", "--port", str(collector_port)], tmp,
                          None, REPO)
        collector.wait_http_ok(f"http://127.0.0.1:{collector_port}/health")
        replicas = start_replicas(args, tmp, f"http://127.0.0.1:{upstream_port}/v1", redis_port,
                                  f"http://127.0.0.1:{collector_port}")
        try:
            samples, final, snapshots = run_generator(args, replicas, tmp / "snapshots", reference)
        finally:
            for replica in replicas:  # SIGTERM: each replica writes its last ledger rows before it exits
                stop(replica.child.proc, grace=60)
            upstream.stop()
            collector.stop()
            redis.stop()
        ledger_teams, ledger_status = ledger_ok_rows([r.ledger for r in replicas])
        spilled = [str(r.ledger) for r in replicas if r.ledger.with_name(r.ledger.name + ".spill.jsonl").exists()]
        access_lines = [sum(1 for line in r.child.log.open("rb") if line.startswith(b"{")) for r in replicas]
        growth = snapshot_growth(args.diagnose, snapshots[0], snapshots[-1]) if len(snapshots) == 2 else []
    result.update(loadavg_at_end=os.getloadavg()[0], final=final, samples=samples, spilled_ledgers=spilled,
                  access_log_lines=access_lines, tracemalloc_growth=growth)
    result["verdicts"] = verdicts(args, samples, final, ledger_teams, reference)
    base = args.out_dir / f"soak_{stamp}"
    with (base.with_suffix(".csv")).open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(samples[0]))
        writer.writeheader()
        writer.writerows(samples)
    base.with_suffix(".json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    text = markdown(args, result, final, ledger_status, growth)
    text += f"Access log lines per replica: {access_lines}; ledgers with a spill file: {spilled or 'none'}.\n"
    try:
        plot(samples, args.replicas, reference, base.with_suffix(".png"))
    except ImportError:
        text += "No plot: matplotlib is not installed (`pip install -e '.[load]'`).\n"
    base.with_suffix(".md").write_text(text)
    print("\n" + text + f"\nWritten: {base}.{{csv,json,md,png}}")
    verdict = result["verdicts"]
    return 0 if verdict["memory_pass"] and verdict["ledger_pass"] and verdict["traffic_pass"] and not spilled else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--teams", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=48, help="requests in flight across all replicas")
    parser.add_argument("--window", type=int, default=10_000, help="sample every N completed requests")
    parser.add_argument("--reference", type=int, default=0,
                        help="RSS growth is measured from the sample after this many requests (default: a tenth)")
    parser.add_argument("--max-growth", type=float, default=10.0, help="percent")
    parser.add_argument("--stream-chunks", type=int, default=10)
    parser.add_argument("--leases", action="store_true", help="admit from leases (state.leases), as bench.py's "
                        "gateway-full-leased does")
    parser.add_argument("--diagnose", choices=["census", "tracemalloc"],
                        help="snapshot replica 0's heap at the reference point and the end, report the growth "
                             "(census: object counts by type, free; tracemalloc: allocation sites, slow)")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--replot", type=Path, help="redraw the PNG of a soak_*.json and exit")
    parser.add_argument("--generate", help=argparse.SUPPRESS)  # internal: run as the load generator
    parser.add_argument("--traced-serve", type=Path, help=argparse.SUPPRESS)  # internal: replica 0 traced
    args, rest = parser.parse_known_args(argv)
    args.gateway_argv = [a for a in rest if a != "--"]
    return args


def main() -> int:
    args = parse_args()
    if args.generate:
        import uvloop

        final = uvloop.run(generate(orjson.loads(args.generate)))
        sys.stdout.write(orjson.dumps(final).decode() + "\n")
        return 0
    if args.traced_serve:
        return traced_serve(args.traced_serve, args.diagnose, args.gateway_argv)
    if args.replot:
        saved = orjson.loads(args.replot.read_bytes())
        plot(saved["samples"], int(saved["args"]["replicas"]), saved["verdicts"]["reference_served"],
             args.replot.with_suffix(".png"))
        return 0
    return soak(args)


if __name__ == "__main__":
    raise SystemExit(main())
