"""Gateway overhead benchmark: direct vs bare pass-through baselines vs the gateway, one run, as ratios.

    .venv/bin/python loadtests/bench.py            # 10 s cells, ~3.5 minutes per round
    .venv/bin/python loadtests/bench.py --quick    # ~1 minute smoke run

Layout on a 2-core box: the system under test (SUT) alone on core 0; the fake upstreams and the load
generator share core 1, and their CPU is reported so harness saturation is visible, not hidden.
Systems: direct (load generator -> upstream), baseline-aiohttp, baseline-httpx, gateway (skipped if
`python -m gateway` is not importable or does not become healthy). See loadtests/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import report
from procs import Child, core_busy_seconds, cpu_seconds, free_port, install_cleanup, machine_busy_seconds, stop, track

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
SUT_CORE, HARNESS_CORE = 0, 1
BENCH_KEY = "sk-bench"


@dataclass(frozen=True)
class Mode:
    name: str
    loop: str  # "closed" | "open"
    stream: bool


@dataclass
class Upstream:
    child: Child
    base_url: str  # ends in /v1


@dataclass
class Target:
    """A running system under test: where to send requests and which pid to bill CPU to."""

    url: str
    key: str
    model: str
    child: Child | None  # None for direct (no SUT process)
    # What the system needs besides itself (gateway-full: its Redis and OTLP collector), on the harness core.
    helpers: list[Child] = field(default_factory=list)


# A system starts itself against one upstream and returns a Target, or None to be skipped.
Starter = Callable[[Upstream, argparse.Namespace, Path], Target | None]


def start_upstream(name: str, latency_ms: float, args: argparse.Namespace, tmp: Path) -> Upstream:
    port = free_port()
    argv = [
        PY,
        "-m",
        args.upstream_module,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--latency-ms",
        str(latency_ms),
        "--stream-chunks",
        str(args.stream_chunks),
        "--chunk-delay-ms",
        str(getattr(args, "chunk_delay_ms", 0.0)),  # the other benchmarks' parsers have no such option
    ]
    child = Child(name, argv, tmp, HARNESS_CORE, REPO)
    child.wait_http_ok(f"http://127.0.0.1:{port}/health")
    return Upstream(child, f"http://127.0.0.1:{port}/v1")


def direct_target(upstream: Upstream) -> Target:
    """The upstream itself, called by the load generator: nothing to start."""
    return Target(upstream.base_url + "/chat/completions", "sk-anything", "fake-model", None)


def start_direct(upstream: Upstream, _args: argparse.Namespace, _tmp: Path) -> Target:
    return direct_target(upstream)


def wrapped(args: argparse.Namespace, argv: list[str]) -> list[str]:
    """A system under test's command line, behind `args.wrap` when a caller sets one (serve_count.py: valgrind)."""
    return [*getattr(args, "wrap", ()), *argv]


def startup_timeout(args: argparse.Namespace) -> float:
    return getattr(args, "startup_timeout_s", 60.0)


def baseline_starter(client: str) -> Starter:
    def start(upstream: Upstream, args: argparse.Namespace, tmp: Path) -> Target:
        port = free_port()
        argv = [
            PY,
            str(HERE / "baseline_passthrough.py"),
            "--upstream",
            upstream.base_url,
            "--port",
            str(port),
            "--client",
            client,
            "--gc",
            args.baseline_gc,
        ]
        child = Child(f"baseline-{client}-{port}", wrapped(args, argv), tmp, SUT_CORE, REPO)
        child.wait_http_ok(f"http://127.0.0.1:{port}/health", timeout=startup_timeout(args))
        return Target(f"http://127.0.0.1:{port}/v1/chat/completions", "sk-anything", "fake-model", child)

    return start


# HAProxy as a relay: keep-alive on both sides, responses streamed as they come (HAProxy buffers neither way by
# default), one thread on the system's core like every other system under test.
HAPROXY_CONFIG = """global
    nbthread 1
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    option http-no-delay
    http-reuse always
frontend relay
    bind 127.0.0.1:{port}
    default_backend upstream
backend upstream
    server upstream 127.0.0.1:{upstream_port}
"""


