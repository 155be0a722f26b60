"""The hand-written RESP client and OTLP encoder against the libraries they replace, in one run (issue #17).

    .venv/bin/python loadtests/library_bench.py            # callgrind counts + timed rounds, ~6 minutes
    .venv/bin/python loadtests/library_bench.py --quick    # 3 rounds, callgrind on admissions only: < 1 minute

Contenders, each doing what the gateway does:

- Admission round trip: `RedisStore.admit` (gateway/state/redis.py) with the full policy's five checks (team
  RPM and TPM, key RPM, a daily token and USD budget) and the previous request's three settlement deltas riding
  along, one EVALSHA per call, against a private redis-server on a free port. `resp`: the store's own client
  (gateway/state/resp.py); `redis-py`: the same store with its client swapped for `redis.asyncio.Redis`
  (hiredis parser, one pool), so only the client differs. At concurrency 1 (one call at a time) and 32
  (32 admissions gathered: the gateway under load; ours pipelines them on one connection, redis-py spreads
  them over its pool).
- OTLP: spans built as the gateway builds them (gateway/telemetry/traces.py: a SERVER span with the route and
  admission events, a CLIENT span per attempt; 2 spans per request), in batches of 512 (the batch processor's
  default). `encode`: gateway/telemetry/otlp.py's `encode_request` vs opentelemetry-exporter-otlp-proto-common's
  `encode_spans(...).SerializeToString()`; `export`: our `OtlpHttpExporter.export` vs the SDK's
  `OTLPSpanExporter.export` (opentelemetry-exporter-otlp-proto-http, a `requests` session), both POSTing to a
  local collector process (tests/fakes/otlp_receiver.py).

Instructions (deterministic, what the verdict rests on): each contender runs alone under
`valgrind --tool=callgrind` at two lengths, and the difference of the two totals over the difference of the
lengths is its cost per unit (setup, imports and warm-up cancel out; loadtests/inprocess.py does the same).
Only this process is counted: redis-server and the collector are not traced. Timed (noisier): the
contenders alternate in one process, several rounds, process CPU time per unit, medians.

The libraries are the `load` extra (pyproject.toml): redis-py with hiredis, opentelemetry-exporter-otlp-proto-http.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from procs import Child, free_port, install_cleanup  # noqa: E402

from gateway.http.heap import settle_for_serving  # noqa: E402 - the serving process's GC settings, for every contender

PY = sys.executable
BATCH = 512  # spans per export: BatchSpanProcessor's default max_export_batch_size
TEAM = "{bench}"
KINDS = ("resp-c1", "redispy-c1", "resp-c32", "redispy-c32",
         "encode-ours", "encode-sdk", "export-ours", "export-sdk")


# --- the admission round trip ----------------------------------------------------------------------------------


class RedisPyClient:
    """The two calls RedisStore makes of its client, over `redis.asyncio` (what a redis-py store would do).

    The per-call timeout is the client's `socket_timeout`, as redis-py is configured; a Redis error reply is
    raised as the store's `RedisReplyError` (NOSCRIPT keeps its prefix, which the store tests for).
    """

    def __init__(self, url: str, timeout_s: float) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import NoScriptError, ResponseError

        self._redis = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._noscript, self._reply_error = NoScriptError, ResponseError

    async def call(self, *args: Any) -> Any:
        return await self.call_within(0.0, *args)

    async def call_within(self, _timeout_s: float, *args: Any) -> Any:
        from gateway.state.resp import RedisReplyError

        try:
            return await self._redis.execute_command(*args)
        except self._noscript as exc:
            raise RedisReplyError(f"NOSCRIPT {exc}") from exc
        except self._reply_error as exc:
            raise RedisReplyError(str(exc)) from exc

    def abort(self) -> None:
        pass

    async def close(self) -> None:
        await self._redis.aclose()


def _admission(now: float) -> tuple[list[Any], list[Any]]:
    """The full policy's checks for one request, and the three deltas its settlement sends."""
    from gateway.state import UNLIMITED, Check, Delta

    minute, day = int(now // 60), int(now // 86_400)
    expires_minute, expires_day = (minute + 2) * 60, (day + 2) * 86_400
    checks = [
        Check((f"{TEAM}:rpm:team:{minute}",), UNLIMITED, 1, expires_minute),
        Check((f"{TEAM}:tpm:team:{minute}",), UNLIMITED, 1_200, expires_minute),
        Check((f"{TEAM}:rpm:key:bench:{minute}",), UNLIMITED, 1, expires_minute),
        Check((f"{TEAM}:budget:team:tok:{day}",), UNLIMITED, 1_200, expires_day),
        Check((f"{TEAM}:budget:team:usd:{day}",), UNLIMITED, 900, expires_day),
    ]
    deltas = [Delta(checks[1].slices[-1], -1_040, expires_minute), Delta(checks[3].slices[-1], -1_040, expires_day),
              Delta(checks[4].slices[-1], -780, expires_day)]
    return checks, deltas


async def _store(kind: str, port: int) -> Any:
    from gateway.state.redis import RedisStore

    url = f"redis://127.0.0.1:{port}/0"
    store = RedisStore(url, key_prefix=f"bench-{kind}-{os.getpid()}:", timeout_s=1.0)
    if kind.startswith("redispy"):
        store._client = RedisPyClient(url, 1.0)  # the one seam a library would take
    await store.start()
    return store


def admission_unit(store: Any, concurrency: int) -> Callable[[], Awaitable[None]]:
    """One unit of work: `concurrency` admissions at once, each followed by its settlement (which rides along)."""
    checks, deltas = _admission(time.time())

    async def one() -> None:
        verdict = await store.admit(checks)
        assert verdict.admitted
        store.settle(deltas)

    if concurrency == 1:
        return one

    async def many() -> None:
        await asyncio.gather(*(one() for _ in range(concurrency)))

    return many


# --- spans and their export ------------------------------------------------------------------------------------


def gateway_spans(requests: int) -> list[Any]:
    """Finished spans of `requests` traced requests, built by the gateway's own trace code."""
    import bench
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from gateway.accounting.usage import UsageRecord
    from gateway.compiled.policy import parse_policy
    from gateway.exchange import Exchange
    from gateway.routing.strategies import RouteState
    from gateway.telemetry.decisions import route_event
    from gateway.telemetry.traces import Telemetry
    from providers.base import Call, Endpoint, UpstreamRequest, Usage

    policy = parse_policy(bench.policy_yaml("http://127.0.0.1:9/v1"))
    model = policy.models["bench-model"]
    target = model.targets[0]
    routes = RouteState()
    call = Call(Endpoint.CHAT, {"model": "bench-model", "messages": [{"role": "user", "content": "hi"}],
                                "temperature": 0.5, "max_tokens": 64}, "fake-model", False)
    labels = ("team bench: requests per minute", "team bench: tokens per minute", "key bench: requests per minute",
              "team bench: daily tokens", "team bench: daily usd")

    class Response:
        status = 200

    class Client:
        async def open(self, _request: UpstreamRequest) -> Response:
            return Response()

    keep = InMemorySpanExporter()
    telemetry = Telemetry(span_exporter=keep)
    telemetry.configure(policy)

    async def run() -> None:
        client = Client()
        for number in range(requests):
            exchange = Exchange(f"req_{number:08x}{random.getrandbits(64):016x}", time.perf_counter())
            trace = telemetry.start("chat", {}, exchange)
            # As gateway/accounting/limits.py records it (admission_event's attributes; counts grow per request).
            trace.decision("switchboard.admission", {
                "switchboard.admission.verdict": "admitted", "switchboard.admission.model": "bench-model",
                "switchboard.admission.checks": labels, "switchboard.admission.limits": (1e8, 1e11, 1e8, 1e12, 1e9),
                "switchboard.admission.used": (number, number * 1_040, number, number * 1_040, number * 0.00078),
                "switchboard.admission.requested": (1, 1_200, 1, 1_200, 0.0009),
                "switchboard.admission.remaining": (1e8 - number, 1e11, 1e8 - number, 1e12, 1e9),
                "switchboard.admission.reserved_tokens": 1_200, "switchboard.admission.reserved_usd": 0.0009})
            trace.decision("switchboard.route", route_event(model, model.targets, model.targets, routes,
                                                            routes.clock(), 1, None))
            await trace.send(client, UpstreamRequest("POST", "http://x/v1", {}, b""), target, call)  # type: ignore[arg-type]
            trace.responded(b'{"id":"chatcmpl-%d","object":"chat.completion"}' % number, "fake-model", ("stop",))
            trace.finish(UsageRecord(
                request_id=exchange.request_id, team="bench", key_id="bench", endpoint="chat",
                public_model="bench-model", provider="upstream", upstream_model="fake-model", stream=False,
                status=200, usage=Usage(120 + number % 50, 40, 160 + number % 50), duration_ms=55.0 + number % 7,
                overhead_ms=0.4, cost_usd=0.00042, price_version="v1", trace_id=trace.trace_id))

    asyncio.run(run())
    return list(keep.get_finished_spans())


def span_unit(kind: str, spans: list[Any], sink_url: str) -> Callable[[], None]:
    """One unit: encode (or encode and POST) one batch of `BATCH` spans."""
    from opentelemetry.sdk.trace.export import SpanExportResult

    batch = spans[:BATCH]
    if kind == "encode-ours":
        from gateway.telemetry.otlp import encode_request

        def encode() -> None:
            encode_request(batch)

        return encode
    if kind == "encode-sdk":
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        def encode_sdk() -> None:
            encode_spans(batch).SerializeToString()

        return encode_sdk
    if kind == "export-ours":
        from gateway.telemetry.otlp import OtlpHttpExporter

        exporter: Any = OtlpHttpExporter(sink_url)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=sink_url)

    def export() -> None:
        assert exporter.export(batch) is SpanExportResult.SUCCESS

    return export


