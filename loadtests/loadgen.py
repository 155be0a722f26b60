"""Single-core async load generator for OpenAI-style chat completions (driven by bench.py).

    python loadtests/loadgen.py --url http://127.0.0.1:9100/v1/chat/completions --mode closed \
        --concurrency 32 --duration 10 --warmup 2 [--stream]
    python loadtests/loadgen.py --url ... --mode open --rate 200 --duration 10 --warmup 2 [--stream]

Protocol with the parent: one line `MARK start` when the warm-up ends, `MARK end` when the measured
window ends (the parent samples /proc CPU counters on each), then one JSON line with the results.

Closed loop: `concurrency` workers each send back-to-back requests; a request counts if it completes
inside the window. Open loop: request i is due at t0 + i/rate whatever happened before (no
coordinated omission); its latency is measured from that *scheduled* time, so generator lag or
queueing shows up as latency instead of silently lowering the offered rate.

`--paired-url` (open loop): each arrival also sends the same request to a second URL (the upstream itself), half
an interval later, and the results add the system's latency over it at the same percentile, measured in the same
window: latency added by the system without the drift between windows that a separate direct run carries.
"""

# ruff: noqa: TID251 - a load generator, not gateway code: the single-upstream-client rule does not apply.
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import uvloop

PROMPT = [{"role": "user", "content": "Say hello in five words."}]
# Set by the gateway on every reply: its time on the request outside the upstream's (for a stream, up to the
# response's headers).
OVERHEAD_HEADER = "x-switchboard-overhead-ms"


@dataclass
class Window:
    """The measured interval on the perf_counter clock; set when the warm-up ends."""

    start: float = float("inf")
    end: float = float("inf")

    def contains(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    ttfbs: list[float] = field(default_factory=list)
    # The gateway's own time on a request, from its x-switchboard-overhead-ms header (none from other systems):
    # what of the added latency the gateway's handler accounts for, the rest being hops and waits outside it.
    overheads: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    max_lag: float = 0.0

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


def build_body(model: str, stream: bool) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": PROMPT, "max_tokens": 32, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


@dataclass(frozen=True)
class Destination:
    """Where a request goes and what it carries."""

    url: str
    body: bytes
    headers: dict[str, str]


def destination(url: str, key: str, model: str, stream: bool) -> Destination:
    return Destination(url, build_body(model, stream),
                       {"authorization": f"Bearer {key}", "content-type": "application/json"})


async def one_request(
    session: aiohttp.ClientSession, args: argparse.Namespace, to: Destination
) -> tuple[float, float | None, str | None, float | None]:
    """Send one request, read it to the end. Returns (end time, first-body-byte time, error, the gateway's
    reported overhead in seconds)."""
    first: float | None = None
    async with session.post(to.url, data=to.body, headers=to.headers) as resp:
        reported = resp.headers.get(OVERHEAD_HEADER)
        overhead = float(reported) / 1000 if reported is not None else None
        if resp.status != 200:
            await resp.read()
            return time.perf_counter(), None, f"HTTP {resp.status}", overhead
        if not args.stream:
            await resp.read()
            return time.perf_counter(), None, None, overhead
        tail = b""
        async for chunk in resp.content.iter_any():
            if first is None:
                first = time.perf_counter()  # first SSE event: time to first byte/token
            tail = (tail + chunk)[-64:]
        end = time.perf_counter()
        return end, first, None if b"[DONE]" in tail else "stream ended without [DONE]", overhead


async def timed(
    session: aiohttp.ClientSession,
    args: argparse.Namespace,
    to: Destination,
    start: float,
    stats: Stats,
    window: Window,
    count_by_start: bool,
) -> None:
    """Run one request and record it if it belongs to the window (by start or by completion)."""
    try:
        end, first, err, overhead = await one_request(session, args, to)
    except (aiohttp.ClientError, TimeoutError) as exc:
        end, first, err, overhead = time.perf_counter(), None, f"{type(exc).__name__}: {exc}", None
    if not window.contains(start if count_by_start else end):
        return
    if err:
        stats.error(err)
        return
    stats.latencies.append(end - start)
    if first is not None:
        stats.ttfbs.append(first - start)
    if overhead is not None:
        stats.overheads.append(overhead)


async def closed_loop(
    session: aiohttp.ClientSession,
    args: argparse.Namespace,
    to: Destination,
    stats: Stats,
    window: Window,
) -> None:
    async def worker() -> None:
        while time.perf_counter() < window.end:
            await timed(session, args, to, time.perf_counter(), stats, window, False)

    tasks = [asyncio.create_task(worker()) for _ in range(args.concurrency)]
    await run_window(args, window)
    for task in tasks:  # in-flight requests finished after the window: they don't count
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def open_loop(
    session: aiohttp.ClientSession,
    args: argparse.Namespace,
    to: Destination,
    stats: Stats,
    window: Window,
    paired: tuple[Destination, Stats] | None = None,
) -> None:
    interval = 1.0 / args.rate
    tasks: set[asyncio.Task[None]] = set()
    phases = asyncio.create_task(run_window(args, window))
    # Each arrival, then (with `paired`) its twin half an interval later: two evenly interleaved streams.
    arrivals = [(to, stats, 0.0)] + ([(paired[0], paired[1], interval / 2)] if paired is not None else [])
    t0 = time.perf_counter()
    for i in range(int((args.warmup + args.duration) * args.rate)):
        for where, counted, offset in arrivals:
            due = t0 + i * interval + offset
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            stats.max_lag = max(stats.max_lag, time.perf_counter() - due)
            task = asyncio.create_task(timed(session, args, where, due, counted, window, True))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    await phases
    # Requests scheduled inside the window still count if they complete late (that is the tail).
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=60)


