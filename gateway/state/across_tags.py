"""Store calls over counters under several hash tags (a team's and its organisation's), all or nothing.

A store call may only touch one hash tag: one Redis Cluster slot. A request
whose checks span two tags is admitted one tag at a time, concurrently, and
what one tag reserved is given back when another refuses; reads are split
the same way. Stores that are atomic across tags anyway (memory, durable
file) take the whole call at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence

from gateway.state import Check, Delta, StateStore, Verdict


def _tag(key: str) -> str:
    return key[:key.find("}") + 1]


def tag_groups(checks: Sequence[Check]) -> tuple[tuple[int, ...], ...]:
    """The indexes of `checks` per hash tag (in order of first appearance): what one store call may take."""
    groups: dict[str, list[int]] = {}
    for index, check in enumerate(checks):
        groups.setdefault(_tag(check.slices[0]), []).append(index)
    return tuple(tuple(group) for group in groups.values())


def reserve(store: StateStore, checks: Sequence[Check],
            groups: tuple[tuple[int, ...], ...] | None = None) -> Awaitable[Verdict]:
    """`store.admit(checks)`, all or nothing, for checks under several hash tags (a team and its organisation).

    A store call may only touch one tag (one Redis Cluster slot), so each
    tag's checks are admitted atomically on their own, concurrently; when any
    refuses, what the others reserved is given back (one settlement). Until
    that settlement lands, a concurrent request can see those counters high by
    this request's amount and be refused: a refusal too many, never a
    reservation too few. A caller cancelled meanwhile gives back what was
    reserved too. `groups` is `tag_groups(checks)` when the caller keeps it
    (a plan's frame does: its checks' keys only change with their windows).
    """
    if getattr(store, "atomic_across_tags", False):
        return store.admit(checks)  # not awaited here: the caller awaits the store's own coroutine
    if groups is None:
        groups = tag_groups(checks)
    if len(groups) <= 1:
        return store.admit(checks)
    return _reserve_each(store, checks, groups)


async def _reserve_each(store: StateStore, checks: Sequence[Check], groups: tuple[tuple[int, ...], ...]) -> Verdict:
    """`reserve` for checks under several tags: each tag's at once, all given back when one refuses."""
    tasks = [asyncio.ensure_future(store.admit([checks[i] for i in part])) for part in groups]
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()  # a store admission in flight gives its own reservation back when cancelled
        _give_back(store, checks, groups, tasks)
        raise
    failure = next((t.exception() for t in tasks if not t.cancelled() and t.exception() is not None), None)
    if failure is not None:
        _give_back(store, checks, groups, tasks)
        raise failure
    used = [0] * len(checks)
    denied: int | None = None
    for part, task in zip(groups, tasks, strict=True):
        verdict = task.result()
        for position, index in enumerate(part):
            used[index] = verdict.used[position]
        if verdict.denied is not None:
            index = part[verdict.denied]
            denied = index if denied is None else min(denied, index)
    if denied is not None:
        _give_back(store, checks, groups, tasks)
    return Verdict(denied is None, tuple(used), denied)


async def read(store: StateStore, slices: Sequence[Sequence[str]]) -> list[int]:
    """`store.read(slices)` for counters under several hash tags: one read per tag (concurrent), as a Redis
    Cluster node refuses a multi-key read across slots even when it owns them all."""
    if getattr(store, "atomic_across_tags", False):
        return await store.read(slices)
    groups: dict[str, list[int]] = {}
    for index, group in enumerate(slices):
        groups.setdefault(_tag(group[0]) if group else "", []).append(index)
    if len(groups) <= 1:
        return await store.read(slices)
    parts = list(groups.values())
    results = await asyncio.gather(*(store.read([slices[i] for i in part]) for part in parts))
    values = [0] * len(slices)
    for part, result in zip(parts, results, strict=True):
        for index, value in zip(part, result, strict=True):
            values[index] = value
    return values


def _give_back(store: StateStore, checks: Sequence[Check], parts: Sequence[Sequence[int]],
               tasks: Sequence[asyncio.Future[Verdict]]) -> None:
    deltas = []
    for part, task in zip(parts, tasks, strict=True):
        if task.done() and not task.cancelled() and task.exception() is None and task.result().admitted:
            deltas += [Delta(checks[i].slices[-1], -checks[i].amount, checks[i].expires_at) for i in part]
    if deltas:
        store.settle(deltas)
