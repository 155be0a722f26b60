"""Three gateway processes sharing Redis hold one team's budget together: admitting through Redis each time, and
admitting from leases (`state.leases`, docs/accounting.md "Leases"; that requests are admitted from them at all is
tests/test_state_leases.py's to show)."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis

from tests.conftest import standard_policy
from tests.fakes import FakeOpenAIUpstream
from tests.fakes.state_stores import (
    SHARED_REDIS,
    GatewayProcess,
    drop_prefix,
    shared_redis_available,
    unique_prefix,
)

BUDGET = 4000
MAX_TOKENS = 20
WORKERS = 12


@pytest.fixture(params=["exact", "leased"])
def replicas(request: pytest.FixtureRequest, tmp_path: Path, upstream: FakeOpenAIUpstream
             ) -> Iterator[tuple[list[GatewayProcess], str]]:
    """Three gateways sharing Redis, and the key prefix they use there."""
    if not shared_redis_available():
        pytest.fail("no Redis on 127.0.0.1:6379 (make test starts one)")
    prefix = unique_prefix()
    # A generous Redis timeout: this test is about counting across replicas, and on a loaded 2-core CI box a
    # 250 ms round trip would take the configured failure path instead of the one under test.
    # Leases given back after 0.2 s idle: the counters below include a lease until it is.
    leases = ", leases: {requests: 32, headroom_fraction: 0.05, idle_s: 0.2}" if request.param == "leased" else ""
    text = standard_policy(upstream.base_url, extra=f"state: {{url: '{SHARED_REDIS}', key_prefix: '{prefix}', "
                                                    f"timeout_s: 5{leases}}}\n")
    text = text.replace("    models: [chat-model, embed-model]\n",
                        "    models: [chat-model, embed-model]\n    limits: {rpm: 1000000}\n"
                        f"    budget: {{tokens: {BUDGET}}}\n", 1)
    policy = tmp_path / "shared.yaml"
    policy.write_text(text)
    gateways = [GatewayProcess(policy, tmp_path / f"gateway-{i}.log") for i in range(3)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        # Three processes loading tiktoken at once on a shared 2-core box can take well over 30 s.
        list(pool.map(lambda gateway: gateway.start(timeout=120), gateways))
    yield gateways, prefix
    for gateway in gateways:
        gateway.kill()
    drop_prefix(SHARED_REDIS, prefix)


def report(policy: Path) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-m", "gateway", "usage", "--policy", str(policy), "--team", "alpha"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return {row["unit"]: row["used"] for row in json.loads(out.stdout)["usage"]}


def requests_counted(prefix: str, minutes: range) -> int:
    """The team's per-minute request counters in Redis, summed over `minutes` (minute numbers since the epoch)."""
    client = redis.Redis.from_url(SHARED_REDIS)
    try:
        values = client.mget([f"{prefix}{{alpha}}:r:team:rpm:{minute}" for minute in minutes])
    finally:
        client.close()
    return sum(int(value) for value in values if value is not None)


def test_three_replicas_never_overspend_and_count_every_request_once(
        replicas: tuple[list[GatewayProcess], str]) -> None:
    gateways, prefix = replicas
    clients = [openai.OpenAI(base_url=g.base_url + "/v1", api_key="sk-alpha", max_retries=0) for g in gateways]

    def hammer(worker: int) -> tuple[int, int]:
        client = clients[worker % len(clients)]
        served = tokens = 0
        while True:
            try:
                reply = client.chat.completions.create(
                    model="chat-model", messages=[{"role": "user", "content": f"worker {worker} says hello"}],
                    max_tokens=MAX_TOKENS)
            except openai.RateLimitError as error:
                assert error.code == "budget_exceeded"
                return served, tokens
            assert reply.usage is not None
            served += 1
            tokens += reply.usage.total_tokens

    began = time.time()
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(hammer, range(WORKERS)))
    ended = time.time()
    served = sum(s for s, _ in results)
    spent = sum(t for _, t in results)
    assert served > 50
    # Settlements are written just after each reply; wait for the counters to catch up. Requests are counted
    # per clock minute and the run may cross a minute boundary: sum every minute window it touched (the
    # usage report shows only the current one); a request refused for budget is not counted.
    minutes = range(int(began // 60), int(ended // 60) + 1)
    deadline = time.monotonic() + 10
    while (counted := {"requests": requests_counted(prefix, minutes),
                       "tokens": report(gateways[0].policy)["tokens"]}) != {"requests": served, "tokens": spent}:
        assert time.monotonic() < deadline, f"counted {counted}, served {served} requests using {spent} tokens"
        time.sleep(0.1)
    in_flight_bound = WORKERS * (MAX_TOKENS + 30)  # each worker holds at most one reservation
    assert spent <= BUDGET + in_flight_bound
    assert spent >= BUDGET - in_flight_bound  # and the budget was actually used, not refused early