# --- one contender at one length (under callgrind) -------------------------------------------------------------


def run_one(kind: str, units: int, redis_port: int, sink_url: str) -> None:
    """Set up `kind`, warm it up, then run `units` units: the process callgrind counts."""
    if kind.startswith(("resp", "redispy")):
        concurrency = int(kind.rsplit("-c", 1)[1])

        async def admissions() -> None:
            store = await _store(kind, redis_port)
            unit = admission_unit(store, concurrency)
            settle_for_serving()
            for _ in range(20):
                await unit()
            for _ in range(units):
                await unit()
            await store.close()

        asyncio.run(admissions())
        return
    unit = span_unit(kind, gateway_spans(BATCH // 2), sink_url)
    settle_for_serving()
    for _ in range(3):
        unit()
    for _ in range(units):
        unit()


def per_unit(kind: str) -> tuple[str, int]:
    """What one unit is, and how many calls or spans it holds."""
    if kind.endswith("-c32"):
        return "admission", 32
    if kind.endswith("-c1"):
        return "admission", 1
    return "span", BATCH


def callgrind_total(argv: list[str], tmp: Path) -> int:
    out = tmp / f"callgrind.{len(list(tmp.iterdir()))}"
    done = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
                          capture_output=True, text=True, cwd=HERE.parent)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"callgrind run failed ({done.returncode}): {done.stderr[-2000:]}")
    out.unlink(missing_ok=True)
    return int(found.group(1))


