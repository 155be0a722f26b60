"""Admission and settlement through the Limiter, with an injected clock, on every state backend."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.accounting.budget_events import LOOK_EVERY_S
from gateway.accounting.budgets import ThresholdEvent
from gateway.accounting.limits import Admission, Limiter
from gateway.compiled.policy import Policy, parse_policy
from gateway.errors import GatewayError
from gateway.state import StateStore, StoreUnavailable
from gateway.state.durable import DurableStore
from gateway.state.memory import MemoryStore
from gateway.state.redis import RedisStore
from gateway.timestamps import go_duration
from gateway.tokens.counter import TokenCounter
from providers.base import Endpoint, Usage
from tests.conftest import key_hash
from tests.fakes.state_stores import (
    SHARED_REDIS,
    FakeClock,
    drop_prefix,
    private_redis,
    shared_redis_available,
    unique_prefix,
)

COUNTER = TokenCounter()
# 2027-01-15 08:00:00 UTC: the start of a minute, a day and a week-day.
START = dt.datetime(2027, 1, 15, 8, 0, tzinfo=dt.UTC).timestamp()


def policy_text(team_extra: str = "", key_extra: str = "", top_extra: str = "") -> str:
    return f"""
version: 1
providers:
  up: {{kind: openai_compatible, base_url: "http://127.0.0.1:9/v1", api_key: k}}
models:
  big: {{targets: [{{provider: up, model: gpt-4o}}]}}
  small: {{targets: [{{provider: up, model: gpt-4o-mini}}]}}
