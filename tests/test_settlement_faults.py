"""Money adds up under faults: three gateway processes, one Redis, mixed traffic, a fault at every step.

Not each request's answer is checked here, but the invariants an operator
relies on, after a run with faults and a SIGTERM under load (Jepsen-style):

- every request a gateway answered has exactly one ledger row, and no gateway id has two;
- per team, the ledger's cost (in micro-dollars, each request rounded up as
  admission rounds it) equals the USD budget counter in Redis, and the
  ledger's tokens equal the token budget counter: nothing reserved is left
  over, nothing settled twice, nothing lost;
- the cost header a client got equals its ledger row's cost;
- the in-flight gauge of every process is back to 0 once traffic stops.

Faults injected during the run: Redis paused (replies arrive after the
callers' timeouts: the late-reply case), Redis killed and restarted (fail_open
serving from local counters, then the journal replayed), each ledger file held
locked for seconds, one process's stdout (its access log) closed, upstream
errors and fallbacks, streams that die mid-way or write their tail in one
read, clients that leave while waiting or mid-stream, bad input of every kind.
"""

from __future__ import annotations

import contextlib
import math
import random
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.conftest import key_hash
from tests.fakes import Behaviour, FakeOpenAIUpstream
from tests.fakes.state_stores import GatewayProcess, PrivateRedis

pytestmark = pytest.mark.slow

ADMIN = "sk-admin-faults"
TEAMS = {"alpha": "sk-alpha-faults", "beta": "sk-beta-faults"}
PREFIX = "sbfaults:"
RUN_S = 30.0
WORKERS = 6

POLICY = """
version: 1
server:
  shutdown_grace_s: 10
admin:
  keys: [{{id: ops, hash: "{admin}"}}]
providers:
  up:
    kind: openai_compatible
    base_url: {primary}
    api_key: sk-upstream-secret
    timeouts: {{connect_s: 2, first_byte_s: 5, total_s: 20}}
  spare:
    kind: openai_compatible
    base_url: {spare}
    timeouts: {{connect_s: 2, first_byte_s: 5, total_s: 20}}
prices:
  targets:
    up:
      "*": {{input: 1.5, output: 6.0}}
    spare:
      "*": {{input: 3.0, output: 12.0}}
state:
  url: {redis}
  key_prefix: "{prefix}"
  timeout_s: 0.2
  failure_mode: fail_open
  retry_interval_s: 0.2
ledger:
  path: {ledger}
  flush_interval_s: 0.2
telemetry:
  metrics: {{enabled: true}}
models:
  chat-model:
    retries: 1
    backoff: {{initial_s: 0.01, max_s: 0.05}}
    fallbacks: {{default: [spare-model]}}
    targets: [{{provider: up, model: up-chat}}]
    cache: {{mode: exact, only_deterministic: true}}
  spare-model:
    targets: [{{provider: spare, model: spare-chat}}]
  embed-model:
    targets: [{{provider: up, model: up-embed}}]
teams:
  alpha:
    keys: [{{id: alpha-key, hash: "{alpha}"}}]
    models: ["*"]
    limits: {{rpm: 100000, tpm: 100000000}}
    budget: {{tokens: 100000000, usd: 10000, period: daily}}
  beta:
    keys: [{{id: beta-key, hash: "{beta}"}}]
    models: ["*"]
    budget: {{tokens: 100000000, usd: 10000, period: daily}}
"""


@dataclass
class Outcome:
    """What one client request saw."""

    request_id: str
    team: str
    status: int | None = None  # None: no answer (connection refused, or the client left)
    cost: Decimal | None = None  # the x-switchboard-cost-usd header or the final stream chunk's cost
    answered: bool = False


@dataclass
class Run:
    base_urls: list[str]
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


class DurableRedis(PrivateRedis):
    """A private redis-server that keeps every write (append-only, fsync always), so kill -9 loses nothing."""

    def start(self) -> None:
        binary = "redis-server"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=0.2)
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    break
            assert time.monotonic() < deadline, "private redis-server did not start"
            time.sleep(0.02)
        client.close()


def _chat_body(rng: random.Random) -> dict[str, Any]:
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega"]) for _ in range(rng.randint(1, 12)))
    body: dict[str, Any] = {"model": "chat-model", "messages": [{"role": "user", "content": words}],
                            "max_tokens": rng.choice([16, 64, 200])}
    if rng.random() < 0.3:  # repeated deterministic questions: cache hits and coalesced followers
        body = {"model": "chat-model", "temperature": 0, "max_tokens": 64,
                "messages": [{"role": "user", "content": f"cached question {rng.randint(1, 4)}"}]}
    return body


