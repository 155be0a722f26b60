"""Reloads apply everything they can, and refuse, saying so, what needs a restart (gateway/policy_store.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import openai
import pytest

from gateway.policy_store import RESTART_ONLY
from tests.conftest import RunningGateway, free_port, standard_policy
from tests.fakes import Behaviour, FakeOpenAIUpstream

Start = Callable[..., RunningGateway]
ASK = [{"role": "user", "content": "hi"}]


def _watch(gateway: RunningGateway) -> tuple[threading.Event, list[str]]:
    applied, refusals = threading.Event(), []
    gateway.store.on_change(lambda policy: applied.set())
    gateway.store.on_refusal(lambda error: refusals.extend(error.problems))
    return applied, refusals


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    done = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if condition():
            return True
        done.wait(0.02)
    return condition()


def test_provider_timeouts_changed_by_a_reload_take_effect(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    policy = standard_policy(upstream.base_url)
    gateway = start_gateway(policy)
    upstream.script(Behaviour.slow_first_byte(800))
    assert gateway.client().chat.completions.create(model="chat-model", messages=ASK).choices  # 2 s: in time
    applied, _ = _watch(gateway)
    gateway.policy_path.write_text(policy.replace("first_byte_s: 2", "first_byte_s: 0.2"))
    assert applied.wait(5)
    upstream.script(Behaviour.slow_first_byte(800))
    with pytest.raises(openai.APIStatusError) as late:
        gateway.client().chat.completions.create(model="chat-model", messages=ASK)
    assert late.value.status_code == 504


def test_server_bounds_and_concurrency_changed_by_a_reload_take_effect(upstream: FakeOpenAIUpstream,
                                                                       start_gateway: Start) -> None:
    policy = standard_policy(upstream.base_url)
    gateway = start_gateway(policy)
    applied, _ = _watch(gateway)
    gateway.policy_path.write_text(policy.replace("  max_body_bytes: 65536\n", "  max_body_bytes: 1024\n").replace(
        "      - id: beta-key\n", "      - id: beta-key\n        max_concurrent: 1\n", 1))
    assert applied.wait(5)
    with pytest.raises(openai.APIStatusError) as large:
        gateway.client().chat.completions.create(model="chat-model", messages=[{"role": "user",
                                                                                "content": "x " * 1000}])
    assert large.value.status_code == 413
    upstream.script(Behaviour.hanging())
    beta = gateway.client("sk-beta", timeout=10)
    worker = threading.Thread(target=lambda: beta.chat.completions.create(model="beta-model", messages=ASK))
    worker.start()
    try:
        assert upstream.wait_for_requests(1)
        with pytest.raises(openai.RateLimitError):
            beta.chat.completions.create(model="beta-model", messages=ASK)
    finally:
        upstream.release()
        worker.join(10)


@pytest.mark.parametrize("path, edit", [
    ("server.admin", lambda text: text.replace("server:\n", f"server:\n  admin: {{port: {free_port()}}}\n", 1)),
    ("server.shutdown_grace_s", lambda text: text.replace("server:\n", "server:\n  shutdown_grace_s: 3\n", 1)),
    ("state", lambda text: text + "state: {backend: memory, key_prefix: 'other:'}\n"),
    ("ledger.path", lambda text: text + "ledger: {path: spend.sqlite}\n"),
    ("telemetry.metrics.enabled", lambda text: text + "telemetry: {metrics: {enabled: false}}\n"),
])
def test_a_reload_that_needs_a_restart_is_refused_and_says_so(upstream: FakeOpenAIUpstream, start_gateway: Start,
                                                              path: str, edit: Callable[[str], str]) -> None:
    policy = standard_policy(upstream.base_url)
    gateway = start_gateway(policy)
    before = gateway.store.current
    applied, refusals = _watch(gateway)
    gateway.policy_path.write_text(edit(policy))
    assert _wait_for(lambda: bool(refusals))
    assert not applied.is_set() and gateway.store.current is before
    assert refusals == [f"{path}: changed, but it is read only at startup; restart the gateway to apply it "
                        "(the running policy keeps serving)"]
    assert gateway.client().chat.completions.create(model="chat-model", messages=ASK).choices


def test_every_restart_only_setting_is_tested() -> None:
    tested = {"server.admin", "server.shutdown_grace_s", "state", "ledger.path", "telemetry.metrics.enabled"}
    assert set(RESTART_ONLY) == tested
