"""The semantic cache's embeddings are billed to the team whose request needed them (issue 14, item 10).

A semantic lookup embeds the question through the gateway's own providers, on a miss and on a hit alike; the
upstream bills that call. Each test runs a real gateway in front of the word-embeddings fake and checks what a
user or operator sees: the usage record and ledger row (`cache_overhead_tokens`, `cache_overhead_cost_usd`,
both inside `cost_usd`), the spans, `switchboard spend`, and the team's budget.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from opentelemetry.trace import SpanKind

from gateway.accounting.ledger import _SCHEMA, Ledger
from gateway.accounting.spend import spend
from gateway.accounting.usage import UsageRecord
from gateway.cache import ResponseCache
from gateway.cli.main import main
from providers.base import Usage
from tests.conftest import RunningGateway, key_hash
from tests.fakes import Behaviour
from tests.fakes.embeddings_upstream import WordEmbeddingsUpstream, similarity
from tests.fakes.otlp_receiver import WaitingSpanExporter
from tests.test_cache_semantic import ASKED, CLOSE, semantic_policy

Start = Callable[..., RunningGateway]
ADMIN_KEY = "sk-admin-overhead"
# ASKED has 7 words, CLOSE 8: the fake bills one embedding token a word.
CHAT_PRICE = (2.0, 8.0)  # USD per 1M input, output tokens
EMBED_PRICE = 100.0  # USD per 1M input tokens: dear, so the overhead is plain in every total


def overhead_policy(base_url: str) -> str:
    """The semantic-cache policy of tests/test_cache_semantic.py, with prices, budgets, a ledger and an admin key."""
    text = semantic_policy(base_url, 0.85)
    for team in ("alpha", "beta"):
        text = text.replace(f'hash: "{key_hash("sk-" + team)}"}}]\n    models: [chat-model]\n',
                            f'hash: "{key_hash("sk-" + team)}"}}]\n    models: [chat-model]\n'
                            "    budget: {tokens: 1000000, usd: 10, period: daily}\n", 1)
    return text + f"""admin:
  keys: [{{id: ops, hash: "{key_hash(ADMIN_KEY)}"}}]
prices:
  version: overhead-test
  targets:
    upstream:
      upstream-chat: {{input: {CHAT_PRICE[0]}, output: {CHAT_PRICE[1]}}}
      upstream-embed: {{input: {EMBED_PRICE}, output: 0}}
ledger:
  path: ledger.sqlite
  flush_interval_s: 0.05
