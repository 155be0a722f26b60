"""The `switchboard` command as an operator uses it: validate, schema, keys, and a served process."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.compiled.policy import load_policy
from tests.demo_policy import ADMIN_KEY, demo_text
from tests.fakes.state_stores import free_port

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "policies" / "demo.yaml"
INVALID = Path(__file__).parent / "policies" / "invalid"


def _switchboard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def test_validate_accepts_the_demo_policy() -> None:
    result = _switchboard("policy", "validate", str(DEMO))
    assert result.returncode == 0 and "ok" in result.stdout


def test_validate_lists_every_problem_with_paths_and_lines(tmp_path: Path) -> None:
    result = _switchboard("policy", "validate", str(INVALID / "unknown_field.yaml"))
    assert result.returncode == 1
    assert "teams.demo.budgte: unknown field" in result.stderr and "(line 14)" in result.stderr


def test_schema_is_json_schema_of_the_policy() -> None:
    result = _switchboard("policy", "schema")
    schema = json.loads(result.stdout)
    assert result.returncode == 0
    assert {"providers", "models", "teams"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_keys_new_prints_a_key_whose_hash_authenticates(tmp_path: Path) -> None:
    result = _switchboard("keys", "new", "--team", "demo")
    key = re.search(r"(sk-sb-\S+)", result.stdout).group(1)  # type: ignore[union-attr]
    digest = re.search(r'hash: "(sha256:[0-9a-f]{64})"', result.stdout).group(1)  # type: ignore[union-attr]
    policy_file = tmp_path / "p.yaml"
    new_team = f'models: ["*"]\n  new:\n    keys: [{{id: fresh, hash: "{digest}"}}]\n    models: ["*"]'
    policy_file.write_text(DEMO.read_text().replace('models: ["*"]', new_team))
    assert load_policy(policy_file).keys[hashlib.sha256(key.encode()).digest()].team.name == "new"




@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path, list[str]]]:
    """`switchboard serve` as a real process, on the demo policy with a slower mock stream."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(demo_text(paced=True).replace("token_interval_ms: 5", "token_interval_ms: 20")
                      .replace("first_token_ms: 20", "first_token_ms: 1"))
    port = free_port()
    env = {**os.environ, "PORT": str(port)}
    process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--policy", str(policy)], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        if "Application startup complete" in line:
            break
    else:
        raise AssertionError("gateway did not start")
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(process.stdout), daemon=True).start()  # type: ignore[arg-type]
    yield process, f"http://127.0.0.1:{port}", policy, output
    if process.poll() is None:
        process.kill()
    process.wait(10)


Served = tuple[subprocess.Popen[str], str, Path, list[str]]


def test_served_process_answers_the_openai_sdk_on_port_from_env(served: Served) -> None:
    _, base, _, _ = served
    client = openai.OpenAI(base_url=base + "/v1", api_key="sk-switchboard-demo", max_retries=0)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content.startswith("Mock reply:")


def test_sighup_reloads_the_policy(served: Served) -> None:
    process, base, policy, _ = served
    policy.write_text(policy.read_text().replace("watch: true", "watch: false")
                      .replace("  gpt-4o:\n", "  gpt-4.1:\n"))
    process.send_signal(signal.SIGHUP)
    headers = {"authorization": "Bearer sk-switchboard-demo"}
    with httpx.Client(timeout=5) as client:
        for _ in range(500):
            ids = {m["id"] for m in client.get(base + "/v1/models", headers=headers).json()["data"]}
            if "gpt-4.1" in ids:
                break
        assert "gpt-4.1" in ids and "gpt-4o" not in ids


