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
