"""Scaling: throughput and CPU per request of `switchboard serve --workers N`, one run per N, as ratios.

    .venv/bin/python loadtests/scaling_bench.py                 # workers 1 and 2, 15 s cells
    .venv/bin/python loadtests/scaling_bench.py --workers 1 2 4 --duration 20

The fake upstream and the load generator share core 1 (as in bench.py); the gateway is not pinned,
so with two workers on a 2-core machine it competes with its own clients for core 1. The numbers
say so: `harness_busy` and `foreign_busy` (other load on the machine) are printed with each cell.
Closed loop, 64 in flight, non-streamed and streamed chat. loadtests/README.md, "Scaling".
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import bench
from procs import Child, free_port, install_cleanup

BENCH_KEY = bench.BENCH_KEY


def start_gateway(upstream: bench.Upstream, workers: int, tmp: Path) -> bench.Target:
    port = free_port()
    policy = tmp / f"policy-{port}.yaml"
    policy.write_text(bench.policy_yaml(upstream.base_url))
    argv = [bench.PY, "-m", "gateway", "serve", "--policy", str(policy), "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers), "--no-access-log"]
    child = Child(f"gateway-w{workers}-{port}", argv, tmp, None, bench.REPO)  # not pinned: it may use both cores
    child.wait_http_ok(f"http://127.0.0.1:{port}/healthz", timeout=60)
    return bench.Target(f"http://127.0.0.1:{port}/v1/chat/completions", BENCH_KEY, "bench-model", child)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=64)
    cli = parser.parse_args()
    args = argparse.Namespace(duration=cli.duration, warmup=cli.warmup, concurrency=cli.concurrency, rate=0,
                              stream_chunks=20, chunk_delay_ms=0.0, upstream_module="tests.fakes.openai_upstream")
    install_cleanup()
    rows = []
    with tempfile.TemporaryDirectory(prefix="scaling-") as directory:
        tmp = Path(directory)
        upstream = bench.start_upstream("upstream", 0.0, args, tmp)
        for workers in cli.workers:
            target = start_gateway(upstream, workers, tmp)
            for stream in (False, True):
                mode = bench.Mode(f"w={workers} {'stream' if stream else 'chat'}", "closed", stream)
                cell = bench.run_cell(target, upstream, mode, args)
                rows.append((workers, stream, cell))
                bench.report.note(
                    f"workers={workers} {'stream' if stream else 'chat  '}: {cell['rps']:7.0f} req/s, "
                    f"gateway {cell['sut_cpu_us']:5.0f} us CPU/req ({cell['sut_busy']:.2f} cores busy), "
                    f"p50 {cell['p50_ms']:.1f} ms p99 {cell['p99_ms']:.1f} ms, errors {cell['errors']}; "
                    f"harness {cell['harness_busy']:.2f} cores, other load {cell['foreign_busy']:.2f} cores")
            target.child.stop()  # type: ignore[union-attr]
        upstream.child.stop()
    base = {stream: cell for workers, stream, cell in rows if workers == cli.workers[0]}
    for workers, stream, cell in rows:
        first = base[stream]
        bench.report.note(f"ratio workers={workers}/{cli.workers[0]} {'stream' if stream else 'chat'}: "
                          f"throughput {cell['rps'] / first['rps']:.2f}x, "
                          f"CPU per request {cell['sut_cpu_us'] / first['sut_cpu_us']:.2f}x")


if __name__ == "__main__":
    main()
