"""The admin console in a real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium).

Logs in the way a user does (credentials for the Basic challenge), opens every page, fails on any browser
console error, checks the figures on the page against /admin/spend, /admin/budgets and the ledger file, and
saves a screenshot of each page. Screenshots go to the test's temporary folder; set
SWITCHBOARD_SCREENSHOTS=docs to refresh the ones in docs/ (`make screenshots`).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RunningGateway
from tests.demo_policy import ADMIN_KEY, DEMO_KEY, INTERN_KEY, demo_text
from tests.fakes.otlp_receiver import WaitingSpanExporter

pytestmark = pytest.mark.slow  # starting Chromium takes seconds on a 2-core machine

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parents[1]
PAGES = ["overview", "spend", "budgets", "targets", "requests", "policy"]
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    # Not skipped when missing: CI installs both packages (.ci/run), and a skipped check proves nothing.
    assert shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER), "apt-get install chromium chromium-driver"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,900", "--hide-scrollbars",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def traffic(start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    """The demo gateway, traced, after a few requests from both teams (one refused by the intern budget)."""
    gateway = start_gateway(demo_text(), span_exporter=WaitingSpanExporter())
    for key, model in ((DEMO_KEY, "gpt-4o"), (DEMO_KEY, "gpt-4o-mini"), (DEMO_KEY, "claude-sonnet-4-5"),
                       (DEMO_KEY, "gemini-2.5-flash"), (INTERN_KEY, "gpt-4o-mini"), (INTERN_KEY, "gpt-4o-mini")):
        httpx.post(gateway.v1 + "/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=10,
                   json={"model": model, "messages": [{"role": "user", "content": "What does a gateway do?"}]})
    gateway.usage.wait_for(6)
    return gateway


def _open(browser: Any, gateway: RunningGateway, page: str) -> None:
    """Navigate to a console page and wait until it has rendered its data (body[data-ready])."""
    host = gateway.base_url.removeprefix("http://")
    browser.get(f"http://admin:{ADMIN_KEY}@{host}/ui/#{page}")
    deadline = time.monotonic() + 15
    while not browser.execute_script(
            "return document.body.dataset.page === arguments[0] && document.body.dataset.ready === '1'", page):
        assert time.monotonic() < deadline, f"{page} did not render"
        threading.Event().wait(0.05)


def _cells(browser: Any, table_id: str, key: str) -> list[str]:
    return browser.execute_script(
        "return [...document.querySelectorAll(`#${arguments[0]} td[data-key='${arguments[1]}']`)]"
        ".map(td => td.dataset.value)", table_id, key)


def test_every_console_page_loads_without_errors_and_shows_the_ledgers_figures(
        browser: Any, traffic: RunningGateway, tmp_path: Path) -> None:
    shots = ROOT / "docs" if os.environ.get("SWITCHBOARD_SCREENSHOTS") == "docs" else tmp_path
    spend = httpx.get(traffic.base_url + "/admin/spend?by=team", headers=ADMIN).json()
    assert {row["team"]: row["requests"] for row in spend} == {"demo": 4, "interns": 2}
    for page in PAGES:
        _open(browser, traffic, page)
        assert browser.find_element("id", "problem").get_attribute("hidden") is not None, page
        errors = [entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
        assert errors == [], page
        text = browser.find_element("tag name", "main").text
        assert "NaN" not in text and "undefined" not in text and "[object" not in text, page
        path = shots / f"console-{page}.png"
        assert browser.save_screenshot(str(path)) and path.stat().st_size > 10_000

        if page == "overview":
            today = browser.find_element("id", "cost-today").get_attribute("data-value")
            day = httpx.get(traffic.base_url + "/admin/spend?by=day", headers=ADMIN).json()
            assert float(today) == pytest.approx(sum(row["cost_usd"] for row in day), rel=1e-9)
            assert browser.find_element("id", "rps").text == f"{6 / 60:.2f}"
        elif page == "spend":
            assert _cells(browser, "spend-team", "team") == [row["team"] for row in spend]
            shown = [float(v) for v in _cells(browser, "spend-team", "cost_usd")]
            assert shown == pytest.approx([row["cost_usd"] for row in spend], rel=1e-12)
            bars = browser.execute_script("return [...document.querySelectorAll('#chart-model rect.bar')]"
                                          ".map(r => [r.dataset.label, Number(r.dataset.value)])")
            by_model = httpx.get(traffic.base_url + "/admin/spend?by=model", headers=ADMIN).json()
            assert bars == [[row["model"], pytest.approx(row["cost_usd"])] for row in by_model]
        elif page == "budgets":
            (budget,) = httpx.get(traffic.base_url + "/admin/budgets", headers=ADMIN).json()["data"]
            assert _cells(browser, "budget-table", "used") == [str(budget["used"])]
            assert _cells(browser, "budget-table", "burned") == [str(budget["burned"])]
        elif page == "targets":
            assert sorted(_cells(browser, "target-table", "model")) == sorted(
                t.upstream_model for m in traffic.store.current.models.values() for t in m.targets)
        elif page == "requests":
            ledger = sqlite3.connect(traffic.store.current.ledger_path)
            newest = [row[0] for row in ledger.execute("SELECT request_id FROM usage ORDER BY ts DESC, rowid DESC")]
            ledger.close()
            shown_ids = browser.execute_script(
                "return [...document.querySelectorAll('#request-table tr[data-request-id]')]"
                ".map(tr => tr.dataset.requestId)")
            assert shown_ids == newest and len(newest) == 6
            links = browser.execute_script(
                "return [...document.querySelectorAll('#request-table a')].map(a => a.href)")
            assert len(links) == 6 and all(link.startswith("http://127.0.0.1:16686/trace/") for link in links)
            assert "429" in _cells(browser, "request-table", "status")  # the intern's refused request
        elif page == "policy":
            assert browser.find_element("id", "policy-fingerprint").text == traffic.store.current.fingerprint
            assert browser.find_element("id", "reload-result").text == "loaded"
