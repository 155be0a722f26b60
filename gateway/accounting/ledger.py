"""The durable usage ledger: one SQLite row per request, and spend reports from it.

`Ledger` is a usage sink. The event loop only puts a tuple on a queue; a
writer thread batches rows into one transaction every `flush_interval_s`
(WAL journal), so the request path never touches the disk. Rows are keyed by
the gateway's own id for the request (`gateway_id`, unguessable: no client can
name, and so overwrite or suppress, another request's row) and inserted with
`INSERT OR IGNORE`: a retried or replayed write never counts twice. The
client's `x-request-id` is data in its own column. A `kill -9` loses at most
the rows of the last interval.

A batch SQLite refuses (a lock held by another process, a disk error) is not
dropped: it goes to a bounded spill file beside the ledger
(`<ledger>.spill.jsonl`, gateway/accounting/spill.py) and is retried with backoff,
before newer rows, until it is stored; a restart replays it too. `waiting`
and `lost` (rows the full spill could not take) are exported as metrics.

Reports (`switchboard spend`, `GET /admin/spend`) group the rows by team,
model, key or UTC day and sum tokens and cost.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import operator
import queue
import sqlite3
import threading
import time
import uuid
from itertools import chain, compress
from operator import is_not
from pathlib import Path
from typing import Any

from gateway.accounting.spill import Spill
from gateway.accounting.tags import tags_json
from gateway.accounting.usage import UsageRecord

log = logging.getLogger("switchboard.ledger")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    gateway_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    ts REAL NOT NULL,
    day TEXT NOT NULL,
    team TEXT NOT NULL,
    key_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    public_model TEXT NOT NULL,
    provider TEXT,
    upstream_model TEXT,
    stream INTEGER NOT NULL,
    status INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    usage_estimated INTEGER NOT NULL,
    cost_usd REAL,
    price_version TEXT,
    duration_ms REAL NOT NULL,
    ttft_ms REAL,
    trace_id TEXT,
    cache TEXT,
    cache_tokens INTEGER NOT NULL DEFAULT 0,
    cost_saved_usd REAL,
    failed_attempt_tokens INTEGER NOT NULL DEFAULT 0,
    failed_attempt_cost_usd REAL,
    cache_overhead_tokens INTEGER NOT NULL DEFAULT 0,
    cache_overhead_cost_usd REAL,
    tags TEXT,
    variant TEXT,
    organization TEXT,
    end_user TEXT
);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
CREATE INDEX IF NOT EXISTS usage_request_id ON usage (request_id);
"""
# Columns added after the first release: a ledger file written by an older gateway gets them on open.
_ADDED_COLUMNS = (("cache", "TEXT"), ("cache_tokens", "INTEGER NOT NULL DEFAULT 0"), ("cost_saved_usd", "REAL"),
                  ("failed_attempt_tokens", "INTEGER NOT NULL DEFAULT 0"), ("failed_attempt_cost_usd", "REAL"),
                  ("cache_overhead_tokens", "INTEGER NOT NULL DEFAULT 0"), ("cache_overhead_cost_usd", "REAL"),
                  ("tags", "TEXT"), ("variant", "TEXT"), ("organization", "TEXT"),
                  ("end_user", "TEXT"))
_COLUMNS = ("gateway_id", "request_id", "ts", "day", "team", "key_id", "endpoint", "public_model", "provider",
            "upstream_model", "stream", "status", "outcome", "prompt_tokens", "completion_tokens", "cached_tokens",
            "cache_write_tokens", "reasoning_tokens", "usage_estimated", "cost_usd", "price_version", "duration_ms",
            "ttft_ms", "trace_id", "cache", "cache_tokens", "cost_saved_usd", "failed_attempt_tokens",
            "failed_attempt_cost_usd", "cache_overhead_tokens", "cache_overhead_cost_usd", "tags", "variant",
            "organization", "end_user")
# A row spilled by an older gateway has fewer columns: the newer ones take these values.
_LATER_DEFAULTS = (0, None, 0, None, None, None, None, None)
_NONES = (None,) * len(_COLUMNS)
_MAX_BATCH = 2000
# How long one write waits for another connection's lock before the batch is spilled and retried later.
_BUSY_TIMEOUT_S = 2.0
_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 2.0


class _Flush:
    __slots__ = ("done", "stored")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.stored = False


def _sort(item: tuple[Any, ...] | _Flush | None, batch: list[tuple[Any, ...]], markers: list[_Flush]) -> bool:
    """File one queued item: a row into `batch`, a flush request into `markers`; True for the stop signal."""
    if item is None:
        return True
    if isinstance(item, _Flush):
        markers.append(item)
    else:
        batch.append(item)
    return False


