"""Settling a request: the usage record every finished request produces."""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import orjson

from gateway.policy.experiment_schema import SHADOW
from providers.base import Usage

access_log = logging.getLogger("switchboard.access")


@dataclass(slots=True)
class UsageRecord:
    """What one request used, settled once when its response (or stream) ends.

    Not frozen, though no sink may change it: built once per request on the hot path, and a frozen
    dataclass of this size took 2 µs longer to construct. Settlement builds it with positional arguments
    (gateway/accounting/settlement.py): a new field goes at the end, or that call changes with it.
    """

    request_id: str
    team: str
    key_id: str
    endpoint: str
    public_model: str
    provider: str | None
    upstream_model: str | None
    stream: bool
    status: int
    usage: Usage | None
    duration_ms: float
    overhead_ms: float
    time_to_first_token_ms: float | None = None
    # Why a stream ended early: "client_disconnected", "upstream_error", ...
    outcome: str = "completed"
    # What the usage cost in USD and which price version billed it (gateway/accounting/pricing.py);
    # None when the target has no price or nothing was used.
    cost_usd: float | None = None
    price_version: str | None = None
    # The W3C trace id (32 hex digits) when the request was traced.
    trace_id: str | None = None
    # Response cache (gateway/cache/): "hit", "miss" or "bypass" when the model caches, else None. A hit
    # is answered without an upstream call and bills nothing (`usage` is zero); `cache_tokens` are the
    # tokens it served and `cost_saved_usd` what they cost when the answer was first bought.
    cache: str | None = None
    cache_tokens: int = 0
    cost_saved_usd: float | None = None
    # The gateway's own id for the request (a UUIDv7, gateway/exchange.py): the ledger's key. `request_id` is
    # the client's when it sent one, so it identifies nothing on its own.
    gateway_id: str = ""
    # Attempts that failed after an upstream had started answering (a stream cut before its first content, a
    # deadline): their prompts, estimated, and what they cost. Included in `cost_usd` and in the limits.
    failed_attempt_tokens: int = 0
    failed_attempt_cost_usd: float | None = None
    # The semantic cache's embedding of the question (gateway/cache/semantic.py), on a hit or a miss: its
    # tokens and cost. Included in `cost_usd` and in the limits, like failed attempts.
    cache_overhead_tokens: int = 0
    cache_overhead_cost_usd: float | None = None
    # Cost attribution tags (gateway/accounting/tags.py): allow-listed (key, value) pairs sorted by key, or ().
    tags: tuple[tuple[str, str], ...] = ()
    # On a model with experiments (gateway/routing/experiments.py): "control", "canary" or "shadow" (a mirrored call,
    # not the client's request); None otherwise.
    variant: str | None = None
    # The budget hierarchy (gateway/accounting/hierarchy.py): the team's organisation, and the end user the request
    # named (validated; the id itself, even when its budget was the shared `other` bucket), or None.
    organization: str | None = None
    end_user: str | None = None


class UsageSink(Protocol):
    """Receives every settled record. Must not block: it runs on the event loop."""

    def record(self, record: UsageRecord) -> None: ...


