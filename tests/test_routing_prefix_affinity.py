"""Prefix-affinity routing over fake vLLM replicas that simulate a KV prefix cache; load scraping."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest

from gateway.routing.strategies import prefix_hashes
from tests.conftest import RunningGateway
from tests.fakes.routing_policy import ADMIN_KEY, multi_policy
from tests.fakes.vllm_replica import FakeVLLMReplica


@pytest.fixture
def replicas() -> Iterator[list[FakeVLLMReplica]]:
    with FakeVLLMReplica("r0", miss_ms=0, hit_ms=0) as a, FakeVLLMReplica("r1", miss_ms=0, hit_ms=0) as b, \
            FakeVLLMReplica("r2", miss_ms=0, hit_ms=0) as c:
        yield [a, b, c]


def _start(start_gateway: Callable[[str], RunningGateway], replicas: list[FakeVLLMReplica], strategy: str,
           routing: str = "", provider_extra: str = "") -> RunningGateway:
    targets = "\n".join(f"      - {{provider: r{i}, model: up-{i}}}" for i in range(len(replicas)))
    models = f"  m:\n    routing: {{strategy: {strategy}{routing}}}\n    targets:\n{targets}"
    return start_gateway(multi_policy({f"r{i}": r.base_url for i, r in enumerate(replicas)}, models, kind="vllm",
                                      provider_extra=provider_extra))


def _conversation(client, number: int, turns: int) -> list[str]:
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    served = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"conversation {number} question {turn}"})
        response = client.chat.completions.create(model="m", messages=messages)
        served.append(response.model)
        messages.append({"role": "assistant", "content": response.choices[0].message.content})
    return served


def _hit_rate(replicas: list[FakeVLLMReplica]) -> float:
    return sum(r.hits for r in replicas) / sum(r.queries for r in replicas)


def test_turns_of_a_conversation_share_prefix_hashes() -> None:
    system = {"role": "system", "content": "be brief"}
    turn1 = {"messages": [system, {"role": "user", "content": "a"}]}
    turn2 = {"messages": [*turn1["messages"], {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}
    first, second = prefix_hashes(turn1), prefix_hashes(turn2)
    assert second[: len(first)] == first
    assert len(second) == len(first) + 2
    # Tools belong to the first block: a different tool set is a different prefix.
    assert prefix_hashes({**turn1, "tools": [{"type": "function"}]})[0] != first[0]


def test_many_conversations_keep_landing_on_their_replica(replicas, start_gateway) -> None:
    gateway = _start(start_gateway, replicas, "prefix-affinity")
    client = gateway.client()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        served = list(pool.map(lambda n: _conversation(client, n, 4), range(36)))
    assert _hit_rate(replicas) > 0.9
    assert sum(len(set(s)) == 1 for s in served) / len(served) > 0.9
    # The conversations are spread over the replicas, not piled on one.
    assert all(r.requests >= 10 for r in replicas)


def test_weighted_routing_for_comparison_misses_the_cache(replicas, start_gateway) -> None:
    gateway = _start(start_gateway, replicas, "weighted")
    client = gateway.client()
    for number in range(12):
        _conversation(client, number, 4)
    assert _hit_rate(replicas) < 0.5


def test_spills_to_the_least_loaded_replica_when_the_owner_is_overloaded(replicas, start_gateway) -> None:
    gateway = _start(start_gateway, replicas, "prefix-affinity", ", prefix_affinity: {spill_margin: 1}")
    client = gateway.client()
    messages = [{"role": "user", "content": "hello there"}]
    owner = client.chat.completions.create(model="m", messages=messages).model
    held = replicas[int(owner.rsplit("-", 1)[1])]
    held.hold()
    messages += [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "more"}]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(client.chat.completions.create, model="m", messages=messages) for _ in range(2)]
        assert held.wait_for_running(2)  # within the margin: both stay with the owner
        spilled = client.chat.completions.create(model="m", messages=messages).model
        held.release()
        assert {f.result(timeout=5).model for f in waiting} == {owner}
    assert spilled != owner


def test_scraped_queue_depth_makes_a_replica_count_as_busy(replicas, start_gateway) -> None:
    gateway = _start(start_gateway, replicas, "prefix-affinity", ", prefix_affinity: {spill_margin: 4}",
                     provider_extra="    metrics: {interval_s: 1}\n")  # trusted 3 s: room on a loaded machine
    client = gateway.client()
    messages = [{"role": "user", "content": "scrape me"}]
    owner = client.chat.completions.create(model="m", messages=messages).model
    busy = replicas[int(owner.rsplit("-", 1)[1])]
    busy.reported_waiting = 20  # other gateways' traffic, visible only in /metrics
    _wait_for_scrape(gateway, owner, 20)
    messages += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}]
    assert client.chat.completions.create(model="m", messages=messages).model != owner


def _wait_for_scrape(gateway: RunningGateway, model: str, load: float) -> None:
    done = threading.Event()
    for _ in range(200):
        rows = httpx.get(gateway.base_url + "/admin/targets", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        row = next(r for r in rows.json()["data"] if r["model"] == model)
        if row["scraped_load"] is not None and row["scraped_load"] >= load:
            return
        done.wait(0.02)
    raise AssertionError("the gateway never scraped the replica's load")

