"""The usage ledger: durable, idempotent, and its spend reports match what clients were told."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from gateway.accounting.ledger import _SCHEMA, Ledger
from gateway.accounting.spend import parse_since, render_report, spend
from gateway.accounting.usage import UsageRecord
from gateway.cli.main import main
from providers.base import Usage
from tests.conftest import RunningGateway, key_hash, standard_policy
from tests.fakes import FakeOpenAIUpstream

ADMIN_KEY = "sk-admin-ledger"
EXTRA = f"""
prices:
  version: ledger-test
  targets:
    upstream:
      upstream-chat: {{input: 2.50, output: 10.00}}
      upstream-beta: {{input: 0.50, output: 1.50}}
ledger:
  path: ledger.sqlite
  flush_interval_s: 0.05
admin:
  keys:
    - id: finance
      hash: "{key_hash(ADMIN_KEY)}"
"""


@pytest.fixture
def ledgered(upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    return start_gateway(standard_policy(upstream.base_url, extra=EXTRA))


def _call(gateway: RunningGateway, index: int) -> tuple[str, Decimal]:
    """One request; returns the team and the cost the client was told (header, or the stream's final chunk)."""
    team, key, model = ("alpha", "sk-alpha", "chat-model") if index % 3 else ("beta", "sk-beta", "beta-model")
    client = gateway.client(key)
    messages = [{"role": "user", "content": " ".join(["word"] * (index % 7 + 1))}]
    if index % 2:
        chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True,
                                                     stream_options={"include_usage": True}))
        return team, Decimal(str((chunks[-1].model_extra or {})["switchboard"]["cost_usd"]))
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages)
    return team, Decimal(raw.headers["x-switchboard-cost-usd"])


def admin_spend(gateway: RunningGateway, **params: str) -> httpx.Response:
    return httpx.get(gateway.base_url + "/admin/spend", params=params,
                     headers={"authorization": f"Bearer {ADMIN_KEY}"})


def test_ledger_totals_match_the_costs_clients_were_told_under_concurrent_load(ledgered: RunningGateway) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        told = list(pool.map(lambda i: _call(ledgered, i), range(60)))
    ledgered.usage.wait_for(60)
    expected = {team: sum((cost for t, cost in told if t == team), Decimal(0)) for team in ("alpha", "beta")}

    response = admin_spend(ledgered, by="team")
    assert response.status_code == 200
    rows = {row["team"]: row for row in response.json()}
    assert {team: row["requests"] for team, row in rows.items()} == {"alpha": 40, "beta": 20}
    for team in ("alpha", "beta"):
        assert Decimal(str(rows[team]["cost_usd"])) == pytest.approx(expected[team], abs=Decimal("1e-9"))
    prompt = sum(r.usage.prompt_tokens for r in ledgered.usage.records if r.usage)
    assert sum(row["input_tokens"] for row in rows.values()) == prompt

    csv = admin_spend(ledgered, by="model", format="csv")
    assert csv.headers["content-type"].startswith("text/csv")
    lines = csv.text.strip().splitlines()
    assert lines[0].split(",")[:2] == ["model", "requests"] and len(lines) == 3


