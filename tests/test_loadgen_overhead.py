"""loadtests/loadgen.py reports the gateway's own time on its requests, read from the x-switchboard-overhead-ms
header of each reply, so a benchmark can tell the gateway's handler from the hops and waits around it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loadtests"))
import loadgen

ANSWER = b'{"id":"x","object":"chat.completion","choices":[]}'


async def _serve(overheads: list[str] | None) -> tuple[web.AppRunner, str]:
    """A chat endpoint whose replies carry the next of `overheads` as their overhead header (None: no header)."""
    served = 0

    async def chat(request: web.Request) -> web.Response:
        nonlocal served
        await request.read()
        headers = {} if overheads is None else {loadgen.OVERHEAD_HEADER: overheads[served % len(overheads)]}
        served += 1
        return web.Response(body=ANSWER, content_type="application/json", headers=headers)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/v1/chat/completions"


def _measure(overheads: list[str] | None) -> dict[str, object]:
    async def main() -> dict[str, object]:
        runner, url = await _serve(overheads)
        try:
            return await loadgen.run(loadgen.parse_args(["--url", url, "--mode", "closed", "--concurrency", "4",
                                                         "--duration", "0.5", "--warmup", "0.1"]))
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def test_the_overhead_a_gateway_reports_on_each_reply_is_summarized_in_milliseconds() -> None:
    # Nine replies in ten say 0.250 ms and one says 4.000: the median is the former, the 99th percentile the latter.
    result = _measure(["0.250"] * 9 + ["4.000"])
    assert result["errors"] == 0 and int(result["completed"]) >= 20
    assert result["reported_overhead_p50_ms"] == 0.25
    assert result["reported_overhead_p99_ms"] == 4.0


def test_a_system_that_reports_no_overhead_gets_none_not_zero() -> None:
    result = _measure(None)
    assert int(result["completed"]) >= 20
    assert result["reported_overhead_p50_ms"] is None and result["reported_overhead_p99_ms"] is None
