"""granian against uvicorn, for the gateway and for the lean relay, in one run (issue #17).

    .venv/bin/python loadtests/server_bench.py            # 8 s cells, 3 rounds, ~5 minutes
    .venv/bin/python loadtests/server_bench.py --quick    # 2.5 s cells, 1 round, ~1 minute
    .venv/bin/python loadtests/server_bench.py --callgrind 200   # instructions per request instead, ~5 minutes

Four systems against the same fake upstream (no latency), closed loop at c=32 from loadtests/loadgen.py,
non-streamed chat and 20-chunk streams, laid out as bench.py does (system under test alone on core 0; the
upstream and the load generator on core 1):

- gateway under uvicorn: `python -m gateway serve` as shipped (uvloop, the project's httptools protocol with
  its connection bounds and disconnect hook, gateway/http/connections.py), demo-like policy, no access log;
- gateway under granian: `granian --interface asgi --loop uvloop --factory gateway.app:app_from_environment`
  (the factory `serve --workers N` uses), one worker, one runtime thread, same policy, no access log;
- the lean relay (loadtests/baseline_passthrough.py, aiohttp) under uvicorn (uvloop, httptools), as bench.py
  runs it, and the same app under granian.

CPU per request is the server's process tree (/proc utime+stime, granian's worker and its Rust threads
included) over the measured window. The systems take turns cell by cell, every round, so drift in the
shared machine's load lands on all of them; the figures are medians over rounds, and the ratios are also
given per round (two cells back to back). Each cell also reports the kernel's share of the server's CPU and
the other load on the machine (`foreign`, in cores).

`--callgrind N`: each server alone under `valgrind --tool=callgrind --trace-children=yes`, counters zeroed
after 30 warm-up requests and dumped after N more from one client on one kept-alive connection: user-space
instructions per request, deterministic, but blind to kernel time and to what concurrency changes.

What the gateway does not get under granian (not ported, on purpose): the bounds of
gateway/http/connections.py (`server.max_connections`, `header_timeout_s`, `body_timeout_s`,
`max_header_bytes`; granian has its own header read timeout and buffer size, set by flags, not by the policy),
the disconnect hook (the app falls back to a task per request that watches `receive()`), and `serve`'s
admin listener and logging setup.

Needs granian (the `compare` extra: pip install -e '.[compare]').
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import bench  # noqa: E402
import report  # noqa: E402
from procs import CLK_TCK, Child, descendants, free_port, install_cleanup  # noqa: E402

RELAY_UPSTREAM_ENV = "SWITCHBOARD_BENCH_RELAY_UPSTREAM"


def relay_from_environment() -> Any:
    """granian's factory for the lean relay (it takes an import path, not an app object)."""
    from baseline_passthrough import build_app

    return build_app(os.environ[RELAY_UPSTREAM_ENV], "aiohttp", tune_gc=True)


def _granian(target: str, extra: str) -> list[str]:
    return [bench.PY, "-m", "granian", "--interface", "asgi", "--loop", "uvloop", "--http", "1", "--no-ws",
            "--workers", "1", "--runtime-threads", "1", "--host", "127.0.0.1", "--port", "{port}",
            "--log-level", "warning", "--no-access-log", *shlex.split(extra), "--factory", target]


def _child(name: str, argv: list[str], tmp: Path, env: dict[str, str], health: str, counted: bool) -> Child:
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # Child passes our environment on: set it for the launch only
    try:
        if counted:  # every process of the server (granian's worker too), each thread (its Rust runtime too)
            argv = ["valgrind", "--tool=callgrind", "--trace-children=yes",
                    f"--callgrind-out-file={tmp / name}.%p", *argv]
        child = Child(name, argv, tmp, None if counted else bench.SUT_CORE, bench.REPO)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    child.wait_http_ok(health, timeout=600 if counted else 60)
    return child


