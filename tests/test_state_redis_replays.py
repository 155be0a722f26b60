"""Redis faults never apply a counter update twice, and fail_open never hands a spent budget out again.

Every test runs its own redis-server (never the shared one): replies are lost
through a proxy that drops them after Redis ran the command, the event loop
is stalled past `timeout_s`, and Redis is killed and restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import uvloop

from gateway.state import Check, Delta, StoreUnavailable
from gateway.state.redis import EPOCH_OPS, OP_MEMORY_S, RedisStore
from tests.conftest import RunningGateway, standard_policy
from tests.fakes.redis_proxy import ReplyCuttingProxy
from tests.fakes.state_stores import PrivateRedis, private_redis

TIMEOUT_S = 0.2
KEY = "{t}:tokens"
USD_KEY = "{t}:b:usd"
DOLLAR = 1_000_000  # budgets count micro-dollars


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path, persist=True) as running:
        yield running


def expiry() -> int:
    return int(time.time()) + 600


def reserve(amount: int, key: str = KEY, limit: int = 1_000_000_000) -> Check:
    return Check((key,), limit, amount, expiry())


def store_at(url: str, failure_mode: str = "fail_open") -> RedisStore:
    return RedisStore(url, timeout_s=TIMEOUT_S, retry_interval_s=0.05, failure_mode=failure_mode)


async def warmed(store: RedisStore) -> RedisStore:
    """Started, with the script cached in Redis (a first call's NOSCRIPT round trip is not what is tested)."""
    await store.start()
    assert (await store.admit([reserve(0)])).admitted
    return store


@contextlib.asynccontextmanager
async def through_proxy(server: PrivateRedis, failure_mode: str = "fail_open") -> AsyncIterator[
        tuple[RedisStore, ReplyCuttingProxy]]:
    """A warmed store talking to `server` through a proxy that can lose a reply."""
    proxy = ReplyCuttingProxy(server.port)
    await proxy.start()
    store = await warmed(store_at(proxy.url, failure_mode))
    try:
        yield store, proxy
    finally:
        await store.close()
        await proxy.close()


async def recovered(store: RedisStore) -> None:
    async with asyncio.timeout(10):
        await store.wait_until_healthy()


def counter(server: PrivateRedis, key: str = KEY) -> int:
    client = redis.Redis(port=server.port)
    try:
        return int(client.get("switchboard:" + key) or 0)
    finally:
        client.close()


def test_a_reservation_redis_applied_whose_reply_was_lost_is_not_applied_again(server: PrivateRedis) -> None:
    """The issue's case: reserve 1,000 tokens, use 400; the admission's reply never arrives -> exactly 400."""
    async def main() -> None:
        async with through_proxy(server) as (store, proxy):
            proxy.cut_next_reply()
            verdict = await store.admit([reserve(1000)])
            assert proxy.cuts == 1 and not store.healthy
            assert verdict.admitted  # served from local counters meanwhile
            assert counter(server) == 1000  # Redis did apply it
            store.settle([Delta(KEY, 400 - 1000, expiry())])
            await recovered(store)
            assert counter(server) == 400

    asyncio.run(main())


def test_a_refused_admission_whose_reply_was_lost_gives_its_reservation_back(server: PrivateRedis) -> None:
    async def main() -> None:
        async with through_proxy(server, "fail_closed") as (store, proxy):
            proxy.cut_next_reply()
            with pytest.raises(StoreUnavailable):
                await store.admit([reserve(1000)])
            assert counter(server) == 1000  # Redis reserved it; the client was told no
            await recovered(store)
            assert counter(server) == 0

    asyncio.run(main())


def test_a_settlement_whose_reply_was_lost_is_not_applied_again(server: PrivateRedis) -> None:
    async def main() -> None:
        async with through_proxy(server) as (store, proxy):
            assert (await store.admit([reserve(1000)])).admitted
            proxy.cut_next_reply()
            store.settle([Delta(KEY, -600, expiry())])  # sent on its own by the outbox timer
            async with asyncio.timeout(5):
                await proxy.cut_made.wait()
            assert counter(server) == 400
            await recovered(store)
            assert (await store.admit([reserve(0)])).used == (400,)

    asyncio.run(main())


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_reply_that_arrived_while_the_loop_was_stalled_is_used_not_timed_out(
        server: PrivateRedis, run: Callable[[Any], None]) -> None:
    """A tenant can stall the loop (a 4 MB prompt in tiktoken): the reply already here wins over the timeout.

    Both loops: asyncio polls sockets before running due timers in a turn, uvloop (which the gateway serves
    on) runs timers first.
    """
    async def main() -> None:
        store = await warmed(store_at(server.url))
        # Runs right after the admission's command is written, before its reply is read.
        asyncio.get_running_loop().call_soon(time.sleep, TIMEOUT_S * 2.5)
        verdict = await store.admit([reserve(1000)])
        assert verdict.admitted and store.healthy
        store.settle([Delta(KEY, -600, expiry())])
        await store.flush()
        assert counter(server) == 400
        await store.close()

    run(main())


def test_an_admission_whose_caller_gave_up_mid_call_gives_its_reservation_back(server: PrivateRedis) -> None:
    """A client that leaves while its admission is in flight: Redis reserved, nobody will settle."""
    async def main() -> None:
        store = await warmed(store_at(server.url))
        store.settle([Delta(KEY, 7, expiry())])  # waits in the outbox, rides on the next admission
        admission = asyncio.create_task(store.admit([reserve(1000)]))
        await asyncio.sleep(0)  # the admission is written to Redis and waits for its reply
        admission.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admission
        await store.flush()
        assert counter(server) == 7 and store.healthy
        await store.close()

    asyncio.run(main())


def test_operation_ids_cost_two_bits_each_and_expire(server: PrivateRedis) -> None:
    async def main() -> None:
        store = store_at(server.url)
        await store.start()
        for _ in range(1000):
            await store.admit([reserve(1)])
        await store.close()

    asyncio.run(main())
    client = redis.Redis(port=server.port)
    try:
        (ops_key,) = client.keys("switchboard:{t}:ops:*")
        assert client.strlen(ops_key) <= 1000 * 2 // 8 + 1  # 250 bytes for 1,000 operations
        assert 0 < client.ttl(ops_key) <= OP_MEMORY_S
    finally:
        client.close()
    assert counter(server) == 1000
    assert EPOCH_OPS * 2 // 8 == 8192  # the largest one bitmap key gets


def test_fail_open_starts_from_the_last_values_seen_and_keeps_the_stated_bound(server: PrivateRedis) -> None:
    """$99 of $100 spent, Redis down, 20 x $5: a process that saw $99 admits none; bound per process: L - seen."""
    limit = 100 * DOLLAR

    def five() -> Check:
        return reserve(5 * DOLLAR, USD_KEY, limit)

    async def main() -> None:
        first, second, fresh = store_at(server.url), store_at(server.url), store_at(server.url)
        for store in (first, second, fresh):
            await store.start()
        assert (await first.admit([reserve(50 * DOLLAR, USD_KEY, limit)])).admitted  # first saw $50
        assert (await second.admit([reserve(49 * DOLLAR, USD_KEY, limit)])).admitted  # second saw $99
        server.stop()  # kill -9; the append-only file keeps the $99
        admitted = {}
        for name, store in (("second", second), ("first", first), ("fresh", fresh)):
            admitted[name] = sum([(await store.admit([five()])).admitted for _ in range(20)])
        assert admitted == {"second": 0, "first": 10, "fresh": 20}
        server.start()
        for store in (first, second, fresh):
            await recovered(store)
            await store.close()
        # After the replay: $99 + what each process could admit on its own, L - (the value it last saw).
        bound = 99 * DOLLAR + (limit - 50 * DOLLAR) + (limit - 99 * DOLLAR) + (limit - 0)
        assert counter(server, USD_KEY) == 249 * DOLLAR <= bound

    asyncio.run(main())


def test_one_process_that_saw_the_budget_spent_never_exceeds_it_during_an_outage(server: PrivateRedis) -> None:
    limit = 100 * DOLLAR

    async def main() -> None:
        store = store_at(server.url)
        await store.start()
        assert (await store.admit([reserve(99 * DOLLAR, USD_KEY, limit)])).admitted
        server.stop()
        verdicts = [await store.admit([reserve(5 * DOLLAR, USD_KEY, limit)]) for _ in range(20)]
        assert not any(v.admitted for v in verdicts)
        assert all(v.used == (99 * DOLLAR,) for v in verdicts)  # the refusal says what was spent
        server.start()
        await recovered(store)
        await store.close()
        assert counter(server, USD_KEY) == 99 * DOLLAR

    asyncio.run(main())


def test_a_budget_known_only_from_an_outage_is_still_known_in_the_next_one(server: PrivateRedis) -> None:
    """The $99 admission's reply is lost, so it is served locally and replayed; then Redis goes down again."""
    limit = 100 * DOLLAR

    async def main() -> None:
        async with through_proxy(server) as (store, proxy):
            proxy.cut_next_reply()
            assert (await store.admit([reserve(99 * DOLLAR, USD_KEY, limit)])).admitted  # locally
            await recovered(store)
            assert counter(server, USD_KEY) == 99 * DOLLAR
            server.stop()
            assert not any([(await store.admit([reserve(5 * DOLLAR, USD_KEY, limit)])).admitted
                            for _ in range(20)])
            server.start()
            await recovered(store)
        assert counter(server, USD_KEY) == 99 * DOLLAR

    asyncio.run(main())


def test_close_gives_up_within_its_timeout_and_says_what_redis_never_got(
        server: PrivateRedis, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        store = store_at(server.url)
        await store.start()
        assert (await store.admit([reserve(10)])).admitted
        server.stop()
        store.settle([Delta(KEY, -4, expiry())])
        await store.flush()
        started = time.monotonic()
        await store.close(timeout_s=0.5)
        assert time.monotonic() - started < 1.5
        assert store.unsent > 0

    asyncio.run(main())
    assert "closing with counter updates Redis never received" in caplog.text and KEY in caplog.text


def test_close_counts_a_settlement_still_on_its_way_when_its_timeout_comes(
        server: PrivateRedis, caplog: pytest.LogCaptureFixture) -> None:
    """Redis hangs (stopped, not gone: the connection stays open and nothing answers): the settlement close sends
    is still waiting for its reply when close gives up. Redis may or may not apply it, so close must count it and
    name its key, not leave it in a task the closing loop drops without a word."""
    async def main() -> None:
        store = await warmed(store_at(server.url))
        assert server.process is not None
        server.process.send_signal(signal.SIGSTOP)
        try:
            store.settle([Delta(KEY, -4, expiry())])
            started = time.monotonic()
            await store.close(timeout_s=0.3)  # the send's own deadline (4 x timeout_s) is later
            assert time.monotonic() - started < 1.0
            assert store.unsent == 1
            # Once every task has ended, still one: the send close gave up on does not count itself again.
            others = asyncio.all_tasks() - {asyncio.current_task()}
            if others:
                await asyncio.wait(others, timeout=5)
            assert store.unsent == 1 and all(task.done() for task in others)
        finally:
            server.process.send_signal(signal.SIGCONT)

    asyncio.run(main())
    assert "closing with counter updates Redis never received or may not have applied: 0 journalled increments " \
           "and 1 unconfirmed calls, on keys {t}:tokens" in caplog.text


def test_a_flush_its_caller_gives_up_on_still_sends_the_settlements(server: PrivateRedis) -> None:
    """A usage report flushes the settlements first (gateway/accounting/limits.py); its client leaving cancels the
    flush as it starts. The settlements it began to send must still reach Redis: cancelled before they ran, they
    were neither sent nor counted anywhere."""
    async def main() -> None:
        store = await warmed(store_at(server.url))
        assert (await store.admit([reserve(10)])).admitted
        store.settle([Delta(KEY, -4, expiry())])
        flusher = asyncio.create_task(store.flush())
        await asyncio.sleep(0)  # the flush has handed the settlement to a send of its own, not yet run
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await store.close()
        assert store.unsent == 0

    asyncio.run(main())
    assert counter(server) == 6


def test_close_replays_the_journal_when_redis_is_back_in_time(server: PrivateRedis) -> None:
    async def main() -> None:
        store = RedisStore(server.url, timeout_s=TIMEOUT_S, retry_interval_s=60, failure_mode="fail_open")
        await store.start()
        assert (await store.admit([reserve(10)])).admitted
        server.stop()
        assert (await store.admit([reserve(5)])).admitted  # locally, journalled
        server.start()
        await store.close(timeout_s=5)  # the probe would wait a minute; close replays at once
        assert store.unsent == 0

    asyncio.run(main())
    assert counter(server) == 15


def test_a_gateway_that_saw_99_of_100_dollars_spent_admits_nothing_more_while_redis_is_down(
        server: PrivateRedis, upstream: object, start_gateway: Callable[..., RunningGateway]) -> None:
    """The issue's case through the gateway: $99 of $100 spent, Redis down, 20 x $5 -> none admitted, $99 in Redis."""
    prefix = "sbfailopen:"
    extra = f"""
state: {{url: '{server.url}', key_prefix: '{prefix}', timeout_s: 0.2, retry_interval_s: 0.05}}
prices:
  version: fail-open-test
  targets:
    upstream:
      upstream-chat: {{input: 0, output: 1000000}}
"""
    text = standard_policy(upstream.base_url, extra=extra).replace(  # type: ignore[attr-defined]
        "    models: [chat-model, embed-model]\n", "    models: [chat-model, embed-model]\n    budget: {usd: 100}\n", 1)
    gateway = start_gateway(text)
    client = gateway.client()
    words = [{"role": "user", "content": " ".join(f"word{n}" for n in range(150))}]
    first = client.chat.completions.with_raw_response.create(model="chat-model", messages=words, max_tokens=99)
    spent = round(Decimal(first.headers["x-switchboard-cost-usd"]) * DOLLAR)  # $1 per output token
    assert 95 * DOLLAR < spent <= 99 * DOLLAR

    def budget_counter() -> int:
        """The USD budget's counters (one per time slice), not the once-per-period alert claims beside them."""
        client = redis.Redis(port=server.port)
        base = (prefix + "{alpha}:b:team:usd:").encode()
        try:
            return sum(int(client.get(key) or 0) for key in client.keys(base + b"*") if b":" not in key[len(base):])
        finally:
            client.close()

    deadline = time.monotonic() + 5
    while budget_counter() != spent:  # the settlement is sent within 20 ms
        assert time.monotonic() < deadline, budget_counter()
        time.sleep(0.02)
    server.stop()
    admitted = 0
    for _ in range(20):
        try:
            client.chat.completions.create(model="chat-model", messages=words, max_tokens=5)
            admitted += 1
        except openai.RateLimitError as refused:
            assert refused.code == "budget_exceeded"
    assert admitted == 0
    server.start()
    with pytest.raises(openai.RateLimitError):  # back on Redis, still spent
        client.chat.completions.create(model="chat-model", messages=words, max_tokens=5)
    assert budget_counter() == spent <= 100 * DOLLAR
