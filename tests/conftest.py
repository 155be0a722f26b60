"""Shared fixtures: a real gateway on an ephemeral loopback port, fake upstreams, policies."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from gateway.accounting.usage import UsageRecord, UsageSink
from gateway.app import create_app
from gateway.compiled.store import PolicyStore
from gateway.http.admin_surface import AdminListener
from gateway.http.connections import GuardedHttpToolsProtocol
from gateway.tokens.counter import TokenCounter
from tests.fakes import FakeOpenAIUpstream
from tests.fakes.embeddings_upstream import WordEmbeddingsUpstream

pytest_plugins = ["tests.conformance_plugin"]  # `--conformance-report`: docs/conformance.md from this run

SHARED_TIKTOKEN = Path(__file__).resolve().parents[2] / "shared" / "tiktoken"
if "TIKTOKEN_CACHE_DIR" not in os.environ and SHARED_TIKTOKEN.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_TIKTOKEN)


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def standard_policy(upstream_base_url: str, *, upstream_key: str = "sk-upstream-secret", extra: str = "") -> str:
    """Two teams over one OpenAI-compatible upstream; `extra` is appended verbatim (more YAML)."""
    return f"""
version: 1
server:
  max_body_bytes: 65536
  reload: {{watch: true, poll_interval_s: 0.05}}
providers:
  upstream:
    kind: openai_compatible
    base_url: {upstream_base_url}
    api_key: {upstream_key}
    timeouts: {{connect_s: 2, first_byte_s: 2, total_s: 10}}
models:
  chat-model:
    targets:
      - provider: upstream
        model: upstream-chat
  embed-model:
    targets:
      - provider: upstream
        model: upstream-embed
  beta-model:
    targets:
      - provider: upstream
        model: upstream-beta
teams:
  alpha:
    keys:
      - id: alpha-key
        hash: "{key_hash('sk-alpha')}"
    models: [chat-model, embed-model]
  beta:
    keys:
      - id: beta-key
        hash: "{key_hash('sk-beta')}"
    models: [beta-model]
{extra}
"""


# An admin key for tests that read /metrics on the tenant port, where it needs one (gateway/http/admin_surface.py).
ADMIN_KEY = "sk-admin-metrics"
ADMIN_POLICY = f"""
admin:
  keys: [{{id: ops, hash: "{key_hash(ADMIN_KEY)}"}}]
"""


def metrics_text(gateway: RunningGateway) -> str:
    """GET /metrics with the admin key of ADMIN_POLICY; asserts it answered 200."""
    response = httpx.get(gateway.base_url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    return response.text


class RecordingSink:
    """Collects usage records; tests wait on it instead of sleeping."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []
        self._changed = threading.Condition()
        self._fence_ms = 0  # records of requests that started before this (Unix ms) are not kept: `clear`

    def record(self, record: UsageRecord) -> None:
        # The gateway's id is a UUIDv7 made when the request arrived: its first 48 bits are Unix milliseconds.
        if record.gateway_id and int(record.gateway_id[:13].replace("-", ""), 16) < self._fence_ms:
            return
        with self._changed:
            self.records.append(record)
            self._changed.notify_all()

    def clear(self) -> None:
        """Forget the records so far, and those requests already under way record later: a test sharing a
        gateway with the one before gets only its own (a stream settles just after its client has read it)."""
        with self._changed:
            self.records.clear()
            self._fence_ms = time.time_ns() // 1_000_000

    def wait_for(self, count: int, timeout: float = 5.0) -> list[UsageRecord]:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.records) >= count, timeout):
                raise AssertionError(f"expected {count} usage records, got {len(self.records)}")
            return list(self.records)