def test_a_sighup_that_changes_nothing_says_so(served: Served) -> None:
    process, base, _, output = served
    process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not any("unchanged" in line for line in output) and time.monotonic() < deadline:
        threading.Event().wait(0.05)
    assert any(re.search(r"policy .* reloaded: unchanged, still serving [0-9a-f]{16}", line) for line in output)
    last = httpx.get(base + "/admin/policy", headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()["last_reload"]
    assert last["result"] == "unchanged"


def test_sigterm_drains_an_in_flight_stream(served: Served) -> None:
    process, base, _, _ = served
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "drain me"}]}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=10,
                      headers={"authorization": "Bearer sk-switchboard-demo"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    # uvicorn re-raises the signal once drained, as supervisors expect.
    assert process.wait(10) in (0, -signal.SIGTERM)


def test_a_sigterm_ends_the_log_with_the_shutdown_lines(served: Served) -> None:
    """The log is written through a queue; the process ending by the re-raised signal must not lose its tail."""
    process, _, _, output = served
    process.send_signal(signal.SIGTERM)
    assert process.wait(10) == -signal.SIGTERM  # uvicorn re-raises the signal once drained, as supervisors expect
    deadline = time.monotonic() + 5  # the reader thread may still be appending the last lines
    while not any("Finished server process" in line for line in output) and time.monotonic() < deadline:
        threading.Event().wait(0.05)
    assert any("Application shutdown complete" in line for line in output), output[-3:]
    assert any("Finished server process" in line for line in output), output[-3:]


def _serve_draining(tmp_path: Path, drain_s: float, *extra: str, server: str = "",
                    ) -> tuple[subprocess.Popen[str], str, list[str]]:
    """`switchboard serve` on the demo policy with `server.drain_s` (and `server`, more of that block's lines), its
    output collected as it comes."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(demo_text().replace("version: 1\n", f"version: 1\nserver:\n  drain_s: {drain_s}\n{server}", 1))
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port",
                                str(port), *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    output: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            output.append(line)
            if "Application startup complete" in line:
                started.set()
        started.set()  # the process ended (a refused start) before it served

    threading.Thread(target=read, daemon=True).start()
    started.wait(60)
    return process, f"http://127.0.0.1:{port}", output


def _readiness(client: httpx.Client, base: str) -> tuple[int, str]:
    reply = client.get(base + "/readyz")
    return reply.status_code, reply.json()["status"]


def test_sigterm_with_a_drain_reports_draining_and_serves_until_the_drain_ends(tmp_path: Path) -> None:
    """A load balancer polling /readyz sees 503 `draining` while requests routed to the replica in the meantime
    are still answered; the listener closes (and the process ends) only once the drain is over."""
    drain_s = 3.0
    process, base, output = _serve_draining(tmp_path, drain_s)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="sk-switchboard-demo", max_retries=0)
        with httpx.Client(timeout=5) as http:
            assert _readiness(http, base) == (200, "ready")
            assert http.get(base + "/healthz").headers.get("connection") != "close"  # kept alive
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)  # as a supervisor signalling the process group may: still drains
            while _readiness(http, base) != (503, "draining"):
                assert time.monotonic() - signalled < drain_s, "never reported draining"
            # Keep-alive clients are told to reconnect (behind a balancer: to another replica).
            assert http.get(base + "/healthz").headers["connection"] == "close"
            # Served during the drain: a new connection, a plain and a streamed request.
            raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini",
                                                                   messages=[{"role": "user", "content": "hi"}])
            assert raw.headers["connection"] == "close"
            assert raw.parse().choices[0].message.content.startswith("Mock reply:")
            chunks = list(client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                         messages=[{"role": "user", "content": "hi"}]))
            assert chunks[-1].choices[0].finish_reason == "stop"
            assert time.monotonic() - signalled < drain_s, "too slow to show the drain serving"
        assert process.wait(30) == -signal.SIGTERM
        assert time.monotonic() - signalled >= drain_s
    finally:
        process.kill()
    assert any("draining for" in line for line in output), output
    assert any("Finished server process" in line for line in output)


def test_sigint_during_a_drain_stops_at_once(tmp_path: Path) -> None:
    """An operator's Ctrl-C must not wait out a long drain."""
    process, base, _ = _serve_draining(tmp_path, 120)
    try:
        process.send_signal(signal.SIGTERM)
        with httpx.Client(timeout=5) as http:
            while _readiness(http, base) != (503, "draining"):
                pass
        process.send_signal(signal.SIGINT)
        assert process.wait(30) in (0, -signal.SIGINT, -signal.SIGTERM)
    finally:
        process.kill()


def test_with_an_admin_listener_both_ports_report_the_drain_and_the_tenant_port_serves_through_it(
        tmp_path: Path) -> None:
    admin_port = free_port()
    process, base, _ = _serve_draining(tmp_path, 120, server=f"  admin: {{host: 127.0.0.1, port: {admin_port}}}\n")
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        with httpx.Client(timeout=5) as http:
            assert _readiness(http, admin) == (200, "ready")
            process.send_signal(signal.SIGTERM)
            while _readiness(http, base) != (503, "draining"):
                pass
            assert _readiness(http, admin) == (503, "draining")
            reply = http.post(base + "/v1/chat/completions", headers={"authorization": "Bearer sk-switchboard-demo"},
                              json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
            assert reply.status_code == 200
        process.send_signal(signal.SIGINT)
        process.wait(30)
        with pytest.raises(httpx.ConnectError):  # the admin listener stopped with the tenant's
            httpx.get(admin + "/healthz", timeout=5)
    finally:
        process.kill()


def test_a_drain_set_by_a_reload_applies_to_the_next_sigterm(tmp_path: Path) -> None:
    process, base, _ = _serve_draining(tmp_path, 0)
    try:
        with httpx.Client(timeout=5) as http:
            fingerprint = http.get(base + "/readyz").json()["policy"]
            policy = tmp_path / "policy.yaml"
            policy.write_text(policy.read_text().replace("drain_s: 0", "drain_s: 120"))
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while http.get(base + "/readyz").json()["policy"] == fingerprint:
                assert time.monotonic() < deadline, "the policy was not reloaded"
            process.send_signal(signal.SIGTERM)
            while _readiness(http, base) != (503, "draining"):  # (a process that stopped fails to connect)
                pass
        process.send_signal(signal.SIGINT)
        process.wait(30)
    finally:
        process.kill()


def test_a_drain_with_several_workers_is_refused_at_start(tmp_path: Path) -> None:
    process, _, output = _serve_draining(tmp_path, 2, "--workers", "2")
    try:
        assert process.wait(30) == 1
    finally:
        process.kill()
    assert any("server.drain_s: draining after SIGTERM needs --workers 1" in line for line in output), output


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    from gateway.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"switchboard {version('switchboard')}"


BROKEN = """version: 1
providers:
  openai:
    kind: openai
    api_key: sk-x
    timeouts: {conect_s: 2}
models:
  chat:
    targets:
      - provider: openia
        model: gpt-4o
    retries: many
    fallbacks: {default: [nowhere]}
teams:
  a:
    keys: [{id: a, hash: "sha256:0000000000000000000000000000000000000000000000000000000000000000"}]
    models: [chat, missing]
    budgt: {tokens: 5}
"""


def test_validate_reports_types_references_and_typos_in_one_pass(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli.main import main

    policy = tmp_path / "broken.yaml"
    policy.write_text(BROKEN)
    assert main(["policy", "validate", str(policy)]) == 1
    problems = capsys.readouterr().err.splitlines()[1:]
    assert [p.strip() for p in problems] == [
        "providers.openai.timeouts.conect_s: unknown field (did you mean `connect_s`?) (line 6)",
        "models.chat.retries: Input should be a valid integer, unable to parse string as an integer (line 12)",
        "teams.a.budgt: unknown field (did you mean `budget`?) (line 18)",
        "models.chat.targets.0.provider: unknown provider 'openia'; defined: openai (line 10)",
        "models.chat.fallbacks.default.0: unknown model 'nowhere'; defined: chat (line 13)",
        "teams.a.models.1: unknown model 'missing'; defined: chat (line 17)",
    ]


def test_validate_suggests_nothing_for_a_name_unlike_any_field(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli.main import main

    policy = tmp_path / "odd.yaml"
    policy.write_text(DEMO.read_text() + "\nzzqx: 1\n")
    assert main(["policy", "validate", str(policy)]) == 1
    assert "zzqx: unknown field (check the spelling" in capsys.readouterr().err
