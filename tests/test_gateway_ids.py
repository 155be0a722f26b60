"""The gateway's own request id (gateway/exchange.py): a UUIDv7 in its canonical text form, made one by one
(`new_gateway_id`) or from a pool of random bytes (`GatewayIds`, the app's)."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import Callable

import pytest

from gateway.exchange import GatewayIds, new_gateway_id

MAKERS = {"one by one": new_gateway_id, "pooled": GatewayIds()}


@pytest.fixture(params=list(MAKERS))
def make(request: pytest.FixtureRequest) -> Callable[[], str]:
    return MAKERS[request.param]


def test_gateway_ids_are_canonical_uuid7_text(make: Callable[[], str]) -> None:
    for _ in range(2000):
        text = make()
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # lowercase, 8-4-4-4-12, every leading zero kept
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122


def test_gateway_ids_carry_the_time_and_are_ordered_by_it(make: Callable[[], str]) -> None:
    before = time.time_ns() // 1_000_000
    first = make()
    time.sleep(0.002)  # not synchronisation: two ids must be made in different milliseconds
    second = make()
    after = time.time_ns() // 1_000_000
    assert before <= uuid.UUID(first).int >> 80 <= after
    assert first < second  # text order is time order: the ledger appends to its index


def test_gateway_ids_are_random_beyond_the_time(make: Callable[[], str]) -> None:
    ids = {make() for _ in range(5000)}  # the pooled maker refills its pool a dozen times
    assert len(ids) == 5000
    # 74 random bits: every hex digit outside the timestamp and the version takes many values across the ids.
    for position in (15, 16, 20, 35):
        assert len({text[position] for text in ids}) > 2


def _ids_in_child(ids: GatewayIds, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    queue.put([ids() for _ in range(100)])


def test_a_forked_process_does_not_reuse_its_parents_random_bytes() -> None:
    ids = GatewayIds()
    ids()  # the pool is filled: 408 ids' worth left, which a forked child would inherit
    queue: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()  # type: ignore[type-arg]
    child = multiprocessing.get_context("fork").Process(target=_ids_in_child, args=(ids, queue))
    child.start()
    theirs = queue.get(timeout=30)
    child.join(timeout=30)
    ours = [ids() for _ in range(100)]
    # The same millisecond can repeat, the same random part must not: compare the random bits alone.
    assert not {text[15:] for text in theirs} & {text[15:] for text in ours}
