"""`make stack` / `make stack-down`: Switchboard's multi-replica topology as processes on one machine.

HAProxy on $STACK_PORT load-balancing over three `switchboard serve` replicas, a private Redis they
share for limits and budgets, Prometheus scraping every replica with deploy/prometheus/prometheus.yml
(its targets rewritten to the replicas' ports), and Arize Phoenix receiving traces. The same topology
as deploy/compose.yaml, without containers. Everything runs from the run directory (default .stack/);
`down` stops exactly the processes `up` recorded there.

    python deploy/stack/stack.py up [--dir .stack] [--phoenix .venv-phoenix/bin/phoenix] [--port-base 8180]
    python deploy/stack/stack.py restart gw2 [--dir .stack]   # SIGTERM (drain), then start it again
    python deploy/stack/stack.py down [--dir .stack]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import yaml

from gateway.compiled.policy import load_policy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from phoenix_prices import load_prices  # a sibling script, not a package

HERE = Path(__file__).resolve().parent
DEPLOY = HERE.parent
# Offsets from --port-base (default 8180): the load balancer, the replicas, Redis, Prometheus, Phoenix.
OFFSETS = {"lb": 0, "gw1": 1, "gw2": 2, "gw3": 3, "redis": 4, "prometheus": 5, "phoenix": 6, "phoenix_grpc": 7}
REPLICAS = ("gw1", "gw2", "gw3")


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _wait(what: str, ready: Callable[[], bool], timeout_s: float = 60.0, pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if pid is not None:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    raise SystemExit(f"stack: {what} exited while starting (its log is in the run directory)")
        if time.monotonic() > deadline:
            raise SystemExit(f"stack: {what} did not come up within {timeout_s:.0f}s (logs in the run directory)")
        time.sleep(0.2)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class Stack:
    def __init__(self, directory: Path, port_base: int | None = None) -> None:
        self.dir = directory
        self.pids_file = directory / "pids.json"
        ports_file = directory / "ports.json"
        if port_base is None and ports_file.exists():
            self.ports = json.loads(ports_file.read_text())  # restart/down use the ports `up` chose
        else:
            self.ports = {name: (port_base or 8180) + offset for name, offset in OFFSETS.items()}

    @property
    def pids(self) -> dict[str, int]:
        return json.loads(self.pids_file.read_text()) if self.pids_file.exists() else {}

    def environment(self) -> dict[str, str]:
        return {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{self.ports['redis']}/0",
                "PHOENIX_TRACES_URL": f"http://127.0.0.1:{self.ports['phoenix']}/v1/traces",
                "STACK_PORT": str(self.ports["lb"]),
                **{f"{name.upper()}_PORT": str(self.ports[name]) for name in REPLICAS}}

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> int:
        log = (self.dir / f"{name}.log").open("ab")
        process = subprocess.Popen(argv, cwd=cwd or self.dir, env=self.environment(), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.pids_file.write_text(json.dumps({**self.pids, name: process.pid}))
        return process.pid

    def start_replica(self, name: str, switchboard: str) -> int:
        home = self.dir / name
        home.mkdir(exist_ok=True)
        shutil.copy(HERE / "policy.yaml", home / "policy.yaml")
        return self.start(name, [switchboard, "serve", "--policy", str(home / "policy.yaml"), "--host", "127.0.0.1",
                                 "--port", str(self.ports[name])], cwd=home)

    def up(self, switchboard: str, phoenix: str | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.pids:
            raise SystemExit(f"stack: already running ({self.pids_file}); `make stack-down` first")
        (self.dir / "ports.json").write_text(json.dumps(self.ports))
        (self.dir / "switchboard").write_text(switchboard)
        if phoenix:
            phoenix_home = self.dir / "phoenix"
            phoenix_home.mkdir(exist_ok=True)
            os.environ.update(PHOENIX_WORKING_DIR=str(phoenix_home), PHOENIX_PORT=str(self.ports["phoenix"]),
                              PHOENIX_HOST="127.0.0.1", PHOENIX_GRPC_PORT=str(self.ports["phoenix_grpc"]))
            phoenix_pid = self.start("phoenix", [phoenix, "serve"])
        self.start("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(self.ports["redis"]),
                             "--save", "", "--appendonly", "no"])
        _wait("redis", lambda: subprocess.run(["redis-cli", "-p", str(self.ports["redis"]), "ping"],
                                              capture_output=True).stdout.strip() == b"PONG")
        for name in REPLICAS:
            self.start_replica(name, switchboard)
        for name in REPLICAS:
            _wait(name, lambda name=name: _answers(f"http://127.0.0.1:{self.ports[name]}/readyz"))
        self.start("haproxy", ["haproxy", "-db", "-f", str(HERE / "haproxy.cfg")])
        _wait("haproxy", lambda: _answers(f"http://127.0.0.1:{self.ports['lb']}/healthz"))
        self.start("prometheus", ["prometheus", f"--config.file={self.prometheus_config()}",
                                  f"--storage.tsdb.path={self.dir / 'prometheus-data'}",
                                  f"--web.listen-address=127.0.0.1:{self.ports['prometheus']}", "--log.level=warn"])
        _wait("prometheus", lambda: _answers(f"http://127.0.0.1:{self.ports['prometheus']}/-/ready"))
        if phoenix:
            phoenix_url = f"http://127.0.0.1:{self.ports['phoenix']}"
            _wait("phoenix", lambda: _answers(f"{phoenix_url}/healthz"), 300, phoenix_pid)
            # Phoenix prices spans itself: give it the policy's prices, so its costs are the ledger's.
            os.environ.update(self.environment())
            load_prices(phoenix_url, load_policy(self.dir / REPLICAS[0] / "policy.yaml"))
        _say(f"stack up: http://127.0.0.1:{self.ports['lb']}/v1 (key sk-switchboard-demo); "
             f"Prometheus http://127.0.0.1:{self.ports['prometheus']}"
             + (f"; Phoenix http://127.0.0.1:{self.ports['phoenix']}" if phoenix else "; Phoenix not started"))

    def prometheus_config(self) -> Path:
        """deploy/prometheus/prometheus.yml with the replicas' addresses as targets."""
        config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="2s", evaluation_interval="2s")
        (job,) = config["scrape_configs"]
        job["scrape_interval"] = "2s"
        job["static_configs"] = [{"targets": [f"127.0.0.1:{self.ports[name]}" for name in REPLICAS]}]
        # The scrape job's admin key (/metrics needs one on the tenant port) is the shipped file, read as
        # shipped: its path is relative to the config, so it goes beside the copy.
        for name in ("alerts.yaml", "switchboard-admin-key"):
            shutil.copy(DEPLOY / "prometheus" / name, self.dir / name)
        path = self.dir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        return path

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> None:
        """Stop one recorded process (its whole session: --workers N children too)."""
        pids = self.pids
        pid = pids.pop(name, None)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                os.kill(pid, 0)  # raises ProcessLookupError once it is gone
                time.sleep(0.1)
            else:
                os.killpg(pid, signal.SIGKILL)
        self.pids_file.write_text(json.dumps(pids))

    def restart(self, name: str) -> None:
        """Stop a replica with SIGTERM (it drains in-flight requests), then start it again and wait for it."""
        self.stop(name)
        self.start_replica(name, (self.dir / "switchboard").read_text())
        _wait(name, lambda: _answers(f"http://127.0.0.1:{self.ports[name]}/readyz"))

    def down(self) -> None:
        for name in reversed(list(self.pids)):
            self.stop(name)
        self.pids_file.unlink(missing_ok=True)
        _say("stack down")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "restart", "down"])
    parser.add_argument("replica", nargs="?", choices=REPLICAS, help="restart: which replica")
    parser.add_argument("--port-base", type=int, default=None, help="up: first of 8 consecutive ports (8180)")
    parser.add_argument("--dir", default=".stack", type=Path)
    parser.add_argument("--switchboard", default=shutil.which("switchboard") or "switchboard")
    parser.add_argument("--phoenix", default=None, help="the `phoenix` executable (arize-phoenix); none: no trace UI")
    args = parser.parse_args()
    stack = Stack(args.dir.resolve(), args.port_base)
    if args.command == "up":
        phoenix = str(Path(args.phoenix).resolve()) if args.phoenix else None
        try:
            stack.up(str(Path(args.switchboard).resolve()), phoenix)
        except BaseException:
            stack.down()
            raise
    elif args.command == "restart":
        stack.restart(args.replica or parser.error("restart needs a replica: gw1, gw2 or gw3"))
    else:
        stack.down()


if __name__ == "__main__":
    main()
