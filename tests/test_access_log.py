"""The access log: one JSON line per settled request, written off the event loop in batches."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import httpx
import orjson

from gateway.accounting.usage import AccessLogSink, UsageRecord, access_line
from providers.base import Usage
from tests.conftest import ADMIN_POLICY, RunningGateway, metrics_text, standard_policy
from tests.fakes import FakeOpenAIUpstream


class _Capture:
    """A binary stream the writer thread writes to; tests wait on its line count."""

    def __init__(self) -> None:
        self.data = b""
        self._changed = threading.Condition()

    def write(self, data: bytes) -> int:
        with self._changed:
            self.data += data
            self._changed.notify_all()
        return len(data)

    def flush(self) -> None:
        pass

    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.data.splitlines()]

    def wait_for_lines(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        with self._changed:
            self._changed.wait_for(lambda: self.data.count(b"\n") >= count, timeout)
        return self.lines()


def _chat(gateway: RunningGateway, request_id: str, key: str = "sk-alpha") -> httpx.Response:
    return httpx.post(gateway.v1 + "/chat/completions", headers={"authorization": f"Bearer {key}",
                      "x-request-id": request_id},
                      json={"model": "chat-model", "messages": [{"role": "user", "content": "hi"}]})


def test_every_request_gets_one_json_line(upstream: FakeOpenAIUpstream,
                                          start_gateway: Callable[..., RunningGateway]) -> None:
    capture = _Capture()
    gateway = start_gateway(standard_policy(upstream.base_url), sinks=[AccessLogSink(capture, flush_interval_s=0.01)])
    sent = [f"log-{n}" for n in range(25)]
    for request_id in sent:
        assert _chat(gateway, request_id).status_code == 200
    assert _chat(gateway, "log-bad-key", key="sk-nobody").status_code == 401  # never authenticated: not settled

    lines = capture.wait_for_lines(len(sent))
    assert [line["request_id"] for line in lines] == sent
    first = lines[0]
    assert (first["team"], first["public_model"], first["status"], first["outcome"]) == (
        "alpha", "chat-model", 200, "completed")
    assert first["usage"]["prompt_tokens"] > 0 and first["duration_ms"] >= first["overhead_ms"] >= 0


def test_records_waiting_for_their_batch_are_written_at_shutdown(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    capture = _Capture()
    # An interval no test outlives: only shutdown can write these lines.
    gateway = start_gateway(standard_policy(upstream.base_url), sinks=[AccessLogSink(capture, flush_interval_s=3600)])
    for n in range(5):
        assert _chat(gateway, f"late-{n}").status_code == 200
    gateway.usage.wait_for(5)
    assert capture.data == b""

    gateway.stop()
    assert [line["request_id"] for line in capture.lines()] == [f"late-{n}" for n in range(5)]


def test_a_full_batch_is_written_without_waiting_for_the_timer(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    capture = _Capture()
    gateway = start_gateway(standard_policy(upstream.base_url),
                            sinks=[AccessLogSink(capture, flush_interval_s=3600, batch_size=4)])
    for n in range(9):
        assert _chat(gateway, f"batch-{n}").status_code == 200
    lines = capture.wait_for_lines(8)
    assert [line["request_id"] for line in lines] == [f"batch-{n}" for n in range(8)]  # the ninth waits its turn


def test_access_line_carries_every_record_field_as_the_dataclass_would() -> None:
    """`access_line` spells the record out for speed; it must stay the record, field for field."""
    record = UsageRecord(request_id="r", team="t", key_id="k", endpoint="chat", public_model="m", provider="p",
                         upstream_model="u", stream=True, status=200,
                         usage=Usage(prompt_tokens=3, completion_tokens=4, cached_tokens=1, reasoning_tokens=2),
                         duration_ms=1.5, overhead_ms=0.25, time_to_first_token_ms=0.75, outcome="completed",
                         cost_usd=0.01, price_version="v1", trace_id="ab" * 16, cache="miss", cache_tokens=0,
                         cost_saved_usd=None)
    assert orjson.loads(orjson.dumps(access_line(record))) == orjson.loads(orjson.dumps(record))
    assert access_line(dataclasses.replace(record, usage=None))["usage"] is None


class _Switchable:
    """A stream that writes to a closed pipe (EPIPE on every write) until `mend` points it elsewhere."""

    def __init__(self) -> None:
        import os

        read_end, write_end = os.pipe()
        os.close(read_end)
        self._broken = os.fdopen(write_end, "wb", buffering=0)
        self.target: Any = self._broken
        self.capture = _Capture()

    def write(self, data: bytes) -> int:
        return self.target.write(data)

    def flush(self) -> None:
        self.target.flush()

    def mend(self) -> None:
        self.target = self.capture
        self._broken.close()


def _wait(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_closed_stdout_pipe_drops_lines_counts_them_and_the_log_resumes_when_it_works(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    stream = _Switchable()
    sink = AccessLogSink(stream, flush_interval_s=0.01)  # type: ignore[arg-type]
    gateway = start_gateway(standard_policy(upstream.base_url, extra=ADMIN_POLICY), sinks=[sink])
    for n in range(6):
        assert _chat(gateway, f"broken-{n}").status_code == 200  # the gateway serves on
    _wait(lambda: sink.dropped == 6)
    metrics = metrics_text(gateway)
    assert "switchboard_access_log_lines_dropped_total 6.0" in metrics
    stream.mend()
    for n in range(3):
        assert _chat(gateway, f"mended-{n}").status_code == 200
    lines = stream.capture.wait_for_lines(3)
    assert [line["request_id"] for line in lines] == [f"mended-{n}" for n in range(3)]
    assert sink.dropped == 6 and sink.waiting == 0


def test_a_stuck_stream_bounds_the_lines_waiting_and_counts_the_rest() -> None:
    release = threading.Event()
    written: list[bytes] = []

    class Stuck:
        def write(self, data: bytes) -> int:
            release.wait(10)
            written.append(data)
            return len(data)

        def flush(self) -> None:
            pass

    sink = AccessLogSink(Stuck(), max_waiting=10)  # type: ignore[arg-type]
    record = UsageRecord(request_id="r", team="t", key_id="k", endpoint="chat", public_model="m", provider="p",
                         upstream_model="u", stream=False, status=200, usage=None, duration_ms=1.0, overhead_ms=0.1)
    for n in range(25):  # outside an event loop each record is handed to the writer at once
        sink.record(dataclasses.replace(record, request_id=f"stuck-{n}"))
    assert sink.waiting == 10 and sink.dropped == 15
    release.set()
    sink.close(timeout_s=5)
    assert b"".join(written).count(b"\n") == 10 and sink.waiting == 0


def test_closing_never_waits_longer_than_its_timeout_on_a_stream_that_never_returns() -> None:
    import time

    never = threading.Event()

    class Hung:
        def write(self, data: bytes) -> int:
            never.wait(30)
            return len(data)

        def flush(self) -> None:
            pass

    sink = AccessLogSink(Hung())  # type: ignore[arg-type]
    sink.record(UsageRecord(request_id="r", team="t", key_id="k", endpoint="chat", public_model="m", provider="p",
                            upstream_model="u", stream=False, status=200, usage=None, duration_ms=1.0,
                            overhead_ms=0.1))
    started = time.monotonic()
    sink.close(timeout_s=0.3)
    assert time.monotonic() - started < 2
    never.set()