def start_systems(upstream: bench.Upstream, tmp: Path, granian_args: str, only: str | None = None,
                  counted: bool = False) -> dict[str, bench.Target]:
    from gateway.app import ACCESS_LOG_ENV, POLICY_ENV

    policy = tmp / "policy.yaml"
    policy.write_text(bench.policy_yaml(upstream.base_url))
    pythonpath = os.pathsep.join([str(HERE), str(bench.REPO), os.environ.get("PYTHONPATH", "")])
    targets: dict[str, bench.Target] = {}
    launches = {
        "gateway-uvicorn": ([bench.PY, "-m", "gateway", "serve", "--policy", str(policy), "--host", "127.0.0.1",
                             "--port", "{port}", "--no-access-log"], {}, "/healthz", "gateway"),
        "gateway-granian": (_granian("gateway.app:app_from_environment", granian_args),
                            {POLICY_ENV: str(policy), ACCESS_LOG_ENV: "0"}, "/healthz", "gateway"),
        "relay-uvicorn": ([bench.PY, str(HERE / "baseline_passthrough.py"), "--upstream", upstream.base_url,
                           "--port", "{port}", "--client", "aiohttp"], {}, "/health", "relay"),
        "relay-granian": (_granian("server_bench:relay_from_environment", granian_args),
                          {RELAY_UPSTREAM_ENV: upstream.base_url, "PYTHONPATH": pythonpath}, "/health", "relay"),
    }
    for name, (argv, env, health, kind) in launches.items():
        if only is not None and name != only:
            continue
        port = free_port()
        argv = [arg.replace("{port}", str(port)) for arg in argv]
        child = _child(f"{name}-{port}", argv, tmp, env, f"http://127.0.0.1:{port}{health}", counted)
        key, model = (bench.BENCH_KEY, "bench-model") if kind == "gateway" else ("sk-anything", "fake-model")
        targets[name] = bench.Target(f"http://127.0.0.1:{port}/v1/chat/completions", key, model, child)
    return targets


def _user_system(root: int) -> tuple[float, float]:
    """utime and stime, in seconds, of the live process tree under root (warm-up included: for the split)."""
    user = system = 0
    for pid in descendants(root):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text()
            values = fields[fields.rindex(")") + 2:].split()
            user, system = user + int(values[11]), system + int(values[12])
    return user / CLK_TCK, system / CLK_TCK


def _callgrind_control(command: str, pids: list[int]) -> None:
    subprocess.run(["callgrind_control", command, *map(str, pids)], check=True, capture_output=True)


def _dumped(tmp: Path, name: str, pids: list[int]) -> int:
    """Instructions in each process's newest dump (`<name>.<pid>.<n>`), summed."""
    total = 0
    for pid in pids:
        dumps = sorted(tmp.glob(f"{name}.{pid}.*"), key=lambda path: int(path.suffix[1:]))
        found = re.search(r"^(?:totals|summary): (\d+)", dumps[-1].read_text(errors="replace"), re.MULTILINE)
        assert found is not None, f"no totals in {dumps[-1]}"
        total += int(found.group(1))
    return total