def start_haproxy(upstream: Upstream, args: argparse.Namespace, tmp: Path) -> Target | None:
    """The machine's floor: a relay in C that parses little and costs the same hops as any other system, so what a
    Python system adds beyond it is its own. Skipped where HAProxy is not installed."""
    binary = shutil.which("haproxy")
    if binary is None:
        report.note("relay-haproxy skipped: no haproxy on PATH (apt-get install haproxy)")
        return None
    port = free_port()
    config = tmp / f"haproxy-{port}.cfg"
    config.write_text(HAPROXY_CONFIG.format(port=port, upstream_port=urlsplit(upstream.base_url).port))
    child = Child(f"relay-haproxy-{port}", wrapped(args, [binary, "-db", "-f", str(config)]), tmp, SUT_CORE, REPO)
    child.wait_http_ok(f"http://127.0.0.1:{port}/health", timeout=startup_timeout(args))
    return Target(f"http://127.0.0.1:{port}/v1/chat/completions", "sk-anything", "fake-model", child)


def policy_yaml(upstream_base: str) -> str:
    key_hash = hashlib.sha256(BENCH_KEY.encode()).hexdigest()
    return f"""version: 1
providers:
  upstream:
    kind: openai_compatible
    base_url: {upstream_base}
    api_key: sk-upstream-secret
models:
  bench-model:
    targets:
      - provider: upstream
        model: fake-model
teams:
  bench:
    keys:
      - id: bench
        hash: "sha256:{key_hash}"
    models: ["bench-model"]
"""


# What a platform team runs (issue #17's "full policy"): hashed-key auth, RPM/TPM limits for the team and the
# key, a daily token + USD budget, all on Redis; OTLP traces at 100% sampling to a collector; metrics on; the
# SQLite ledger. Limits are set high enough never to refuse: the benchmark measures their cost, not their effect.
# The one template: loadtests/inprocess.py --full appends the same parts to its own policy.
FULL_POLICY_EXTRA = """\
    limits: {{rpm: 100000000, tpm: 100000000000}}
    budget: {{period: daily, tokens: 1000000000000, usd: 1000000000}}
prices:
  version: bench-2026-12
  targets:  # by provider name: every request is priced (USD budget, cost header, span)
    {provider}:
      {model}: {{input: 0.15, output: 0.60, effective_date: 2026-12-01}}
state: {{url: "{redis_url}", key_prefix: "{key_prefix}"{state_extra}}}
telemetry:
  traces: {{exporter: otlp_http, endpoint: "{collector}/v1/traces", sample_ratio: 1.0}}
  metrics: {{enabled: true}}
ledger:
  path: {ledger}
"""


# Where the full policy's CPU goes (`--ablate`): the full policy minus one part, each a system of its own. Each part
# is the template's lines that turn it on, and what replaces them (Redis stays configured without limits).
FULL_POLICY_PARTS = {
    "traces": ('  traces: {{exporter: otlp_http, endpoint: "{collector}/v1/traces", sample_ratio: 1.0}}\n',
               "  traces: {{exporter: none}}\n"),
    "limits": ("    limits: {{rpm: 100000000, tpm: 100000000000}}\n"
               "    budget: {{period: daily, tokens: 1000000000000, usd: 1000000000}}\n", ""),
    "ledger": ("ledger:\n  path: {ledger}\n", ""),
    "metrics": ("  metrics: {{enabled: true}}\n", "  metrics: {{enabled: false}}\n"),
}


