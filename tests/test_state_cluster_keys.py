"""Redis deployment shapes: Cluster-safe key hashing, a cluster-mode node, and `rediss://` (TLS).

Redis Cluster refuses a script whose keys hash to different slots (CROSSSLOT),
so every key one admission, settlement or report touches must share one slot.
The slot is CRC16/XMODEM of the key's `{hash tag}` modulo 16384 (the Redis
Cluster spec); the tests compute it here and also run the real script on a
private cluster-mode redis-server, which enforces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway.accounting.limits import Limiter
from gateway.compiled.policy import parse_policy
from gateway.state import Check, Delta, StoreUnavailable, Verdict
from gateway.state.redis import RedisStore
from gateway.state.resp import RedisReplyError, RespClient
from gateway.tokens.counter import TokenCounter
from providers.base import Endpoint, Usage
from tests.conftest import key_hash
from tests.fakes.state_stores import FakeClock, free_port

PREFIX = "sb:"
REDIS_SERVER = shutil.which("redis-server")
needs_redis_server = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")


def crc16(data: bytes) -> int:
    """CRC16/XMODEM (poly 0x1021, init 0), the checksum of Redis Cluster key slots."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key: str) -> int:
    """The Redis Cluster slot of `key`: only the first non-empty `{...}` is hashed, if there is one."""
    raw = key.encode()
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1:end]
    return crc16(raw) % 16384


def test_the_slot_function_matches_redis() -> None:
    # Values from the Redis Cluster specification and `CLUSTER KEYSLOT` documentation.
    assert crc16(b"123456789") == 0x31C3
    assert key_slot("somekey") == 11058
    assert key_slot("foo{hash_tag}") == key_slot("hash_tag") == 2515
    assert key_slot("foo{}{bar}") == crc16(b"foo{}{bar}") % 16384  # an empty first tag: the whole key


# Team and model names with the characters that could break a hash tag or the key structure.
TEAMS = ("alpha", "we{ir}d:team", "x}y")


def policy_text() -> str:
    teams = ""
    for index, team in enumerate(TEAMS):
        teams += f"""
  "{team}":
    models: ["*"]
    limits: {{rpm: 1000, tpm: 1000000, rpd: 100000, tpd: 10000000}}
    model_limits:
      "m{{1}}": {{rpm: 1000, tpm: 1000000}}
    budget: {{tokens: 10000000, usd: 100, soft_thresholds: [0.000001]}}
    keys:
      - id: key-{index}
        hash: "{key_hash(f'sk-{index}')}"
        limits: {{rpm: 1000, tpd: 10000000}}
        budget: {{period: rolling, window_s: 3600, tokens: 1000000}}
"""
    return f"""
version: 1
providers:
  up: {{kind: openai_compatible, base_url: "http://127.0.0.1:9/v1", api_key: k}}
models:
  "m{{1}}": {{targets: [{{provider: up, model: gpt-4o}}]}}
teams:{teams}"""


class RecordingStore:
    """Admits everything and keeps every key each operation named, grouped as one Redis call would send them."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def flush(self) -> None: ...

    async def admit(self, checks: Sequence[Check]) -> Verdict:
        self.calls.append([key for check in checks for key in check.slices])
        return Verdict(True, tuple(0 for _ in checks))

    def settle(self, deltas: Sequence[Delta]) -> None:
        self.calls.append([delta.key for delta in deltas])

    async def read(self, slices: Sequence[Sequence[str]]) -> list[int]:
        self.calls.append([key for group in slices for key in group])
        return [0 for _ in slices]


def cost(_policy: Any, _target: Any, usage: Usage) -> float:
    return (usage.prompt_tokens + 4 * usage.completion_tokens) / 1_000_000


async def exercise(limiter: Limiter, policy: Any) -> None:
    """An admission, a settlement (with a soft-threshold mark) and a report for every team."""
    body = {"model": "m{1}", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20}
    for index, team in enumerate(TEAMS):
        caller = next(k for k in policy.keys.values() if k.key_id == f"key-{index}")
        admission = await limiter.admit(policy, caller, Endpoint.CHAT, body, policy.models["m{1}"], {})
        assert admission is not None
        limiter.settle(admission, Usage(prompt_tokens=5, completion_tokens=7), 200)
        await limiter.flush()
        await limiter.report(policy, team)


def test_every_key_of_one_operation_shares_one_cluster_slot() -> None:
    store = RecordingStore()
    policy = parse_policy(policy_text())
    limiter = Limiter(store, TokenCounter(), cost=cost)  # type: ignore[arg-type]
    asyncio.run(exercise(limiter, policy))
    # Per team: an admission (a rolling budget's 24 slices included), a settlement, a threshold mark, a report.
    assert len(store.calls) >= 4 * len(TEAMS)
    slots_by_team: dict[str, set[int]] = {}
    for keys in store.calls:
        slots = {key_slot(PREFIX + key) for key in keys}
        assert len(slots) == 1, f"one call spans {len(slots)} slots: {keys}"
        tag = keys[0][:keys[0].index("}") + 1]
        assert all(key.startswith(tag) for key in keys)
        slots_by_team.setdefault(tag, set()).update(slots)
    assert len(slots_by_team) == len(TEAMS)  # braces and colons in names are escaped: one tag per team
    assert all(len(slots) == 1 for slots in slots_by_team.values())


@contextlib.contextmanager
def redis_server(workdir: Path, *args: str) -> Iterator[int]:
    """A private redis-server on a free port (TLS or cluster mode as `args` say); yields the port.

    `{port}` in `args` is the client port and `{bus}` a second free port. Its log goes to `redis-<port>.log` in
    `workdir`, which `wait_ready` quotes if the server never answers.
    """
    assert REDIS_SERVER is not None
    port, bus = free_port(), free_port()
    while bus == port:
        bus = free_port()
    log = (workdir / f"redis-{port}.log").open("wb")
    process = subprocess.Popen([REDIS_SERVER, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                "--dir", str(workdir),
                                *[a.replace("{port}", str(port)).replace("{bus}", str(bus)) for a in args]],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        yield port
    finally:
        process.kill()
        process.wait(timeout=10)
        log.close()


def wait_ready(client: redis.Redis, workdir: Path, timeout: float = 10) -> None:
    """Poll until the private server in `workdir` answers; on timeout, fail with the end of its log."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.RedisError):
            if client.ping():
                return
        if time.monotonic() >= deadline:
            port = client.connection_pool.connection_kwargs["port"]
            log = workdir / f"redis-{port}.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
            raise AssertionError(f"private redis-server on {port} did not start:\n{tail}")
        time.sleep(0.02)


