"""The gateway's own work per request, driven in process: for instruction counts under callgrind.

No server, no sockets: the app is called as ASGI with a canned receive/send,
in front of the in-process `mock` provider with no pacing, so what is counted
is the pipeline (authentication, parsing, admission, routing, relay,
settlement, metrics) plus the mock's own reply. The mock's part is the same
for any two versions of the gateway, so the difference between two counts is
the difference in the gateway's work. Wall-clock time under load is noise;
instruction counts are not (`valgrind --tool=callgrind` counts the same for
the same code whatever else the machine does):

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p python loadtests/inprocess.py --requests 300
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p python loadtests/inprocess.py --requests 100
    # instructions per request = (total at 300 - total at 100) / 200

Without valgrind it prints the CPU time per request of the measured loop (after a warm-up), which is steady
enough for an A/B of two checkouts run alternately on a quiet machine.

Run it from another checkout (PYTHONPATH=that/checkout) to compare versions in one sitting.

With `--bytecodes N` it counts the bytecodes the event loop's thread runs per request instead (`sys.settrace` with
opcode events, ~50 times slower), by file and for the N functions that run the most: as repeatable as callgrind's
count for the same code and inputs, and it says which Python function the work is in, which callgrind's count of
the interpreter's C functions does not. (The span export and ledger threads are not counted.) A count, not a
cost: on 3.11 a specialized bytecode can take less time than the C call that replaces it (mapping `str.encode`
over a reply's 17 header values ran ~210 fewer bytecodes a request than the loop it replaced, and 27% more time
in `timeit`), so time a change too.

    python loadtests/inprocess.py --full --leased --concurrency 8 --requests 300 --bytecodes 40
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

POLICY = """
version: 1
providers:
  mock:
    kind: mock
    options: {first_token_ms: 0, token_interval_ms: 0, reply_words: 24}
models:
  gpt-4o-mini:
    targets: [{provider: mock, model: mock-gpt-4o-mini}]
teams:
  demo:
    keys:
      - id: demo
        hash: "sha256:b63e455907cf558f3526e7928ae4568399e5c142f3c34dd804152268985719aa"
    models: ["*"]