"""


def ask(gateway: RunningGateway, text: str, key: str = "sk-alpha") -> dict[str, str]:
    raw = gateway.client(key).chat.completions.with_raw_response.create(
        model="chat-model", messages=[{"role": "user", "content": text}])
    assert raw.parse().choices
    return dict(raw.headers)


def budget(gateway: RunningGateway, team: str) -> dict[str, float]:
    """The team's daily budget used, by unit ("tokens", "usd" in dollars)."""
    response = httpx.get(gateway.base_url + "/admin/usage", params={"team": team},
                         headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    return {r["unit"]: r["used"] for r in response.json()["usage"] if r["limit_type"] == "daily budget"}


def spend_by_team(gateway: RunningGateway) -> dict[str, dict[str, Any]]:
    response = httpx.get(gateway.base_url + "/admin/spend", params={"by": "team"},
                         headers={"authorization": f"Bearer {ADMIN_KEY}"})  # flushes the ledger writer
    assert response.status_code == 200, response.text
    return {row["team"]: row for row in response.json()}


def chat_cost(record: UsageRecord) -> float:
    assert record.usage is not None
    return (record.usage.prompt_tokens * CHAT_PRICE[0] + record.usage.completion_tokens * CHAT_PRICE[1]) / 1e6


def embedding_cost(tokens: int) -> float:
    return tokens * EMBED_PRICE / 1e6


@pytest.fixture
def exporter() -> WaitingSpanExporter:
    return WaitingSpanExporter()


def test_a_miss_and_a_hit_each_bill_their_embedding_to_the_team_that_asked(
        words: WordEmbeddingsUpstream, start_gateway: Start, exporter: WaitingSpanExporter,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert similarity(ASKED, CLOSE) > 0.85
    gateway = start_gateway(overhead_policy(words.base_url), cache=ResponseCache(), span_exporter=exporter)
    missed = ask(gateway, ASKED)
    hit = ask(gateway, CLOSE)
    beta = ask(gateway, ASKED, key="sk-beta")  # beta's cache is its own: a miss, and its own embedding
    assert (missed["x-switchboard-cache"], hit["x-switchboard-cache"], beta["x-switchboard-cache"]) == \
        ("miss", "hit", "miss")
    miss_record, hit_record, beta_record = gateway.usage.wait_for(3)
    assert [r.team for r in (miss_record, hit_record, beta_record)] == ["alpha", "alpha", "beta"]

    # The miss: its answer plus the embedding, in the record and in the cost the client was told.
    assert (miss_record.cache_overhead_tokens, beta_record.cache_overhead_tokens) == (7, 7)
    assert miss_record.cache_overhead_cost_usd == pytest.approx(embedding_cost(7))
    assert miss_record.cost_usd == pytest.approx(chat_cost(miss_record) + embedding_cost(7))
    assert float(missed["x-switchboard-cost-usd"]) == pytest.approx(miss_record.cost_usd)
    # The hit: no upstream answer, but its embedding was bought.
    assert (hit_record.cache, hit_record.cache_overhead_tokens) == ("hit", 8)
    assert hit_record.cost_usd == pytest.approx(embedding_cost(8))

    # Each team's budget moved by its own embeddings, and only by them.
    assert miss_record.usage is not None and beta_record.usage is not None
    alpha_budget, beta_budget = budget(gateway, "alpha"), budget(gateway, "beta")
    assert alpha_budget["tokens"] == miss_record.usage.total_tokens + 7 + 8
    assert alpha_budget["usd"] == pytest.approx(miss_record.cost_usd + hit_record.cost_usd, abs=2e-6)
    assert beta_budget["tokens"] == beta_record.usage.total_tokens + 7
    assert beta_budget["usd"] == pytest.approx(beta_record.cost_usd, abs=1e-6)

    # The ledger: its own columns per row, and inside every total `switchboard spend` reports.
    rows = spend_by_team(gateway)
    assert (rows["alpha"]["cache_overhead_tokens"], rows["beta"]["cache_overhead_tokens"]) == (15, 7)
    assert rows["alpha"]["cache_overhead_cost_usd"] == pytest.approx(embedding_cost(15))
    assert rows["alpha"]["cost_usd"] == pytest.approx(miss_record.cost_usd + hit_record.cost_usd)
    assert rows["beta"]["cost_usd"] == pytest.approx(beta_record.cost_usd)
    assert main(["spend", "--policy", str(gateway.policy_path), "--by", "team", "--format", "json"]) == 0
    printed = {row["team"]: row for row in json.loads(capsys.readouterr().out)}
    assert printed["alpha"]["cache_overhead_tokens"] == 15
    assert printed["alpha"]["cost_usd"] == pytest.approx(rows["alpha"]["cost_usd"])
    connection = sqlite3.connect(gateway.policy_path.parent / "ledger.sqlite")
    stored = connection.execute("SELECT team, cache, cache_overhead_tokens, cache_overhead_cost_usd FROM usage "
                                "ORDER BY ts").fetchall()
    connection.close()
    assert [row[:3] for row in stored] == [("alpha", "miss", 7), ("alpha", "hit", 8), ("beta", "miss", 7)]

    # Spans: the request says what its lookup cost; the embedding's own span is marked as cache overhead,
    # ended as a success, and the attempt that answered is not mistaken for a retry of it.
    spans = exporter.wait_for_servers(3)
    servers = sorted((s for s in spans if s.kind is SpanKind.SERVER), key=lambda s: s.start_time or 0)
    assert [s.attributes["switchboard.cache.overhead_tokens"] for s in servers] == [7, 8, 7]
    assert servers[1].attributes["switchboard.cache.overhead_cost_usd"] == pytest.approx(embedding_cost(8))
    clients = [s for s in spans if s.kind is SpanKind.CLIENT and s.parent is not None
               and s.parent.span_id == servers[0].context.span_id]
    embedding, answer = sorted(clients, key=lambda s: s.start_time or 0)
    assert embedding.attributes["switchboard.cache_overhead"] is True
    assert embedding.attributes["gen_ai.usage.input_tokens"] == 7
    assert "error.type" not in embedding.attributes and "error.type" not in answer.attributes
    assert "switchboard.cache_overhead" not in answer.attributes


def test_a_request_that_fails_after_its_lookup_still_pays_for_the_embedding(
        words: WordEmbeddingsUpstream, start_gateway: Start) -> None:
    gateway = start_gateway(overhead_policy(words.base_url), cache=ResponseCache())
    words.script(Behaviour.error(500, path="/v1/chat/completions"))
    with pytest.raises(openai.APIStatusError):
        ask(gateway, ASKED)
    (record,) = gateway.usage.wait_for(1)
    assert record.status == 502 and record.cache_overhead_tokens == 7
    assert record.cost_usd == pytest.approx(embedding_cost(7))
    assert budget(gateway, "alpha")["tokens"] == 7
    assert budget(gateway, "beta") == {"tokens": 0, "usd": 0}


def test_a_failed_embedding_bills_nothing(words: WordEmbeddingsUpstream, start_gateway: Start) -> None:
    gateway = start_gateway(overhead_policy(words.base_url), cache=ResponseCache())
    words.script(Behaviour.error(500, path="/v1/embeddings"))
    ask(gateway, ASKED)
    (record,) = gateway.usage.wait_for(1)
    assert (record.cache, record.cache_overhead_tokens, record.cache_overhead_cost_usd) == ("miss", 0, None)
    assert record.cost_usd == pytest.approx(chat_cost(record))


def _record(request_id: str) -> UsageRecord:
    return UsageRecord(request_id=request_id, gateway_id=request_id, team="alpha", key_id="k", endpoint="chat",
                       public_model="chat-model", provider="upstream", upstream_model="upstream-chat", stream=False,
                       status=200, usage=Usage(prompt_tokens=10, completion_tokens=5), duration_ms=1.0,
                       overhead_ms=0.1, cost_usd=0.5, cache="miss")


def test_a_ledger_from_before_the_overhead_columns_is_upgraded_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "older.sqlite"
    connection = sqlite3.connect(path)
    older = _SCHEMA.replace("    failed_attempt_cost_usd REAL,\n", "    failed_attempt_cost_usd REAL\n")
    connection.executescript(older.replace("    cache_overhead_tokens INTEGER NOT NULL DEFAULT 0,\n", "")
                             .replace("    cache_overhead_cost_usd REAL\n", ""))
    connection.execute("INSERT INTO usage (gateway_id, request_id, ts, day, team, key_id, endpoint, public_model, "
                       "stream, status, outcome, prompt_tokens, completion_tokens, cached_tokens, "
                       "cache_write_tokens, reasoning_tokens, usage_estimated, cost_usd, duration_ms) VALUES "
                       "('old', 'old', 1.0, '1970-01-01', 'alpha', 'k', 'chat', 'chat-model', 0, 200, "
                       "'completed', 10, 5, 0, 0, 0, 0, 0.25, 1.0)")
    connection.commit()
    connection.close()
    ledger = Ledger(path, flush_interval_s=0.01)
    ledger.record(dataclasses.replace(_record("new"), cache_overhead_tokens=7, cache_overhead_cost_usd=0.0007,
                                      cost_usd=0.5007))
    assert ledger.flush()
    ledger.close()
    (row,) = spend(path, "team")
    assert (row["requests"], row["cache_overhead_tokens"]) == (2, 7)
    assert row["cache_overhead_cost_usd"] == pytest.approx(0.0007)
    assert row["cost_usd"] == pytest.approx(0.7507)
