"""deploy/compose.yaml and the files `make stack` runs: valid, and describing the same topology."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.compiled.policy import load_policy
from tests.prometheus_server import binary

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
# A copy of the Compose specification's schema (compose-spec/compose-spec @ 170098b, Apache-2.0).
COMPOSE_SCHEMA = Path(__file__).parent / "fixtures" / "compose-spec" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def compose_errors(document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(COMPOSE_SCHEMA.read_text()))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    assert compose_errors(compose) == []


def test_the_schema_check_refuses_what_compose_would(compose: dict[str, Any]) -> None:
    broken = {**compose, "services": {**compose["services"], "lb": {**compose["services"]["lb"], "portz": [1]}}}
    assert any("portz" in error for error in compose_errors(broken))
    assert compose_errors({**compose, "networkz": {}}) != []


def test_compose_runs_three_replicas_behind_haproxy_with_redis_prometheus_and_phoenix(
        compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateways = sorted(name for name in services if name.startswith("gateway-"))
    assert gateways == ["gateway-1", "gateway-2", "gateway-3"]
    assert {"lb", "redis", "prometheus", "phoenix"} <= set(services)
    for name in gateways:
        gateway = services[name]
        assert gateway["build"]["dockerfile"] == "deploy/Dockerfile"
        assert gateway["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    # The replicas' drain fits in compose's grace period before SIGKILL.
    policy = load_policy(DEPLOY / "stack" / "policy.yaml", environ={"REDIS_URL": "redis://redis:6379/0"})
    grace = int(services["gateway-1"]["stop_grace_period"].removesuffix("s"))
    assert grace > policy.server.drain_s + policy.server.shutdown_grace_s
    # Limits and budgets live in the shared Redis, and refuse rather than count per replica.
    assert policy.state.url == "redis://redis:6379/0" and policy.state.failure_mode == "fail_closed"
    # The shipped scrape config scrapes exactly these replicas.
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == [f"{name}:8080" for name in gateways]


def test_compose_prometheus_sends_an_admin_key_the_replicas_accept(compose: dict[str, Any]) -> None:
    # /metrics needs an admin key on the tenant port; the job reads it from a file beside its config.
    (job,) = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    key_file = job["authorization"]["credentials_file"]
    assert job["authorization"]["type"] == "Bearer" and "/" not in key_file  # relative: beside prometheus.yml
    mounts = dict(volume.rsplit(":", 1)[0].split(":") for volume in compose["services"]["prometheus"]["volumes"])
    config_dir = Path(mounts["./prometheus/prometheus.yml"]).parent
    assert mounts[f"./prometheus/{key_file}"] == str(config_dir / key_file)
    # The key is one the replicas' policy lists under admin.keys.
    key = (DEPLOY / "prometheus" / key_file).read_text().strip()
    policy = load_policy(DEPLOY / "stack" / "policy.yaml", environ={"REDIS_URL": "redis://redis:6379/0"})
    assert hashlib.sha256(key.encode()).digest() in policy.admin_keys


def test_haproxy_config_is_valid_and_compose_uses_the_same_one() -> None:
    env = {"STACK_PORT": "8180", "GW1_PORT": "8181", "GW2_PORT": "8182", "GW3_PORT": "8183", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([binary("haproxy"), "-c", "-f", str(DEPLOY / "stack" / "haproxy.cfg")], env=env,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr

    def body(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if not line.startswith("#")]

    processes, containers = body(DEPLOY / "stack" / "haproxy.cfg"), body(DEPLOY / "stack" / "haproxy-compose.cfg")
    as_compose = [re.sub(r"127\.0\.0\.1:\"\$\{GW(\d)_PORT\}\"", r'gateway-\1:"${GW\1_PORT}"', line)
                  .replace('bind 127.0.0.1:"${STACK_PORT}"', 'bind :"${STACK_PORT}"') for line in processes]
    assert as_compose == containers
