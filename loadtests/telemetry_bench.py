"""Cost of tracing and metrics: gateway CPU per request and added latency, in one run.

    .venv/bin/python loadtests/telemetry_bench.py              # ~4 minutes
    .venv/bin/python loadtests/telemetry_bench.py --quick      # 4 s cells, 1 round
    .venv/bin/python loadtests/telemetry_bench.py --micro      # in-process figures only, ~10 s

Micro (deterministic, process CPU time): per request, the trace hooks on the event loop (two spans'
facts, built once at settle, plus the route decision event every request records), the OTLP protobuf
encoding the export thread does for those spans (in batches of 512, as the batch processor sends
them), and the metrics sink.

Four gateway configurations against the same fake upstream (50 ms latency) at an open-loop 200 req/s,
non-streamed chat and 20-chunk streamed chat: everything off; metrics only; tracing only (100% sampled,
batch OTLP/HTTP export to a local collector process that decodes the protobuf); tracing + metrics.
Gateway CPU is the whole process (so the batch exporter's thread is billed too). The gateway runs on
core 0, the upstream, collector and load generator on core 1 (see README.md, Methodology). The four
gateways run side by side and each round visits all of them, so drift in the machine's other load
hits every configuration alike; figures are medians over `--repeat` rounds.
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


def micro(iterations: int) -> None:
    import asyncio
    import time

    from opentelemetry.sdk.trace.export import SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from gateway.accounting.usage import UsageRecord
    from gateway.compiled.policy import parse_policy
    from gateway.exchange import Exchange
    from gateway.routing.strategies import RouteState
    from gateway.telemetry.decisions import route_event
    from gateway.telemetry.metrics import Metrics
    from gateway.telemetry.otlp import encode_request
    from gateway.telemetry.traces import Telemetry
    from providers.base import Call, Endpoint, UpstreamRequest, Usage

    policy = parse_policy(bench.policy_yaml("http://127.0.0.1:9/v1"))
    model = policy.models["bench-model"]
    target = model.targets[0]
    routes = RouteState()
    call = Call(Endpoint.CHAT, {"model": "bench-model", "messages": [{"role": "user", "content": "hi"}],
                                "temperature": 0.5, "max_tokens": 64}, "fake-model", False)
    body = b'{"id":"chatcmpl-1","object":"chat.completion","model":"fake-model","choices":[]}'

    class Response:
        status = 200

    class Client:
        async def open(self, request: UpstreamRequest) -> Response:
            return Response()

    def record(trace_id: str | None) -> UsageRecord:
        return UsageRecord(request_id="req_1", team="bench", key_id="bench", endpoint="chat",
                           public_model="bench-model", provider="upstream", upstream_model="fake-model", stream=False,
                           status=200, usage=Usage(120, 40, 16), duration_ms=55.0, overhead_ms=0.4,
                           cost_usd=0.00042, price_version="v1", trace_id=trace_id)

    async def requests(telemetry: Telemetry, count: int, sink: Metrics | None) -> float:
        client = Client()
        started = time.process_time()
        for _ in range(count):
            exchange = Exchange("req_1", time.perf_counter())
            trace = telemetry.start("chat", {}, exchange)
            if trace.recording:  # as gateway/routing/resilience.py records each attempt's route
                trace.decision("switchboard.route", route_event(model, model.targets, model.targets, routes,
                                                                routes.clock(), 1, None))
            await trace.send(client, UpstreamRequest("POST", "http://x/v1", {}, b""), target, call)  # type: ignore[arg-type]
            trace.responded(body, "fake-model", ("stop",))
            settled = record(trace.trace_id)
            if sink is not None:
                sink.record(settled)
            trace.finish(settled)
        return (time.process_time() - started) / count * 1e6

    class Discard(InMemorySpanExporter):
        def export(self, spans):  # type: ignore[no-untyped-def]
            return SpanExportResult.SUCCESS

    figures = {}
    def metrics() -> Metrics:
        return Metrics(lambda: policy)

    for name, exporter, sink in (("tracing off", None, None), ("metrics sink", None, metrics()),
                                 ("tracing hooks", Discard(), None), ("tracing + metrics", Discard(), metrics())):
        telemetry = Telemetry(span_exporter=exporter, metrics=sink)
        telemetry.configure(policy)
        asyncio.run(requests(telemetry, iterations // 10, sink))
        figures[name] = asyncio.run(requests(telemetry, iterations, sink))
    keep = InMemorySpanExporter()
    telemetry = Telemetry(span_exporter=keep)
    telemetry.configure(policy)
    asyncio.run(requests(telemetry, 256, None))
    spans = keep.get_finished_spans()
    started = time.process_time()
    for _ in range(50):
        encode_request(spans)
    encode_us = (time.process_time() - started) / 50 / 256 * 1e6
    base = figures["tracing off"]
    for name, value in figures.items():
        print(f"micro {name:18} {value:6.1f} µs/request on the loop ({value - base:+6.1f} vs off)")  # noqa: T201
    print(f"micro OTLP encoding    {encode_us:6.1f} µs/request on the export thread (2 spans, 1 event)")  # noqa: T201
    total = figures["tracing + metrics"] - base + encode_us
    print(f"micro tracing+metrics  {total:6.1f} µs CPU/request in all (target <= 150)")  # noqa: T201


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--micro", action="store_true", help="in-process figures only")
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--open-latency-ms", type=float, default=50.0)
    parser.add_argument("--stream-chunks", type=int, default=20)
    parser.add_argument("--upstream-module", default="tests.fakes.openai_upstream")
    args = parser.parse_args()
    micro(args.iterations)
    if args.micro:
        return
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
        gateways: dict[str, bench.Target] = {}
        try:
            # Every configuration runs side by side (idle ones cost nothing) and the rounds interleave
            # them, so drift in the machine's other load hits every configuration alike.
            for name, extra in configs(f"http://127.0.0.1:{collector_port}/v1/traces").items():
                port = free_port()
                policy = tmp / f"policy-{port}.yaml"
                policy.write_text(bench.policy_yaml(upstream.base_url) + extra)
                argv = [sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port", str(port),
                        "--no-access-log"]
                child = Child(f"gateway-{port}", argv, tmp, bench.SUT_CORE, bench.REPO)
                child.wait_http_ok(f"http://127.0.0.1:{port}/readyz", timeout=60)
                gateways[name] = bench.Target(f"http://127.0.0.1:{port}/v1/chat/completions", bench.BENCH_KEY,
                                              "bench-model", child)
            cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for round_number in range(args.repeat):
                for mode in modes:
                    for name, target in gateways.items():
                        cell = bench.run_cell(target, upstream, mode, args)
                        cells.setdefault((name, mode.name), []).append(cell)
                        print(  # noqa: T201
                            f"round {round_number + 1} {name:16} {mode.name:22} p50 {cell['p50_ms']:6.2f} ms  "
                            f"gateway CPU {cell['sut_cpu_us']:6.0f} µs/req", flush=True)
            for mode in modes:
                for name in gateways:
                    runs = cells[(name, mode.name)]
                    row = {"config": name, "mode": mode.name, "errors": sum(c["errors"] for c in runs),
                           **{k: statistics.median(c[k] for c in runs)
                              for k in ("rps", "p50_ms", "p99_ms", "sut_cpu_us")}}
                    rows.append(row)
                    print(  # noqa: T201
                        f"{name:16} {mode.name:22} {row['rps']:6.0f} req/s  p50 {row['p50_ms']:6.2f} ms  "
                        f"p99 {row['p99_ms']:6.2f} ms  gateway CPU {row['sut_cpu_us']:6.0f} µs/req (median of "
                        f"{len(runs)})  errors {row['errors']}", flush=True)
        finally:
            for target in gateways.values():
                assert target.child is not None
                target.child.stop()
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
