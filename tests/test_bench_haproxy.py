"""loadtests/bench.py's `relay-haproxy`: the machine's floor, a relay in C in front of the same fake upstream as every
other system. It must relay what the upstream says, and a stream as it comes, or the floor it gives is wrong."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loadtests"))
import bench

BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def test_haproxy_relays_a_reply_whole_and_a_stream_as_it_comes(tmp_path: Path) -> None:
    args = argparse.Namespace(upstream_module="tests.fakes.openai_upstream", stream_chunks=5, chunk_delay_ms=150.0)
    upstream = bench.start_upstream("upstream", 0.0, args, tmp_path)
    relay = None
    try:
        relay = bench.start_haproxy(upstream, args, tmp_path)
        assert relay is not None and relay.child is not None
        direct = bench.direct_target(upstream)
        with httpx.Client(timeout=10) as client:
            ours = client.post(relay.url, json=BODY, headers={"authorization": f"Bearer {relay.key}"})
            theirs = client.post(direct.url, json=BODY, headers={"authorization": f"Bearer {direct.key}"})
            assert ours.status_code == theirs.status_code == 200
            assert ours.json()["choices"] == theirs.json()["choices"]

            arrivals = []
            with client.stream("POST", relay.url, json={**BODY, "stream": True}) as stream:
                assert stream.status_code == 200
                for chunk in stream.iter_raw():
                    arrivals.append((time.monotonic(), chunk))
        events = b"".join(chunk for _, chunk in arrivals)
        assert events.count(b"data: ") >= 5 and events.rstrip().endswith(b"data: [DONE]")
        # Five chunks 150 ms apart: a relay that buffered the stream would deliver them all at its end.
        assert arrivals[-1][0] - arrivals[0][0] > 0.4
    finally:
        if relay is not None and relay.child is not None:
            relay.child.stop()
        upstream.child.stop()
