"""Budget alerts through a running gateway to a real HTTP receiver: signed, retried, once per threshold."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.compiled.policy import PolicyError, parse_policy
from tests.conftest import ADMIN_KEY, ADMIN_POLICY, RunningGateway, metrics_text, standard_policy
from tests.fakes import FakeOpenAIUpstream
from tests.fakes.webhook_receiver import WebhookReceiver

ALPHA_MODELS = "    models: [chat-model, embed-model]\n"
SECRET = b"whsec-test-7c1f0e2a"
Start = Callable[..., RunningGateway]


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as hook:
        yield hook


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "webhook.secret"
    path.write_bytes(SECRET + b"\n")
    return path


def alert_policy(upstream: FakeOpenAIUpstream, budget: str, webhook: str, extra: str = "") -> str:
    """The standard policy with a budget for team alpha and one webhook `ops`."""
    alerts = f"alerts:\n  webhooks:\n    ops: {webhook}\n"
    text = standard_policy(upstream.base_url, extra=ADMIN_POLICY + alerts + extra)
    return text.replace(ALPHA_MODELS, ALPHA_MODELS + f"    budget: {budget}\n", 1)


def signed_hook(receiver: WebhookReceiver, secret_file: Path, extra: str = "") -> str:
    return (f"{{url: '{receiver.url}', secret_file: {secret_file.name}, "
            f"backoff: {{initial_s: 0.02, max_s: 0.1}}{extra}}}")


def ask(gateway: RunningGateway, content: str = "hi there") -> None:
    gateway.client().chat.completions.create(model="chat-model", messages=[{"role": "user", "content": content}],
                                             max_tokens=5)


def exhaust(gateway: RunningGateway) -> int:
    """Small requests until the budget refuses one; how many were served."""
    served = 0
    with pytest.raises(openai.RateLimitError) as refused:
        while served < 100:
            ask(gateway)
            served += 1
    assert refused.value.code == "budget_exceeded"
    return served


def admin_alerts(gateway: RunningGateway, key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.get(gateway.base_url + "/admin/alerts", headers={"authorization": f"Bearer {key}"})


def wait_for_delivery(gateway: RunningGateway, status: str, timeout: float = 10) -> dict[str, Any]:
    """The newest delivery listed by /admin/alerts once it has reached `status`."""
    deadline = time.monotonic() + timeout
    while True:
        deliveries = admin_alerts(gateway).json()["deliveries"]
        if deliveries and deliveries[0]["status"] == status:
            return deliveries[0]  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, deliveries
        time.sleep(0.02)


def metric(gateway: RunningGateway, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    found = re.search(rf"^{name}\{{{re.escape(wanted)}\}} ([0-9.e+]+)$", metrics_text(gateway), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_thresholds_and_exhaustion_each_post_one_signed_alert(
        upstream: FakeOpenAIUpstream, start_gateway: Start, receiver: WebhookReceiver, secret_file: Path) -> None:
    gateway = start_gateway(alert_policy(upstream, "{tokens: 200, period: daily, soft_thresholds: [0.5, 0.8], "
                                                   "notify: [ops]}", signed_hook(receiver, secret_file)))
    assert exhaust(gateway) > 3
    for _ in range(3):  # more refusals in the same period report nothing new
        with pytest.raises(openai.RateLimitError):
            ask(gateway)
    gateway.stop()  # shutdown sends every alert fired so far: after it nothing more can arrive

    posts = receiver.received
    assert sorted((p.json()["type"], p.json()["threshold"]) for p in posts) == [
        ("budget.exhausted", 1.0), ("budget.threshold", 0.5), ("budget.threshold", 0.8)]
    for post in posts:
        assert post.signed_by(SECRET), post.headers
        assert not post.signed_by(b"another secret")
        body = post.json()
        assert post.headers["idempotency-key"] == body["id"]
        assert post.headers["x-switchboard-event"] == body["type"]
        assert post.headers["content-type"] == "application/json"
        assert body["team"] == "alpha" and body["scope"] == "team" and body["unit"] == "tokens"
        assert body["limit"] == 200 and body["mode"] == "enforce" and "Team alpha" in body["text"]
    assert len({p.headers["idempotency-key"] for p in posts}) == 3
    threshold = next(p.json() for p in posts if p.json()["threshold"] == 0.8)
    assert 160 <= threshold["used"] < 200 and "80% of its token budget" in threshold["text"]


def test_a_webhook_changed_by_a_reload_gets_the_next_alert(
        upstream: FakeOpenAIUpstream, start_gateway: Start, receiver: WebhookReceiver, secret_file: Path) -> None:
    policy = alert_policy(upstream, "{tokens: 200, period: daily, soft_thresholds: [0.5], notify: [ops]}",
                          signed_hook(receiver, secret_file))
    gateway = start_gateway(policy)
    applied = threading.Event()
    gateway.store.on_change(lambda _: applied.set())
    with WebhookReceiver() as moved:
        gateway.policy_path.write_text(policy.replace(receiver.url, moved.url).replace(
            "max_s: 0.1}", "max_s: 0.1}, format: slack"))
        assert applied.wait(5)
        exhaust(gateway)
        [post, *_] = moved.wait_for(1)
        assert set(post.json()) == {"text", "blocks"}  # the reloaded format: a Slack message
        assert post.signed_by(SECRET)
    assert receiver.received == []  # the old address heard nothing


def test_a_receiver_failing_twice_gets_the_same_idempotency_key_three_times(
        upstream: FakeOpenAIUpstream, start_gateway: Start, receiver: WebhookReceiver, secret_file: Path) -> None:
    gateway = start_gateway(alert_policy(upstream, "{tokens: 60, notify: [ops]}", signed_hook(receiver, secret_file)))
    receiver.fail_next(503, 503)
    exhaust(gateway)
    posts = receiver.wait_for(3)
    assert [p.status for p in posts] == [503, 503, 200]
    assert len({p.headers["idempotency-key"] for p in posts}) == 1
    assert len({p.body for p in posts}) == 1
    assert [p.headers["x-switchboard-delivery-attempt"] for p in posts] == ["1", "2", "3"]
    assert all(p.signed_by(SECRET) for p in posts)
    delivered = wait_for_delivery(gateway, "delivered")
    assert delivered["attempts"] == 3 and delivered["idempotency_key"] == posts[0].headers["idempotency-key"]
    assert delivered["webhook"] == "ops" and delivered["event"] == "budget.exhausted"
    assert metric(gateway, "switchboard_alert_delivery_failures_total", webhook="ops", reason="http_503") == 2
    assert metric(gateway, "switchboard_alert_deliveries_total", webhook="ops", outcome="delivered") == 1


def test_failed_deliveries_are_listed_and_counted_and_need_an_admin_key(
        upstream: FakeOpenAIUpstream, start_gateway: Start, receiver: WebhookReceiver, secret_file: Path) -> None:
    gateway = start_gateway(alert_policy(upstream, "{tokens: 60, notify: [ops]}",
                                         signed_hook(receiver, secret_file, ", max_attempts: 2")))
    receiver.fail_next(500, 500, 500)
    exhaust(gateway)
    failed = wait_for_delivery(gateway, "failed")
    assert failed["attempts"] == 2 and failed["last_http_status"] == 500 and failed["last_error"] == "HTTP 500"
    assert "Team alpha has exhausted its token budget" in failed["summary"]
    assert len(receiver.received) == 2  # max_attempts: no third try
    assert metric(gateway, "switchboard_alert_deliveries_total", webhook="ops", outcome="failed") == 1
    assert metric(gateway, "switchboard_alert_delivery_failures_total", webhook="ops", reason="http_500") == 2
    tenant = admin_alerts(gateway, "sk-alpha")
    assert tenant.status_code == 401 and tenant.json()["error"]["code"] == "invalid_api_key"


def test_a_receiver_that_refuses_the_alert_is_not_retried(
        upstream: FakeOpenAIUpstream, start_gateway: Start, receiver: WebhookReceiver, secret_file: Path) -> None:
    gateway = start_gateway(alert_policy(upstream, "{tokens: 60, notify: [ops]}", signed_hook(receiver, secret_file)))
    receiver.fail_next(401)
    exhaust(gateway)
    failed = wait_for_delivery(gateway, "failed")
    assert failed["attempts"] == 1 and failed["last_http_status"] == 401


def test_delivery_is_off_the_request_path(
        upstream: FakeOpenAIUpstream, start_gateway: Start, receiver: WebhookReceiver, secret_file: Path) -> None:
    gateway = start_gateway(alert_policy(upstream, "{tokens: 60, notify: [ops]}",
                                         signed_hook(receiver, secret_file, ", timeout_s: 60")))
    receiver.hold()  # the receiver takes the alert and never answers while the test runs
    exhaust(gateway)
    receiver.wait_for(1)
    began = time.monotonic()
    for _ in range(3):  # while the delivery hangs, requests are answered as before
        with pytest.raises(openai.RateLimitError):
            ask(gateway)
        assert gateway.client("sk-beta").chat.completions.create(
            model="beta-model", messages=[{"role": "user", "content": "hi"}], max_tokens=5).choices
    assert time.monotonic() - began < 5
    assert admin_alerts(gateway).json()["queue"] == {"queued": 0, "capacity": 1000, "delivering": 1}
    receiver.release()
    assert wait_for_delivery(gateway, "delivered")["attempts"] == 1
    assert len(receiver.received) == 1  # the later refusals were the same exhaustion: no new alert


def test_slack_format_posts_a_slack_message(
        upstream: FakeOpenAIUpstream, start_gateway: Start, receiver: WebhookReceiver) -> None:
    hook = f"{{url: '{receiver.url}', format: slack}}"
    gateway = start_gateway(alert_policy(upstream, "{tokens: 60, notify: [ops], mode: shadow}", hook))
    client = gateway.client()
    for _ in range(100):  # a shadow budget serves every request, and reports the exhaustion
        raw = client.chat.completions.with_raw_response.create(
            model="chat-model", messages=[{"role": "user", "content": "hi there"}], max_tokens=5)
        if "x-switchboard-shadow-reject" in raw.headers:
            break
    (post,) = receiver.wait_for(1)
    body = post.json()
    assert set(body) == {"text", "blocks"}
    assert body["text"].startswith("Team alpha has exhausted its token budget")
    assert "would have been refused" in body["text"] and "shadow budget" in body["text"]
    assert body["blocks"][0]["type"] == "section" and body["text"] in body["blocks"][0]["text"]["text"]
    assert "x-switchboard-signature" not in post.headers  # no secret configured: unsigned, as Slack expects
    assert post.headers["idempotency-key"]
    wait_for_delivery(gateway, "delivered")


def test_a_request_larger_than_the_whole_budget_is_not_its_exhaustion(
        upstream: FakeOpenAIUpstream, start_gateway: Start, receiver: WebhookReceiver, secret_file: Path) -> None:
    gateway = start_gateway(alert_policy(upstream, "{tokens: 60, notify: [ops]}", signed_hook(receiver, secret_file)))
    with pytest.raises(openai.RateLimitError):
        ask(gateway, "x " * 100)  # needs more than 60 tokens on its own
    exhaust(gateway)  # the period's exhaustion alert was not used up by it
    (post,) = receiver.wait_for(1)
    assert post.json()["type"] == "budget.exhausted" and post.json()["used"] > 30


def test_a_full_delivery_queue_drops_and_counts(upstream: FakeOpenAIUpstream, start_gateway: Start,
                                                secret_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Nothing listens at the webhook's URL and a retry waits 15-30 s: with queue_size 1 and one delivery at a
    # time, the first alert is retrying, the second queued, and the next two are dropped.
    dead = "http://127.0.0.1:9/unreachable"
    hook = f"{{url: '{dead}', secret_file: {secret_file.name}, backoff: {{initial_s: 30, max_s: 30}}}}"
    text = alert_policy(upstream, "{tokens: 200, period: daily, soft_thresholds: [0.1, 0.5, 0.8], notify: [ops]}",
                        hook, extra="  queue_size: 1\n  concurrent_deliveries: 1\n")
    # Shutdown gives up on the delivery sleeping in backoff after the grace period: keep the test's short.
    gateway = start_gateway(text.replace("server:\n", "server:\n  shutdown_grace_s: 0.5\n", 1))
    while True:
        try:
            ask(gateway)
        except openai.RateLimitError:
            break
    deadline = time.monotonic() + 10
    while (listed := admin_alerts(gateway).json())["dropped"] < 2:
        assert time.monotonic() < deadline, listed
        time.sleep(0.02)
    assert listed["queue"] == {"queued": 1, "capacity": 1, "delivering": 1}
    assert [d["status"] for d in listed["deliveries"]].count("dropped") == 2
    assert metric(gateway, "switchboard_alert_deliveries_total", webhook="ops", outcome="dropped") == 2
    assert metric(gateway, "switchboard_alert_delivery_failures_total", webhook="ops", reason="connection") >= 1
    gateway.stop()  # the retrying and the queued delivery cannot finish: each is named in the log as lost
    lost = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lost alert")]
    assert len(lost) == 2 and all("webhook ops" in line and "Team alpha has used" in line for line in lost), lost


@pytest.mark.parametrize(("webhook", "budget", "environ", "message"), [
    ("{url: 'http://h/x', secret: abc}", "{tokens: 9}", {},
     "alerts.webhooks.ops.secret: unknown field"),
    ("{url: 'http://h/x'}", "{tokens: 9}", {},
     "alerts.webhooks.ops: format: json deliveries are signed: set `secret_env`"),
    ("{url: 'ftp://h/x', secret_env: HOOK_SECRET}", "{tokens: 9}", {"HOOK_SECRET": "s"},
     "alerts.webhooks.ops.url: must start with http:// or https://"),
    ("{url: 'http://h/x', secret_env: HOOK_SECRET}", "{tokens: 9}", {},
     "alerts.webhooks.ops.secret_env: environment variable HOOK_SECRET is not set"),
    ("{url: 'http://h/x', secret_file: missing.secret}", "{tokens: 9}", {},
     "alerts.webhooks.ops.secret_file: cannot read"),
    ("{url: 'http://h/x', secret_env: HOOK_SECRET}", "{tokens: 9, notify: [pager]}", {"HOOK_SECRET": "s"},
     "teams.alpha.budget.notify.0: unknown webhook 'pager'; defined: ops"),
    ("{url: 'http://h/x', secret_env: HOOK_SECRET}", "{tokens: 9, soft_thresholds: [1.5]}", {"HOOK_SECRET": "s"},
     "teams.alpha.budget.soft_thresholds: each threshold is a fraction between 0 and 1"),
])
def test_alert_settings_are_validated_with_their_path(upstream: FakeOpenAIUpstream, webhook: str, budget: str,
                                                      environ: dict[str, str], message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(alert_policy(upstream, budget, webhook), environ=environ)
    assert any(problem.startswith(message) for problem in caught.value.problems), caught.value.problems


def test_secrets_are_read_at_load_from_the_environment(upstream: FakeOpenAIUpstream) -> None:
    loaded = parse_policy(alert_policy(upstream, "{tokens: 9, soft_thresholds: [0.5, 1.0], notify: [ops]}",
                                       "{url: 'https://h/x', secret_env: HOOK_SECRET}"),
                          environ={"HOOK_SECRET": "from-env"})
    assert loaded.webhooks["ops"].secret == b"from-env"
    assert loaded.rules is not None and loaded.rules.team_budgets["alpha"].soft_thresholds == (0.5, 1.0)
