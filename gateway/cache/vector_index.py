"""The in-process semantic index: embedded questions by partition, each partition one float32 numpy matrix.

Vectors are kept normalized, so similarity is a dot product. Entries are
grouped by partition (a hash of everything in the request but its last user
turn), so only questions asked in the same context ever match; a lookup scans
its partition, which `max_entries` bounds.

A partition's vectors are one float32 numpy matrix, so a lookup is one
matrix-vector product (numpy's own loop, without the GIL) instead of a Python loop:
1,000 x 1,536 dims took 0.114 s per lookup as Python floats, and a partition
at the schema's 100,000 entries held ~4.9 GB of float objects; as float32 it
is 0.6 GB. Partitions big enough for the product to take more than a fraction
of a millisecond are scored in a worker thread (`find`), so a tenant's cache
misses never stall the event loop; see loadtests/README.md, "Hostile tenants".

This module is the gateway's only user of numpy, and is imported only where a
policy's semantic cache keeps its index in process (gateway/cache/service.py):
a gateway without one never loads numpy (~15 MB of RSS per process, and
OpenBLAS's worker thread, which spins ~0.1 s at import).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import numpy as np

# Partitions with at least this many vector elements (~650 x 1,536 dims, ~0.3 ms of arithmetic) are
# scored in a worker thread rather than on the event loop.
OFF_LOOP_ELEMENTS = 1_000_000


class _Partition:
    """The vectors of one partition and one dimension: rows of a float32 matrix, with their keys and expiries."""

    __slots__ = ("expires", "keys", "rows", "vectors")

    def __init__(self, dims: int) -> None:
        self.keys: list[bytes] = []
        self.rows: dict[bytes, int] = {}
        self.vectors = np.empty((8, dims), dtype=np.float32)
        self.expires = np.empty(8, dtype=np.float64)

    def add(self, key: bytes, vector: np.ndarray, expires_at: float) -> None:
        row = len(self.keys)
        if row == len(self.vectors):  # grow by doubling; a matrix being scored in a thread keeps the old one
            self.vectors = np.concatenate([self.vectors, np.empty_like(self.vectors)])
            self.expires = np.concatenate([self.expires, np.empty_like(self.expires)])
        self.vectors[row] = vector
        self.expires[row] = expires_at
        self.keys.append(key)
        self.rows[key] = row

    def remove(self, key: bytes) -> None:
        row, last = self.rows.pop(key), len(self.keys) - 1
        if row != last:  # the last row moves into the gap
            moved = self.keys[last]
            self.keys[row], self.rows[moved] = moved, row
            self.vectors[row] = self.vectors[last]
            self.expires[row] = self.expires[last]
        self.keys.pop()


def _scores(vectors: np.ndarray, expires: np.ndarray, query: np.ndarray, now: float) -> np.ndarray:
    # einsum, not `@`: `@` goes to OpenBLAS, whose worker threads, on a busy 2-core machine, made a 1,000-row
    # product take 32 ms instead of 0.3 ms; einsum's own loop is single-threaded (0.6-0.8 ms) and drops the GIL.
    scores = np.einsum("ij,j->i", vectors, query)
    scores[expires <= now] = -np.inf
    return scores


class SemanticIndex:
    """Entry keys by their question's vector, LRU-bounded to `max_entries`."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._where: OrderedDict[bytes, tuple[bytes, int]] = OrderedDict()  # entry key -> partition, dims
        self._partitions: dict[tuple[bytes, int], _Partition] = {}

    def __len__(self) -> int:
        return len(self._where)

    def add(self, partition: bytes, key: bytes, vector: list[float], expires_at: float) -> None:
        self.discard(key)
        where = (partition, len(vector))
        self._where[key] = where
        members = self._partitions.get(where)
        if members is None:
            members = self._partitions[where] = _Partition(len(vector))
        members.add(key, np.asarray(vector, dtype=np.float32), expires_at)
        while len(self._where) > self.max_entries:
            self.discard(next(iter(self._where)))

    def discard(self, key: bytes) -> None:
        where = self._where.pop(key, None)
        if where is not None:
            members = self._partitions[where]
            members.remove(key)
            if not members.keys:
                del self._partitions[where]

    def nearest(self, partition: bytes, vector: list[float], threshold: float, now: float
                ) -> tuple[bytes, float] | None:
        """The closest live entry at or above `threshold`, with its similarity (on the calling thread)."""
        members = self._partitions.get((partition, len(vector)))
        if members is None:
            return None
        query = np.asarray(vector, dtype=np.float32)
        count = len(members.keys)
        return self._choose(members, list(members.keys), _scores(members.vectors[:count], members.expires[:count],
                                                                  query, now), query, threshold, now)

    async def find(self, partition: bytes, vector: list[float], threshold: float, now: float
                   ) -> tuple[bytes, float] | None:
        """`nearest`, scoring a big partition in a worker thread; same interface as the Redis index."""
        members = self._partitions.get((partition, len(vector)))
        if members is None:
            return None
        count = len(members.keys)
        if count * len(vector) < OFF_LOOP_ELEMENTS:
            return self.nearest(partition, vector, threshold, now)
        query = np.asarray(vector, dtype=np.float32)
        keys = list(members.keys)
        # Views of the rows as they are now: adds write past them or into a new matrix; a removal may
        # move a row while it is scored, which `_choose` catches by checking the winner again.
        scores = await asyncio.to_thread(_scores, members.vectors[:count], members.expires[:count].copy(), query,
                                         now)
        return self._choose(members, keys, scores, query, threshold, now)

    def _choose(self, members: _Partition, keys: list[bytes], scores: np.ndarray, query: np.ndarray,
                threshold: float, now: float) -> tuple[bytes, float] | None:
        for row in np.flatnonzero(scores == -np.inf).tolist():  # expired: forget them
            if members.rows.get(keys[row]) is not None and members.expires[members.rows[keys[row]]] <= now:
                self.discard(keys[row])
        if not len(scores):
            return None
        best = int(np.argmax(scores))
        key, score = keys[best], float(scores[best])
        if score < threshold:
            return None
        row = members.rows.get(key)
        if row is None or members.expires[row] <= now:
            return None  # gone while it was scored
        score = float(np.dot(members.vectors[row], query))  # the row may have moved: score it as it is now
        if score < threshold:
            return None
        self._where.move_to_end(key)
        return key, score

    async def close(self) -> None:
        pass
