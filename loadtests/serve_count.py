"""Instructions per request of each system as served for real, under callgrind: deterministic where CPU time is not.

    .venv/bin/python loadtests/serve_count.py                       # lean relay, gateway, gateway-full; ~15 min
    .venv/bin/python loadtests/serve_count.py --only baseline-aiohttp gateway --requests 100
    .venv/bin/python loadtests/serve_count.py --compare-checkout /tmp/wt-before   # also gateway@ and gateway-full@

The systems are bench.py's, started by its own starters (same policies, same fake upstream, same private Redis
and OTLP collector for `gateway-full`), each alone under `valgrind --tool=callgrind --trace-children=yes`. For
each mode (non-streamed chat, 20-chunk stream) one client sends a warm-up of 30 requests on one kept-alive
connection, the counters are zeroed once the warm-up's spans are exported, `--requests` more are sent, and the
counters dumped once theirs are: instructions per request = the dump's total over the requests, summed over the
system's processes and every thread in them (the span export and ledger writer threads included). The full
policy's Redis calls get a 10 s timeout: under callgrind one can outlast the default 0.25 s, and the store would
then count locally instead. The fake upstream, Redis and the collector are other
processes, not counted.

What this does not see: kernel time (system calls, wake-ups), cache misses, and whatever concurrency changes
(one request at a time: a Redis round trip pays an idle event-loop turn that 32 requests in flight share). So it
complements bench.py's CPU time under load, it does not replace it; a recount of the same code moves by ~1-3%.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import bench  # noqa: E402
import server_bench  # noqa: E402
from loadgen import build_body  # noqa: E402
from procs import descendants, install_cleanup  # noqa: E402

SYSTEMS = ("baseline-aiohttp", "gateway", "gateway-full", "gateway-full-leased")
EXPORT_WAIT_S = 4.0  # past the full policy's span schedule delay (2 s), with room for callgrind's slowness
MODES = (("chat", False), ("stream", True))


def count(name: str, start: bench.Starter, args: argparse.Namespace, upstream: bench.Upstream, tmp: Path
          ) -> dict[str, float]:
    args.wrap = ["valgrind", "--tool=callgrind", "--trace-children=yes",
                 f"--callgrind-out-file={tmp / name.replace('@', '_').replace('/', '_')}.%p"]
    target = start(upstream, args, tmp)
    if target is None or target.child is None:
        raise SystemExit(f"{name} did not start")
    figures = {}
    try:
        pids = descendants(target.child.pid)
        stem = Path(args.wrap[-1].split("=", 1)[1]).name.rsplit(".", 1)[0]
        for mode, stream in MODES:
            body = build_body(target.model, stream)
            server_bench._send(target, body, 30)
            # The full policy exports spans on a 2 s timer: the warm-up's go before the counters are zeroed, and
            # the counted requests' before they are dumped, so the count holds exactly those requests' spans.
            time.sleep(EXPORT_WAIT_S)
            server_bench._callgrind_control("--zero", pids)
            server_bench._send(target, body, args.requests)
            time.sleep(EXPORT_WAIT_S)
            server_bench._callgrind_control("--dump", pids)
            figures[mode] = server_bench._dumped(tmp, stem, pids) / args.requests
            print(f"{name:28} {mode:6} {figures[mode]:>12,.0f} instructions per request", flush=True)  # noqa: T201
    finally:
        target.child.stop()
        for helper in target.helpers:
            helper.stop()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="counted requests per mode, after 30 unmeasured")
    parser.add_argument("--only", nargs="+", metavar="SYSTEM", help=f"a subset of {', '.join(SYSTEMS)} (and @)")
    parser.add_argument("--compare-checkout", type=Path, nargs="+", default=[], metavar="DIR",
                        help="also count gateway@DIR, gateway-full@DIR and gateway-full-leased@DIR (a worktree of "
                             "another commit)")
    parser.add_argument("--stream-chunks", type=int, default=20)
    parser.add_argument("--ablate", nargs="?", const="gateway-full", choices=bench.ABLATABLE,
                        help="also count the full policy (default, or with leases) minus each of its parts")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="write the callgrind files here and keep them (for callgrind_annotate), not in a "
                             "temporary folder")
    args = parser.parse_args()
    # What bench.py's starters read from its own options.
    args.upstream_module, args.chunk_delay_ms, args.baseline_gc = "tests.fakes.openai_upstream", 0.0, "serving"
    args.gateway_workers, args.gateway_args, args.startup_timeout_s = 1, "--no-access-log", 900.0
    args.full_state_extra = ", timeout_s: 10"  # a Redis call under callgrind must not fall back to local counting
    install_cleanup()
    starters = {"baseline-aiohttp": bench.baseline_starter("aiohttp"), "gateway": bench.start_gateway,
                "gateway-full": bench.start_gateway_full, "gateway-full-leased": bench.start_gateway_full_leased}
    starters.update(bench.ablations(args.ablate))
    for checkout in args.compare_checkout:
        starters.update(bench.checkout_systems(checkout))
    chosen = {name: start for name, start in starters.items() if not args.only or name in args.only}
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        tmp = args.keep.resolve() if args.keep else Path(folder)
        upstream = bench.start_upstream("upstream", 0.0, args, tmp)
        try:
            figures = {name: count(name, start, args, upstream, tmp) for name, start in chosen.items()}
        finally:
            upstream.child.stop()
    relay = figures.get("baseline-aiohttp")
    if relay:
        for name, counted in figures.items():
            ratios = ", ".join(f"{mode} {counted[mode] / relay[mode]:.2f}x" for mode, _ in MODES)
            print(f"{name:28} against the lean relay: {ratios}")  # noqa: T201


if __name__ == "__main__":
    main()
