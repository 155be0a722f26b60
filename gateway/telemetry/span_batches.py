"""Finished traces waiting for export, sent in batches from a thread of their own.

What the SDK's `BatchSpanProcessor` does for `ReadableSpan`s, for the
gateway's own traces on the OTLP/HTTP path: a request hands over its finished
trace, queued as what `queued_as` makes of it (its encoded spans,
gateway/telemetry/traces.py), and the export thread joins a batch of them into
one request and posts it.

On the event loop, `queued_as` runs once per loop turn for every trace that
ended in it, not as each one ends. Under load several requests end per turn
(a median of about seven at 32 in flight), and encoding them one after another
finds the encoder's memos and code still in the CPU's caches: a trace encoded
between two requests' work cost about twice what it costs in a run of them
(loadtests/README.md, round eleven). The policy's `telemetry.traces.batch` sets
the same four things as for the SDK's processor, counted in spans: how many
may wait (a trace that would pass the bound is dropped, and counted), how many
make a batch, the longest one waits, and how long one export may take. The
spans of a batch whose export fails are counted as dropped too
(`dropped_spans`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

log = logging.getLogger("switchboard.telemetry")


class FinishedTrace(Protocol):
    @property
    def span_count(self) -> int: ...


class SpanBatches:
    """A bounded queue of finished traces and the thread that exports them, `max_batch` spans at a time."""

    def __init__(self, send: Callable[[Sequence[FinishedTrace]], bool], *, max_queue: int, max_batch: int,
                 delay_s: float, close_exporter: Callable[[], None] = lambda: None,
                 queued_as: Callable[[FinishedTrace], FinishedTrace] | None = None) -> None:
        self._send = send
        # What a trace is queued as (the OTLP path: its encoded spans, gateway/telemetry/traces.py), made only for a
        # trace the queue takes; None: the trace itself.
        self._queued_as = queued_as
        self._close_exporter = close_exporter
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._delay_s = delay_s
        self._queue: deque[FinishedTrace] = deque()  # appended on the loop, popped by the exporting thread
        # Traces that ended in this loop turn, made into what is queued at its end (`_queue_ended`), and their spans.
        self._ended: deque[FinishedTrace] = deque()
        self._ended_spans = 0
        # Held while ended traces are moved to `_queue`, so `shutdown` (on another thread) never closes the queue
        # with a trace halfway there.
        self._queueing = threading.Lock()
        # Spans in `_queue` = added - taken (a trace has one per upstream attempt, and its own). Each counter is
        # written by one side only, so neither loses an update to the other.
        self._added_spans = 0
        self._taken_spans = 0
        # Spans dropped: refused by a full queue or lost to an encoding error (counted on the loop) and in batches
        # that failed (counted by whoever holds `_exporting`: the export thread, or a caller's `force_flush`).
        self._refused_spans = 0
        self._failed_spans = 0
        self._warned = False
        self._closed = False
        self._wake = threading.Event()
        self._exporting = threading.Lock()  # the export thread, or a caller's `force_flush`
        self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
        self._thread.start()

    def add(self, trace: FinishedTrace) -> None:
        """Take a finished trace: queued at the end of this loop turn (at once off a loop, or with no
        `queued_as`), or dropped now when the queue has no room for it."""
        spans = trace.span_count
        if self._closed or self._added_spans - self._taken_spans + self._ended_spans + spans > self._max_queue:
            self._drop(spans)
            return
        if self._queued_as is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on a loop (a test, a tool): queued now, below
                pass
            else:
                if not self._ended:
                    loop.call_soon(self._queue_ended)
                self._ended.append(trace)
                self._ended_spans += spans
                return
        with self._queueing:
            self._enqueue(trace if self._queued_as is None else self._queued_as(trace), spans)

    def _queue_ended(self) -> None:
        """Queue the traces that ended in the loop turn just run, as `queued_as` makes them."""
        ended, make = self._ended, self._queued_as
        assert make is not None
        with self._queueing:
            while ended:
                trace = ended.popleft()
                spans = trace.span_count
                self._ended_spans -= spans
                if self._closed:  # shut down meanwhile (`shutdown` queues what it finds first)
                    self._drop(spans)
                    continue
                try:
                    item = make(trace)
                except Exception:  # a bug in encoding loses that trace, never the turn's others or later ones
                    log.exception("encoding a finished trace failed; its %d spans are dropped", spans)
                    self._refused_spans += spans
                    continue
                self._enqueue(item, spans)

    def _enqueue(self, item: FinishedTrace, spans: int) -> None:
        queued = self._added_spans - self._taken_spans
        self._queue.append(item)
        self._added_spans += spans
        if queued + spans >= self._max_batch:
            self._wake.set()

    @property
    def dropped_spans(self) -> int:
        """Spans that were not delivered: the queue was full, or their batch's export failed or raised."""
        return self._refused_spans + self._failed_spans

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export everything queued now, from the calling thread (blocking: call it off the event loop)."""
        if self._ended:  # traces of a loop turn not yet over
            self._queue_ended()
        if not self._exporting.acquire(timeout=timeout_millis / 1000):
            return False
        try:
            self._export(everything=True)
        finally:
            self._exporting.release()
        return True

    def shutdown(self) -> None:
        """Export what is queued, stop the thread, close the exporter (blocking: call it off the event loop)."""
        if self._closed:
            return
        if self._ended:  # traces of a loop turn not yet over: queued here, to be sent with the rest
            self._queue_ended()
        with self._queueing:
            self._closed = True
        self._wake.set()
        self._thread.join()
        self._close_exporter()

    def _run(self) -> None:
        while not self._closed:
            full = self._wake.wait(self._delay_s)
            # Cleared before exporting: a batch filled meanwhile sets it again, and is not left waiting.
            self._wake.clear()
            with self._exporting:
                self._export(everything=not full)
        with self._exporting:
            self._export(everything=True)

    def _export(self, *, everything: bool) -> None:
        """Send full batches; with `everything`, the last partial one too."""
        queue = self._queue
        while queue and (everything or self._added_spans - self._taken_spans >= self._max_batch):
            batch, spans = [], 0
            while queue and spans < self._max_batch:
                trace = queue.popleft()
                batch.append(trace)
                spans += trace.span_count
            self._taken_spans += spans
            try:
                delivered = self._send(batch)
            except Exception:  # a bug in encoding must not kill the export thread
                log.exception("span export raised; %d spans dropped", spans)
                delivered = False
            if not delivered:
                self._failed_spans += spans
        if not queue:
            self._warned = False  # a later overflow is a new episode, worth a line of its own

    def _drop(self, spans: int) -> None:
        self._refused_spans += spans
        if not self._warned:
            self._warned = True
            log.warning("span export queue full (%d spans): dropping new traces until it drains", self._max_queue)