def test_cli_spend_reads_the_same_ledger(ledgered: RunningGateway, capsys: pytest.CaptureFixture[str]) -> None:
    told = [_call(ledgered, i) for i in range(6)]
    ledgered.usage.wait_for(6)
    assert admin_spend(ledgered, by="day").status_code == 200  # flushes the writer
    assert main(["spend", "--policy", str(ledgered.policy_path), "--by", "key", "--since", "1d",
                 "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(row["team"], row["key_id"]) for row in rows} == {("alpha", "alpha-key"), ("beta", "beta-key")}
    total = sum(Decimal(str(row["cost_usd"])) for row in rows)
    assert total == pytest.approx(sum(cost for _, cost in told), abs=Decimal("1e-9"))
    assert main(["spend", "--policy", str(ledgered.policy_path), "--by", "team", "--since", "2999-01-01",
                 "--format", "csv"]) == 0
    assert capsys.readouterr().out == ""


def test_admin_spend_requires_an_admin_key(ledgered: RunningGateway) -> None:
    assert httpx.get(ledgered.base_url + "/admin/spend").status_code == 401
    team_key = httpx.get(ledgered.base_url + "/admin/spend", headers={"authorization": "Bearer sk-alpha"})
    assert team_key.status_code == 401 and team_key.json()["error"]["code"] == "invalid_api_key"
    assert admin_spend(ledgered, by="colour").status_code == 400
    assert admin_spend(ledgered, since="last tuesday").status_code == 400


def _record(request_id: str, cost: float, team: str = "t") -> UsageRecord:
    return UsageRecord(request_id=request_id, team=team, key_id="k", endpoint="chat", public_model="m",
                       provider="p", upstream_model="u", stream=False, status=200,
                       usage=Usage(prompt_tokens=10, completion_tokens=5, cached_tokens=2), duration_ms=12.0,
                       overhead_ms=0.5, cost_usd=cost, price_version="v1", trace_id="ab" * 16,
                       gateway_id=f"gw-{request_id}")  # the same request recorded twice keeps its gateway id


def test_a_replayed_record_is_never_counted_twice(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path, flush_interval_s=0.01)
    ledger.record(_record("req-1", 0.25))
    ledger.record(_record("req-1", 0.25))
    ledger.record(_record("req-2", 0.50))
    ledger.close()
    again = Ledger(path)  # a restart that replays a write
    again.record(_record("req-2", 0.50))
    assert again.flush()
    again.close()
    (row,) = spend(path, "team")
    assert (row["requests"], row["cost_usd"], row["input_tokens"], row["cached_input_tokens"]) == (2, 0.75, 20, 4)


def test_rows_with_different_null_columns_in_one_batch_are_stored_column_for_column(tmp_path: Path) -> None:
    """The writer inserts a batch grouped by which columns are NULL (one statement per pattern, naming only the
    others): rows of different patterns, interleaved in one batch, each come back column for column as recorded,
    NULL where the record had nothing, and in the order they were recorded."""
    from gateway.accounting.ledger import _COLUMNS, _row

    def varied(index: int) -> UsageRecord:
        record = _record(f"req-{index}", 0.001 * index if index % 2 else None)  # type: ignore[arg-type]
        if index % 3 == 0:
            record = dataclasses.replace(record, time_to_first_token_ms=5.5 + index, cache="hit", cache_tokens=7,
                                         cost_saved_usd=0.002)
        if index % 4 == 1:
            record = dataclasses.replace(record, usage=None, trace_id=None, tags=(("project", f"p{index}"),),
                                         variant="canary", organization="acme", end_user=f"user-{index}")
        if index % 5 == 2:
            record = dataclasses.replace(record, failed_attempt_tokens=3, failed_attempt_cost_usd=0.0001,
                                         price_version=None)
        return record

    records = [varied(index) for index in range(24)]
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path, flush_interval_s=60)  # nothing is written before the flush: one batch
    for index, record in enumerate(records):
        ledger.record(record, at=1_800_000_000 + index)
    assert ledger.flush()
    ledger.close()
    expected = [_row(record, 1_800_000_000 + index) for index, record in enumerate(records)]
    assert len({tuple(value is None for value in row) for row in expected}) >= 6  # the patterns are really mixed
    connection = sqlite3.connect(path)
    stored = connection.execute(f"SELECT {', '.join(_COLUMNS)} FROM usage ORDER BY ts").fetchall()
    connection.close()
    assert stored == expected


@pytest.mark.parametrize("variables", [None, 100])
def test_a_batch_inserted_many_rows_a_statement_keeps_every_row(tmp_path: Path, variables: int | None) -> None:
    """`insert_rows` puts up to 64 rows in one statement, then halving sizes, and fewer when SQLite allows fewer
    variables: 150 rows of two NULL patterns (75 each: 64 + 8 + 2 + 1) all come back column for column, with
    SQLite's own default limit and with one that fits only two rows a statement; a row inserted again is ignored."""
    from gateway.accounting.ledger import _COLUMNS, _row, insert_rows, open_ledger

    records = [dataclasses.replace(_record(f"req-{index}", 0.01), time_to_first_token_ms=float(index) if index % 2
                                   else None) for index in range(150)]
    rows = [_row(record, 1_800_000_000 + index) for index, record in enumerate(records)]
    connection = open_ledger(tmp_path / "ledger.sqlite")
    if variables is not None:
        connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, variables)
    with connection:
        insert_rows(connection, rows)
    with connection:
        insert_rows(connection, rows[:3])  # a replay: INSERT OR IGNORE
    stored = connection.execute(f"SELECT {', '.join(_COLUMNS)} FROM usage ORDER BY ts").fetchall()
    connection.close()
    assert stored == rows