@contextlib.contextmanager
def cluster_mode_node(workdir: Path) -> Iterator[tuple[int, redis.Redis]]:
    """One private cluster-mode redis-server serving every slot; yields its port and an admin client.

    The cluster bus port is given explicitly: Redis's default, the client port + 10000, is past 65535 for a
    fifth of Linux's ephemeral ports (32768-60999), and such a node never starts.
    """
    with redis_server(workdir, "--port", "{port}", "--cluster-enabled", "yes", "--cluster-port", "{bus}",
                      "--cluster-config-file", str(workdir / "nodes.conf")) as port:
        admin = redis.Redis(port=port, socket_timeout=2)
        wait_ready(admin, workdir)
        admin.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)  # one node serving every slot
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in admin.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "cluster did not become ready"
            time.sleep(0.05)
        try:
            yield port, admin
        finally:
            admin.close()


@needs_redis_server
def test_admission_settlement_and_reports_run_on_a_cluster_mode_node(tmp_path: Path) -> None:
    with cluster_mode_node(tmp_path) as (port, admin):

        async def main() -> None:
            # The node enforces the rule this test is about: a script over two slots is refused.
            client = RespClient(f"redis://127.0.0.1:{port}/0", connect_timeout_s=2)
            with pytest.raises(RedisReplyError, match="CROSSSLOT"):
                await client.call("EVAL", "return 1", 2, "{a}:x", "{b}:x")
            await client.close()
            # fail_closed: any refused script would surface as StoreUnavailable instead of passing quietly.
            store = RedisStore(f"redis://127.0.0.1:{port}/0", key_prefix=PREFIX, timeout_s=2,
                               failure_mode="fail_closed")
            await store.start()
            policy = parse_policy(policy_text())
            limiter = Limiter(store, TokenCounter(), cost=cost, clock=FakeClock(time.time()))
            await exercise(limiter, policy)
            report = await limiter.report(policy, TEAMS[1])
            rows = {(r["scope"], r["limit_type"], r["unit"]): r["used"] for r in report["usage"]}
            assert rows[("team", "requests per minute", "requests")] == 1
            assert rows[("team", "monthly budget", "tokens")] == 12  # settled to actual usage
            assert store.healthy
            await limiter.close()

        asyncio.run(main())
        keys = admin.keys(PREFIX + "*")
        assert keys and all(admin.ttl(key) > 0 for key in keys)  # every key expires


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@needs_redis_server
def test_rediss_urls_speak_tls_and_verify_the_server(tmp_path: Path, tls_files: tuple[Path, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = tls_files
    with redis_server(tmp_path, "--port", "0", "--tls-port", "{port}", "--tls-cert-file", str(cert),
                      "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                      "--tls-auth-clients", "no") as port:
        wait_ready(redis.Redis(port=port, ssl=True, ssl_ca_certs=str(cert), socket_timeout=2), tmp_path)
        url = f"rediss://127.0.0.1:{port}/0"
        checks = [Check(("{t}:n",), 10, 3, int(time.time()) + 600)]

        async def admit_once() -> Verdict:
            store = RedisStore(url, key_prefix=PREFIX, timeout_s=2, failure_mode="fail_closed")
            await store.start()
            try:
                return await store.admit(checks)
            finally:
                await store.close()

        # The certificate is not trusted by the system: verification is on, so the store refuses it.
        with pytest.raises(StoreUnavailable):
            asyncio.run(admit_once())
        # Trusted through OpenSSL's standard variable (how a private CA is configured for the gateway).
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert asyncio.run(admit_once()).admitted
        verdict = asyncio.run(admit_once())
        assert verdict.admitted and verdict.used == (3,)  # the first admission's count, read back over TLS