BAD_BODIES = [
    {"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
    {"model": "chat-model", "messages": [{"role": "user", "content": "x"}], "stop": 5},
    {"model": "chat-model", "messages": [{"role": "assistant", "tool_calls": ["x"]}]},
    {"model": "chat-model", "messages": []},
    {"model": "chat-model", "messages": [{"role": "user", "content": [1]}]},
]


def _deep_body() -> bytes:
    return b'{"model": "chat-model", "messages": [{"role": "user", "content": ' + b"[" * 400 + b"]" * 400 + b"}]}"


def _cost_of_stream(text: str) -> Decimal | None:
    import orjson

    for line in text.splitlines():
        if line.startswith("data: {") and '"switchboard"' in line:
            return Decimal(str(orjson.loads(line[6:])["switchboard"]["cost_usd"]))
    return None


def _one_request(run: Run, rng: random.Random, client: httpx.Client) -> None:
    team = rng.choice(list(TEAMS))
    request_id = f"fault-{uuid.uuid4().hex}"
    outcome = Outcome(request_id, team)
    headers = {"authorization": f"Bearer {TEAMS[team]}", "x-request-id": request_id}
    base = rng.choice(run.base_urls)
    kind = rng.choices(["chat", "stream", "messages", "messages_stream", "responses", "responses_stream",
                        "completions", "embeddings", "bad", "deep", "leave_waiting", "leave_mid_stream",
                        "half_body"],
                       weights=[14, 14, 6, 6, 4, 4, 4, 4, 4, 2, 3, 3, 2])[0]
    try:
        if kind == "chat":
            response = client.post(base + "/v1/chat/completions", headers=headers, json=_chat_body(rng))
            outcome.status, outcome.answered = response.status_code, True
            if "x-switchboard-cost-usd" in response.headers:
                outcome.cost = Decimal(response.headers["x-switchboard-cost-usd"])
        elif kind in ("stream", "messages_stream", "responses_stream"):
            body = _chat_body(rng)
            path = "/v1/chat/completions"
            if kind == "stream":
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            elif kind == "messages_stream":
                path, body = "/v1/messages", {"model": "chat-model", "max_tokens": 64, "stream": True,
                                              "messages": body["messages"]}
            else:
                path, body = "/v1/responses", {"model": "chat-model", "stream": True,
                                               "input": body["messages"][0]["content"]}
            with client.stream("POST", base + path, headers=headers, json=body) as response:
                text = response.read().decode()
            outcome.status, outcome.answered = response.status_code, True
            if kind == "stream" and text.rstrip().endswith("data: [DONE]"):
                outcome.cost = _cost_of_stream(text)
        elif kind == "messages":
            response = client.post(base + "/v1/messages", headers=headers, json={
                "model": "chat-model", "max_tokens": 64, "messages": [{"role": "user", "content": "hello there"}]})
            outcome.status, outcome.answered = response.status_code, True
        elif kind == "responses":
            response = client.post(base + "/v1/responses", headers=headers,
                                   json={"model": "chat-model", "input": "hello responses"})
            outcome.status, outcome.answered = response.status_code, True
        elif kind == "completions":
            response = client.post(base + "/v1/completions", headers=headers,
                                   json={"model": "chat-model", "prompt": "say hi", "max_tokens": 20})
            outcome.status, outcome.answered = response.status_code, True
        elif kind == "embeddings":
            response = client.post(base + "/v1/embeddings", headers=headers,
                                   json={"model": "embed-model", "input": ["one", "two three"]})
            outcome.status, outcome.answered = response.status_code, True
        elif kind == "bad":
            response = client.post(base + "/v1/chat/completions", headers=headers, json=rng.choice(BAD_BODIES))
            outcome.status, outcome.answered = response.status_code, True
            assert response.status_code == 400, response.text
        elif kind == "deep":
            response = client.post(base + "/v1/chat/completions", headers=headers | {"content-type":
                                                                                         "application/json"},
                                   content=_deep_body())
            outcome.status, outcome.answered = response.status_code, True
            assert response.status_code == 400, response.text
        elif kind == "leave_waiting":
            with contextlib.suppress(httpx.TimeoutException):
                client.post(base + "/v1/chat/completions", headers=headers, json=_chat_body(rng),
                            timeout=rng.uniform(0.001, 0.05))
        elif kind == "leave_mid_stream":
            body = _chat_body(rng) | {"stream": True}
            with client.stream("POST", base + "/v1/chat/completions", headers=headers, json=body) as response:
                for _ in response.iter_raw():
                    break  # read one piece, then hang up
        elif kind == "half_body":
            _send_half_a_body(base, headers)
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, OSError):
        pass  # a replica stopped (SIGTERM) or a connection cut: no answer, which the invariants allow
    if outcome.status is not None:
        assert outcome.status < 500 or outcome.status in (502, 503, 504), f"{kind}: {outcome.status}"
    run.add(outcome)


