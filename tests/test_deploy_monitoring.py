"""deploy/prometheus and deploy/grafana against the real thing: promtool, and a real Prometheus
scraping a real gateway with the shipped scrape config, answering every dashboard panel's query."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from tests.conftest import ADMIN_KEY, ADMIN_POLICY, RunningGateway, key_hash, standard_policy
from tests.fakes import Behaviour, FakeOpenAIUpstream
from tests.prometheus_server import ROOT, binary, running_prometheus
from tests.test_metrics import PRICES

PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "switchboard.json"


def promtool(*args: str) -> str:
    done = subprocess.run([binary("promtool"), *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_alert_rules_and_scrape_config_pass_promtool() -> None:
    assert "SUCCESS: 9 rules found" in promtool("check", "rules", "alerts.yaml")
    assert "is valid prometheus config file syntax" in promtool("check", "config", "prometheus.yml")
    # The in-cluster config names the Secret's mount path, which exists only inside the Prometheus pod.
    assert "is valid prometheus config file syntax" in promtool("check", "config", "--syntax-only", "kubernetes.yml")


def test_alert_scenarios_fire_and_near_misses_stay_quiet() -> None:
    # Budget burn (one replica and summed over three), 5xx rate (4xx not counted), Redis down, replica down.
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yaml")


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_covers_what_operators_watch() -> None:
    titles = " ".join(title.lower() for title, _ in panel_queries())
    for topic in ("requests", "errors", "first token", "overhead", "tokens", "cost", "budget", "cache hit",
                  "circuit breakers", "redis"):
        assert topic in titles, topic


MONITORED = """    cache: {mode: exact, scope: team}
"""


@pytest.fixture
def monitored(upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    alpha_key = f'        hash: "{key_hash("sk-alpha")}"\n'
    policy = standard_policy(upstream.base_url, extra=PRICES + ADMIN_POLICY).replace(
        "        model: upstream-chat\n", "        model: upstream-chat\n" + MONITORED, 1).replace(
        # A team budget far too small for the traffic: it burns at many times its pace (the alert
        # averages over 30 minutes, and this test's traffic lasts seconds).
        "    models: [chat-model, embed-model]\n",
        "    models: [chat-model, embed-model]\n    budget: {usd: 0.002, period: daily}\n", 1).replace(
        # A key whose budget is spent: every request with it is refused.
        alpha_key, alpha_key + f'      - id: capped-key\n        hash: "{key_hash("sk-capped")}"\n'
        "        budget: {usd: 0.00001, period: daily}\n", 1)
    return start_gateway(policy)


def traffic(gateway: RunningGateway, upstream: FakeOpenAIUpstream, round_: int) -> None:
    """Some of everything the dashboard shows: a miss and a hit, a stream, 5xx, a refused budget."""
    client = gateway.client().with_options(max_retries=0)
    small = {"max_tokens": 8}  # admission reserves the prompt plus max_tokens against the small budget
    ask = [{"role": "user", "content": f"what is the weather like, round {round_}"}]
    client.chat.completions.create(model="chat-model", messages=ask, **small)  # a miss
    client.chat.completions.create(model="chat-model", messages=ask, **small)  # a hit
    list(client.chat.completions.create(model="chat-model", stream=True, **small,
                                        messages=[{"role": "user", "content": f"stream {round_}"}]))
    upstream.script(*[Behaviour.error(500, "boom")] * 3)
    for n in range(3):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="chat-model", **small,
                                           messages=[{"role": "user", "content": f"{round_}{n}"}])
    with pytest.raises(openai.RateLimitError, match="Budget exceeded"):
        gateway.client("sk-capped").chat.completions.create(model="chat-model", messages=ask)


def test_every_dashboard_query_returns_data_from_a_real_prometheus(
        monitored: RunningGateway, upstream: FakeOpenAIUpstream, tmp_path: Path) -> None:
    with running_prometheus(tmp_path, [monitored.base_url.removeprefix("http://")],
                            admin_key=ADMIN_KEY) as prometheus:
        # A series' first sample is not an increase: a first round creates every series and a second,
        # after Prometheus has scraped them, moves them.
        traffic(monitored, upstream, 1)
        prometheus.wait_for("a scrape of the first round", lambda: prometheus.query(
            "switchboard_time_to_first_token_seconds_count > 0"))
        traffic(monitored, upstream, 2)

        def numbers(query: str) -> list[dict[str, object]]:
            result = prometheus.query(query)  # empty, or NaN until two scrapes saw the counters move
            return result if all(sample["value"][1] != "NaN" for sample in result) else []

        for title, expr in panel_queries():
            query = expr.replace("$__rate_interval", "1m")
            prometheus.wait_for(f"data for panel {title!r}: {query}", lambda q=query: numbers(q))

        # The alert expressions match the gateway's real series: the budget and error-rate alerts are
        # pending or firing (their `for:` durations are exercised by alerts.test.yaml).
        wanted = {"SwitchboardBudgetBurnFast", "SwitchboardHighErrorRate", "SwitchboardBudgetExhausted"}
        seen: set[str] = set()

        def alerting() -> bool:
            seen.update(a["labels"]["alertname"] for a in prometheus.alerts())
            return wanted <= seen

        try:
            prometheus.wait_for(f"alerts {sorted(wanted)}", alerting)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; seen {sorted(seen)}; rules: {prometheus.rules()}") from None
