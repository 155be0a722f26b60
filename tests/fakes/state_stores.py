"""State stores for the limits tests: a settable clock, per-run Redis namespaces, a private redis-server."""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import redis

SHARED_REDIS = "redis://127.0.0.1:6379/11"  # a DB index only these tests use; keys also get a per-run prefix


class FakeClock:
    """Wall-clock time the test sets; start it inside a minute so windows are predictable."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def shared_redis_available() -> bool:
    try:
        return bool(redis.Redis.from_url(SHARED_REDIS, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def unique_prefix() -> str:
    return f"sbtest:{uuid.uuid4().hex[:12]}:"


def drop_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def free_port() -> int:
    """A free port for a server a test starts as a child process.

    Taken below Linux's ephemeral range (32768-60999): a port from bind(0) is
    one the kernel may hand to any outgoing connection as its source port
    before the child binds it, which under a parallel suite happens.
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 32_000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-31999")


class PrivateRedis:
    """A redis-server of our own on a free port, which a test may stop and start again.

    `persist`: an append-only file synced on every write, so a `kill -9` and restart keeps every counter
    (a Redis that comes back with its data, as a production one with AOF does).
    """

    def __init__(self, workdir: Path, *, persist: bool = False) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.persist = persist
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *(("--appendonly", "yes", "--appendfsync", "always") if self.persist else ("--appendonly", "no")),
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("private redis-server did not start")
            time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@contextlib.contextmanager
def private_redis(workdir: Path, *, persist: bool = False) -> Iterator[PrivateRedis]:
    server = PrivateRedis(workdir, persist=persist)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class GatewayProcess:
    """`switchboard serve` in a child process on a free port (for kill -9 and multi-process tests)."""

    def __init__(self, policy: Path, log: Path) -> None:
        self.policy = policy
        self.port = free_port()
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> GatewayProcess:
        import sys

        import httpx

        root = Path(__file__).resolve().parents[2]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--policy", str(self.policy), "--port", str(self.port),
                 "--no-access-log"], cwd=root, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"gateway exited: {self.log.read_text()[-2000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/readyz", timeout=1).status_code == 200:
                    return self
            assert time.monotonic() < deadline, "gateway did not become ready"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def terminate(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None