def _send_half_a_body(base: str, headers: dict[str, str]) -> None:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n{head}content-type: application/json\r\n"
                     f"content-length: 500\r\n\r\n{{\"model\": \"chat-model\"".encode())


def _traffic(run: Run, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=30) as client:
        while not run.stop.is_set():
            _one_request(run, rng, client)


def _upstream_faults(primary: FakeOpenAIUpstream, stop: threading.Event, seed: int, scripted: list[int]) -> None:
    """Keep a few scripted faults queued on the primary upstream: errors, fallbacks, dying and buffered streams."""
    rng = random.Random(seed)
    while not stop.wait(0.05):
        if primary.pending_behaviours < 3:
            scripted[0] += 1
            primary.script(rng.choice([
                Behaviour.error(500), Behaviour.error(503), Behaviour.error(429),
                Behaviour.die_mid_stream(after_chunks=1), Behaviour.die_mid_stream(after_chunks=3),
                Behaviour(tail_in_one_write=True), Behaviour(delay_ms=150), Behaviour(chunk_delay_ms=30),
                Behaviour.abrupt_close(),
            ]))


def _hold_locked(path: Path, seconds: float) -> None:
    connection = sqlite3.connect(str(path), timeout=5)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        time.sleep(seconds)  # the fault itself: the database stays locked this long
        connection.rollback()
    finally:
        connection.close()


def _in_flight(base_url: str) -> float:
    text = httpx.get(base_url + "/metrics", headers={"authorization": f"Bearer {ADMIN}"}, timeout=5).text
    line = next(line for line in text.splitlines() if line.startswith("switchboard_requests_in_flight "))
    return float(line.split()[1])