async def run_window(args: argparse.Namespace, window: Window) -> None:
    """Warm up, then mark the measured window for the parent process."""
    await asyncio.sleep(args.warmup)
    window.start = time.perf_counter()
    window.end = window.start + args.duration
    mark("start")
    await asyncio.sleep(args.duration)
    mark("end")


def mark(what: str) -> None:
    sys.stdout.write(f"MARK {what}\n")
    sys.stdout.flush()


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def summarize(args: argparse.Namespace, stats: Stats, paired: Stats | None = None) -> dict[str, Any]:
    lat, ttfb = stats.latencies, stats.ttfbs
    same_window: dict[str, Any] = {}
    if paired is not None:
        def added(ours: list[float], theirs: list[float], q: float) -> float | None:
            mine, other = percentile(ours, q), percentile(theirs, q)
            return None if mine is None or other is None else mine - other

        same_window = {
            "paired_completed": len(paired.latencies),
            "paired_errors": paired.errors,
            "same_window_added_p50_ms": added(lat, paired.latencies, 50),
            "same_window_added_p99_ms": added(lat, paired.latencies, 99),
            "same_window_added_ttfb_p50_ms": added(ttfb, paired.ttfbs, 50),
            "same_window_added_ttfb_p99_ms": added(ttfb, paired.ttfbs, 99),
        }
    return {
        "completed": len(lat),
        "errors": stats.errors,
        "error_samples": stats.error_samples,
        "duration_s": args.duration,
        "rps": len(lat) / args.duration,
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "max_ms": percentile(lat, 100),
        "ttfb_p50_ms": percentile(ttfb, 50),
        "ttfb_p99_ms": percentile(ttfb, 99),
        "reported_overhead_p50_ms": percentile(stats.overheads, 50),
        "reported_overhead_p99_ms": percentile(stats.overheads, 99),
        "max_schedule_lag_ms": 1000 * stats.max_lag if args.mode == "open" else None,
        **same_window,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    to = destination(args.url, args.key, args.model, args.stream)
    stats, window = Stats(), Window()
    paired = None
    if args.paired_url is not None:
        if args.mode != "open":
            raise SystemExit("--paired-url is for the open loop")
        paired = (destination(args.paired_url, args.paired_key, args.paired_model, args.stream), Stats())
    connector = aiohttp.TCPConnector(limit=0)  # never let the client pool queue requests
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        if args.mode == "closed":
            await closed_loop(session, args, to, stats, window)
        else:
            await open_loop(session, args, to, stats, window, paired)
    return summarize(args, stats, paired[1] if paired is not None else None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="full chat completions URL")
    parser.add_argument("--key", default="sk-bench")
    parser.add_argument("--model", default="bench-model")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--mode", choices=["closed", "open"], default="closed")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=200.0, help="open loop arrivals per second")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--paired-url", help="open loop: also send each arrival here, half an interval later")
    parser.add_argument("--paired-key", default="sk-anything")
    parser.add_argument("--paired-model", default="fake-model")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    result = uvloop.run(run(args))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
