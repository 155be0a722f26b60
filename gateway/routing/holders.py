"""Which replicas were sent each prompt prefix: the table the KV-aware strategy learns and replicas share.

Kept in the app's `RouteState` per model, so it outlives policy reloads; the
KV-aware strategy (gateway/routing/kv_scoring.py) reads and records it, and the
shared ownership stream (gateway/routing/prefix_sharing.py) feeds it other
gateways' routing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.routing.strategies import RouteState, TargetKey

_HOLDERS = 4  # replicas remembered per prefix block: the latest ones a prompt was sent to


class HolderTable:
    """Which replicas were sent each prefix block, newest first (bounded LRU over blocks)."""

    __slots__ = ("_holders", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._holders: OrderedDict[bytes, tuple[TargetKey, ...]] = OrderedDict()

    def depths(self, hashes: Sequence[bytes]) -> dict[TargetKey, int]:
        """For each replica known to hold part of this prompt, the index of its deepest block."""
        deepest: dict[TargetKey, int] = {}
        holders = self._holders
        for index in range(len(hashes) - 1, -1, -1):
            found = holders.get(hashes[index])
            if found is not None:
                for holder in found:
                    deepest.setdefault(holder, index)
        return deepest

    def knows(self, digest: bytes) -> bool:
        return digest in self._holders

    def record(self, hashes: Sequence[bytes], holder: TargetKey) -> None:
        holders = self._holders
        for digest in hashes:
            known = holders.get(digest, ())
            if not known or known[0] != holder:
                holders[digest] = (holder, *(k for k in known if k != holder))[:_HOLDERS]
            holders.move_to_end(digest)
        while len(holders) > self.size:
            holders.popitem(last=False)


def holder_table(states: RouteState, model: str, size: int) -> HolderTable:
    """The model's learned table in the app's routing state (kept across reloads unless resized)."""
    key = ("kv-aware", model)
    table = states.tables.get(key)
    if not isinstance(table, HolderTable) or table.size != size:
        table = states.tables[key] = HolderTable(size)
    return table
