"""The embedded single-node store: counters in memory, snapshotted to SQLite.

The request path never touches the disk: the in-memory counters are
authoritative and a background thread writes the keys changed since its last
pass every `flush_interval_s` (SQLite in WAL mode, one transaction per pass).
A clean shutdown writes a final snapshot, so a restart loses nothing; after
`kill -9` at most one interval of spend is lost.

One process owns the file (an exclusive lock next to it), because two
processes each keeping their own in-memory counters would overwrite each
other's snapshots. Several workers or replicas need `redis://`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gateway.state.memory import MemoryStore

log = logging.getLogger("switchboard.state")

_SCHEMA = "CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL, expires_at INTEGER)"


class StateFileBusy(Exception):
    """Another process already owns the durable state file."""


class DurableStore(MemoryStore):
    def __init__(self, path: str | Path, *, flush_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.time, read_only: bool = False) -> None:
        super().__init__(clock=clock)
        self.path = Path(path)
        self._interval = flush_interval_s
        self._read_only = read_only
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._db: sqlite3.Connection | None = None

    async def start(self) -> None:
        import asyncio

        await asyncio.to_thread(self.open)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Write the final snapshot and release the file within `timeout_s` (never hangs on a locked file).

        The snapshot runs in a daemon thread of its own, not the loop's default executor, which
        `asyncio.run` waits for without a limit when the loop closes.
        """
        import asyncio

        loop = asyncio.get_running_loop()
        finished = loop.create_future()

        def shut_and_tell() -> None:
            try:
                self.shut()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                    loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

        threading.Thread(target=shut_and_tell, name="switchboard-state-close", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(finished), timeout_s)
        except TimeoutError:
            self._unfinished(f"within {timeout_s:.1f}s")
        except asyncio.CancelledError:  # the caller's own deadline came first
            self._unfinished("before the shutdown deadline")
            raise

    def _unfinished(self, when: str) -> None:
        log.error("durable state store %s: the final snapshot did not finish %s; counters changed since the last "
                  "snapshot (at most %.1fs of spend) may be missing from the file", self.path, when, self._interval)

    def open(self) -> None:
        """Take the file, load the last snapshot and start the flusher (blocking; call off the loop)."""
        if self._read_only:
            self.load(_read_rows(self.path))
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateFileBusy(f"{self.path} is in use by another gateway process; the durable store is for a "
                                "single process (use state.url: redis://... for several workers or replicas)") from None
        self._lock_fd = fd
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(_SCHEMA)
        self._db = db
        self.load(db.execute("SELECT key, value, expires_at FROM counters").fetchall())
        self._thread = threading.Thread(target=self._run, name="switchboard-state-flusher", daemon=True)
        self._thread.start()
        log.info("durable state store %s: %d counters loaded", self.path, len(self._values))

    def shut(self) -> None:
        """Stop the flusher, write a final snapshot and release the file."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._db is not None:
            try:
                self.write_snapshot()
            except sqlite3.Error:
                log.exception("durable state store %s: the final snapshot failed; %d changed counters are not in "
                              "the file", self.path, len(self._dirty))
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def write_snapshot(self) -> int:
        """Write the counters changed since the last snapshot; returns how many."""
        rows = self.snapshot_changes()
        if not rows or self._db is None:
            return 0
        live = [row for row in rows if row[1] != 0]
        gone = [(row[0],) for row in rows if row[1] == 0]
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT INTO counters (key, value, expires_at) VALUES (?, ?, ?) "
                                     "ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
                                     "expires_at = excluded.expires_at", live)
                self._db.executemany("DELETE FROM counters WHERE key = ?", gone)
        except sqlite3.Error:
            # Keep the rows dirty so the next pass retries them.
            with self._lock:
                self._dirty.update(row[0] for row in rows)
            raise
        return len(rows)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.write_snapshot()
            except Exception:
                log.exception("durable state snapshot to %s failed; will retry", self.path)


def _read_rows(path: Path) -> list[tuple[str, int, int]]:
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT key, value, expires_at FROM counters").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()