"""

CHAT = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there, how are you?"}]}'
STREAM = (b'{"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true}, '
          b'"messages": [{"role": "user", "content": "Hello there, how are you?"}]}')


class Phase:
    """Which side of its reply's last byte the request running now is on (`--split`): what a client waits for,
    and what is done after it has its answer."""

    def __init__(self) -> None:
        self.answered = False


async def _request(app: Any, body: bytes, phase: Phase | None = None) -> int:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "headers": [(b"authorization", b"Bearer sk-switchboard-demo"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8080), "scheme": "http",
             # As `switchboard serve`'s protocol offers it (gateway/http/connections.py): the request is told of a
             # disconnect instead of watching receive() with a task of its own. Older checkouts ignore it.
             "switchboard.on_disconnect": None}
    sent = asyncio.Event()
    received = False
    status = 0
    if phase is not None:
        phase.answered = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await sent.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif not message.get("more_body", False):
            sent.set()
            if phase is not None:
                phase.answered = True

    await app(scope, receive, send)
    if phase is not None:  # what the loop runs once the request is over (callbacks of its turn) is its too
        for _ in range(3):
            await asyncio.sleep(0)
    return status


def policy_text(args: argparse.Namespace, folder: Path) -> str:
    """The demo policy, or with --full issue #17's full policy on top (bench.py's template, the same parts as its
    gateway-full): a per-key RPM limit, team RPM/TPM limits and a daily token + USD budget on the Redis at
    `--redis`, OTLP traces at 100% to a collector at `--collector`, metrics, and the SQLite ledger. Set never to
    refuse: what is counted is their cost."""
    if not args.full:
        return POLICY
    from bench import LEASES, with_full_policy

    # timeout_s: under callgrind a round trip takes far longer than the default 0.25 s, and a timed-out store would
    # fall back to counting in memory (fail_open): the count would no longer be the Redis path.
    return with_full_policy(POLICY, provider="mock", model="mock-gpt-4o-mini", redis_url=args.redis,
                            key_prefix=f"inprocess-{os.getpid()}:", collector=args.collector,
                            ledger=folder / "ledger.sqlite",
                            state_extra=", timeout_s: 10" + (LEASES if args.leased else ""),
                            without=args.without)


async def _run(requests: int, stream: bool, args: argparse.Namespace) -> None:
    from gateway.app import create_app
    from gateway.compiled.store import PolicyStore

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "policy.yaml"
        path.write_text(policy_text(args, Path(folder)))
        app = create_app(PolicyStore(path), sinks=[])
        startup: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        await startup.put({"type": "lifespan.startup"})
        done = asyncio.Event()

        async def lifespan_send(message: dict[str, Any]) -> None:
            if message["type"] == "lifespan.startup.complete":
                done.set()

        lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, startup.get,
                                           lifespan_send))
        await done.wait()
        body = STREAM if stream else CHAT
        for _ in range(min(50, requests)):  # warm up: first-use caches, the policy's plans, pools
            assert await _request(app, body) == 200
        counted: Counter[tuple[str, int, str]] = Counter()
        after: Counter[tuple[str, int, str]] = Counter()
        phase = Phase() if args.split else None
        started = time.process_time()
        with counting_bytecodes(counted, after, phase) if args.bytecodes else contextlib.nullcontext():
            if args.concurrency == 1:
                for _ in range(requests):
                    assert await _request(app, body, phase) == 200
            else:  # requests in flight together, as under load: several end in one loop turn

                async def worker(count: int) -> None:
                    for _ in range(count):
                        assert await _request(app, body) == 200

                share, extra = divmod(requests, args.concurrency)
                await asyncio.gather(*(worker(share + (i < extra)) for i in range(args.concurrency)))
        spent = time.process_time() - started
        if args.bytecodes and phase is not None:
            sys.stdout.write("Before the reply's last byte (what its client waits for):\n"
                             + bytecode_report(counted, requests, args.bytecodes)
                             + "\nAfter it (the record, the trace's end, what the loop turn runs then):\n"
                             + bytecode_report(after, requests, args.bytecodes))
        elif args.bytecodes:
            sys.stdout.write(bytecode_report(counted, requests, args.bytecodes))
        else:
            sys.stdout.write(f"{spent / requests * 1e6:.1f} us of CPU per request ({requests} requests)\n")
        await startup.put({"type": "lifespan.shutdown"})
        await lifespan


@contextlib.contextmanager
def counting_bytecodes(counts: Counter[tuple[str, int, str]], after: Counter[tuple[str, int, str]] | None = None,
                       phase: Phase | None = None) -> Iterator[None]:
    """Count, in `counts`, the bytecodes this thread runs in each function (file, first line, qualified name);
    with `phase`, those run once a request is answered in `after` instead."""

    def per_opcode(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            code = frame.f_code
            into = after if phase is not None and phase.answered and after is not None else counts
            into[(code.co_filename, code.co_firstlineno, code.co_qualname)] += 1
        return per_opcode

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return per_opcode

    previous = sys.gettrace()  # a debugger's or a coverage tool's, put back after
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


def bytecode_report(counts: Counter[tuple[str, int, str]], requests: int, top: int) -> str:
    """Bytecodes per request: in all, by file, and the `top` functions."""
    from bench import REPO

    root = f"{REPO}{os.sep}"
    by_file: Counter[str] = Counter()
    for (filename, _, _), count in counts.items():
        by_file[filename.removeprefix(root)] += count
    lines = [f"{sum(counts.values()) / requests:,.0f} bytecodes per request on the event loop's thread "
             f"({requests} requests)", "", "by file:"]
    lines += [f"{count / requests:9,.0f}  {name}" for name, count in by_file.most_common(30)]
    lines += ["", "by function:"]
    lines += [f"{count / requests:9,.0f}  {filename.removeprefix(root)}:{line} {name}"
              for (filename, line, name), count in counts.most_common(top)]
    return "\n".join(lines) + "\n"


def main() -> None:
    from bench import FULL_POLICY_PARTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="requests in flight together (1: one after another, as the instruction counts assume)")
    parser.add_argument("--full", action="store_true", help="issue #17's full policy (Redis, OTLP, metrics, ledger)")
    parser.add_argument("--leased", action="store_true", help="with --full: admission from leases (state.leases)")
    parser.add_argument("--without", metavar="PART", choices=list(FULL_POLICY_PARTS),
                        help="with --full: leave one of its parts out, as bench.py --ablate does")
    parser.add_argument("--bytecodes", type=int, default=0, metavar="N",
                        help="count bytecodes per request instead of CPU time, and list the N busiest functions")
    parser.add_argument("--split", action="store_true",
                        help="with --bytecodes and one request at a time: count what runs before a reply's last "
                             "byte apart from what runs after it")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="with --full")
    parser.add_argument("--collector", default="http://127.0.0.1:4318",
                        help="with --full: an OTLP/HTTP collector (python -m tests.fakes.otlp_receiver)")
    args = parser.parse_args()
    if args.split and (not args.bytecodes or args.concurrency != 1):
        parser.error("--split counts bytecodes (--bytecodes N) of one request at a time (--concurrency 1)")
    asyncio.run(_run(args.requests, args.stream, args))


if __name__ == "__main__":
    main()