def with_full_policy(policy: str, *, provider: str, model: str, redis_url: str, key_prefix: str, collector: str,
                     ledger: Path, state_extra: str = "", without: str | None = None) -> str:
    """`policy` (one team, one hashed key) with the full policy's parts: a per-key RPM limit on its key, the rest
    appended after its team. `state_extra`: more `state` settings, e.g. `, timeout_s: 10`. `without`: one of
    `FULL_POLICY_PARTS`, left out."""
    template = FULL_POLICY_EXTRA
    if without is not None:
        lines, replacement = FULL_POLICY_PARTS[without]
        assert lines in template, without
        template = template.replace(lines, replacement)
    if without != "limits":
        policy = policy.replace('        hash: "', '        limits: {rpm: 100000000}\n        hash: "', 1)
    return policy + template.format(provider=provider, model=model, redis_url=redis_url, key_prefix=key_prefix,
                                    collector=collector, ledger=ledger, state_extra=state_extra)


def full_policy_yaml(upstream_base: str, redis_port: int, collector_port: int, ledger: Path,
                     state_extra: str = "", without: str | None = None) -> str:
    return with_full_policy(policy_yaml(upstream_base), provider="upstream", model="fake-model",
                            redis_url=f"redis://127.0.0.1:{redis_port}/0", key_prefix=f"bench-{redis_port}:",
                            collector=f"http://127.0.0.1:{collector_port}", ledger=ledger, state_extra=state_extra,
                            without=without)


def start_gateway_full(upstream: Upstream, args: argparse.Namespace, tmp: Path, checkout: Path = REPO,
                       without: str | None = None) -> Target | None:
    """The gateway under the full policy, with a private Redis and an OTLP collector on the harness core."""
    redis_port, collector_port = free_port(), free_port()
    redis = Child(f"redis-{redis_port}", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                          "--save", "", "--appendonly", "no"], tmp, HARNESS_CORE, REPO)
    collector = Child(f"collector-{collector_port}", [PY, "-m", "tests.fakes.otlp_receiver", "--port",
                                                      str(collector_port)], tmp, HARNESS_CORE, REPO)
    target = None
    try:
        collector.wait_http_ok(f"http://127.0.0.1:{collector_port}/health")
        # `full_state_extra` (serve_count.py): under callgrind a Redis call can outlast the default state timeout,
        # after which the store would count locally and the count would measure the wrong path.
        target = _start_gateway_with(full_policy_yaml(upstream.base_url, redis_port, collector_port,
                                                      tmp / f"ledger-{redis_port}.sqlite",
                                                      getattr(args, "full_state_extra", ""), without),
                                     args, tmp, checkout)
    finally:
        if target is None:  # the gateway did not come up (or raised): its helpers go with it
            redis.stop()
            collector.stop()
    if target is not None:
        target.helpers = [redis, collector]
    return target


def gateway_available() -> bool:
    probe = "import importlib.util as u, sys; sys.exit(u.find_spec('gateway.__main__') is None)"
    return subprocess.run([PY, "-c", probe], cwd=REPO, capture_output=True).returncode == 0


def start_gateway(upstream: Upstream, args: argparse.Namespace, tmp: Path) -> Target | None:
    return _start_gateway_with(policy_yaml(upstream.base_url), args, tmp)


def checkout_starter(checkout: Path, full: bool = False, leased: bool = False) -> Starter:
    """The gateway of another checkout (a commit before a change) under the demo-like or the full policy (with
    leases, if `leased`), in the same run."""
    def start(upstream: Upstream, args: argparse.Namespace, tmp: Path) -> Target | None:
        if full and leased:
            return start_gateway_full_leased(upstream, args, tmp, checkout=checkout)
        if full:
            return start_gateway_full(upstream, args, tmp, checkout)
        return _start_gateway_with(policy_yaml(upstream.base_url), args, tmp, checkout)
    return start


def checkout_systems(checkout: Path) -> dict[str, Starter]:
    """`--compare-checkout`'s systems for one checkout: its gateway under the demo-like, full and leased full
    policies."""
    name, checkout = checkout.name, checkout.resolve()
    return {f"gateway@{name}": checkout_starter(checkout),
            f"gateway-full@{name}": checkout_starter(checkout, full=True),
            f"gateway-full-leased@{name}": checkout_starter(checkout, full=True, leased=True)}


# The full policy with admission from leases (`state.leases`, docs/accounting.md "Leases"): most requests admitted
# in process instead of one Redis round trip each; the same limits, the defaults of the policy schema.
LEASES = ", leases: {requests: 32, headroom_fraction: 0.05, idle_s: 1.0}"