class Ledger:
    """A usage sink that appends every settled request to a SQLite file, off the event loop."""

    def __init__(self, path: str | Path, flush_interval_s: float = 0.5) -> None:
        self.path = Path(path)
        self._interval = flush_interval_s
        self._queue: queue.SimpleQueue[tuple[Any, ...] | _Flush | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._urgent = threading.Event()  # set when the writer should stop gathering rows and write now
        self._lock = threading.Lock()
        self._spill = Spill(self.path.with_name(self.path.name + ".spill.jsonl"))
        self._held = 0  # rows the writer has taken off the queue and not yet stored or spilled
        self._stop_by = float("inf")  # monotonic time by which close() wants the writer gone
        self.written = 0
        self.lost = 0  # rows neither SQLite nor the spill file took (logged; a metric that should stay 0)

    @property
    def waiting(self) -> int:
        """Rows recorded but not yet in the ledger file (queued, being written, or spilled)."""
        return self._queue.qsize() + self._held + self._spill.rows

    def record(self, record: UsageRecord, at: float | None = None) -> None:
        """Enqueue the record's row, stamped now (or `at`: synthetic ledgers, tests). Never blocks once `open()`
        ran; without it, the first call opens the file, waiting up to the busy timeout for another process."""
        # Queued before the writer starts: if starting fails (the file cannot be opened now), the row waits for
        # the next record's attempt instead of being lost.
        self._queue.put(_row(record, time.time() if at is None else at))
        if self._writer is None:
            self.open()
        if self._queue.qsize() >= _MAX_BATCH:
            self._urgent.set()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Block until everything recorded so far is committed (call it off the event loop).

        False when that did not happen within `timeout_s`, or SQLite refused the rows (they wait in the spill).
        """
        if self._writer is None:
            if not self._spill.rows:
                return True
            self.open()  # rows spilled before a restart: write them now, not at the first request
        marker = _Flush()
        self._queue.put(marker)
        self._urgent.set()
        return marker.done.wait(timeout_s) and marker.stored

    def close(self, timeout_s: float = 10.0) -> None:
        """Commit what is queued and stop the writer within `timeout_s` (blocking: call it off the loop).

        Rows SQLite will not take in time stay in the spill file for the next start; the log says how many,
        and how many could not even be spilled.
        """
        writer, self._writer = self._writer, None
        if writer is None:
            return
        self._stop_by = time.monotonic() + timeout_s
        self._queue.put(None)
        self._urgent.set()
        writer.join(timeout=timeout_s)
        if writer.is_alive():
            log.error("usage ledger %s: the writer did not stop within %.1fs; %d rows not written",
                      self.path, timeout_s, self.waiting)
        elif self._spill.rows:
            log.error("usage ledger %s: %d rows could not be written before shutdown; they are kept in %s and "
                      "written at the next start", self.path, self._spill.rows, self._spill.path)
        if self.lost:
            log.error("usage ledger %s: %d rows were lost (the spill file was full or unwritable)",
                      self.path, self.lost)

    def open(self) -> None:
        """Create (or open) the file and start the writer, unless started: blocking, so call it off the event loop.

        The gateway calls it at startup, so a path it cannot write fails the start, rows spilled before the last
        shutdown are written at once, and no request waits on the file. Raises OSError or sqlite3.Error.
        """
        with self._lock:
            if self._writer is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)  # e.g. the demo's .switchboard/
                open_ledger(self.path).close()  # create the file and table up front, so a bad path fails loudly
                self._writer = threading.Thread(target=self._write, name="switchboard-ledger", daemon=True)
                self._writer.start()

    def _write(self) -> None:
        connection = open_ledger(self.path, busy_timeout_s=_BUSY_TIMEOUT_S)
        retry = _Retry()
        try:
            self._store(connection, [], retry)  # rows spilled before the last shutdown
            stopping = False
            while not stopping:
                batch: list[tuple[Any, ...]] = []
                markers: list[_Flush] = []
                try:
                    # With rows spilled, wake up to retry them even when nothing new comes.
                    wait = max(0.01, retry.at - time.monotonic()) if self._spill.rows else None
                    stopping = _sort(self._queue.get(timeout=wait), batch, markers)
                except queue.Empty:
                    self._store(connection, [], retry)
                    continue
                if not (stopping or markers):
                    # Let rows gather for the interval without taking them one by one: each `get` would wake
                    # this thread, and take the GIL from the event loop, once per request. A full batch, a
                    # flush or close wakes it early.
                    self._urgent.wait(self._interval)
                self._urgent.clear()  # before draining: a wake-up after this finds its rows in the next batch
                while stopping or markers or len(batch) < _MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    stopping = _sort(item, batch, markers) or stopping
                self._held = len(batch)
                if stopping:
                    # One last try within the grace close() gave; what SQLite refuses stays spilled.
                    retry.at = 0.0
                    # Leave a fifth of the grace for spilling what SQLite will not take.
                    wait_s = max(0.0, min(_BUSY_TIMEOUT_S, (self._stop_by - time.monotonic()) * 0.8))
                    connection.execute(f"PRAGMA busy_timeout = {int(wait_s * 1000)}")
                stored = self._store(connection, batch, retry) if batch or self._spill.rows else True
                for marker in markers:
                    marker.stored = stored
                    marker.done.set()
        finally:
            connection.close()

    def _store(self, connection: sqlite3.Connection, batch: list[tuple[Any, ...]], retry: _Retry) -> bool:
        """Commit the spilled rows and `batch`, or spill `batch`; True when nothing is left waiting."""
        spilled = self._spill.rows
        if spilled and time.monotonic() < retry.at:
            self._to_spill(batch)
            return False
        rows = [*map(_complete, self._spill.read()), *batch] if spilled else batch
        if not rows:
            return True
        try:
            with connection:
                insert_rows(connection, rows)
        except sqlite3.Error as exc:
            retry.failed()
            if retry.failures == 1:
                log.error("usage ledger %s: could not write %d rows (%s); keeping them in %s and retrying",
                          self.path, len(rows), exc, self._spill.path)
            self._to_spill(batch)
            return False
        if spilled:
            self._spill.clear()
            if retry.failures:
                log.warning("usage ledger %s: writing again; %d held-back rows stored", self.path, spilled)
        retry.reset()
        self.written += len(rows)
        self._held = 0
        return True

    def _to_spill(self, batch: list[tuple[Any, ...]]) -> None:
        lost = self._spill.append(batch)
        self._held = 0
        if lost:
            self.lost += lost
            log.error("usage ledger %s: %d rows lost: the spill file %s is full (%d bytes) or unwritable",
                      self.path, lost, self._spill.path, self._spill.size)


class _Retry:
    """When the writer may next try SQLite after a failure (exponential backoff, capped)."""

    __slots__ = ("at", "delay", "failures")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.at = 0.0
        self.delay = _FIRST_BACKOFF_S
        self.failures = 0

    def failed(self) -> None:
        self.failures += 1
        self.at = time.monotonic() + self.delay
        self.delay = min(self.delay * 2, _MAX_BACKOFF_S)


def open_ledger(path: str | Path, busy_timeout_s: float = 10.0) -> sqlite3.Connection:
    """A connection to the ledger file, creating it (and its table) if needed, upgrading an older one."""
    connection = sqlite3.connect(str(path), timeout=busy_timeout_s, check_same_thread=False)
    _switch_to_wal(connection, time.monotonic() + busy_timeout_s)
    connection.execute("PRAGMA synchronous=NORMAL")
    present = {row[1] for row in connection.execute("PRAGMA table_info(usage)")}
    if present and "gateway_id" not in present:
        _rekey(connection, present)
    connection.executescript(_SCHEMA)
    present = {row[1] for row in connection.execute("PRAGMA table_info(usage)")}
    for name, declaration in _ADDED_COLUMNS:
        if name not in present:
            with connection:
                connection.execute(f"ALTER TABLE usage ADD COLUMN {name} {declaration}")
    return connection


def _switch_to_wal(connection: sqlite3.Connection, deadline: float) -> None:
    """Put the file in WAL mode, waiting (until `deadline`) for other processes doing the same.

    Replicas sharing a new ledger file open it at once. Switching the journal mode takes an exclusive lock, and
    SQLite answers "database is locked" at once, without its busy handler, when another connection is switching
    it too (6 processes opening a new file together: 2 failures in 20 trials). The row that opened the ledger
    was then lost. Once one switch has won, the mode is kept in the file and the others' switch is a no-op.
    """
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)  # another process holds the lock for a moment: the busy handler's own back-off


def _rekey(connection: sqlite3.Connection, present: set[str]) -> None:
    """Rebuild a ledger keyed by the client's request id into one keyed by `gateway_id`, in one transaction.

    Old rows keep their request id as their gateway id (it was their key, so it is unique among them).
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        present = {row[1] for row in connection.execute("PRAGMA table_info(usage)")}
        if "gateway_id" not in present:  # another process may have upgraded it while we waited for the lock
            connection.execute("ALTER TABLE usage RENAME TO usage_before_gateway_id")
            connection.execute("DROP INDEX IF EXISTS usage_ts")
            for statement in _SCHEMA.split(";"):  # not executescript: it would commit the open transaction
                if statement.strip():
                    connection.execute(statement)
            copied = [c for c in _COLUMNS[1:] if c in present]
            connection.execute(f"INSERT INTO usage (gateway_id, {', '.join(copied)}) "
                               f"SELECT request_id, {', '.join(copied)} FROM usage_before_gateway_id")
            connection.execute("DROP TABLE usage_before_gateway_id")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    log.warning("usage ledger upgraded: rows are now keyed by the gateway's own request id (gateway_id)")


def insert_rows(connection: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """`INSERT OR IGNORE` ledger rows (`_COLUMNS`' order) within the caller's transaction, grouped by which of
    their columns are NULL: each group names only its other columns, and the NULL ones take their default (NULL).

    Python's sqlite3 binds a None through its adapter lookup, which formats an AttributeError's message on the way
    (~2,000 instructions); a request's row has about nine. And a statement inserts up to 64 rows, not one as with
    `executemany`: fewer instructions a row, and one release of the GIL per statement stepped instead of per row
    (loadtests/README.md, "Round twelve"). The rows of a batch mostly share one NULL pattern.
    """
    groups: dict[tuple[bool, ...], list[tuple[Any, ...]]] = {}
    for row in rows:
        present = tuple(map(is_not, row, _NONES))
        group = groups.get(present)
        if group is None:
            group = groups[present] = []
        group.append(tuple(compress(row, present)))
    variables = connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    for present, group in groups.items():
        # Statements of 64 rows (fewer when SQLite allows fewer variables), then halving sizes for the rest: a few
        # statement texts per pattern, which sqlite3's statement cache keeps prepared.
        size = _ROWS_PER_STATEMENT
        while size > 1 and size * len(group[0]) > variables:
            size //= 2
        at = 0
        while at < len(group):
            while size > len(group) - at:
                size //= 2
            connection.execute(_insert(present, size), list(chain.from_iterable(group[at:at + size])))
            at += size


_ROWS_PER_STATEMENT = 64


@functools.lru_cache(maxsize=256)
def _insert(present: tuple[bool, ...], rows: int) -> str:
    """`INSERT OR IGNORE` of `rows` rows of the columns `present` marks."""
    columns = list(compress(_COLUMNS, present))
    values = f"({', '.join('?' * len(columns))})"
    return f"INSERT OR IGNORE INTO usage ({', '.join(columns)}) VALUES {', '.join([values] * rows)}"


def _complete(row: Any) -> tuple[Any, ...]:
    missing = len(_COLUMNS) - len(row)
    return (*row, *_LATER_DEFAULTS[len(_LATER_DEFAULTS) - missing:]) if 0 < missing <= len(_LATER_DEFAULTS) \
        else tuple(row)


@functools.lru_cache(maxsize=4)
def _utc_day(day: int) -> str:
    """The UTC date of a day number since the epoch: a row's `day` column, worked out once a day, not per row."""
    return (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()


# The record's fields in the ledger's column order, in runs between the columns that are computed: one C-level
# `attrgetter` call per run instead of ~30 attribute reads (the row is built once per request).
_NAMES = operator.attrgetter("team", "key_id", "endpoint", "public_model", "provider", "upstream_model")
_OUTCOME = operator.attrgetter("status", "outcome")
_TOKENS = operator.attrgetter("prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens",
                              "reasoning_tokens")
_NO_USAGE = (0, 0, 0, 0, 0, 0)  # the token columns and usage_estimated of a record without usage
_COSTS = operator.attrgetter("cost_usd", "price_version", "duration_ms", "time_to_first_token_ms", "trace_id", "cache",
                             "cache_tokens", "cost_saved_usd", "failed_attempt_tokens", "failed_attempt_cost_usd",
                             "cache_overhead_tokens", "cache_overhead_cost_usd")
_OWNERS = operator.attrgetter("variant", "organization", "end_user")


def _row(record: UsageRecord, now: float) -> tuple[Any, ...]:
    """The record as a ledger row (`_COLUMNS`' order). A record without a gateway id (made outside the pipeline)
    gets a random one: the client's request id is never a key."""
    usage = record.usage
    tags = record.tags
    return (
        record.gateway_id or uuid.uuid4().hex, record.request_id, now, _utc_day(int(now // 86_400)),
        *_NAMES(record), int(record.stream), *_OUTCOME(record),
        *((*_TOKENS(usage), int(usage.estimated)) if usage else _NO_USAGE),
        *_COSTS(record), tags_json(tags) if tags else None, *_OWNERS(record),
    )
