"""The durable usage ledger: one SQLite row per request, and spend reports from it.

`Ledger` is a usage sink. The event loop only puts a tuple on a queue; a
writer thread batches rows into one transaction every `flush_interval_s`
(WAL journal), so the request path never touches the disk. Rows are keyed by
request id and inserted with `INSERT OR IGNORE`: a retried or replayed write
never counts twice. A `kill -9` loses at most the rows of the last interval.

Reports (`switchboard spend`, `GET /admin/spend`) group the rows by team,
model, key or UTC day and sum tokens and cost.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from gateway.auth import authenticate_admin
from gateway.errors import ErrorKind, GatewayError
from gateway.usage import UsageRecord

log = logging.getLogger("switchboard.ledger")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    request_id TEXT PRIMARY KEY,
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
    cost_saved_usd REAL
);
CREATE INDEX IF NOT EXISTS usage_ts ON usage (ts);
"""
# Columns added after the first release: a ledger file written by an older gateway gets them on open.
_ADDED_COLUMNS = (("cache", "TEXT"), ("cache_tokens", "INTEGER NOT NULL DEFAULT 0"), ("cost_saved_usd", "REAL"))
_COLUMNS = ("request_id", "ts", "day", "team", "key_id", "endpoint", "public_model", "provider", "upstream_model",
            "stream", "status", "outcome", "prompt_tokens", "completion_tokens", "cached_tokens",
            "cache_write_tokens", "reasoning_tokens", "usage_estimated", "cost_usd", "price_version", "duration_ms",
            "ttft_ms", "trace_id", "cache", "cache_tokens", "cost_saved_usd")
_INSERT = f"INSERT OR IGNORE INTO usage ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_GROUPS = {"team": "team", "model": "public_model", "key": "team, key_id", "day": "day"}
_MAX_BATCH = 2000