def start_gateway_full_leased(upstream: Upstream, args: argparse.Namespace, tmp: Path,
                              without: str | None = None, checkout: Path = REPO) -> Target | None:
    extra = getattr(args, "full_state_extra", "")
    args = argparse.Namespace(**{**vars(args), "full_state_extra": extra + LEASES})
    return start_gateway_full(upstream, args, tmp, checkout, without=without)


def ablated_starter(part: str, leased: bool = False) -> Starter:
    """The gateway under the full policy (with leases, if `leased`) without `part` (one of `FULL_POLICY_PARTS`)."""
    def start(upstream: Upstream, args: argparse.Namespace, tmp: Path) -> Target | None:
        if leased:
            return start_gateway_full_leased(upstream, args, tmp, without=part)
        return start_gateway_full(upstream, args, tmp, without=part)
    return start


# What `--ablate` takes apart (bench.py and serve_count.py): the full policy, or the full policy with leases.
ABLATABLE = ("gateway-full", "gateway-full-leased")


def ablations(base: str | None) -> dict[str, Starter]:
    """`--ablate`'s systems: `base` (gateway-full or gateway-full-leased) minus each of the full policy's parts."""
    if base is None:
        return {}
    # Without limits nothing is leased: that system is the plain full policy's.
    return {f"{base}-minus-{part}": ablated_starter(part, leased=base.endswith("-leased") and part != "limits")
            for part in FULL_POLICY_PARTS}


def _start_gateway_with(policy_text: str, args: argparse.Namespace, tmp: Path, checkout: Path = REPO
                        ) -> Target | None:
    port = free_port()
    policy = tmp / f"policy-{port}.yaml"
    policy.write_text(policy_text)
    argv = [PY, "-m", "gateway", "serve", "--policy", str(policy), "--host", "127.0.0.1", "--port", str(port)]
    if args.gateway_workers > 1:
        argv += ["--workers", str(args.gateway_workers)]
    argv += shlex.split(args.gateway_args)
    child = Child(f"gateway-{port}", wrapped(args, argv), tmp, SUT_CORE, checkout)  # `-m gateway`: the checkout's own
    try:
        child.wait_http_ok(f"http://127.0.0.1:{port}/healthz", timeout=startup_timeout(args))
    except RuntimeError as exc:  # a half-built gateway must not sink the baseline figures
        report.note(f"gateway skipped: {exc}")
        child.stop()
        return None
    return Target(f"http://127.0.0.1:{port}/v1/chat/completions", BENCH_KEY, "bench-model", child)


def systems(args: argparse.Namespace) -> dict[str, Starter]:
    chosen: dict[str, Starter] = {
        "direct": start_direct,
        "baseline-aiohttp": baseline_starter("aiohttp"),
        "baseline-httpx": baseline_starter("httpx"),
        "relay-haproxy": start_haproxy,
    }
    if args.no_gateway:
        report.note("gateway skipped: --no-gateway")
    elif gateway_available():
        chosen["gateway"] = start_gateway
        chosen["gateway-full"] = start_gateway_full
        chosen["gateway-full-leased"] = start_gateway_full_leased
        chosen.update(ablations(args.ablate))
    else:
        report.note("gateway skipped: `python -m gateway` is not importable yet (no gateway/__main__.py)")
    for checkout in args.compare_checkout or ():
        chosen.update(checkout_systems(checkout))
    return {name: start for name, start in chosen.items() if not args.only or name in args.only}


def loadgen_argv(target: Target, mode: Mode, args: argparse.Namespace, upstream: Upstream | None = None) -> list[str]:
    argv = [
        PY,
        str(HERE / "loadgen.py"),
        "--url",
        target.url,
        "--key",
        target.key,
        "--model",
        target.model,
        "--mode",
        mode.loop,
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--concurrency",
        str(args.concurrency),
        "--rate",
        str(args.rate),
    ]
    if getattr(args, "paired_direct", False) and mode.loop == "open" and upstream is not None and target.child:
        direct = direct_target(upstream)
        argv += ["--paired-url", direct.url, "--paired-key", direct.key, "--paired-model", direct.model]
    return ["taskset", "-c", str(HARNESS_CORE), *argv, *(["--stream"] if mode.stream else [])]


