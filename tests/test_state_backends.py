"""The StateStore contract, run against every backend: memory, durable (SQLite) and real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.state import UNLIMITED, Check, Delta, StateStore, Verdict
from gateway.state.durable import DurableStore, StateFileBusy
from gateway.state.leases import LeaseSettings
from gateway.state.memory import MemoryStore
from gateway.state.redis import RedisStore
from tests.fakes.state_stores import SHARED_REDIS, FakeClock, drop_prefix, shared_redis_available, unique_prefix

BACKENDS = ["memory", "durable", "redis", "redis-leased"]
Factory = Callable[[FakeClock], StateStore]


class LeasedRedisStore(RedisStore):
    """Redis admitting as request admission does with `state.leases`: from leases where it can."""

    async def admit(self, checks: Sequence[Check], lease: bool = True) -> Verdict:
        return await super().admit(checks, lease)


@pytest.fixture(params=BACKENDS)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    prefix = unique_prefix()
    if request.param.startswith("redis") and not shared_redis_available():
        pytest.fail("no Redis on 127.0.0.1:6379 (make test starts one)")

    def make(clock: FakeClock) -> StateStore:
        if request.param == "memory":
            return MemoryStore(clock=clock)
        if request.param == "durable":
            return DurableStore(tmp_path / "state.sqlite", clock=clock)
        if request.param == "redis-leased":
            return LeasedRedisStore(SHARED_REDIS, key_prefix=prefix, clock=clock, leases=LeaseSettings(8, 0.5, 60))
        return RedisStore(SHARED_REDIS, key_prefix=prefix, clock=clock)

    yield make
    if request.param.startswith("redis"):
        drop_prefix(SHARED_REDIS, prefix)


def run(make: Factory, body: Callable[[StateStore, FakeClock], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        clock = FakeClock()
        store = make(clock)
        await store.start()
        try:
            return await body(store, clock)
        finally:
            await store.close()

    return asyncio.run(main())


def expiry(clock: FakeClock, seconds: float = 120) -> int:
    return int(clock.now + seconds)


def test_admits_up_to_the_limit_exactly_and_refuses_one_past_it(make_store: Factory) -> None:
    async def body(store: StateStore, clock: FakeClock) -> None:
        check = Check(("{t}:rpm:1",), 3, 1, expiry(clock))
        verdicts = [await store.admit([check]) for _ in range(4)]
        assert [v.admitted for v in verdicts] == [True, True, True, False]
        assert [v.used for v in verdicts] == [(0,), (1,), (2,), (3,)]
        assert verdicts[-1].denied == 0

    run(make_store, body)


def test_a_reservation_that_reaches_the_limit_exactly_is_admitted(make_store: Factory) -> None:
    async def body(store: StateStore, clock: FakeClock) -> None:
        assert (await store.admit([Check(("{t}:tok",), 100, 60, expiry(clock))])).admitted
        assert not (await store.admit([Check(("{t}:tok",), 100, 41, expiry(clock))])).admitted
        assert (await store.admit([Check(("{t}:tok",), 100, 40, expiry(clock))])).admitted
        assert await store.read([("{t}:tok",)]) == [100]

    run(make_store, body)


def test_admission_is_all_or_nothing_across_checks(make_store: Factory) -> None:
    async def body(store: StateStore, clock: FakeClock) -> None:
        roomy = Check(("{t}:a",), 10, 5, expiry(clock))
        full = Check(("{t}:b",), 4, 5, expiry(clock))
        verdict = await store.admit([roomy, full])
        assert not verdict.admitted and verdict.denied == 1
        assert await store.read([("{t}:a",), ("{t}:b",)]) == [0, 0]

    run(make_store, body)


def test_unlimited_checks_count_but_never_refuse(make_store: Factory) -> None:
    async def body(store: StateStore, clock: FakeClock) -> None:
        for _ in range(3):
            assert (await store.admit([Check(("{t}:u",), UNLIMITED, 1000, expiry(clock))])).admitted
        assert await store.read([("{t}:u",)]) == [3000]

    run(make_store, body)


def test_settle_refunds_and_charges_the_difference(make_store: Factory) -> None:
    async def body(store: StateStore, clock: FakeClock) -> None:
        await store.admit([Check(("{t}:tok",), 1000, 500, expiry(clock))])
        store.settle([Delta("{t}:tok", -380, expiry(clock))])  # used 120 of the 500 reserved
        await store.flush()
        assert await store.read([("{t}:tok",)]) == [120]
        store.settle([Delta("{t}:tok", 30, expiry(clock))])
        await store.flush()
        assert await store.read([("{t}:tok",)]) == [150]

    run(make_store, body)


def test_a_rolling_counter_sums_its_slices(make_store: Factory) -> None:
    async def body(store: StateStore, clock: FakeClock) -> None:
        for index in (1, 2, 3):
            slices = tuple(f"{{t}}:r:{i}" for i in range(index - 1, index + 1))
            assert (await store.admit([Check(slices, 25, 10, expiry(clock))])).admitted
        # slices 2 and 3 now hold 10 each: 20 + 10 passes 25
        verdict = await store.admit([Check(("{t}:r:2", "{t}:r:3"), 25, 10, expiry(clock))])
        assert not verdict.admitted and verdict.used == (20,)

    run(make_store, body)


def test_expired_counters_are_gone(make_store: Factory) -> None:
    async def body(store: StateStore, clock: FakeClock) -> None:
        await store.admit([Check(("{t}:old",), 10, 7, expiry(clock, 60))])
        if isinstance(store, RedisStore):
            # Redis expires on its own clock: check the key got an expiry at all.
            import redis

            assert redis.Redis.from_url(SHARED_REDIS).ttl(store._prefix + "{t}:old") > 0
            return
        clock.advance(61)
        assert await store.read([("{t}:old",)]) == [0]

    run(make_store, body)


def test_concurrent_admissions_never_overshoot(make_store: Factory) -> None:
    async def body(store: StateStore, clock: FakeClock) -> None:
        check = Check(("{t}:race",), 50, 1, expiry(clock))
        verdicts = await asyncio.gather(*(store.admit([check]) for _ in range(120)))
        assert sum(v.admitted for v in verdicts) == 50
        assert await store.read([("{t}:race",)]) == [50]

    run(make_store, body)


def test_durable_store_keeps_counts_across_a_clean_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "state.sqlite"

    async def first() -> None:
        store = DurableStore(path, clock=clock)
        await store.start()
        await store.admit([Check(("{t}:tok",), 1000, 700, expiry(clock))])
        store.settle([Delta("{t}:tok", -200, expiry(clock))])
        await store.close()

    async def second() -> list[int]:
        store = DurableStore(path, clock=clock)
        await store.start()
        try:
            return await store.read([("{t}:tok",)])
        finally:
            await store.close()

    asyncio.run(first())
    assert asyncio.run(second()) == [500]


def test_durable_store_file_belongs_to_one_process_at_a_time(tmp_path: Path) -> None:
    first = DurableStore(tmp_path / "state.sqlite")
    first.open()
    try:
        with pytest.raises(StateFileBusy, match="redis://"):
            DurableStore(tmp_path / "state.sqlite").open()
        reader = DurableStore(tmp_path / "state.sqlite", read_only=True)
        reader.open()  # reports may read while the gateway runs
    finally:
        first.shut()
