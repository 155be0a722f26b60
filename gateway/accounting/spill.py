"""A bounded on-disk overflow for rows a writer could not store yet: one JSON array per line.

The usage ledger's writer thread appends a batch here when SQLite refuses it
(locked, disk error) and replays the file before its next batch, so a long
lock delays rows instead of dropping them, and a restart finds them again.
The file is bounded (`max_bytes`): rows that would not fit are refused and
the caller counts them as lost. Only one thread may use a spill at a time.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("switchboard.ledger")

MAX_SPILL_BYTES = 64 * 1024 * 1024  # ~200,000 ledger rows of ~300 bytes


class Spill:
    def __init__(self, path: Path, max_bytes: int = MAX_SPILL_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.rows = 0
        self.size = 0
        # No file yet, or no directory for one (the ledger's open says so when it cannot create it).
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), self.path.open("rb") as existing:
            for line in existing:
                self.rows += 1
                self.size += len(line)

    def append(self, rows: Sequence[Sequence[Any]]) -> int:
        """Write `rows` to the file; returns how many did not fit (or could not be written) and are lost."""
        lines = [orjson.dumps(list(row), option=orjson.OPT_APPEND_NEWLINE) for row in rows]
        kept: list[bytes] = []
        room = self.max_bytes - self.size
        for line in lines:
            if len(line) > room:
                break
            kept.append(line)
            room -= len(line)
        if kept:
            block = b"".join(kept)
            try:
                with self.path.open("ab") as out:
                    out.write(block)
                    out.flush()
                    os.fsync(out.fileno())
            except OSError:
                log.exception("could not write %d rows to the spill file %s", len(kept), self.path)
                return len(rows)
            self.rows += len(kept)
            self.size += len(block)
        return len(rows) - len(kept)

    def read(self) -> list[tuple[Any, ...]]:
        """Every spilled row (a torn last line, from a crash mid-write, is skipped)."""
        if not self.rows:
            return []
        rows = []
        with self.path.open("rb") as spilled:
            for line in spilled:
                try:
                    rows.append(tuple(orjson.loads(line)))
                except orjson.JSONDecodeError:
                    log.error("spill file %s: skipping a torn line (%d bytes)", self.path, len(line))
        return rows

    def clear(self) -> None:
        """Forget the rows (they are stored elsewhere now)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.rows = self.size = 0