def _wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_money_adds_up_across_three_replicas_under_every_fault(tmp_path: Path) -> None:
    store = DurableRedis(tmp_path)
    store.start()
    with (contextlib.ExitStack() as cleanup, FakeOpenAIUpstream(stream_chunks=6) as primary,
          FakeOpenAIUpstream(stream_chunks=4) as spare):
        cleanup.callback(store.stop)  # whatever fails, no child process outlives the test
        processes: list[GatewayProcess] = []
        ledgers: list[Path] = []
        for index in range(3):
            ledger = tmp_path / f"ledger-{index}.sqlite"
            policy = tmp_path / f"policy-{index}.yaml"
            policy.write_text(POLICY.format(admin=key_hash(ADMIN), primary=primary.base_url, spare=spare.base_url,
                                            redis=store.url, prefix=PREFIX, ledger=ledger,
                                            alpha=key_hash(TEAMS["alpha"]), beta=key_hash(TEAMS["beta"])))
            ledgers.append(ledger)
            processes.append(GatewayProcess(policy, tmp_path / f"gateway-{index}.log"))
            cleanup.callback(processes[-1].kill)
        for process in processes[:2]:
            process.start(timeout=120)
        # The third writes its access log to a pipe the test closes mid-run (a broken stdout).
        third = processes[2]
        third.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--policy", str(third.policy), "--port", str(third.port)],
            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=third.log.open("ab"))
        _wait_until(lambda: _ready(third.base_url), 120, "the third gateway")

        run = Run([p.base_url for p in processes])
        threads = [threading.Thread(target=_traffic, args=(run, seed)) for seed in range(WORKERS)]
        scripted = [0]
        faults = threading.Thread(target=_upstream_faults, args=(primary, run.stop, 99, scripted))
        for thread in (*threads, faults):
            thread.start()
        try:
            started = time.monotonic()
            time.sleep(2)  # traffic without faults first, so every ledger and Redis key exists
            redis.Redis(port=store.port).execute_command("CLIENT", "PAUSE", "800", "ALL")  # late replies
            time.sleep(1.5)
            assert third.process.stdout is not None
            third.process.stdout.close()  # the access log's stdout breaks
            store.stop()  # Redis down: fail_open serves from local counters and journals
            time.sleep(1.5)
            store.start()  # and back: the journals replay
            # Every ledger locked at once for longer than the writer's SQLite busy timeout (10 s).
            lockers = [threading.Thread(target=_hold_locked, args=(ledger, 11.0)) for ledger in ledgers]
            for locker in lockers:
                locker.start()
            for locker in lockers:
                locker.join(30)
            time.sleep(max(0.0, RUN_S - (time.monotonic() - started)))
            # SIGTERM one replica under load: every request it answered must still have its ledger row.
            processes[0].terminate()
            time.sleep(1)
        finally:
            run.stop.set()
            for thread in (*threads, faults):
                thread.join(30)
        primary.release()
        for process in processes[1:]:
            _wait_until(lambda p=process: _in_flight(p.base_url) == 0, 15, "in-flight back to 0")
        for process in processes[1:]:
            process.terminate()  # a clean stop flushes settlements, ledger rows and the journal

        rows = _ledger_rows(ledgers)
        counters = _counters(store)
        store.stop()

    assert scripted[0] > 50, "the upstream faults were not injected"
    answered = [o for o in run.outcomes if o.answered]
    assert len(answered) > 300, f"only {len(answered)} requests were answered"
    by_request = {}
    for row in rows:
        assert row["gateway_id"] not in by_request, "a gateway id has two ledger rows"
        by_request[row["gateway_id"]] = row
    client_ids = [row["request_id"] for row in rows]
    assert len(client_ids) == len(set(client_ids)), "a request has two ledger rows"
    ledgered = set(client_ids)
    missing = [o.request_id for o in answered if o.request_id not in ledgered and o.status != 401]
    assert not missing, f"{len(missing)} answered requests have no ledger row, e.g. {missing[:3]}"
    rows_by_client_id = {row["request_id"]: row for row in rows}
    for outcome in answered:
        if outcome.cost is not None:
            assert Decimal(str(rows_by_client_id[outcome.request_id]["cost_usd"])) == pytest.approx(
                outcome.cost, abs=Decimal("1e-9")), outcome
    for team in TEAMS:
        team_rows = [row for row in rows if row["team"] == team]
        micros = sum(math.ceil(row["cost_usd"] * 1_000_000) for row in team_rows if row["cost_usd"])
        tokens = sum(_billed_tokens(row) for row in team_rows)
        assert counters[(team, "usd")] == micros, f"team {team}: Redis USD counter vs ledger"
        assert counters[(team, "tok")] == tokens, f"team {team}: Redis token counter vs ledger"


def _ready(base_url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(base_url + "/readyz", timeout=1).status_code == 200
    return False


def _billed_tokens(row: dict[str, Any]) -> int:
    """What the budget counts for a row: its usage (a cache hit counts none here), failed attempts, and a semantic
    lookup's embedding."""
    overhead = row.get("cache_overhead_tokens") or 0
    if row["cache"] == "hit":
        return overhead
    return row["prompt_tokens"] + row["completion_tokens"] + (row.get("failed_attempt_tokens") or 0) + overhead


def _ledger_rows(paths: list[Path]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in paths:
        connection = sqlite3.connect(str(path))
        connection.row_factory = sqlite3.Row
        try:
            rows += [dict(row) for row in connection.execute("SELECT * FROM usage")]
        finally:
            connection.close()
    return rows


def _counters(store: PrivateRedis) -> dict[tuple[str, str], int]:
    client = redis.Redis(port=store.port, decode_responses=True)
    totals: dict[tuple[str, str], int] = {}
    for team in TEAMS:
        for unit in ("tok", "usd"):
            base = f"{PREFIX}{{{team}}}:b:team:{unit}:"
            # The slices' counters, not the once-per-period alert claims (`...:exhausted:<slice>`) beside them.
            keys = [key for key in client.scan_iter(match=base + "*") if ":" not in key[len(base):]]
            totals[(team, unit)] = sum(int(client.get(key) or 0) for key in keys)
    client.close()
    return totals
