"""loadtests/loadgen.py `--paired-url`: each open-loop arrival also goes to a second server half an interval later,
and the results give the system's latency over that server's, measured in the same window."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loadtests"))
import loadgen

ANSWER = b'{"id":"x","object":"chat.completion","choices":[]}'


async def _server(delay_s: float, seen: list[float]) -> tuple[web.AppRunner, str]:
    """A chat endpoint that answers after `delay_s`, noting when each request arrived."""
    async def chat(request: web.Request) -> web.Response:
        seen.append(asyncio.get_running_loop().time())
        await request.read()
        await asyncio.sleep(delay_s)
        return web.Response(body=ANSWER, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/v1/chat/completions"


def test_a_paired_open_loop_gives_the_latency_over_the_paired_server_from_the_same_window() -> None:
    async def main() -> tuple[dict[str, object], list[float], list[float]]:
        system_seen: list[float] = []
        direct_seen: list[float] = []
        system, system_url = await _server(0.060, system_seen)  # the system: 40 ms more than the upstream
        direct, direct_url = await _server(0.020, direct_seen)
        try:
            args = loadgen.parse_args(["--url", system_url, "--mode", "open", "--rate", "40", "--duration", "1.0",
                                       "--warmup", "0.2", "--paired-url", direct_url])
            result = await loadgen.run(args)
        finally:
            await system.cleanup()
            await direct.cleanup()
        return result, system_seen, direct_seen

    result, system_seen, direct_seen = asyncio.run(main())
    assert result["errors"] == result["paired_errors"] == 0
    # One twin per arrival: 40 of each in the 1 s window (one either side of its edges, by the order of timers).
    assert 39 <= int(result["completed"]) <= 41 and abs(int(result["completed"]) - int(result["paired_completed"])) <= 1
    assert len(system_seen) == len(direct_seen) == 48  # warm-up included
    # Evenly interleaved: each twin arrives about half an interval (12.5 ms) after its arrival.
    gaps = sorted(d - s for s, d in zip(system_seen, direct_seen, strict=True))
    assert 0.005 < gaps[len(gaps) // 2] < 0.020
    added = result["same_window_added_p50_ms"]
    assert isinstance(added, float) and 30 < added < 50
    assert result["same_window_added_ttfb_p50_ms"] is None  # not a stream


def test_the_paired_url_is_refused_for_the_closed_loop() -> None:
    args = loadgen.parse_args(["--url", "http://127.0.0.1:9/v1/chat/completions", "--mode", "closed",
                               "--paired-url", "http://127.0.0.1:9/v1/chat/completions"])
    with pytest.raises(SystemExit, match="open loop"):
        asyncio.run(loadgen.run(args))