def count_instructions(kinds: list[str], lengths: dict[str, tuple[int, int]], redis_port: int, sink_url: str,
                       tmp: Path) -> dict[str, float]:
    """Instructions per call (admissions) or per span: (total at long - total at short) / (difference)."""
    figures: dict[str, float] = {}
    for kind in kinds:
        short, long = lengths[kind]
        totals = []
        for units in (short, long):
            argv = [PY, str(Path(__file__).resolve()), "one", kind, "--units", str(units), "--redis-port",
                    str(redis_port), "--sink-url", sink_url]
            totals.append(callgrind_total(argv, tmp))
        _, per = per_unit(kind)
        figures[kind] = (totals[1] - totals[0]) / (long - short) / per
        sys.stdout.write(f"callgrind {kind:12} {figures[kind]:>12,.0f} instructions per {per_unit(kind)[0]} "
                         f"(totals {totals[0]:,} at {short} units, {totals[1]:,} at {long})\n")
        sys.stdout.flush()
    return figures


# --- the contenders alternately, timed -------------------------------------------------------------------------


def time_alternately(rounds: int, units: dict[str, int], redis_port: int, sink_url: str) -> dict[str, float]:
    """Process CPU µs per call (or per span), median over rounds; each round runs every contender in turn."""
    samples: dict[str, list[float]] = {kind: [] for kind in KINDS}

    async def admissions() -> None:
        stores = {kind: await _store(kind, redis_port) for kind in KINDS[:4]}
        work = {kind: admission_unit(store, per_unit(kind)[1]) for kind, store in stores.items()}
        settle_for_serving()
        for unit in work.values():
            for _ in range(20):
                await unit()
        for _ in range(rounds):
            for kind, unit in work.items():
                started = time.process_time()
                for _ in range(units[kind]):
                    await unit()
                samples[kind].append((time.process_time() - started) / units[kind] / per_unit(kind)[1] * 1e6)
        for kind, store in stores.items():
            await store.close()
            if kind.startswith("redispy"):
                await store._client.close()

    asyncio.run(admissions())
    spans = gateway_spans(BATCH // 2)
    span_work = {kind: span_unit(kind, spans, sink_url) for kind in KINDS[4:]}
    settle_for_serving()
    for unit in span_work.values():
        unit()
    for _ in range(rounds):
        for kind, unit in span_work.items():
            started = time.process_time()
            for _ in range(units[kind]):
                unit()
            samples[kind].append((time.process_time() - started) / units[kind] / BATCH * 1e6)
    for kind in KINDS:
        sys.stdout.write(f"timed     {kind:12} {statistics.median(samples[kind]):8.2f} µs CPU per "
                         f"{per_unit(kind)[0]} (rounds: {', '.join(f'{v:.2f}' for v in samples[kind])})\n")
    return {kind: statistics.median(values) for kind, values in samples.items()}


# --- verdict ---------------------------------------------------------------------------------------------------


def verdict(timed: dict[str, float], counted: dict[str, float], args: argparse.Namespace) -> None:
    """Each difference as a share of the full policy's CPU per request, and keep/replace by the >10% rule."""
    out = sys.stdout.write
    out(f"\nshare of the full policy's {args.full_policy_us:g} µs CPU per request "
        f"({args.scripts_per_request:g} script calls, {args.spans_per_request:g} spans per request):\n")
    rows = (("RESP client, c=1", "resp-c1", "redispy-c1", args.scripts_per_request),
            ("RESP client, c=32", "resp-c32", "redispy-c32", args.scripts_per_request),
            ("OTLP encoder", "encode-ours", "encode-sdk", args.spans_per_request),
            ("OTLP exporter (encode + POST)", "export-ours", "export-sdk", args.spans_per_request))
    for label, ours, theirs, per_request in rows:
        saved_us = (timed[theirs] - timed[ours]) * per_request
        share = saved_us / args.full_policy_us
        line = (f"  {label:30} ours {timed[ours]:7.2f} vs library {timed[theirs]:7.2f} µs -> "
                f"{saved_us:+7.1f} µs/request = {share:+6.1%} of full-policy CPU")
        if ours in counted and theirs in counted:
            ratio = counted[theirs] / counted[ours]
            # Instructions to µs at ours' own rate in this run: the share by the deterministic count.
            rate = timed[ours] / counted[ours]
            counted_share = (counted[theirs] - counted[ours]) * rate * per_request / args.full_policy_us
            line += f"; instructions x{ratio:.2f} (library/ours) = {counted_share:+6.1%}"
            share = counted_share
        out(line + f"  -> {'keep ours' if share > 0.10 else 'replace (ours wins by <= 10%)'}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts, 3 rounds, callgrind on short lengths")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-callgrind", action="store_true")
    parser.add_argument("--callgrind-kinds", nargs="+", choices=KINDS, metavar="KIND",
                        help=f"count only these under callgrind (of {', '.join(KINDS)})")
    parser.add_argument("--full-policy-us", type=float, default=658.0,
                        help="full-policy gateway CPU per chat request (loadtests/README.md, 2026-12-04)")
    parser.add_argument("--scripts-per-request", type=float, default=1.1,
                        help="EVALSHA calls per request (admission + settlements that find no admission to ride)")
    parser.add_argument("--spans-per-request", type=float, default=2.6, help="as the collector counted (issue 17)")
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("one", help="internal: one contender at one length (what callgrind runs)")
    one.add_argument("kind", choices=KINDS)
    one.add_argument("--units", type=int, required=True)
    one.add_argument("--redis-port", type=int, required=True)
    one.add_argument("--sink-url", required=True)
    args = parser.parse_args()
    if args.command == "one":
        run_one(args.kind, args.units, args.redis_port, args.sink_url)
        return
    install_cleanup()
    if args.quick:
        args.rounds = 3
    scale = 1 if args.quick else 4
    timed_units = {"resp-c1": 300 * scale, "redispy-c1": 300 * scale, "resp-c32": 15 * scale,
                   "redispy-c32": 15 * scale, "encode-ours": 2 * scale, "encode-sdk": 2 * scale,
                   "export-ours": 2 * scale, "export-sdk": 2 * scale}
    lengths = {"resp-c1": (50, 50 + 100 * scale), "redispy-c1": (50, 50 + 100 * scale),
               "resp-c32": (2, 2 + 4 * scale), "redispy-c32": (2, 2 + 4 * scale),
               "encode-ours": (1, 1 + scale), "encode-sdk": (1, 1 + scale),
               "export-ours": (1, 1 + scale), "export-sdk": (1, 1 + scale)}
    from google.protobuf.internal import api_implementation
    from redis.asyncio.connection import DefaultParser
    from redis.utils import HIREDIS_AVAILABLE

    if not HIREDIS_AVAILABLE:
        sys.exit("hiredis is not installed: pip install -e '.[compare]' (redis-py would measure its Python parser)")
    sys.stdout.write(f"python {sys.version.split()[0]}, protobuf backend {api_implementation.Type()}, "
                     f"redis-py's asyncio parser {DefaultParser.__name__}\n")
    with tempfile.TemporaryDirectory(prefix="switchboard-library-bench-") as tmp_name:
        tmp = Path(tmp_name)
        redis_port, sink_port = free_port(), free_port()
        redis = Child("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], tmp, None, HERE.parent)
        sink = Child("collector", [PY, "-m", "tests.fakes.otlp_receiver", "--port", str(sink_port)], tmp, None,
                     HERE.parent)
        try:
            sink.wait_http_ok(f"http://127.0.0.1:{sink_port}/health")
            sink_url = f"http://127.0.0.1:{sink_port}/v1/traces"
            timed = time_alternately(args.rounds, timed_units, redis_port, sink_url)
            counted: dict[str, float] = {}
            if not args.no_callgrind and shutil.which("valgrind"):
                # Quick: the admissions only (a span run spends ~30 s under callgrind building its spans).
                kinds = args.callgrind_kinds or (list(KINDS) if not args.quick else ["resp-c1", "redispy-c1"])
                callgrind_dir = tmp / "callgrind"
                callgrind_dir.mkdir()
                counted = count_instructions(kinds, lengths, redis_port, sink_url, callgrind_dir)
            verdict(timed, counted, args)
        finally:
            redis.stop()
            sink.stop()


if __name__ == "__main__":
    main()
