"""Three gateway processes sharing a private Redis: one alert per threshold, not three; shadow counts shared."""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ADMIN_KEY, ADMIN_POLICY, standard_policy
from tests.fakes import FakeOpenAIUpstream
from tests.fakes.state_stores import GatewayProcess, PrivateRedis, private_redis
from tests.fakes.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.slow  # three gateway processes loading tiktoken: ~30-60 s on a busy 2-core machine

SECRET = b"whsec-replicas-51d2"
BUDGET = 600
SHADOW_RPD = 5


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path) as server:
        yield server


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as hook:
        yield hook


@pytest.fixture
def replicas(tmp_path: Path, upstream: FakeOpenAIUpstream, redis_server: PrivateRedis,
             receiver: WebhookReceiver) -> Iterator[list[GatewayProcess]]:
    (tmp_path / "hook.secret").write_bytes(SECRET)
    extra = (ADMIN_POLICY + f"state: {{url: '{redis_server.url}', timeout_s: 5}}\n"
             f"alerts:\n  webhooks:\n    ops: {{url: '{receiver.url}', secret_file: hook.secret}}\n")
    text = standard_policy(upstream.base_url, extra=extra).replace(
        "    models: [chat-model, embed-model]\n", "    models: [chat-model, embed-model]\n"
        f"    budget: {{tokens: {BUDGET}, soft_thresholds: [0.5], notify: [ops]}}\n"
        f"    limits: {{rpd: {SHADOW_RPD}, mode: shadow}}\n", 1)
    policy = tmp_path / "shared.yaml"
    policy.write_text(text)
    gateways = [GatewayProcess(policy, tmp_path / f"gateway-{i}.log") for i in range(3)]
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda gateway: gateway.start(timeout=120), gateways))
        yield gateways
    finally:
        for gateway in gateways:
            gateway.kill()


def ask(gateway: GatewayProcess) -> bool:
    """One request; False when the budget refused it."""
    client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="sk-alpha", max_retries=0)
    try:
        client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "hello there"}],
                                       max_tokens=10)
    except openai.RateLimitError as error:
        assert error.code == "budget_exceeded"
        return False
    return True


def shadow_row(gateway: GatewayProcess) -> tuple[int, int]:
    """`used` and `would_reject` of the team's shadow requests-per-day limit, from /admin/usage."""
    report = httpx.get(gateway.base_url + "/admin/usage", params={"team": "alpha"},
                       headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
    (row,) = [r for r in report["usage"] if r["limit_type"] == "requests per day"]
    assert row["mode"] == "shadow"
    return row["used"], row["would_reject"]


def decisions(gateway: GatewayProcess, kind: str) -> tuple[int, int]:
    """How often this replica reported the budget event `kind`, and how often it found another had."""
    text = gateway.log.read_text()
    fired = len(re.findall(rf'"event":"budget_{kind}"', text))
    deferred = len(re.findall(rf"budget {kind} \S+ of \S+ already reported by another replica", text))
    return fired, deferred


def serve_until_decided(gateway: GatewayProcess, kind: str) -> int:
    """Requests `gateway` serves until it has decided whether to report the budget event `kind`.

    A replica decides when one of its settlements reads the budget's spend past the threshold: while the six
    clients crossed it, or at its next request (the read is off the request path, so it may take one more).
    """
    served = 0
    deadline = time.monotonic() + 20
    while not sum(decisions(gateway, kind)):
        assert time.monotonic() < deadline, (served, gateway.log.read_text()[-2000:])
        assert ask(gateway)
        served += 1
    return served


def wait_until_every_replica_decided(gateways: list[GatewayProcess], kind: str) -> list[tuple[int, int]]:
    deadline = time.monotonic() + 20
    while True:
        found = [decisions(g, kind) for g in gateways]
        if all(sum(seen) for seen in found):
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.05)


def test_three_replicas_fire_one_alert_per_threshold_and_share_shadow_counts(
        replicas: list[GatewayProcess], receiver: WebhookReceiver) -> None:
    crossed = threading.Event()

    def hammer(worker: int) -> int:
        # Six clients over three replicas, until the threshold's alert arrives: they cross it together.
        served = 0
        while not crossed.is_set() and not receiver.received:
            assert ask(replicas[worker % 3])
            served += 1
        crossed.set()
        return served

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        served = sum(pool.map(hammer, range(6)))
    for gateway in replicas:  # each replica settles requests above the threshold: each tries to report it
        served += serve_until_decided(gateway, "threshold")
    # The shadow daily request limit, counted by all three in Redis, holds what enforcement would have let
    # through, and counts every other request as one it would have refused.
    deadline = time.monotonic() + 10
    while (shadow := shadow_row(replicas[0])) != (SHADOW_RPD, served - SHADOW_RPD):
        assert time.monotonic() < deadline, (shadow, served)
        time.sleep(0.05)
    threshold = [decisions(gateway, "threshold") for gateway in replicas]
    assert sum(fired for fired, _ in threshold) == 1, threshold
    assert sum(deferred for _, deferred in threshold) == 2, threshold

    for gateway in replicas:  # every replica refuses a request: each tries to report the exhaustion
        while ask(gateway):
            pass
    exhausted = wait_until_every_replica_decided(replicas, "exhausted")
    assert sum(fired for fired, _ in exhausted) == 1, exhausted

    posts = receiver.wait_for(2)
    assert sorted(p.json()["type"] for p in posts) == ["budget.exhausted", "budget.threshold"]
    assert all(p.signed_by(SECRET) for p in posts)
    listed = [httpx.get(g.base_url + "/admin/alerts", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()
              for g in replicas]
    assert sum(len(report["deliveries"]) for report in listed) == 2
    assert len(receiver.received) == 2