@dataclass
class RunningGateway:
    base_url: str
    policy_path: Path
    store: PolicyStore
    usage: RecordingSink
    _server: uvicorn.Server = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    # The admin listener's URL when the policy has `server.admin` (gateway/http/admin_surface.py).
    admin_url: str | None = None
    _admin: tuple[uvicorn.Server, threading.Thread] | None = field(default=None, repr=False)

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def client(self, key: str = "sk-alpha", **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.v1, api_key=key, max_retries=0, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        if self._admin is not None:
            self._admin[0].should_exit = True
            self._admin[1].join(timeout=15)


_PER_MINUTE = re.compile(r"\b[rt]pm\s*:")


def clear_of_the_minute_turn(seconds: float = 5.0) -> None:
    """Rate limits count in windows aligned to the clock's minute: a test that fills one and expects the next request
    refused would see it admitted if the minute turned in between. A gateway with per-minute limits starts at least
    `seconds` before the turn, waiting for the clock (no other component) when it is closer."""
    left = 60 - time.time() % 60
    if left < seconds:
        time.sleep(left + 0.01)


def run_gateway(policy_path: Path, *, sinks: Sequence[UsageSink] = (), http: Any = GuardedHttpToolsProtocol,
                wrap: Callable[[Any], Any] | None = None, **app_options: Any) -> RunningGateway:
    """Start the real app under uvicorn in a thread, on an ephemeral port; `sinks` get records besides `usage`.

    `http`: uvicorn's protocol; `switchboard serve`'s by default, or e.g. "h11" for a server that offers the app
    none of its hooks. `wrap`: an ASGI middleware around the app, to watch what it sends.
    """
    if _PER_MINUTE.search(policy_path.read_text()):
        clear_of_the_minute_turn()
    store = PolicyStore(policy_path)
    usage = RecordingSink()
    counter = app_options.pop("counter", None) or TokenCounter()
    app = create_app(store, counter=counter, sinks=[usage, *sinks], **app_options)
    server, thread, port = _serve_in_thread(uvicorn.Config(
        wrap(app) if wrap is not None else app, host="127.0.0.1", port=0, log_config=None, access_log=False,
        lifespan="on", http=http))
    gateway = RunningGateway(f"http://127.0.0.1:{port}", policy_path, store, usage, server, thread)
    admin = store.current.server.admin
    if admin is not None:  # the admin listener, as `switchboard serve` runs it: same app, no second lifespan
        admin_server, admin_thread, admin_port = _serve_in_thread(uvicorn.Config(
            AdminListener(app), host=admin.host, port=admin.port, log_config=None, access_log=False,
            lifespan="off", http=GuardedHttpToolsProtocol))
        gateway.admin_url, gateway._admin = f"http://{admin.host}:{admin_port}", (admin_server, admin_thread)
    return gateway


def _serve_in_thread(config: uvicorn.Config) -> tuple[uvicorn.Server, threading.Thread, int]:
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = threading.Event()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("gateway failed to start")
        deadline.wait(0.01)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


def free_port() -> int:
    """A loopback port nothing listens on right now (for policies that name a port, e.g. server.admin)."""
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


ALPHA_TEAM_ALL_MODELS = f"""teams:
  alpha:
    keys: [{{id: alpha-key, hash: "{key_hash('sk-alpha')}"}}]
    models: ["*"]
"""


@contextlib.contextmanager
def serving(path: Path, providers_and_models: str) -> Iterator[RunningGateway]:
    """A gateway on `providers_and_models` (policy YAML) plus team alpha, key sk-alpha, allowed every model."""
    path.write_text(providers_and_models + ALPHA_TEAM_ALL_MODELS)
    gateway = run_gateway(path)
    try:
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeOpenAIUpstream]:
    with FakeOpenAIUpstream() as fake:
        yield fake


@pytest.fixture
def upstream(fake_upstream: FakeOpenAIUpstream) -> FakeOpenAIUpstream:
    """The shared fake, reset for this test."""
    fake_upstream.reset()
    return fake_upstream


@pytest.fixture(scope="module")
def words_server() -> Iterator[WordEmbeddingsUpstream]:
    """An embeddings upstream whose vectors make sentences with shared words similar (semantic caching)."""
    with WordEmbeddingsUpstream() as fake:
        yield fake


@pytest.fixture
def words(words_server: WordEmbeddingsUpstream) -> WordEmbeddingsUpstream:
    words_server.reset()
    return words_server


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[[str], RunningGateway]]:
    started: list[RunningGateway] = []

    def start(policy_text: str, **app_options: Any) -> RunningGateway:
        path = tmp_path / f"policy-{len(started)}.yaml"
        path.write_text(policy_text)
        gateway = run_gateway(path, **app_options)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture
def gateway(upstream: FakeOpenAIUpstream, start_gateway: Callable[[str], RunningGateway]) -> RunningGateway:
    """A gateway with the standard two-team policy in front of the fake OpenAI upstream."""
    return start_gateway(standard_policy(upstream.base_url))