class _Flush:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


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
        self._lock = threading.Lock()
        self.written = 0

    def record(self, record: UsageRecord) -> None:
        """Enqueue the record's row; never blocks."""
        if self._writer is None:
            self._start()
        self._queue.put(_row(record, time.time()))

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Block until everything recorded so far is committed (call it off the event loop)."""
        if self._writer is None:
            return True
        marker = _Flush()
        self._queue.put(marker)
        return marker.done.wait(timeout_s)

    def close(self) -> None:
        """Commit what is queued and stop the writer."""
        writer, self._writer = self._writer, None
        if writer is not None:
            self._queue.put(None)
            writer.join(timeout=10)

    def _start(self) -> None:
        with self._lock:
            if self._writer is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)  # e.g. the demo's .switchboard/
                open_ledger(self.path).close()  # create the file and table up front, so a bad path fails loudly
                self._writer = threading.Thread(target=self._write, name="switchboard-ledger", daemon=True)
                self._writer.start()

    def _write(self) -> None:
        connection = open_ledger(self.path)
        try:
            stopping = False
            while not stopping:
                batch: list[tuple[Any, ...]] = []
                markers: list[_Flush] = []
                stopping = _sort(self._queue.get(), batch, markers)
                deadline = time.monotonic() + self._interval
                while not (stopping or markers or len(batch) >= _MAX_BATCH):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        stopping = _sort(self._queue.get(timeout=remaining), batch, markers)
                    except queue.Empty:
                        break
                if stopping or markers:  # take whatever else is already queued
                    while True:
                        try:
                            item = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        stopping = _sort(item, batch, markers) or stopping
                if batch:
                    self._commit(connection, batch)
                for marker in markers:
                    marker.done.set()
        finally:
            connection.close()

    def _commit(self, connection: sqlite3.Connection, batch: list[tuple[Any, ...]]) -> None:
        try:
            with connection:
                connection.executemany(_INSERT, batch)
            self.written += len(batch)
        except sqlite3.Error:
            log.exception("usage ledger %s: could not write %d rows", self.path, len(batch))


def open_ledger(path: str | Path) -> sqlite3.Connection:
    """A connection to the ledger file, creating it (and its table) if needed."""
    connection = sqlite3.connect(str(path), timeout=10, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.executescript(_SCHEMA)
    present = {row[1] for row in connection.execute("PRAGMA table_info(usage)")}
    for name, declaration in _ADDED_COLUMNS:
        if name not in present:
            with connection:
                connection.execute(f"ALTER TABLE usage ADD COLUMN {name} {declaration}")
    return connection


def _row(record: UsageRecord, now: float) -> tuple[Any, ...]:
    usage = record.usage
    return (
        record.request_id, now, dt.datetime.fromtimestamp(now, dt.UTC).date().isoformat(), record.team,
        record.key_id, record.endpoint, record.public_model, record.provider, record.upstream_model,
        int(record.stream), record.status, record.outcome,
        usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
        usage.cached_tokens if usage else 0, usage.cache_write_tokens if usage else 0,
        usage.reasoning_tokens if usage else 0, int(usage.estimated) if usage else 0,
        record.cost_usd, record.price_version, record.duration_ms, record.time_to_first_token_ms, record.trace_id,
        record.cache, record.cache_tokens, record.cost_saved_usd,
    )


# --- reports ----------------------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+)([hdw])$")


def parse_since(text: str | None, now: float | None = None) -> float:
    """A start time: an ISO date or datetime (UTC unless it has an offset), or relative like 24h, 7d, 4w."""
    now = time.time() if now is None else now
    if not text:
        return 0.0
    relative = _RELATIVE.match(text.strip())
    if relative:
        amount, unit = int(relative.group(1)), relative.group(2)
        return now - amount * {"h": 3600, "d": 86400, "w": 604800}[unit]
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a time: use 2026-11-01, 2026-11-01T12:00, 24h, 7d or 4w") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def spend(path: str | Path, by: str, since: float = 0.0, until: float | None = None) -> list[dict[str, Any]]:
    """Spend per group (`team`, `model`, `key` or `day`) between two unix times, most expensive first."""
    if by not in _GROUPS:
        raise ValueError(f"--by must be one of {', '.join(_GROUPS)}")
    columns = _GROUPS[by]
    query = (f"SELECT {columns}, COUNT(*), SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens), "
             f"SUM(COALESCE(cost_usd, 0)), SUM(cost_usd IS NULL AND status < 400), "
             f"COUNT(CASE WHEN cache = 'hit' THEN 1 END), SUM(cache_tokens), SUM(COALESCE(cost_saved_usd, 0)) "
             f"FROM usage "
             f"WHERE ts >= ? AND ts < ? GROUP BY {columns} ORDER BY {6 + columns.count(',')} DESC")
    connection = open_ledger(path)
    try:
        rows = connection.execute(query, (since, until if until is not None else float("inf"))).fetchall()
    finally:
        connection.close()
    groups = (c.strip().replace("public_model", "model") for c in columns.split(","))
    keys = [*groups, "requests", "input_tokens", "cached_input_tokens",
            "output_tokens", "cost_usd", "unpriced_requests", "cache_hits", "cache_tokens", "cost_saved_usd"]
    report = [dict(zip(keys, row, strict=True)) for row in rows]
    for entry in report:
        entry["cost_usd"] = round(entry["cost_usd"], 10)
        entry["cost_saved_usd"] = round(entry["cost_saved_usd"], 10)
    return report


def render_report(report: Sequence[Mapping[str, Any]], fmt: str) -> str:
    """A report as `json`, `csv` or an aligned `table`."""
    if fmt == "json":
        return orjson.dumps(list(report), option=orjson.OPT_INDENT_2).decode() + "\n"
    if not report:
        return "" if fmt == "csv" else "(no usage in this period)\n"
    columns = list(report[0])
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(report)
        return out.getvalue()
    cells = [[str(entry[c]) for c in columns] for entry in report]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines) + "\n"


# --- GET /admin/spend -------------------------------------------------------------------------


class SpendRoute:
    """GET /admin/spend?by=team|model|key|day&since=...&until=...&format=json|csv (admin key)."""

    def __init__(self, ledger: Ledger | None) -> None:
        self._ledger = ledger

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        import asyncio
        from urllib.parse import parse_qs

        from gateway.asgi import request_headers, send_reply
        from gateway.errors import render
        from gateway.pipeline import Reply

        policy = scope["app"].state.services.policy()
        try:
            authenticate_admin(policy, request_headers(scope))
            ledger = self._ledger
            if ledger is None:
                raise GatewayError(ErrorKind.NOT_FOUND, "No usage ledger is configured (set `ledger.path`).",
                                   code="ledger_not_configured")
            query = {k: v[0] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
            by, fmt = query.get("by", "team"), query.get("format", "json")
            if fmt not in ("json", "csv"):
                raise GatewayError(ErrorKind.BAD_REQUEST, "format must be json or csv.", param="format")
            try:
                since = parse_since(query.get("since"))
                until = parse_since(query["until"]) if query.get("until") else None
            except ValueError as exc:
                raise GatewayError(ErrorKind.BAD_REQUEST, str(exc), param="since") from exc
            if by not in _GROUPS:
                raise GatewayError(ErrorKind.BAD_REQUEST, f"by must be one of {', '.join(_GROUPS)}.", param="by")

            def report() -> list[dict[str, Any]]:
                ledger.flush()
                return spend(ledger.path, by, since, until)

            rows = await asyncio.to_thread(report)
        except GatewayError as error:
            await send_reply(send, Reply(*render(error)))
            return
        body = render_report(rows, fmt).encode()
        content_type = b"text/csv; charset=utf-8" if fmt == "csv" else b"application/json"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def print_spend(policy_path: str, by: str, since: str | None, until: str | None, fmt: str) -> int:
    """`switchboard spend`: report from the ledger file the policy's `ledger.path` names."""
    import sys

    from gateway.policy import PolicyError, load_policy

    try:
        policy = load_policy(policy_path)
    except PolicyError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    if policy.ledger_path is None:
        sys.stderr.write(f"{policy_path}: no usage ledger configured (set ledger.path)\n")
        return 1
    if not policy.ledger_path.exists():
        sys.stderr.write(f"{policy.ledger_path}: no ledger file yet (the gateway creates it on the first request)\n")
        return 1
    try:
        report = spend(policy.ledger_path, by, parse_since(since), parse_since(until) if until else None)
    except ValueError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    sys.stdout.write(render_report(report, fmt))
    return 0
