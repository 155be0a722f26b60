"""The embedded response store: one SQLite file, written and read on one worker thread.

Nothing to install and nothing shared: one gateway process (or several on one
host, since SQLite locks the file) keeps its responses here. Every operation is
one transaction on a dedicated thread, so the event loop never touches the
disk, and each is bounded by `timeout_s`: a disk that hangs costs a request a
503, never a stuck event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from gateway.response_store import Outages, ResponseStoreUnavailable, StoredResponse

log = logging.getLogger("switchboard.responses")
_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    team TEXT NOT NULL,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    size INTEGER NOT NULL,
    response BLOB NOT NULL,
    context BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_team ON responses (team);
CREATE INDEX IF NOT EXISTS responses_expiry ON responses (expires_at);
"""


class SqliteResponseStore:
    def __init__(self, path: str | Path, *, timeout_s: float = 1.0, retry_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._timeout = timeout_s
        self._clock = clock
        self._outages = Outages(retry_interval_s)
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="switchboard-responses")
        self._db: sqlite3.Connection | None = None  # opened on the worker thread, used only there

    @property
    def healthy(self) -> bool:
        return self._outages.healthy

    async def start(self) -> None:
        """Nothing yet: the file is created on first use, so a gateway that stores no response writes none."""

    async def close(self) -> None:
        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.wrap_future(self._thread.submit(shut))
        self._thread.shutdown(wait=True)

    async def put(self, record: StoredResponse, ttl_s: float, max_bytes: int) -> bool:
        size = len(record.response) + len(record.context)
        if size > max_bytes:
            return False
        now = self._clock()

        def write(db: sqlite3.Connection) -> None:
            with db:
                db.execute("DELETE FROM responses WHERE expires_at <= ?", (now,))
                used = db.execute("SELECT COALESCE(SUM(size), 0) FROM responses WHERE team = ?",
                                  (record.team,)).fetchone()[0]
                excess = used + size - max_bytes
                if excess > 0:  # the team's responses make room in the order they were kept (rowid)
                    evicted: list[tuple[str]] = []
                    for response_id, evicted_size in db.execute(
                            "SELECT id, size FROM responses WHERE team = ? ORDER BY rowid", (record.team,)):
                        evicted.append((response_id,))
                        excess -= evicted_size
                        if excess <= 0:
                            break
                    db.executemany("DELETE FROM responses WHERE id = ?", evicted)
                db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (record.id, record.team, record.owner, record.created_at, now + ttl_s, size,
                            record.response, record.context))

        await self._run(write)
        return True

    async def get(self, team: str, owner: str, response_id: str) -> StoredResponse | None:
        now = self._clock()

        def read(db: sqlite3.Connection) -> Any:
            return db.execute("SELECT created_at, response, context FROM responses WHERE id = ? AND team = ? "
                              "AND owner = ? AND expires_at > ?", (response_id, team, owner, now)).fetchone()

        row = await self._run(read)
        if row is None:
            return None
        return StoredResponse(response_id, team, owner, row[0], bytes(row[1]), bytes(row[2]))

    async def delete(self, team: str, owner: str, response_id: str) -> bool:
        now = self._clock()

        def remove(db: sqlite3.Connection) -> bool:
            with db:
                cursor = db.execute("DELETE FROM responses WHERE id = ? AND team = ? AND owner = ? AND expires_at > ?",
                                    (response_id, team, owner, now))
            return cursor.rowcount > 0

        return await self._run(remove)

    async def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        def job() -> _T:
            if self._db is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None,
                                     check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
                db.isolation_level = ""  # `with db:` transactions from here on
                self._db = db
            return work(self._db)

        try:
            async with asyncio.timeout(self._timeout):
                return await asyncio.wrap_future(self._thread.submit(job))
        except (sqlite3.Error, OSError, TimeoutError) as exc:
            self._outages.failed()
            log.error("response store %s failed: %s: %s", self.path, type(exc).__name__, exc)
            raise ResponseStoreUnavailable(str(exc)) from exc