teams:
  alpha:
    models: [big, small]
    keys:
      - id: alpha-key
        hash: "{key_hash('sk-alpha')}"
{key_extra}
      - id: alpha-other
        hash: "{key_hash('sk-alpha-2')}"
{team_extra}
  beta:
    models: [big]
    keys:
      - id: beta-key
        hash: "{key_hash('sk-beta')}"
{top_extra}
"""


class Harness:
    """One limiter over one store, driven synchronously on its own event loop."""

    def __init__(self, runner: asyncio.Runner, store: StateStore, clock: FakeClock, text: str,
                 cost: Callable[..., float | None] | None = None) -> None:
        self.runner, self.store, self.clock = runner, store, clock
        self.events: list[ThresholdEvent] = []
        kwargs: dict[str, Any] = {"cost": cost} if cost is not None else {}
        self.limiter = Limiter(store, COUNTER, clock=clock, on_threshold=self.events.append, **kwargs)
        self.policy = parse_policy(text)

    def reload(self, text: str) -> None:
        self.policy = parse_policy(text)

    def admit(self, key_id: str = "alpha-key", model: str = "big", max_tokens: int | None = 10,
              content: str = "hello there") -> tuple[Admission | None, dict[str, str]]:
        body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": content}]}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        caller = next(k for k in self.policy.keys.values() if k.key_id == key_id)
        headers: dict[str, str] = {}
        admission = self.runner.run(self.limiter.admit(self.policy, caller, Endpoint.CHAT, body,
                                                       self.policy.models[model], headers))
        return admission, headers

    def refused(self, **kwargs: Any) -> GatewayError:
        with pytest.raises(GatewayError) as caught:
            self.admit(**kwargs)
        return caught.value

    def settle(self, admission: Admission | None, prompt: int, completion: int, status: int = 200) -> None:
        async def settle() -> None:
            self.limiter.settle(admission, Usage(prompt_tokens=prompt, completion_tokens=completion), status)
            await self.limiter.flush()

        self.runner.run(settle())

    def report(self, team: str = "alpha", period: str = "current") -> list[dict[str, Any]]:
        return self.runner.run(self.limiter.report(self.policy, team, period))["usage"]


def prompt_tokens(content: str = "hello there", model: str = "gpt-4o") -> int:
    return COUNTER.count_chat_prompt({"messages": [{"role": "user", "content": content}]}, model)


@pytest.fixture(params=["memory", "durable", "redis"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    if request.param == "redis" and not shared_redis_available():
        pytest.fail("no Redis on 127.0.0.1:6379 (make test starts one)")
    prefix = unique_prefix()
    runner = asyncio.Runner()
    stores: list[StateStore] = []
    clock = FakeClock(START)

    def make(text: str, **kwargs: Any) -> Harness:
        store: StateStore
        if request.param == "memory":
            store = MemoryStore(clock=clock)
        elif request.param == "durable":
            store = DurableStore(tmp_path / f"state-{len(stores)}.sqlite", clock=clock)
        else:
            store = RedisStore(SHARED_REDIS, key_prefix=prefix, clock=clock)
        runner.run(store.start())
        stores.append(store)
        return Harness(runner, store, clock, text, **kwargs)

    yield make
    for store in stores:
        runner.run(store.close())
    runner.close()
    if request.param == "redis":
        drop_prefix(SHARED_REDIS, prefix)


def test_rpm_admits_exactly_the_limit_then_refills_next_minute(harness: Callable[..., Harness]) -> None:
    h = harness(policy_text(team_extra="    limits: {rpm: 3}"))
    h.clock.advance(20)
    for remaining in (2, 1, 0):
        _, headers = h.admit()
        assert headers["x-ratelimit-remaining-requests"] == str(remaining)
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-reset-requests"] == "40s"
    error = h.refused()
    assert error.http_status == 429 and error.code == "rate_limit_exceeded"
    assert "team alpha" in error.message and "requests per minute" in error.message
    assert "limit 3, used 3" in error.message and "Resets in 40s" in error.message
    assert error.retry_after == pytest.approx(40)
    h.clock.advance(39.9)
    h.refused()
    h.clock.advance(0.1)  # the next minute starts
    _, headers = h.admit()
    assert headers["x-ratelimit-remaining-requests"] == "2"


def test_tpm_reserves_prompt_plus_max_tokens_and_boundaries_are_exact(harness: Callable[..., Harness]) -> None:
    prompt = prompt_tokens()
    limit = 2 * (prompt + 50)
    h = harness(policy_text(team_extra=f"    limits: {{tpm: {limit}}}"))
    first, headers = h.admit(max_tokens=50)
    assert first is not None and first.reserved_tokens == prompt + 50
    assert headers["x-ratelimit-remaining-tokens"] == str(limit - prompt - 50)
    h.refused(max_tokens=51)  # one token past the limit
    h.admit(max_tokens=50)  # reaches the limit exactly
    error = h.refused(max_tokens=1)
    assert f"limit {limit}, used {limit}" in error.message and "tokens per minute" in error.message


def test_settlement_refunds_the_unused_reservation(harness: Callable[..., Harness]) -> None:
    prompt = prompt_tokens()
    h = harness(policy_text(team_extra=f"    limits: {{tpm: {prompt + 100}}}"))
    admission, _ = h.admit(max_tokens=100)
    h.refused(max_tokens=100)
    h.settle(admission, prompt, 10)  # used 10 of the 100 reserved
    assert h.report()[0]["used"] == prompt + 10
    h.admit(max_tokens=90 - prompt)  # exactly what is left


def test_a_failed_request_refunds_its_tokens_but_counts_as_a_request(harness: Callable[..., Harness]) -> None:
    h = harness(policy_text(team_extra="    limits: {rpm: 5, tpm: 10000}"))
    admission, _ = h.admit(max_tokens=500)
    h.runner.run(_settle_failure(h, admission))
    rows = {row["unit"]: row for row in h.report()}
    assert rows["tokens"]["used"] == 0 and rows["requests"]["used"] == 1


async def _settle_failure(h: Harness, admission: Admission | None) -> None:
    h.limiter.settle(admission, None, 502)
    await h.limiter.flush()


def test_key_and_model_scopes_are_named_in_the_error(harness: Callable[..., Harness]) -> None:
    h = harness(policy_text(key_extra="        limits: {rpm: 1}",
                            team_extra="    model_limits:\n      small: {rpm: 1}"))
    h.admit()
    error = h.refused()
    assert "key alpha-key (team alpha)" in error.message
    h.admit(key_id="alpha-other")  # another key of the team is not limited by it
    h.admit(key_id="alpha-other", model="small")
    error = h.refused(key_id="alpha-other", model="small")
    assert "model small for team alpha" in error.message


def test_a_request_larger_than_the_limit_is_not_retryable(harness: Callable[..., Harness]) -> None:
    h = harness(policy_text(team_extra="    limits: {tpm: 100}"))
    error = h.refused(max_tokens=500)
    assert error.http_status == 429 and "Request too large" in error.message
    assert error.headers["x-should-retry"] == "false"


def test_token_budget_exhaustion_rejects_with_budget_exceeded(harness: Callable[..., Harness]) -> None:
    prompt = prompt_tokens()
    h = harness(policy_text(team_extra=f"    budget: {{period: monthly, tokens: {prompt + 20}}}"))
    admission, _ = h.admit(max_tokens=20)
    h.settle(admission, prompt, 20)
    error = h.refused(max_tokens=1)
    assert error.http_status == 429 and error.code == "budget_exceeded"
    assert error.kind.error_type == "insufficient_quota"
    assert error.headers["x-should-retry"] == "false"
    assert "team alpha" in error.message and f"limit {prompt + 20}, used {prompt + 20}" in error.message
    assert "resets at 2027-02-01T00:00:00+00:00" in error.message
    assert error.retry_after == pytest.approx(dt.datetime(2027, 2, 1, tzinfo=dt.UTC).timestamp() - START)
    h.admit(key_id="beta-key")  # other teams are unaffected


def test_exhausted_budget_downgrades_to_the_cheaper_model(harness: Callable[..., Harness]) -> None:
    prompt = prompt_tokens()
    budget = f"{{tokens: {prompt + 20}, on_exhaust: downgrade, downgrade_to: small}}"
    h = harness(policy_text(team_extra=f"    budget: {budget}"))
    first, _ = h.admit(max_tokens=20)
    assert first is not None and first.model.name == "big" and first.downgraded_from is None
    second, headers = h.admit(max_tokens=20)
    assert second is not None and second.model.name == "small" and second.downgraded_from == "big"
    assert headers["x-switchboard-downgraded-from"] == "big"
    h.settle(second, prompt, 20)
    budget_row = next(row for row in h.report() if row["unit"] == "tokens")
    assert budget_row["used"] == 2 * prompt + 40  # the downgraded spend still counts


def test_daily_budget_rolls_over_at_midnight_in_its_time_zone(harness: Callable[..., Harness]) -> None:
    berlin_midnight = dt.datetime(2027, 1, 16, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=1))).timestamp()
    h = harness(policy_text(team_extra="    budget: {period: daily, timezone: Europe/Berlin, tokens: 100}"))
    h.clock.now = berlin_midnight - 1
    admission, _ = h.admit(max_tokens=100 - prompt_tokens())
    assert admission is not None
    error = h.refused(max_tokens=1)
    assert "daily token budget" in error.message and "resets at 2027-01-16T00:00:00+01:00" in error.message
    assert error.retry_after == pytest.approx(1.0)
    h.clock.now = berlin_midnight
    h.admit(max_tokens=100 - prompt_tokens())
    assert h.report(period="previous")[0]["used"] == 100


def test_rolling_budget_frees_spend_as_it_ages_out(harness: Callable[..., Harness]) -> None:
    h = harness(policy_text(team_extra="    budget: {period: rolling, window_s: 86400, tokens: 100}"))
    h.admit(max_tokens=100 - prompt_tokens())
    h.refused(max_tokens=1)
    h.clock.advance(86_400 - 3600)
    h.refused(max_tokens=1)
    h.clock.advance(3600)  # the slice holding the spend has left the window
    h.admit(max_tokens=1)


def test_soft_thresholds_fire_once_per_period_across_replicas(harness: Callable[..., Harness]) -> None:
    prompt = prompt_tokens()
    text = policy_text(team_extra="    budget: {tokens: 1000, soft_thresholds: [0.5, 0.8]}")
    h = harness(text)
    other = Harness(h.runner, h.store, h.clock, text)  # a second replica on the same store
    other.events = h.events
    other.limiter._events._on_event = h.events.append  # both replicas report into one list
    for replica in (h, other, h, other):
        admission, _ = replica.admit(max_tokens=10)
        replica.settle(admission, prompt, 250 - prompt)
    assert [(e.threshold, e.team, e.unit) for e in h.events] == [(0.5, "alpha", "tokens"), (0.8, "alpha", "tokens")]
    assert h.events[0].used >= 500
    h.clock.now = dt.datetime(2027, 2, 1, tzinfo=dt.UTC).timestamp()  # next month: fires again
    admission, _ = h.admit(max_tokens=10)
    h.settle(admission, prompt, 600)
    assert [e.threshold for e in h.events] == [0.5, 0.8, 0.5]


def test_a_soft_threshold_fires_on_what_was_spent_not_on_what_requests_in_flight_hold(
        harness: Callable[..., Harness]) -> None:
    prompt = prompt_tokens()
    h = harness(policy_text(team_extra="    budget: {tokens: 1000, soft_thresholds: [0.5]}"))
    held = [h.admit(max_tokens=150)[0] for _ in range(3)]  # ~480 tokens reserved, nothing spent yet
    small, _ = h.admit(max_tokens=10)
    h.settle(small, prompt, 100 - prompt)  # the counter passes 500 with the reservations; 100 tokens are spent
    assert h.events == []
    spent = 100
    for admission in held:  # each uses less than it reserved; the third brings the spend to 550
        assert h.events == []
        h.settle(admission, prompt, 150 - prompt)
        spent += 150
    # The last settlement was admitted before the first settled: it never saw the spend pass 500 coming.
    assert [(e.threshold, e.used) for e in h.events] == [(0.5, spent)] == [(0.5, 550)]
    assert h.report()[0]["used"] == spent


def test_a_replica_whose_budget_is_armed_reports_the_threshold_another_replica_crossed(
        harness: Callable[..., Harness]) -> None:
    prompt = prompt_tokens()
    text = policy_text(team_extra="    budget: {tokens: 1000, soft_thresholds: [0.5]}")
    h = harness(text)
    other = Harness(h.runner, h.store, h.clock, text)  # a second replica on the same store
    h.limiter._events.armed_poll_s = 0.01
    held = [other.admit(max_tokens=150)[0] for _ in range(3)]  # ~480 tokens reserved on the other replica
    small, _ = h.admit(max_tokens=10)

    async def scenario() -> None:
        # No flush after it (a flush ends the look): h reads 100 spent against a counter past 500, and stays armed.
        h.limiter.settle(small, Usage(prompt_tokens=prompt, completion_tokens=100 - prompt), 200)
        deadline = asyncio.get_running_loop().time() + 10
        while not h.limiter._events._armed:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.001)
        for admission in held:  # 150, 309, 468 counted: none of the other replica's settlements looks
            other.limiter.settle(admission, Usage(prompt_tokens=prompt, completion_tokens=150 - prompt), 200)
        await other.limiter.flush()
        while not h.events:  # h's armed look reads the spend again on its own
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.005)
        await h.limiter.flush()

    h.runner.run(scenario())
    assert other.events == []
    assert [(e.threshold, e.used) for e in h.events] == [(0.5, 550)]


def test_an_armed_budget_under_load_reads_its_spend_once_per_interval_not_once_per_settlement() -> None:
    prompt = prompt_tokens()
    clock = FakeClock(START)
    store = MemoryStore(clock=clock)
    reads: list[float] = []
    read = store.read

    async def counted_read(slices: Any) -> list[int]:
        reads.append(asyncio.get_running_loop().time())
        return await read(slices)

    store.read = counted_read  # type: ignore[method-assign]
    with asyncio.Runner() as runner:
        h = Harness(runner, store, clock, policy_text(team_extra="    budget: {tokens: 1000, soft_thresholds: [0.5]}"))
        held, _ = h.admit(max_tokens=500 - prompt)  # holds the counter at 500 while nothing is spent
        small = [h.admit(max_tokens=1)[0] for _ in range(30)]

        async def load() -> tuple[float, int]:
            started = asyncio.get_running_loop().time()
            for admission in small:  # each settlement is counted past 500 and asks for a read
                h.limiter.settle(admission, Usage(prompt_tokens=prompt, completion_tokens=1), 200)
                await asyncio.sleep(0.002)  # a request every 2 ms: the looks get the loop in between
            during = len(reads)
            elapsed = asyncio.get_running_loop().time() - started
            await h.limiter.flush()
            return elapsed, during

        elapsed, during = runner.run(load())
    assert held is not None and h.events == []  # 30 x (prompt + 1) spent: under 500 all along
    assert 1 <= during <= elapsed / LOOK_EVERY_S + 2, (during, elapsed)


def test_a_store_that_cannot_say_what_was_spent_reports_the_threshold_on_the_counter() -> None:
    prompt = prompt_tokens()
    clock = FakeClock(START)
    store = MemoryStore(clock=clock)

    async def unreachable(slices: Any) -> list[int]:
        raise StoreUnavailable("injected: the store does not answer reads")

    store.read = unreachable  # type: ignore[method-assign]
    with asyncio.Runner() as runner:
        h = Harness(runner, store, clock, policy_text(team_extra="    budget: {tokens: 1000, soft_thresholds: [0.5]}"))
        held = [h.admit(max_tokens=150)[0] for _ in range(3)]
        small, _ = h.admit(max_tokens=10)
        h.settle(small, prompt, 100 - prompt)  # 100 spent, but only the counter's figure can be had
    # An alert early (on what was spent plus what is held) rather than never.
    assert all(held) and [(e.threshold, e.used) for e in h.events] == [(0.5, 3 * (prompt + 150) + 100)]


def test_usd_budget_charges_priced_usage(harness: Callable[..., Harness]) -> None:
    def cost(policy: Policy, target: Any, usage: Usage) -> float:
        return usage.total_tokens * 0.001  # $1 per 1000 tokens

    h = harness(policy_text(team_extra="    budget: {usd: 0.5}"), cost=cost)
    admission, _ = h.admit(max_tokens=100)
    assert admission is not None and admission.reserved_usd == (prompt_tokens() + 100) * 1000
    h.settle(admission, 100, 350)  # $0.45
    row = h.report()[0]
    assert row["unit"] == "usd" and row["used"] == pytest.approx(0.45) and row["remaining"] == pytest.approx(0.05)
    error = h.refused(max_tokens=100)
    assert "USD budget limit $0.5, used $0.45" in error.message


def test_editing_the_policy_keeps_usage(harness: Callable[..., Harness]) -> None:
    h = harness(policy_text(team_extra="    limits: {rpm: 5}\n    budget: {tokens: 100000}"))
    for _ in range(3):
        h.admit()
    h.reload(policy_text(team_extra="    limits: {rpm: 4}\n    budget: {tokens: 200000}"))
    _, headers = h.admit()
    assert headers["x-ratelimit-remaining-requests"] == "0"
    h.refused()


def test_no_limits_means_no_admission_work(harness: Callable[..., Harness]) -> None:
    h = harness(policy_text(team_extra="    limits: {rpm: 1}"))
    admission, headers = h.admit(key_id="beta-key")
    assert admission is None and headers == {}


@pytest.mark.parametrize(("seconds", "text"), [(360, "6m0s"), (0.012, "12ms"), (1.5, "1.5s"), (3725, "1h2m5s"),
                                               (59.9999, "1m0s"), (1.39, "1.39s"), (60.001, "1m0.001s"),
                                               (86399.999, "23h59m59.999s"), (0.9991, "1000ms"), (-2, "0ms")])
def test_reset_durations_are_go_style(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_a_key_budget_applies_on_top_of_the_team_budget(harness: Callable[..., Harness]) -> None:
    prompt = prompt_tokens()
    h = harness(policy_text(key_extra=f"        budget: {{period: daily, tokens: {prompt + 10}}}",
                            team_extra="    budget: {tokens: 1000000}"))
    admission, _ = h.admit(max_tokens=10)
    h.settle(admission, prompt, 10)
    error = h.refused(max_tokens=1)
    assert error.code == "budget_exceeded" and "key alpha-key (team alpha)" in error.message
    assert "daily token budget" in error.message
    h.admit(key_id="alpha-other", max_tokens=10)  # the team's other key still has the team budget
    rows = {(row["scope"], row["owner"]): row["used"] for row in h.report()}
    assert rows[("key", "alpha-key")] == prompt + 10
    assert rows[("team", "alpha")] == 2 * prompt + 20  # settled + the other key's open reservation


def test_closing_on_a_redis_that_hangs_keeps_its_deadline_and_names_the_settlements_it_leaves(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Shutdown gives the limiter what is left of the grace period (gateway/app.py). A settlement that reaches a
    soft threshold starts a look at the budget's spend, which waits for Redis; with Redis hung, close must still
    end within its deadline and log the settlement it could not send, by key, instead of waiting on the look
    past the deadline and being cut off before the store could say what it lost."""
    prompt = prompt_tokens()
    with private_redis(tmp_path) as server:
        async def main() -> float:
            store = RedisStore(server.url, key_prefix="close:", timeout_s=2)  # each hung call waits 2 s (sends 8)
            await store.start()
            limiter = Limiter(store, COUNTER, clock=FakeClock(time.time()))
            policy = parse_policy(policy_text(team_extra="    budget: {tokens: 1000, soft_thresholds: [0.5]}"))
            caller = next(k for k in policy.keys.values() if k.key_id == "alpha-key")
            admission = await limiter.admit(policy, caller, Endpoint.CHAT, {
                "model": "big", "max_tokens": 600, "messages": [{"role": "user", "content": "hello there"}]},
                policy.models["big"], {})
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            try:
                limiter.settle(admission, Usage(prompt_tokens=prompt, completion_tokens=550 - prompt), 200)
                started = time.monotonic()
                await limiter.close(timeout_s=0.5)
                return time.monotonic() - started
            finally:
                server.process.send_signal(signal.SIGCONT)

        with caplog.at_level(logging.INFO, logger="switchboard"):
            took = asyncio.run(main())
    assert took < 1.0
    lost = next(record.getMessage() for record in caplog.records if "closing with" in record.getMessage())
    assert "{alpha}:b:team:tok:" in lost, lost  # the team's token budget, its settlement never sent
