"""A real Prometheus (Debian's package) as a subprocess, for tests of the shipped scrape config,
alert rules and dashboard queries."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
SHIPPED_ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def binary(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is needed (Debian package prometheus; .ci/run installs it)"
    return path


def render_config(directory: Path, targets: list[str], interval_s: float, admin_key: str | None = None) -> Path:
    """The shipped prometheus.yml with these targets and a faster scrape and rule evaluation; the admin key the
    tenant port asks for on /metrics goes in the file the shipped job reads it from (its `credentials_file`)."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    interval = f"{int(interval_s * 1000)}ms"
    config["global"] = {"scrape_interval": interval, "evaluation_interval": interval}
    (job,) = config["scrape_configs"]
    job["scrape_interval"] = interval
    job["static_configs"] = [{"targets": targets}]
    # Relative to the config file, as shipped; without a key, an empty file (the scrape then gets 401).
    (directory / job["authorization"]["credentials_file"]).write_text(admin_key or "")
    shutil.copy(SHIPPED_ALERTS, directory / "alerts.yaml")
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10).json()
        assert reply["status"] == "success", (expr, reply)
        return list(reply["data"]["result"])

    def wait_for(self, what: str, check: Callable[[], Any], timeout_s: float = 30.0) -> Any:
        """Poll `check` until it returns something truthy; fail with `what` after the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = check()
            if result:
                return result
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.25)

    def rules(self) -> list[dict[str, Any]]:
        groups = httpx.get(self.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        return [{k: r.get(k) for k in ("name", "health", "lastError", "state")} for g in groups for r in g["rules"]]

    def alerts(self) -> list[dict[str, Any]]:
        return list(httpx.get(self.url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"])


@contextmanager
def running_prometheus(directory: Path, targets: list[str], interval_s: float = 0.5,
                       admin_key: str | None = None) -> Iterator[Prometheus]:
    config = render_config(directory, targets, interval_s, admin_key)
    port = free_port()
    process = subprocess.Popen(
        [binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={directory / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=(directory / "prometheus.log").open("wb"))
    server = Prometheus(f"http://127.0.0.1:{port}")
    try:
        def ready() -> bool:
            assert process.poll() is None, (directory / "prometheus.log").read_text()
            try:
                return httpx.get(server.url + "/-/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        server.wait_for("Prometheus to start", ready)
        yield server
    finally:
        process.terminate()
        process.wait(10)