class AccessLogSink:
    """Writes one JSON line per settled request (to stdout by default).

    The event loop appends each record to a list; every `flush_interval_s` (or
    sooner, once `batch_size` records wait) it serializes the batch into one
    block and hands that to a writer thread, which only writes. A slow terminal
    or pipe never stalls requests, and the thread wakes once per batch. Waking
    it per record cost ~14 µs of CPU per request at 4,000 req/s; serializing
    in the thread instead of the loop cost ~10 µs more in GIL hand-offs than
    the 2 µs the serialization itself takes (loadtests/README.md). Going
    through the logging module cost ~45 µs.

    Nothing here can stall or kill the gateway: at most `max_waiting` lines
    wait for the writer (a stuck reader of stdout would otherwise grow the
    queue without bound); lines beyond that, and lines a failing stream
    refuses (a closed pipe), are dropped and counted in `dropped` (exported
    as a metric). The writer keeps running after a failed write, so the log
    resumes when the stream takes writes again.
    """

    def __init__(self, stream: BinaryIO | None = None, *, flush_interval_s: float = 0.1,
                 batch_size: int = 512, max_waiting: int = 100_000) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._interval = flush_interval_s
        self._batch_size = batch_size
        self._max_waiting = max_waiting
        self._pending: list[bytes] = []
        self._flush_timer: asyncio.TimerHandle | None = None
        self._queue: queue.SimpleQueue[tuple[bytes, int] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._queued = 0  # lines handed to the writer: added on the loop, taken off by the writer
        self._queued_lock = threading.Lock()
        self._failing = False
        # Two counters, each added to by one thread only: lines refused because too many wait (the loop)
        # and lines the stream refused (the writer).
        self._overflowed = 0
        self._failed = 0
        self.written = 0

    @property
    def dropped(self) -> int:
        """Lines never written: refused while `max_waiting` lines waited, or refused by the stream."""
        return self._overflowed + self._failed

    @property
    def waiting(self) -> int:
        """Lines recorded and not yet written."""
        return len(self._pending) + self._queued

    def record(self, record: UsageRecord) -> None:
        pending = self._pending
        if len(pending) + self._queued >= self._max_waiting:
            self._overflowed += 1
            return
        # Serialized now: a list of bytes is invisible to the garbage collector, a list of records is not.
        pending.append(orjson.dumps(access_line(record), option=orjson.OPT_APPEND_NEWLINE))
        if len(pending) >= self._batch_size:
            self._hand_over()
        elif self._flush_timer is None:
            try:
                self._flush_timer = asyncio.get_running_loop().call_later(self._interval, self._hand_over)
            except RuntimeError:  # settled outside an event loop (a CLI tool, a test): write it now
                self._hand_over()

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is pending and stop the writer, waiting at most `timeout_s` (a stuck stream is left)."""
        self._hand_over()
        writer, self._writer = self._writer, None
        if writer is not None:
            self._queue.put(None)
            writer.join(timeout=timeout_s)
            if writer.is_alive():
                access_log.error("access log: the stream did not take %d lines within %.1fs of shutdown; "
                                 "they are not written", self._queued, timeout_s)
        if self.dropped:
            access_log.error("access log: %d lines were dropped (stream failing or too slow)", self.dropped)

    def _hand_over(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        if self._writer is None:
            self._writer = threading.Thread(target=self._write, name="switchboard-access-log", daemon=True)
            self._writer.start()
        with self._queued_lock:
            self._queued += len(batch)
        self._queue.put((b"".join(batch), len(batch)))

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            block, lines = item
            try:
                self._stream.write(block)
                self._stream.flush()
            except (OSError, ValueError) as exc:
                self._failed += lines
                if not self._failing:
                    self._failing = True
                    access_log.warning("access log stream failed (%s); dropping lines until it works again", exc)
            else:
                self.written += lines
                if self._failing:
                    self._failing = False
                    access_log.warning("access log stream works again (%d lines dropped so far)", self.dropped)
            finally:
                with self._queued_lock:
                    self._queued -= lines


def access_line(record: UsageRecord) -> dict[str, Any]:
    """The access log's JSON object: every field of the record, `usage` as an object or null.

    Spelled out because orjson encodes a dict of plain values in well under half the time it takes to
    walk a slotted dataclass (1.2 against 2.0 µs with building the dict, per request).
    """
    usage = record.usage
    return {
        "request_id": record.request_id, "gateway_id": record.gateway_id, "team": record.team,
        "key_id": record.key_id, "endpoint": record.endpoint,
        "public_model": record.public_model, "provider": record.provider, "upstream_model": record.upstream_model,
        "stream": record.stream, "status": record.status,
        "usage": None if usage is None else {
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "cached_tokens": usage.cached_tokens, "cache_write_tokens": usage.cache_write_tokens,
            "reasoning_tokens": usage.reasoning_tokens, "estimated": usage.estimated},
        "duration_ms": record.duration_ms, "overhead_ms": record.overhead_ms,
        "time_to_first_token_ms": record.time_to_first_token_ms, "outcome": record.outcome,
        "cost_usd": record.cost_usd, "price_version": record.price_version, "trace_id": record.trace_id,
        "cache": record.cache, "cache_tokens": record.cache_tokens, "cost_saved_usd": record.cost_saved_usd,
        "failed_attempt_tokens": record.failed_attempt_tokens,
        "failed_attempt_cost_usd": record.failed_attempt_cost_usd,
        "cache_overhead_tokens": record.cache_overhead_tokens,
        "cache_overhead_cost_usd": record.cache_overhead_cost_usd,
        "tags": record.tags, "variant": record.variant, "organization": record.organization,
        "end_user": record.end_user,
    }


class UsageRecorder:
    """Fans a settled record out to every sink; a failing sink never fails a request.

    `sinks` hear of every record. A sink that keeps only clients' requests (`client_requests_only`) or only
    shadow calls (`shadow_calls_only`, gateway/shadow_traffic.py) is handed only those: the choice is made once
    per record here, not by every such sink looking at every record and returning.
    """

    def __init__(self, sinks: Sequence[UsageSink], *, client_requests_only: Sequence[UsageSink] = (),
                 shadow_calls_only: Sequence[UsageSink] = ()) -> None:
        self._sinks = (*shadow_calls_only, *sinks, *client_requests_only)
        self._for_client_requests = (*sinks, *client_requests_only)
        self._for_shadow_calls = (*shadow_calls_only, *sinks)

    def close(self, timeout_s: float = 10.0) -> None:
        """Close every sink that has a `close`, within `timeout_s` in all (each gets what is left)."""
        deadline = time.monotonic() + timeout_s
        for sink in self._sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                if "timeout_s" in inspect.signature(close).parameters:
                    close(timeout_s=max(0.1, deadline - time.monotonic()))
                else:
                    close()

    def settle(self, record: UsageRecord) -> None:
        for sink in self._for_shadow_calls if record.variant == SHADOW else self._for_client_requests:
            try:
                sink.record(record)
            except Exception:
                logging.getLogger("switchboard.usage").exception("usage sink %r failed", sink)
