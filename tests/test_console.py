"""The admin console at /ui and its feeds, over HTTP (the browser test is tests/test_console_browser.py)."""

from __future__ import annotations

import base64
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from gateway.accounting.usage import UsageRecord
from gateway.http.console.activity import RecentActivity
from tests.conftest import RunningGateway
from tests.demo_policy import ADMIN_KEY, DEMO_KEY, INTERN_KEY, demo_text
from tests.fakes.otlp_receiver import WaitingSpanExporter

BEARER = {"authorization": f"Bearer {ADMIN_KEY}"}


def basic(password: str, user: str = "admin") -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def demo(start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    return start_gateway(demo_text())


def _eventually(read: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 10.0) -> Any:
    """`read()` once `ok` holds for it (the ledger commits every 0.5 s), or the last value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if ok(value) or time.monotonic() > deadline:
            return value
        threading.Event().wait(0.05)


@pytest.mark.parametrize("path", ["/ui", "/ui/", "/ui/console.js", "/ui/api/spend", "/ui/api/overview"])
@pytest.mark.parametrize("headers", [{}, basic("sk-wrong"), basic(DEMO_KEY), {"authorization": "Basic !!"}],
                         ids=["none", "wrong", "team-key", "garbage"])
def test_the_console_asks_a_browser_for_the_admin_key(demo: RunningGateway, path: str,
                                                      headers: dict[str, str]) -> None:
    response = httpx.get(demo.base_url + path, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith('Basic realm="Switchboard console"')
    assert response.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
    assert ADMIN_KEY not in response.text


def test_the_console_pages_ship_with_the_package_under_a_strict_policy(demo: RunningGateway) -> None:
    with httpx.Client(base_url=demo.base_url, headers=basic(ADMIN_KEY, user="anyone")) as client:
        assert client.get("/ui").status_code == 308 and client.get("/ui").headers["location"] == "/ui/"
        page = client.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "default-src 'none'" in policy
        assert "http" not in page.text.replace('href="#', "")  # nothing from another origin, no CDN
        for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
            asset = client.get(f"/ui/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
            assert asset.headers["x-content-type-options"] == "nosniff"
        assert client.get("/ui/../pyproject.toml").status_code == 404
        assert client.get("/ui/nothing.js").status_code == 404


def test_the_bearer_admin_key_still_works_and_basic_works_on_admin_endpoints(demo: RunningGateway) -> None:
    for headers in (BEARER, basic(ADMIN_KEY)):
        response = httpx.get(demo.base_url + "/admin/targets", headers=headers)
        assert response.status_code == 200 and response.json()["object"] == "list"


def test_a_disabled_console_is_not_there(start_gateway: Callable[..., RunningGateway]) -> None:
    text = demo_text().replace("  console:\n", "  console:\n    enabled: false\n")
    gateway = start_gateway(text)
    assert httpx.get(gateway.base_url + "/ui/", headers=basic(ADMIN_KEY)).status_code == 404
    assert httpx.get(gateway.base_url + "/admin/overview", headers=BEARER).status_code == 200


def test_console_feeds_are_the_admin_endpoints(demo: RunningGateway) -> None:
    demo.client(DEMO_KEY).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    for feed in ("spend?by=model", "targets", "usage?team=interns", "budgets", "policy"):
        direct = _eventually(lambda f=feed: httpx.get(f"{demo.base_url}/admin/{f}", headers=BEARER).json(),
                             lambda body: body != [])
        through = httpx.get(f"{demo.base_url}/ui/api/{feed}", headers=basic(ADMIN_KEY)).json()
        if feed.startswith("usage"):
            direct.pop("at"), through.pop("at")
        assert through == direct, feed


def test_overview_counts_recent_traffic_and_todays_cost(demo: RunningGateway) -> None:
    client = demo.client(DEMO_KEY)
    costs = [float(client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"question {i}"}]).headers["x-switchboard-cost-usd"])
        for i in range(3)]
    missing = httpx.post(demo.v1 + "/chat/completions", headers={"authorization": f"Bearer {DEMO_KEY}"},
                         json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
    assert missing.status_code == 404
    overview = _eventually(lambda: httpx.get(demo.base_url + "/admin/overview", headers=BEARER).json(),
                           lambda body: body["cost_today_usd"] >= sum(costs) * 0.999999)
    assert overview["requests"] == 4 and overview["requests_per_s"] == round(4 / 60, 3)
    assert overview["error_rate"] == 0 and overview["client_error_rate"] == 0.25
    assert 0 < overview["overhead_ms"]["p50"] <= overview["overhead_ms"]["p99"]
    assert overview["cost_today_usd"] == pytest.approx(sum(costs), rel=1e-6)
    assert overview["policy"] == demo.store.current.fingerprint


def test_recent_activity_windows_and_percentiles() -> None:
    now = [1000.0]
    activity = RecentActivity(clock=lambda: now[0])

    def record(status: int, overhead: float) -> None:
        activity.record(UsageRecord("r", "t", "k", "chat", "m", None, None, False, status, None, 1.0, overhead))

    record(200, 50.0)  # will have left the 5-minute window
    now[0] += 301
    for overhead in range(1, 101):  # 1..100 ms
        record(500 if overhead <= 5 else 200, float(overhead))
    now[0] += 30
    summary = activity.summary()
    assert summary["requests"] == 100 and summary["requests_per_s"] == round(100 / 60, 3)
    assert summary["error_rate"] == 0.05 and summary["overhead_ms"] == {"p50": 50.0, "p99": 99.0}
    now[0] += 31  # out of the last minute, still in the last five
    assert activity.summary()["requests_per_s"] == 0 and activity.summary()["requests"] == 100
    assert RecentActivity().summary()["overhead_ms"] == {"p50": None, "p99": None}


def test_recent_activity_keeps_the_newest_requests_in_fixed_memory() -> None:
    now = [1000.0]
    activity = RecentActivity(clock=lambda: now[0], capacity=1000)

    def record(status: int, overhead: float) -> None:
        activity.record(UsageRecord("r", "t", "k", "chat", "m", None, None, False, status, None, 1.0, overhead))

    for _ in range(1000):
        record(500, 1.0)
    for _ in range(1500):  # overwrite every older slot, half of them twice
        record(404, 2.0)
    summary = activity.summary()
    assert summary["requests"] == 1000 and summary["error_rate"] == 0 and summary["client_error_rate"] == 1
    assert summary["overhead_ms"] == {"p50": 2.0, "p99": 2.0}

    # What the soak found (loadtests/soak.py): a deque of tuples grew ~120 bytes per request kept until it was
    # full. The ring's memory is all allocated up front: filling it keeps nothing more.
    tracemalloc.start()
    try:
        activity = RecentActivity(clock=lambda: now[0], capacity=20_000)
        before = tracemalloc.get_traced_memory()[0]
        for index in range(20_000):
            record(200, index / 7)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert activity.summary()["requests"] == 20_000
    assert grown < 4096, f"recording 20,000 requests kept {grown} bytes"


def test_requests_feed_lists_the_newest_ledger_rows_with_trace_links(
        start_gateway: Callable[..., RunningGateway]) -> None:
    exporter = WaitingSpanExporter()
    gateway = start_gateway(demo_text(), span_exporter=exporter)
    ids = []
    for key, model in ((DEMO_KEY, "gpt-4o"), (INTERN_KEY, "gpt-4o-mini"), (DEMO_KEY, "claude-haiku-4-5")):
        raw = gateway.client(key).chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hi"}])
        ids.append(raw.headers["x-request-id"])
    rows = _eventually(lambda: httpx.get(gateway.base_url + "/admin/requests?limit=2", headers=BEARER).json()["data"],
                       lambda data: len(data) == 2 and data[0]["request_id"] == ids[2])
    assert [r["request_id"] for r in rows] == [ids[2], ids[1]]
    newest = rows[0]
    assert newest["team"] == "demo" and newest["public_model"] == "claude-haiku-4-5" and newest["status"] == 200
    assert len(newest["trace_id"]) == 32
    assert newest["trace_url"] == f"http://127.0.0.1:16686/trace/{newest['trace_id']}"
    spans = exporter.wait_for_servers(3)
    assert newest["trace_id"] in {format(s.context.trace_id, "032x") for s in spans if s.context}
    bad = httpx.get(gateway.base_url + "/admin/requests?limit=0", headers=BEARER)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"


def test_budgets_feed_shows_how_much_of_each_budget_is_burned(demo: RunningGateway) -> None:
    demo.client(INTERN_KEY).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    (budget,) = httpx.get(demo.base_url + "/admin/budgets", headers=BEARER).json()["data"]
    assert budget["team"] == "interns" and budget["unit"] == "tokens" and budget["limit"] == 100
    record = demo.usage.wait_for(1)[0]
    used = record.usage.prompt_tokens + record.usage.completion_tokens
    assert budget["used"] == used and budget["burned"] == round(used / 100, 4)
    assert budget["remaining"] == 100 - used


def test_policy_feed_reports_the_last_reload(demo: RunningGateway) -> None:
    def policy() -> dict[str, Any]:
        return httpx.get(demo.base_url + "/admin/policy", headers=BEARER).json()

    first = policy()
    assert first["fingerprint"] == demo.store.current.fingerprint and first["last_reload"]["result"] == "loaded"
    demo.policy_path.write_text(demo.policy_path.read_text() + "\nnot_a_field: 1\n")
    refused = _eventually(policy, lambda body: body["last_reload"]["result"] == "refused")
    assert refused["last_reload"]["result"] == "refused" and refused["fingerprint"] == first["fingerprint"]
    assert any(p.startswith("not_a_field: unknown field") for p in refused["last_reload"]["problems"])


def test_the_root_path_says_where_things_are(demo: RunningGateway) -> None:
    response = httpx.get(demo.base_url + "/")
    assert response.status_code == 200 and response.json()["console"] == "/ui/" and response.json()["api"] == "/v1"
