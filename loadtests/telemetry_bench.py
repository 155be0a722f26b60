"""Cost of tracing and metrics: gateway CPU per request and added latency, in one run.

    .venv/bin/python loadtests/telemetry_bench.py              # ~2 minutes
    .venv/bin/python loadtests/telemetry_bench.py --quick      # 4 s cells, 1 round

Four gateway configurations against the same fake upstream (50 ms latency) at an open-loop 200 req/s,
non-streamed chat and 20-chunk streamed chat: everything off; metrics only; tracing only (100% sampled,
batch OTLP/HTTP export to a local collector process that decodes the protobuf); tracing + metrics.
Gateway CPU is the whole process (so the batch exporter's thread is billed too). The gateway runs on
core 0, the upstream, collector and load generator on core 1 (see README.md, Methodology).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
SHARED_TIKTOKEN = HERE.parents[1] / "shared" / "tiktoken"
if SHARED_TIKTOKEN.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))

import bench  # noqa: E402
from procs import Child, free_port, install_cleanup  # noqa: E402


def configs(collector: str) -> dict[str, str]:
    traces = (f"  traces: {{exporter: otlp_http, endpoint: '{collector}', sample_ratio: 1.0,\n"
              "           batch: {schedule_delay_ms: 1000, max_queue_size: 8192}}\n")
    return {
        "all off": "telemetry:\n  metrics: {enabled: false}\n",
        "metrics": "telemetry:\n  metrics: {enabled: true}\n",
        "tracing": "telemetry:\n  metrics: {enabled: false}\n" + traces,
        "tracing+metrics": "telemetry:\n  metrics: {enabled: true}\n" + traces,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--open-latency-ms", type=float, default=50.0)
    parser.add_argument("--stream-chunks", type=int, default=20)
    parser.add_argument("--upstream-module", default="tests.fakes.openai_upstream")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup, args.repeat = 4.0, 1.0, 1
    install_cleanup()
    modes = [bench.Mode(f"open {args.rate:g}/s chat", "open", False),
             bench.Mode(f"open {args.rate:g}/s stream", "open", True)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="switchboard-telemetry-bench-") as tmp_name:
        tmp = Path(tmp_name)
        upstream = bench.start_upstream("upstream", args.open_latency_ms, args, tmp)
        collector_port = free_port()
        collector = Child("collector", [sys.executable, "-m", "tests.fakes.otlp_receiver", "--port",
                                        str(collector_port)], tmp, bench.HARNESS_CORE, bench.REPO)
        collector.wait_http_ok(f"http://127.0.0.1:{collector_port}/health")
        try:
            for name, extra in configs(f"http://127.0.0.1:{collector_port}/v1/traces").items():
                port = free_port()
                policy = tmp / f"policy-{port}.yaml"
                policy.write_text(bench.policy_yaml(upstream.base_url) + extra)
                argv = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port", str(port),
                        "--no-access-log"]
                child = Child(f"gateway-{port}", argv, tmp, bench.SUT_CORE, bench.REPO)
                try:
                    child.wait_http_ok(f"http://127.0.0.1:{port}/readyz", timeout=60)
                    target = bench.Target(f"http://127.0.0.1:{port}/v1/chat/completions", bench.BENCH_KEY,
                                          "bench-model", child)
                    for mode in modes:
                        cells = [bench.run_cell(target, upstream, mode, args) for _ in range(args.repeat)]
                        row = {"config": name, "mode": mode.name, "errors": sum(c["errors"] for c in cells),
                               **{k: statistics.median(c[k] for c in cells)
                                  for k in ("rps", "p50_ms", "p99_ms", "sut_cpu_us")}}
                        rows.append(row)
                        print(  # noqa: T201
                            f"{name:16} {mode.name:22} {row['rps']:6.0f} req/s  p50 {row['p50_ms']:6.2f} ms  "
                            f"p99 {row['p99_ms']:6.2f} ms  gateway CPU {row['sut_cpu_us']:6.0f} µs/req  "
                            f"errors {row['errors']}", flush=True)
                finally:
                    child.stop()
        finally:
            collector.stop()
            upstream.child.stop()
    for mode in modes:
        base = next(r for r in rows if r["mode"] == mode.name and r["config"] == "all off")
        for row in rows:
            if row["mode"] == mode.name and row is not base:
                print(  # noqa: T201
                    f"  {mode.name:22} {row['config']:16} adds {row['sut_cpu_us'] - base['sut_cpu_us']:+6.0f} "
                    f"µs CPU/req, p50 {row['p50_ms'] - base['p50_ms']:+.2f} ms, "
                    f"p99 {row['p99_ms'] - base['p99_ms']:+.2f} ms")


if __name__ == "__main__":
    main()
