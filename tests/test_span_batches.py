"""The OTLP path's span queue (gateway/telemetry/span_batches.py) and its rows (gateway/telemetry/otlp.py).

The queue is driven from this thread as the event loop would drive it; the export thread is real. Waits are on
events the sender sets, never sleeps.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import SpanKind, TraceState

from gateway.telemetry.otlp import SpanEncoder, SpanRow
from gateway.telemetry.request_trace import SCOPE_NAME, readable_span
from gateway.telemetry.span_batches import SpanBatches
from tests.fakes.otlp_receiver import count_spans, decode


@dataclass
class Trace:
    number: int
    span_count: int = 2


class Sender:
    def __init__(self, fail_first: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.sent = threading.Event()
        self.fail_first = fail_first
        self.closed = False

    def __call__(self, traces: Sequence[Trace]) -> bool:
        if self.fail_first:
            self.fail_first = False
            raise RuntimeError("encoder bug")
        self.batches.append([trace.number for trace in traces])
        self.sent.set()
        return True

    def close(self) -> None:
        self.closed = True


def test_a_full_batch_is_sent_at_once_and_batches_hold_at_most_the_batch_size() -> None:
    sender = Sender()
    # A delay no test would wait out: only a full batch can wake the thread.
    batches = SpanBatches(sender, max_queue=100, max_batch=6, delay_s=3600, close_exporter=sender.close)
    try:
        for number in range(7):  # 14 spans: two batches of 3 traces (6 spans) are full, one trace waits
            batches.add(Trace(number))
        assert sender.sent.wait(10)
        assert batches.force_flush()
        assert [n for batch in sender.batches for n in batch] == list(range(7))
        assert all(len(batch) <= 3 for batch in sender.batches)
    finally:
        batches.shutdown()
    assert sender.closed


def test_shutdown_sends_what_is_queued_and_later_traces_are_dropped() -> None:
    sender = Sender()
    batches = SpanBatches(sender, max_queue=100, max_batch=50, delay_s=3600, close_exporter=sender.close)
    for number in range(3):
        batches.add(Trace(number))
    batches.shutdown()
    assert sender.batches == [[0, 1, 2]] and sender.closed
    batches.add(Trace(3))
    assert batches.dropped_spans == 2


def test_a_full_queue_drops_new_traces_counts_them_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    sender = Sender()
    batches = SpanBatches(sender, max_queue=5, max_batch=5, delay_s=3600)
    try:
        with caplog.at_level(logging.WARNING, logger="switchboard.telemetry"):
            batches.add(Trace(0, span_count=3))
            batches.add(Trace(1, span_count=3))  # 6 > 5: dropped whole, never cut
            batches.add(Trace(2, span_count=3))
        assert batches.dropped_spans == 6
        assert sum("queue full" in record.message for record in caplog.records) == 1
        assert batches.force_flush()
        assert sender.batches == [[0]]
    finally:
        batches.shutdown()


def test_an_export_that_raises_loses_its_batch_only() -> None:
    sender = Sender(fail_first=True)
    batches = SpanBatches(sender, max_queue=100, max_batch=2, delay_s=3600)
    try:
        batches.add(Trace(0))  # a full batch: sent by the thread, and its send raises
        batches.add(Trace(1))
        assert sender.sent.wait(10)
        assert batches.force_flush()
        assert sender.batches == [[1]]
        assert batches.dropped_spans == 2  # the lost batch's spans are counted
    finally:
        batches.shutdown()


def test_rows_encode_as_the_sdk_spans_made_of_them_do() -> None:
    """The gateway's traces reach OTLP as rows and every other exporter as `ReadableSpan`s made of the same rows:
    both encode to the same bytes, and decode to what the rows say."""
    state = TraceState([("vendor", "x1")])
    rows: list[SpanRow] = [
        (0xABC, 0x2, 1, None, 0x1, False, "chat m", SpanKind.CLIENT, 10, 20,
         {"gen_ai.request.model": "m", "gen_ai.usage.input_tokens": 7, "switchboard.cost_usd": 0.25}, (), 2, None),
        (0xABC, 0x1, 1, state, 0x99, True, "chat public", SpanKind.SERVER, 5, 30, {"switchboard.team": "a"},
         (("switchboard.route", {"switchboard.route.chosen": "p/m"}, 7), ("switchboard.cache", None, 8)), 0, None),
    ]
    resource = Resource.create({"service.name": "svc"})
    from_rows = SpanEncoder().encode_rows(rows, resource.attributes, SCOPE_NAME)
    assert SpanEncoder().encode([readable_span(row, resource) for row in rows]) == from_rows
    client, server = decode(from_rows)
    assert count_spans(from_rows) == 2  # what a load test's collector counts, without decoding
    assert (client.kind, client.status, client.parent_span_id) == ("CLIENT", "ERROR", f"{0x1:016x}")
    assert client.attributes["gen_ai.usage.input_tokens"] == 7 and client.attributes["switchboard.cost_usd"] == 0.25
    assert (server.kind, server.parent_span_id, server.events) == ("SERVER", f"{0x99:016x}",
                                                                   ["switchboard.route", "switchboard.cache"])
    assert server.resource["service.name"] == "svc"


def _rows(trace_id: int) -> list[SpanRow]:
    """A trace of two spans, a CLIENT attempt and its SERVER request, with an event."""
    return [
        (trace_id, 0x2, 1, None, 0x1, False, "chat m", SpanKind.CLIENT, 10, 20,
         {"gen_ai.request.model": "m", "gen_ai.usage.input_tokens": 7, "switchboard.cost_usd": 0.25}, (), 0, None),
        (trace_id, 0x1, 1, None, None, False, "chat public", SpanKind.SERVER, 5, 30,
         {"switchboard.team": "a", "switchboard.request_id": f"req-{trace_id}"},
         (("switchboard.admission", {"switchboard.admission.used": (1.0, 2.5)}, 7),), 0, None),
    ]


class Finished:
    """A finished trace of two spans, numbered, as the queue sees one."""

    span_count = 2

    def __init__(self, number: int) -> None:
        self.number = number

    def rows(self) -> list[SpanRow]:
        return _rows(self.number)


def test_traces_encoded_one_by_one_join_into_the_request_a_batch_of_their_rows_makes() -> None:
    """The loop encodes the traces that end in a turn at its end; the export thread only joins them: the request is
    byte for byte the one encoding all their rows at once makes, and decodes to every span."""
    resource = {"service.name": "svc"}
    traces = [_rows(n) for n in (0xA1, 0xB2, 0xC3)]
    on_the_loop = SpanEncoder()
    joined = SpanEncoder().request_of(resource, SCOPE_NAME, [on_the_loop.framed_spans(rows) for rows in traces])
    assert joined == SpanEncoder().encode_rows([row for rows in traces for row in rows], resource, SCOPE_NAME)
    spans = decode(joined)
    assert [span.attributes.get("switchboard.request_id") for span in spans] == [
        None, "req-161", None, "req-178", None, "req-195"]
    assert count_spans(joined) == 6


def test_a_trace_the_queue_cannot_take_is_dropped_before_it_is_encoded() -> None:
    """A dead collector fills the queue; from then on a finished trace costs no encoding, only a count."""
    from gateway.telemetry.traces import EncodedTrace

    class CountingEncoder(SpanEncoder):
        encoded = 0

        def framed_spans(self, rows):  # type: ignore[no-untyped-def]
            CountingEncoder.encoded += 1
            return super().framed_spans(rows)

    sent: list[bytes] = []

    def send(traces: Sequence[EncodedTrace]) -> bool:
        sent.extend(trace.data for trace in traces)
        return True

    encoder = CountingEncoder()
    spans = SpanBatches(send, max_queue=5, max_batch=5, delay_s=3600,  # what gateway/telemetry/traces.py makes
                        queued_as=lambda trace: EncodedTrace(trace.span_count, encoder.framed_spans(trace.rows())))
    try:
        for number in range(1, 6):
            spans.add(Finished(number))  # type: ignore[arg-type]
        assert CountingEncoder.encoded == 2  # two traces of two spans fit in five
        assert spans.dropped_spans == 6
        assert spans.force_flush()
        assert sent == [SpanEncoder().framed_spans(_rows(number)) for number in (1, 2)]
    finally:
        spans.shutdown()


def _queue_on_the_loop(max_queue: int, failing: int | None = None) -> tuple[SpanBatches, list[int], list[bytes]]:
    """The OTLP path's queue as gateway/telemetry/traces.py makes it, with a delay no test waits out; the numbers of
    the traces it encoded (the one numbered `failing` raises instead), and what it sent."""
    from gateway.telemetry.traces import EncodedTrace

    made: list[int] = []
    sent: list[bytes] = []

    def queued_as(trace: Finished) -> EncodedTrace:
        if trace.number == failing:
            raise ValueError("encoder bug")
        made.append(trace.number)
        return EncodedTrace(trace.span_count, SpanEncoder().framed_spans(trace.rows()))

    def send(traces: Sequence[EncodedTrace]) -> bool:
        sent.extend(trace.data for trace in traces)
        return True

    spans = SpanBatches(send, max_queue=max_queue, max_batch=100, delay_s=3600,
                        queued_as=queued_as)  # type: ignore[arg-type]
    return spans, made, sent


def test_traces_that_end_in_one_loop_turn_are_encoded_together_at_its_end_and_none_is_lost() -> None:
    """On the event loop, traces are encoded once per loop turn, all that ended in it, in the order they ended;
    the queue's bound counts them from the moment they end; shutdown sends those of a turn not yet over, and a
    trace whose turn ends after the shutdown is counted as dropped, never lost silently."""
    import asyncio

    spans, made, sent = _queue_on_the_loop(max_queue=10)

    async def requests_ending() -> None:
        for number in (1, 2, 3):
            spans.add(Finished(number))  # type: ignore[arg-type]
        assert made == []  # the turn is not over
        await asyncio.sleep(0)  # the loop turns
        assert made == [1, 2, 3]
        for number in (4, 5, 6):  # 12 spans with those queued: the last does not fit, whether encoded yet or not
            spans.add(Finished(number))  # type: ignore[arg-type]
        assert spans.dropped_spans == 2
        await asyncio.sleep(0)
        assert made == [1, 2, 3, 4, 5]
        spans.add(Finished(7))  # type: ignore[arg-type]  # no room until the queue is sent
        assert spans.dropped_spans == 4
        assert spans.force_flush()  # (from the loop here: a caller off the loop does the same)
        spans.add(Finished(8))  # type: ignore[arg-type]
        spans.shutdown()  # mid-turn: trace 8 is encoded and sent by the shutdown itself
        assert made == [1, 2, 3, 4, 5, 8]
        spans.add(Finished(9))  # type: ignore[arg-type]  # after the shutdown: dropped and counted
        await asyncio.sleep(0)

    asyncio.run(requests_ending())
    assert sent == [SpanEncoder().framed_spans(_rows(number)) for number in (1, 2, 3, 4, 5, 8)]
    assert spans.dropped_spans == 6


def test_a_shutdown_from_another_thread_while_a_turn_ends_sends_every_trace_once() -> None:
    """A reload shuts the old queue down from a thread of its own while the loop goes on: the turn's traces are
    then queued by whichever side gets to them first, each exactly once, and all of them are sent."""
    import asyncio

    spans, made, sent = _queue_on_the_loop(max_queue=1000)

    async def requests_ending() -> None:
        for number in range(1, 101):
            spans.add(Finished(number))  # type: ignore[arg-type]
        # The loop turns (and queues the turn's traces) while the shutdown runs on another thread.
        await asyncio.to_thread(spans.shutdown)

    asyncio.run(requests_ending())
    assert sorted(made) == list(range(1, 101))
    assert sorted(sent) == sorted(SpanEncoder().framed_spans(_rows(number)) for number in range(1, 101))
    assert spans.dropped_spans == 0


def test_a_trace_that_fails_to_encode_is_dropped_and_counted_and_the_turn_goes_on(
        caplog: pytest.LogCaptureFixture) -> None:
    """An encoding bug costs that trace's spans (counted, logged), not its loop turn's other traces, nor later ones."""
    import asyncio

    spans, made, sent = _queue_on_the_loop(max_queue=100, failing=2)

    async def requests_ending() -> None:
        for number in (1, 2, 3):
            spans.add(Finished(number))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        spans.add(Finished(4))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert made == [1, 3, 4]  # in their turns, not left for the shutdown to find

    with caplog.at_level(logging.ERROR, logger="switchboard.telemetry"):
        asyncio.run(requests_ending())
    spans.shutdown()
    assert sent == [SpanEncoder().framed_spans(_rows(number)) for number in (1, 3, 4)]
    assert spans.dropped_spans == 2
    assert sum("encoding a finished trace failed" in record.message for record in caplog.records) == 1


def test_a_queued_trace_keeps_no_request_or_reply_alive() -> None:
    """A finished trace waits in the export queue for up to the schedule delay (and a queue's worth of them at
    once): it must not hold the exchange, the request body or the reply while it waits."""
    import gc
    import time
    import weakref

    from gateway.policy.schema import TracesPolicy
    from gateway.telemetry.request_trace import RequestTrace
    from gateway.telemetry.traces import Tracing

    class Exchange:
        def __init__(self) -> None:
            self.started = time.perf_counter()
            self.request_id = "req-1"
            self.response_headers: dict[str, str] = {}

    class Body(dict):  # type: ignore[type-arg]  # a dict that can be weakly referenced
        pass

    queued: list[RequestTrace] = []

    class Sink:
        def add(self, trace: RequestTrace) -> None:
            queued.append(trace)

    tracing = Tracing(TracesPolicy(exporter="otlp_http"), Resource.create({"service.name": "svc"}),
                      Sink(), None)  # type: ignore[arg-type]
    exchange, body = Exchange(), Body(messages=[{"role": "user", "content": "x" * 100_000}])
    trace = RequestTrace(tracing, "chat", {}, exchange)
    trace._body = body  # as `send` keeps it, for content recording
    trace.responded(b'{"id": "chatcmpl-1"}' + b" " * 100_000, "m", ("stop",))
    gone = [weakref.ref(exchange), weakref.ref(body)]
    trace.finish(None)  # no usage record: a 500, exported whatever the sampling
    del exchange, body, trace
    gc.collect()
    assert len(queued) == 1 and queued[0].span_count == 1
    assert [ref() for ref in gone] == [None, None]
    (row,) = queued[0].rows()
    assert row[10]["switchboard.request_id"] == "req-1"  # the attributes, built before the references went
