"""The usage ledger keeps every row: keyed by the gateway's own id, through locks, full disks and shutdown."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.accounting.ledger import Ledger
from gateway.accounting.spend import spend
from gateway.accounting.usage import UsageRecord
from providers.base import Usage
from tests.conftest import RunningGateway, standard_policy
from tests.fakes import FakeOpenAIUpstream
from tests.fakes.state_stores import free_port
from tests.test_ledger import ADMIN_KEY, EXTRA, admin_spend

# The ledger as gateways before gateway_id wrote it: keyed by the client's request id.
_KEYED_BY_REQUEST_ID = """
CREATE TABLE usage (
    request_id TEXT PRIMARY KEY, ts REAL NOT NULL, day TEXT NOT NULL, team TEXT NOT NULL, key_id TEXT NOT NULL,
    endpoint TEXT NOT NULL, public_model TEXT NOT NULL, provider TEXT, upstream_model TEXT, stream INTEGER NOT NULL,
    status INTEGER NOT NULL, outcome TEXT NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL, cache_write_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL, usage_estimated INTEGER NOT NULL, cost_usd REAL, price_version TEXT,
    duration_ms REAL NOT NULL, ttft_ms REAL, trace_id TEXT, cache TEXT, cache_tokens INTEGER NOT NULL DEFAULT 0,
    cost_saved_usd REAL
);
CREATE INDEX usage_ts ON usage (ts);
"""


def _record(request_id: str, cost: float = 0.25, team: str = "t") -> UsageRecord:
    return UsageRecord(request_id=request_id, team=team, key_id="k", endpoint="chat", public_model="m",
                       provider="p", upstream_model="u", stream=False, status=200,
                       usage=Usage(prompt_tokens=10, completion_tokens=5), duration_ms=12.0, overhead_ms=0.5,
                       cost_usd=cost, price_version="v1", gateway_id=str(uuid.uuid4()))


def _rows(path: Path) -> list[tuple[str, str]]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute("SELECT request_id, team FROM usage ORDER BY team, request_id").fetchall()
    finally:
        connection.close()


def test_a_team_reusing_another_teams_request_id_does_not_erase_its_row(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway(standard_policy(upstream.base_url, extra=EXTRA))
    sent = []
    for key, model in (("sk-alpha", "chat-model"), ("sk-beta", "beta-model"), ("sk-beta", "beta-model")):
        reply = httpx.post(gateway.v1 + "/chat/completions", headers={"authorization": f"Bearer {key}",
                           "x-request-id": "req-shared-1"},
                           json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200
        assert reply.headers["x-request-id"] == "req-shared-1"  # still echoed to the client
        sent.append(reply)
    gateway.usage.wait_for(3)
    rows = {row["team"]: row["requests"] for row in admin_spend(gateway, by="team").json()}
    assert rows == {"alpha": 1, "beta": 2}
    assert sorted(_rows(gateway.policy_path.parent / "ledger.sqlite")) == [
        ("req-shared-1", "alpha"), ("req-shared-1", "beta"), ("req-shared-1", "beta")]


def test_a_ledger_keyed_by_request_id_is_rekeyed_in_place_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    connection = sqlite3.connect(path)
    connection.executescript(_KEYED_BY_REQUEST_ID)
    for n in range(3):
        connection.execute("INSERT INTO usage VALUES (" + ",".join("?" * 26) + ")",
                           (f"old-{n}", 1.0 + n, "1970-01-01", "t", "k", "chat", "m", "p", "u", 0, 200, "completed",
                            10, 5, 0, 0, 0, 0, 0.5, "v0", 3.0, None, None, None, 0, None))
    connection.commit()
    connection.close()
    ledger = Ledger(path, flush_interval_s=0.01)
    ledger.record(_record("new-1"))
    assert ledger.flush()
    ledger.close()
    connection = sqlite3.connect(path)
    keyed = connection.execute("SELECT gateway_id, request_id FROM usage WHERE gateway_id LIKE 'old-%' "
                               "ORDER BY gateway_id").fetchall()
    columns = [row[1] for row in connection.execute("PRAGMA table_info(usage)")]
    indexes = {row[1] for row in connection.execute("PRAGMA index_list(usage)")}
    connection.close()
    assert keyed == [("old-0", "old-0"), ("old-1", "old-1"), ("old-2", "old-2")]
    assert columns[:2] == ["gateway_id", "request_id"]
    assert {"usage_ts", "usage_request_id"} <= indexes
    (row,) = spend(path, "team")
    assert (row["requests"], row["cost_usd"]) == (4, 1.75)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Another connection holds the ledger in `BEGIN EXCLUSIVE` while the block runs."""
    release, taken = threading.Event(), threading.Event()

    def hold() -> None:
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute("BEGIN EXCLUSIVE")
        taken.set()
        release.wait(60)
        connection.execute("COMMIT")
        connection.close()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert taken.wait(10)
        yield
    finally:
        release.set()
        thread.join()


def _started_ledger(path: Path) -> Ledger:
    ledger = Ledger(path, flush_interval_s=0.01)
    ledger.record(_record("before-lock"))
    assert ledger.flush()
    return ledger


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _locked_run(path: Path, hold_s: float) -> Ledger:
    """12 rows recorded while another connection holds the ledger in `BEGIN EXCLUSIVE` for `hold_s`."""
    ledger = _started_ledger(path)
    with _locked(path):
        locked_at = time.monotonic()
        for n in range(12):
            ledger.record(_record(f"locked-{n}"))
        # The writer gave up on the lock, kept the rows on disk, and goes on retrying.
        _wait(lambda: ledger._spill.rows > 0, 30, "rows were never spilled")
        assert ledger.flush(timeout_s=5) is False
        assert ledger.waiting == 12 and ledger.lost == 0
        _wait(lambda: time.monotonic() - locked_at > hold_s, hold_s + 5, "")
    _wait(lambda: ledger.flush(timeout_s=5), 20, "rows were not written after the lock was released")
    assert ledger.waiting == 0 and ledger.lost == 0
    return ledger