def cpu_snapshot(pids: dict[str, int | None]) -> dict[str, float]:
    snapshot = {name: cpu_seconds(pid) for name, pid in pids.items() if pid is not None}
    snapshot["machine"] = machine_busy_seconds()
    snapshot["core0"] = core_busy_seconds(SUT_CORE)
    snapshot["core1"] = core_busy_seconds(HARNESS_CORE)
    return snapshot


def run_cell(target: Target, upstream: Upstream, mode: Mode, args: argparse.Namespace) -> dict[str, Any]:
    """One load-generator run; CPU counters are sampled exactly at its MARK start/end lines."""
    proc = subprocess.Popen(loadgen_argv(target, mode, args, upstream), stdout=subprocess.PIPE, cwd=REPO,
                            start_new_session=True)
    track(proc)
    pids = {
        "sut": target.child.pid if target.child else None,
        "upstream": upstream.child.pid,
        "loadgen": proc.pid,
    }
    marks: dict[str, dict[str, float]] = {}
    result: dict[str, Any] = {}
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode().strip()
        if line.startswith("MARK "):
            marks[line[5:]] = cpu_snapshot(pids)
        elif line.startswith("{"):
            result = orjson.loads(line)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)  # let it exit on its own; stop() below only mops up a hung one
    stop(proc)
    if "start" not in marks or "end" not in marks or not result:
        raise RuntimeError(f"load generator failed (exit {proc.returncode}) for {target.url}")
    cpu = {name: marks["end"][name] - marks["start"][name] for name in marks["end"]}
    return {**result, **cpu_figures(cpu, result["completed"], args.duration)}


def cpu_figures(cpu: dict[str, float], completed: int, duration: float) -> dict[str, float | None]:
    ours = {name: sec for name, sec in cpu.items() if name in ("sut", "upstream", "loadgen")}
    per_req = {f"{name}_cpu_us": 1e6 * sec / completed if completed else None for name, sec in ours.items()}
    harness = ours.get("upstream", 0.0) + ours.get("loadgen", 0.0)
    return {
        **per_req,
        "sut_busy": ours["sut"] / duration if "sut" in ours else None,
        "harness_busy": harness / duration,
        "core0_busy": cpu["core0"] / duration,
        "core1_busy": cpu["core1"] / duration,
        # Everything else on the box (other engineers' tests, this script): in cores, 0..nproc.
        "foreign_busy": max(0.0, cpu["machine"] - sum(ours.values())) / duration,
    }