def _send(target: bench.Target, body: bytes, count: int) -> None:
    """`count` requests one after another on one kept-alive connection, each read to its end."""
    parts = urlsplit(target.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    headers = {"authorization": f"Bearer {target.key}", "content-type": "application/json"}
    for _ in range(count):
        connection.request("POST", parts.path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status
    connection.close()


def count_instructions(args: argparse.Namespace, modes: list[bench.Mode], tmp: Path,
                       upstream: bench.Upstream) -> None:
    """Instructions per request of each server process tree under callgrind: counters zeroed after a warm-up,
    dumped after `--callgrind N` requests from one client (the method of the README's serve counts)."""
    from loadgen import build_body

    names = ("gateway-uvicorn", "gateway-granian", "relay-uvicorn", "relay-granian")
    figures: dict[tuple[str, str], float] = {}
    for name in names:
        target = start_systems(upstream, tmp, args.granian_args, only=name, counted=True)[name]
        assert target.child is not None
        try:
            pids = descendants(target.child.pid)
            child_name = target.child.name
            for mode in modes:
                body = build_body(target.model, mode.stream)
                _send(target, body, 30)
                _callgrind_control("--zero", pids)
                _send(target, body, args.callgrind)
                _callgrind_control("--dump", pids)
                figures[(name, mode.name)] = _dumped(tmp, child_name, pids) / args.callgrind
                label = "stream" if mode.stream else "chat"
                print(f"callgrind {name:16} {label:6} {figures[(name, mode.name)]:>12,.0f} "  # noqa: T201
                      f"instructions per request ({args.callgrind} requests, {len(pids)} processes)", flush=True)
        finally:
            target.child.stop()
    for mode in modes:
        for app in ("gateway", "relay"):
            granian, uvicorn = figures[(f"{app}-granian", mode.name)], figures[(f"{app}-uvicorn", mode.name)]
            label = "stream" if mode.stream else "chat"
            print(f"callgrind ratio granian/uvicorn, {app:7} {label:6} {granian / uvicorn:.2f}")  # noqa: T201


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2.5 s cells, 1 s warm-up, 1 round")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=200.0)  # loadgen_argv passes it; closed loop ignores it
    parser.add_argument("--stream-chunks", type=int, default=20)
    parser.add_argument("--upstream-module", default="tests.fakes.openai_upstream")
    parser.add_argument("--granian-args", default="", help="more granian flags, e.g. '--task-impl rust'")
    parser.add_argument("--callgrind", type=int, default=0, metavar="N",
                        help="instead of timing: instructions per request under callgrind, N requests per mode")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup, args.repeat = 2.5, 1.0, 1
    install_cleanup()
    modes = [bench.Mode(f"closed c={args.concurrency} chat", "closed", False),
             bench.Mode(f"closed c={args.concurrency} stream", "closed", True)]
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="switchboard-server-bench-") as tmp_name:
        tmp = Path(tmp_name)
        upstream = bench.start_upstream("upstream", 0, args, tmp)
        if args.callgrind:
            try:
                count_instructions(args, modes, tmp, upstream)
            finally:
                upstream.child.stop()
            return
        targets: dict[str, bench.Target] = {}
        try:
            targets = start_systems(upstream, tmp, args.granian_args)
            for round_number in range(args.repeat):
                for mode in modes:
                    for name, target in targets.items():
                        assert target.child is not None
                        before = _user_system(target.child.pid)
                        cell = bench.run_cell(target, upstream, mode, args)
                        after = _user_system(target.child.pid)
                        # The kernel's part (syscalls, wake-ups between threads): callgrind does not see it.
                        user, system = after[0] - before[0], after[1] - before[1]
                        cell["system_share"] = system / (user + system) if user + system else 0.0
                        cells.setdefault((name, mode.name), []).append(cell)
                        print(  # noqa: T201
                            f"round {round_number + 1} {name:16} {mode.name:20} {cell['rps']:6.0f} req/s  "
                            f"p50 {report.fmt(cell['p50_ms'])} ms  server CPU {cell['sut_cpu_us']:6.0f} µs/req  "
                            f"(system {cell['system_share']:.0%})  busy {cell['sut_busy']:.2f}  "
                            f"foreign {cell['foreign_busy']:.2f}  errors {cell['errors']}", flush=True)
        finally:
            for target in targets.values():
                assert target.child is not None
                target.child.stop()
            upstream.child.stop()
    print()  # noqa: T201
    medians: dict[tuple[str, str], float] = {}
    for (name, mode_name), runs in cells.items():
        medians[(name, mode_name)] = statistics.median(c["sut_cpu_us"] for c in runs)
        print(  # noqa: T201
            f"{name:16} {mode_name:20} server CPU {medians[(name, mode_name)]:6.0f} µs/req (median of {len(runs)}: "
            f"{', '.join(str(round(c['sut_cpu_us'])) for c in runs)})  "
            f"{statistics.median(c['rps'] for c in runs):6.0f} req/s  errors {sum(c['errors'] for c in runs)}")
    for mode in modes:
        for app in ("gateway", "relay"):
            granian, uvicorn = medians[(f"{app}-granian", mode.name)], medians[(f"{app}-uvicorn", mode.name)]
            # Each round's two cells ran back to back: their ratio shares that minute's machine load.
            paired = [g["sut_cpu_us"] / u["sut_cpu_us"] for g, u in zip(cells[(f"{app}-granian", mode.name)],
                                                                       cells[(f"{app}-uvicorn", mode.name)],
                                                                       strict=True)]
            print(f"ratio granian/uvicorn, {app:7} {mode.name:20} {granian / uvicorn:.2f} "  # noqa: T201
                  f"({granian:.0f} / {uvicorn:.0f} µs CPU per request); per round "
                  f"{', '.join(f'{r:.2f}' for r in paired)}, median {statistics.median(paired):.2f}")


if __name__ == "__main__":
    main()