def test_rows_recorded_while_the_database_is_locked_are_written_once_it_is_released(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = _locked_run(path, hold_s=3)
    ledger.close()
    assert len(_rows(path)) == 13
    assert not (tmp_path / "ledger.sqlite.spill.jsonl").exists()


@pytest.mark.slow
def test_a_lock_held_longer_than_ten_seconds_loses_no_row(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = _locked_run(path, hold_s=11)
    ledger.close()
    assert len(_rows(path)) == 13


def test_rows_spilled_at_shutdown_are_written_at_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = _started_ledger(path)
    with _locked(path):
        for n in range(5):
            ledger.record(_record(f"at-shutdown-{n}"))
        started = time.monotonic()
        ledger.close(timeout_s=1.0)
        assert time.monotonic() - started < 4  # never hangs on the lock
    assert len(_rows(path)) == 1 and ledger.lost == 0
    again = Ledger(path, flush_interval_s=0.01)
    assert again.waiting == 5
    assert again.flush()  # a report flushes: the spilled rows are written without waiting for a request
    assert len(_rows(path)) == 6 and again.waiting == 0
    again.record(_record("after-restart"))
    assert again.flush()
    again.close()
    assert len(_rows(path)) == 7


def test_a_full_spill_counts_what_it_loses(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = _started_ledger(path)
    ledger._spill.max_bytes = 1500  # room for a few rows only
    with _locked(path):
        for n in range(20):
            ledger.record(_record(f"row-{n}"))
        _wait(lambda: ledger._spill.rows + ledger.lost == 20, 30, "the writer never spilled the rows")
    _wait(lambda: ledger.flush(timeout_s=5), 20, "rows were not written after the lock was released")
    ledger.close()
    assert 0 < ledger.lost < 20  # what fitted was kept, the rest counted
    assert len(_rows(path)) == 1 + 20 - ledger.lost


def test_the_ledger_backlog_and_losses_are_metrics(upstream: FakeOpenAIUpstream,
                                                   start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway(standard_policy(upstream.base_url, extra=EXTRA))
    client = gateway.client()
    client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "hi"}])
    gateway.usage.wait_for(1)
    assert admin_spend(gateway).status_code == 200  # flushes the writer
    text = httpx.get(gateway.base_url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text
    assert "switchboard_ledger_rows_waiting 0.0" in text
    assert "switchboard_ledger_rows_lost_total 0.0" in text


def test_the_gateway_opens_its_ledger_at_startup_and_writes_rows_spilled_before(
        tmp_path: Path, upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    path = tmp_path / "ledger.sqlite"  # where EXTRA's policy puts it
    ledger = _started_ledger(path)
    with _locked(path):
        for n in range(3):
            ledger.record(_record(f"spilled-{n}"))
        ledger.close(timeout_s=1.0)
    assert len(_rows(path)) == 1
    start_gateway(standard_policy(upstream.base_url, extra=EXTRA))
    # Without a request or a report: the writer started with the gateway, and its first act is the spill.
    _wait(lambda: len(_rows(path)) == 4, 20, "the spilled rows were not written when the gateway started")
    # The writer empties the spill file just after its commit (a crash in between rewrites the rows at the next
    # start, where `INSERT OR IGNORE` on their ids keeps one of each): a reader can see the rows first.
    spill = path.with_name("ledger.sqlite.spill.jsonl")
    _wait(lambda: not spill.exists(), 20, "the spill file outlived the rows it held")
    assert len(_rows(path)) == 4


def test_a_ledger_the_gateway_cannot_create_stops_it_at_startup(tmp_path: Path, upstream: FakeOpenAIUpstream) -> None:
    (tmp_path / "data").write_text("a file where the ledger's directory should be")
    policy = tmp_path / "policy.yaml"
    policy.write_text(standard_policy(upstream.base_url,
                                      extra=EXTRA.replace("path: ledger.sqlite", "path: data/ledger.sqlite")))
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--policy", str(policy), "--port",
                           str(free_port()), "--no-access-log"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode != 0
    assert f"usage ledger {tmp_path / 'data' / 'ledger.sqlite'} cannot be opened" in done.stderr, done.stderr[-3000:]


def _replica_records_its_first_row(path: Path, start: object, name: str) -> None:
    start.wait()  # type: ignore[attr-defined]
    ledger = Ledger(path)
    try:
        ledger.record(_record(name))
    finally:
        ledger.close(timeout_s=10)


def test_replicas_opening_a_new_ledger_together_each_keep_their_first_row(tmp_path: Path) -> None:
    """Found by the three-replica experiments test: SQLite refuses a journal-mode switch at once ("database is
    locked", no busy wait) while another process is switching it too, and the first row was lost with it. Six
    processes open each new file together (2 failures in 20 such rounds before the fix)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")  # the test's own imports, not a fresh interpreter each
    for round_number in range(30):
        path = tmp_path / f"ledger-{round_number}.sqlite"
        start = context.Barrier(6)
        replicas = [context.Process(target=_replica_records_its_first_row, args=(path, start, f"r{round_number}-{n}"))
                    for n in range(6)]
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.join(30)
        assert [replica.exitcode for replica in replicas] == [0] * 6
        with contextlib.closing(sqlite3.connect(path)) as connection:
            stored = sorted(row[0] for row in connection.execute("SELECT request_id FROM usage"))
        assert stored == sorted(f"r{round_number}-{n}" for n in range(6)), round_number