def wait_for_quiet(max_wait: float, threshold: float = 0.2) -> None:
    """Between cells our processes idle, so machine CPU is other people's: wait for it to drop."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        before = machine_busy_seconds()
        time.sleep(0.5)
        if (machine_busy_seconds() - before) / 0.5 < threshold:
            return
    report.progress(f"(machine still busy after {max_wait:g} s, measuring anyway) ")


def run_cell_logged(
    name: str, target: Target, upstream: Upstream, mode: Mode, args: argparse.Namespace
) -> dict[str, Any]:
    if args.quiet_wait > 0:
        wait_for_quiet(args.quiet_wait)
    report.progress(f"{name:17} {mode.name:24}")
    cell = run_cell(target, upstream, mode, args)
    p50 = report.fmt(cell["p50_ms"])
    report.progress(f" {cell['rps']:7.0f} req/s  p50 {p50} ms  errors {cell['errors']}\n")
    return {"system": name, "mode": mode.name, "loop": mode.loop, "stream": mode.stream, **cell}


def run_phase(
    upstream: Upstream, modes: list[Mode], starters: dict[str, Starter], args: argparse.Namespace, tmp: Path
) -> list[dict[str, Any]]:
    """Start every system against this upstream, then run each mode on each system in turn, then stop them.

    Systems take turns mode by mode, so the cells compared in a ratio run within a minute or two of each
    other: on a shared machine the speed drifts over minutes, and whole-system blocks let that drift land on
    one system. Idle systems wait on core 0 without using it.
    """
    targets: dict[str, Target] = {}
    try:
        for name, start in starters.items():
            target = start(upstream, args, tmp)
            if target is not None:
                targets[name] = target
        return [run_cell_logged(name, target, upstream, mode, args)
                for mode in modes for name, target in targets.items()]
    finally:
        for target in targets.values():
            if target.child:
                target.child.stop()
            for helper in target.helpers:
                helper.stop()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each cell")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2.5 s cells, 1 s warm-up (~1 min)")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop in-flight requests")
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop arrivals per second")
    parser.add_argument("--open-latency-ms", type=float, default=50.0, help="upstream latency, open loop")
    parser.add_argument("--paired-direct", action="store_true",
                        help="open loop: each arrival also goes straight to the upstream, half an interval later, "
                             "and each system's latency is also given over that, measured in the same window")
    parser.add_argument("--stream-chunks", type=int, default=20)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0,
                        help="gap between a stream's events (0: back to back, so one read often carries several)")
    parser.add_argument(
        "--quiet-wait", type=float, default=0, metavar="S", help="before each cell, wait up to S s for other load"
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds; the report shows medians and ranges")
    parser.add_argument("--gateway-workers", type=int, default=1)
    parser.add_argument("--baseline-gc", choices=["serving", "default"], default="serving",
                        help="baselines' garbage-collector settings: the gateway's (default) or CPython's")
    parser.add_argument("--gateway-args", default="", help="extra serve flags, e.g. '--no-access-log'")
    parser.add_argument("--no-gateway", action="store_true")
    parser.add_argument("--ablate", nargs="?", const="gateway-full", choices=ABLATABLE,
                        help="also the full policy (default, or with leases) minus each of its parts: traces, limits, "
                             "ledger, metrics")
    parser.add_argument("--compare-checkout", type=Path, nargs="+", metavar="DIR",
                        help="also run the gateway of these checkouts (e.g. a git worktree of an older commit) in the "
                             "same run: demo-like policy as 'gateway@<dir name>', full as 'gateway-full@<dir name>', "
                             "full with leases as 'gateway-full-leased@<dir name>'")
    parser.add_argument("--only", nargs="+", metavar="SYSTEM", help="subset, e.g. direct baseline-aiohttp")
    parser.add_argument("--loops", nargs="+", choices=["closed", "open"], default=["closed", "open"],
                        help="which halves of the matrix to run (default both)")
    parser.add_argument("--upstream-module", default="tests.fakes.openai_upstream")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup = 2.5, 1.0
    return args


def main() -> None:
    args = parse_args()
    install_cleanup()
    closed = [
        Mode(f"closed c={args.concurrency} chat", "closed", False),
        Mode(f"closed c={args.concurrency} stream", "closed", True),
    ] if "closed" in args.loops else []
    opened = [
        Mode(f"open {args.rate:g}/s chat", "open", False),
        Mode(f"open {args.rate:g}/s stream", "open", True),
    ] if "open" in args.loops else []
    facts = report.machine_facts(args)
    starters = systems(args)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-") as tmp_name:
        tmp = Path(tmp_name)
        fast = start_upstream("upstream-fast", 0, args, tmp)
        slow = start_upstream("upstream-slow", args.open_latency_ms, args, tmp)
        rows = []
        for round_no in range(args.repeat):  # whole-matrix rounds, so slow drift hits every system alike
            for row in run_phase(fast, closed, starters, args, tmp) + run_phase(slow, opened, starters, args, tmp):
                rows.append({**row, "round": round_no})
        fast.child.stop()
        slow.child.stop()
    facts["wall_seconds"] = round(time.monotonic() - started, 1)
    report.write(rows, facts, args.out_dir)


if __name__ == "__main__":
    main()
