"""deploy/Dockerfile built and run for real, with podman (Debian), as deploy/README.md, "Image" says.

Slow: the first build makes a Debian base with debootstrap and installs the gateway (minutes);
later builds reuse podman's layer cache. The container is run with host networking on loopback only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.prometheus_server import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TAG = "localhost/switchboard:test"
PODMAN = ["podman", "--storage-driver", "vfs", "--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]  # deploy/README.md says why
SLOW_STREAM = """version: 1
server: {shutdown_grace_s: 20}
providers:
  mock: {kind: mock, options: {first_token_ms: 20, token_interval_ms: 60, reply_words: 50}}
models:
  gpt-4o-mini: {targets: [{provider: mock, model: mock-gpt-4o-mini}]}
teams:
  demo:
    keys: [{id: demo, hash: "sha256:b63e455907cf558f3526e7928ae4568399e5c142f3c34dd804152268985719aa"}]
    models: ["*"]
"""


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def image() -> str:
    for tool in ("podman", "runc", "debootstrap"):
        assert shutil.which(tool), f"{tool} is needed (.ci/run installs podman, runc and debootstrap)"
    seed = ROOT / "deploy" / "tiktoken-seed"
    seed.mkdir(exist_ok=True)
    shared = ROOT.parent / "shared" / "tiktoken"
    if shared.is_dir():  # an offline machine: seed the build's encoding cache
        shutil.copytree(shared, seed, dirs_exist_ok=True)
    done = subprocess.run([str(ROOT / "deploy" / "image.sh")], env={**os.environ, "TAG": TAG},
                          capture_output=True, text=True, timeout=3600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return TAG


def test_image_runs_as_non_root_with_the_encodings_baked_in(image: str) -> None:
    config = json.loads(podman("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert config["StopSignal"] == "SIGTERM"
    # No network at all: the token counts must come from the baked encodings, and be tiktoken's exact ones.
    script = ("import tiktoken, os; assert os.getuid() == 10001; "
              "print(len(tiktoken.get_encoding('o200k_base').encode('Switchboard counts tokens offline.')), "
              "len(tiktoken.get_encoding('cl100k_base').encode('Switchboard counts tokens offline.')))")
    done = podman("run", "--rm", "--network", "none", *LIMITS, "--entrypoint", "python", image, "-c", script)
    import tiktoken

    expected = [len(tiktoken.get_encoding(name).encode("Switchboard counts tokens offline."))
                for name in ("o200k_base", "cl100k_base")]
    assert [int(n) for n in done.stdout.split()] == expected


@pytest.fixture
def container(image: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(SLOW_STREAM)
    policy.chmod(0o644)
    port = free_port()
    name = f"switchboard-test-{port}"
    podman("run", "-d", "--name", name, "--network", "host", *LIMITS, "-e", f"PORT={port}",
           "-v", f"{policy}:/etc/switchboard/policy.yaml:ro,Z", image,
           "--policy", "/etc/switchboard/policy.yaml", "--host", "127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, podman("logs", name, check=False).stdout[-2000:]
            time.sleep(0.2)
        yield name, base
    finally:
        podman("rm", "-f", name, check=False)


def test_health_check_passes_and_sigterm_drains_an_in_flight_stream(container: tuple[str, str]) -> None:
    name, base = container
    assert podman("healthcheck", "run", name, check=False).returncode == 0  # the image's HEALTHCHECK
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "drain me"}]}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=30,
                      headers={"authorization": "Bearer sk-switchboard-demo"}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        stopping = subprocess.Popen([*PODMAN, "stop", "-t", "30", name], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)  # SIGTERM to tini, passed to the gateway
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"  # the stream finished although the container was told to stop
    stopping.wait(60)
    state = json.loads(podman("inspect", name).stdout)[0]["State"]
    assert state["Status"] == "exited" and state["ExitCode"] in (0, 143)
