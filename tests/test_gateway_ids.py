"""The gateway's own request id (gateway/exchange.py): a UUIDv7 in its canonical text form."""

from __future__ import annotations

import time
import uuid

from gateway.exchange import new_gateway_id


def test_gateway_ids_are_canonical_uuid7_text() -> None:
    for _ in range(2000):
        text = new_gateway_id()
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # lowercase, 8-4-4-4-12, every leading zero kept
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122


def test_gateway_ids_carry_the_time_and_are_ordered_by_it() -> None:
    before = time.time_ns() // 1_000_000
    first = new_gateway_id()
    time.sleep(0.002)
    second = new_gateway_id()
    after = time.time_ns() // 1_000_000
    assert before <= uuid.UUID(first).int >> 80 <= after
    assert first < second  # text order is time order: the ledger appends to its index


def test_gateway_ids_are_random_beyond_the_time() -> None:
    ids = {new_gateway_id() for _ in range(5000)}
    assert len(ids) == 5000
    # 74 random bits: every hex digit outside the timestamp and the version takes many values across the ids.
    for position in (15, 16, 20, 35):
        assert len({text[position] for text in ids}) > 2