def test_since_accepts_dates_times_and_relative_periods() -> None:
    now = 1_800_000_000.0
    assert parse_since("2026-11-01") == 1_793_491_200.0
    assert parse_since("2026-11-01T01:00:00+01:00") == 1_793_491_200.0
    assert parse_since("24h", now) == now - 86_400
    assert parse_since("2w", now) == now - 14 * 86_400
    with pytest.raises(ValueError, match="7d"):
        parse_since("yesterday")


def test_ledger_not_configured_is_a_clear_error(gateway: RunningGateway) -> None:
    assert httpx.get(gateway.base_url + "/admin/spend").status_code == 401  # no admin keys in this policy
    assert main(["spend", "--policy", str(gateway.policy_path)]) == 1


def test_cache_hits_are_ledgered_with_tokens_served_and_cost_saved(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path, flush_interval_s=0.01)
    ledger.record(dataclasses.replace(_record("req-miss", 0.30), cache="miss"))
    hit = dataclasses.replace(_record("req-hit", 0.0), usage=Usage(), cost_usd=None, outcome="cache_hit",
                              cache="hit", cache_tokens=15, cost_saved_usd=0.30)
    ledger.record(hit)
    ledger.record(_record("req-uncached", 0.10))
    assert ledger.flush()
    ledger.close()
    (row,) = spend(path, "team")
    assert (row["requests"], row["cache_hits"], row["cache_tokens"]) == (3, 1, 15)
    assert row["cost_saved_usd"] == pytest.approx(0.30)
    assert row["cost_usd"] == pytest.approx(0.40)
    connection = sqlite3.connect(path)
    stored = connection.execute("SELECT request_id, cache, cache_tokens, cost_saved_usd FROM usage "
                                "ORDER BY request_id").fetchall()
    connection.close()
    assert stored == [("req-hit", "hit", 15, 0.30), ("req-miss", "miss", 0, None), ("req-uncached", None, 0, None)]
    table = render_report(spend(path, "model"), "table")
    assert "cache_hits" in table.splitlines()[0] and "cost_saved_usd" in table.splitlines()[0]


def test_a_ledger_from_before_the_cache_columns_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    connection = sqlite3.connect(path)
    old_schema = _SCHEMA.split("    cache TEXT,")[0].rstrip().rstrip(",") + "\n);"
    old_schema = old_schema.replace("    gateway_id TEXT PRIMARY KEY,\n    request_id TEXT NOT NULL,",
                                    "    request_id TEXT PRIMARY KEY,")
    connection.executescript(old_schema)
    connection.execute("INSERT INTO usage VALUES (" + ",".join("?" * 23) + ")",
                       ("old-1", 1.0, "1970-01-01", "t", "k", "chat", "m", "p", "u", 0, 200, "completed",
                        10, 5, 0, 0, 0, 0, 0.5, "v0", 3.0, None, None))
    connection.commit()
    connection.close()
    ledger = Ledger(path, flush_interval_s=0.01)
    ledger.record(dataclasses.replace(_record("new-1", 0.25), cache="hit", cache_tokens=7, cost_saved_usd=0.1))
    assert ledger.flush()
    ledger.close()
    (row,) = spend(path, "team")
    assert (row["requests"], row["cost_usd"], row["cache_hits"], row["cache_tokens"]) == (2, 0.75, 1, 7)


def test_cli_spend_shows_cache_columns(upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    ledgered = start_gateway(standard_policy(upstream.base_url, extra=EXTRA).replace(
        "        model: upstream-chat\n", "        model: upstream-chat\n    cache: {mode: exact}\n", 1))
    client = ledgered.client()
    ask = [{"role": "user", "content": "same question twice"}]
    raw = client.chat.completions.with_raw_response.create(model="chat-model", messages=ask)
    again = client.chat.completions.with_raw_response.create(model="chat-model", messages=ask)
    assert (raw.headers["x-switchboard-cache"], again.headers["x-switchboard-cache"]) == ("miss", "hit")
    ledgered.usage.wait_for(2)
    assert admin_spend(ledgered).status_code == 200  # flushes the writer
    assert main(["spend", "--policy", str(ledgered.policy_path), "--by", "model", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["model"], row["requests"], row["cache_hits"]) == ("chat-model", 2, 1)
    assert Decimal(str(row["cost_usd"])) == pytest.approx(Decimal(raw.headers["x-switchboard-cost-usd"]))
    assert Decimal(str(row["cost_saved_usd"])) == pytest.approx(Decimal(raw.headers["x-switchboard-cost-usd"]))
