"""Caps that hold and usage OpenAI's clients expect, against fakes that behave like real servers that don't.

llama-cpp-python reads only `max_tokens` (2,032 tokens generated under `max_completion_tokens: 5`) and ignores
`stream_options.include_usage`; tests/test_selfhosted_servers.py shows the real server. Here the fake is told
to overrun caps and to leave usage out, so the gateway's own guard and usage chunk are what the client sees.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.trace import SpanKind

from gateway.tokens.counter import TokenCounter
from tests.conftest import ALPHA_TEAM_ALL_MODELS, RunningGateway, run_gateway, serving
from tests.fakes import Behaviour, FakeOpenAIUpstream
from tests.fakes.otlp_receiver import WaitingSpanExporter

WORDS = " ".join(f"w{i}" for i in range(40))


def _policy(base_url: str) -> str:
    return f"""
providers:
  llama: {{kind: llamacpp, base_url: {base_url}}}
  openai: {{kind: openai, base_url: {base_url}, api_key: sk-upstream}}
  vllm: {{kind: vllm, base_url: {base_url}}}
models:
  llama: {{targets: [{{provider: llama, model: tiny}}]}}
  o3-mini: {{targets: [{{provider: openai, model: o3-mini}}]}}
  gpt-4o: {{targets: [{{provider: openai, model: gpt-4o}}]}}
  vllm: {{targets: [{{provider: vllm, model: m}}]}}
"""


@pytest.fixture
def gateway(upstream: FakeOpenAIUpstream, tmp_path: Path) -> Iterator[RunningGateway]:
    with serving(tmp_path / "policy.yaml", _policy(upstream.base_url)) as running:
        yield running


@pytest.mark.parametrize(("model", "sent", "expected"), [
    ("llama", {"max_completion_tokens": 5}, {"max_tokens": 5}),
    ("llama", {"max_tokens": 6, "max_completion_tokens": 5}, {"max_tokens": 5}),
    ("o3-mini", {"max_tokens": 7}, {"max_completion_tokens": 7}),
    ("gpt-4o", {"max_tokens": 7}, {"max_tokens": 7}),
    ("vllm", {"max_completion_tokens": 8}, {"max_completion_tokens": 8}),
])
def test_the_cap_goes_under_the_field_the_kind_reads(gateway: RunningGateway, upstream: FakeOpenAIUpstream,
                                                     model: str, sent: dict[str, int],
                                                     expected: dict[str, int]) -> None:
    gateway.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                             **sent)  # type: ignore[call-overload]
    assert upstream.last_request is not None
    forwarded = {k: v for k, v in upstream.last_request.json.items() if k in ("max_tokens", "max_completion_tokens")}
    assert forwarded == expected


def test_a_stream_past_the_cap_is_cut_at_it_and_billed_as_relayed(gateway: RunningGateway,
                                                                  upstream: FakeOpenAIUpstream) -> None:
    upstream.script(Behaviour(content=WORDS, stream_chunks=40, chunk_delay_ms=25, overrun=True, no_usage=True))
    chunks = list(gateway.client().chat.completions.create(
        model="llama", max_completion_tokens=5, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "count"}]))
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 5
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    text = "".join(content)
    expected = TokenCounter().count_text(text, "tiny", "open_weights")
    assert usage_chunks[0].usage is not None and usage_chunks[0].usage.completion_tokens == expected
    assert (usage_chunks[0].model_extra or {})["switchboard"]["usage_estimated"] is True
    assert upstream.wait_for_disconnect(), "the overrunning upstream was not told to stop"
    record = gateway.usage.wait_for(1)[0]
    assert record.usage is not None and record.usage.estimated
    assert record.usage.completion_tokens == expected
    assert record.outcome == "completed"


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_missing_usage_chunk_is_supplied_once_and_marked(gateway: RunningGateway, upstream: FakeOpenAIUpstream,
                                                           endpoint: str) -> None:
    upstream.script(Behaviour(no_usage=True))
    client = gateway.client()
    if endpoint == "chat":
        chunks = list(client.chat.completions.create(model="vllm", stream=True, stream_options={"include_usage": True},
                                                     messages=[{"role": "user", "content": "hello there"}]))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        chunks = list(client.completions.create(model="vllm", prompt="hello there", stream=True,  # type: ignore[assignment]
                                                stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)  # type: ignore[attr-defined]
    assert text.startswith("echo: hello there")
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and not usage_chunks[0].choices
    usage = usage_chunks[0].usage
    assert usage is not None
    assert usage.completion_tokens == TokenCounter().count_text(text, "m", "open_weights")
    assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert (usage_chunks[0].model_extra or {})["switchboard"] == {"usage_estimated": True}
    record = gateway.usage.wait_for(1)[0]
    assert record.usage is not None and record.usage.estimated
    assert record.usage.completion_tokens == usage.completion_tokens


def test_an_upstreams_own_usage_chunk_is_not_doubled(gateway: RunningGateway) -> None:
    chunks = list(gateway.client().chat.completions.create(
        model="vllm", stream=True, stream_options={"include_usage": True}, max_tokens=50,
        messages=[{"role": "user", "content": "hello there"}]))
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1
    assert "usage_estimated" not in ((usage_chunks[0].model_extra or {}).get("switchboard") or {})
    record = gateway.usage.wait_for(1)[0]
    assert record.usage is not None and not record.usage.estimated


def test_a_whole_answer_without_usage_gets_an_estimated_one(gateway: RunningGateway,
                                                            upstream: FakeOpenAIUpstream) -> None:
    upstream.script(Behaviour(no_usage=True))
    reply = gateway.client().chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi you"}])
    text = reply.choices[0].message.content or ""
    assert reply.usage is not None
    assert reply.usage.completion_tokens == TokenCounter().count_text(text, "tiny", "open_weights")
    assert reply.usage.prompt_tokens > 0
    assert (reply.model_extra or {})["switchboard"] == {"usage_estimated": True}
    record = gateway.usage.wait_for(1)[0]
    assert record.usage is not None and record.usage.estimated


def test_an_estimated_usage_is_marked_on_the_ledger_row_and_the_span(upstream: FakeOpenAIUpstream,
                                                                     tmp_path: Path) -> None:
    exporter = WaitingSpanExporter()
    path = tmp_path / "policy.yaml"
    path.write_text(_policy(upstream.base_url) + "ledger: {path: ledger.sqlite, flush_interval_s: 0.05}\n"
                    + ALPHA_TEAM_ALL_MODELS)
    gateway = run_gateway(path, span_exporter=exporter)
    try:
        upstream.script(Behaviour(no_usage=True))  # the first stream gets no usage from the upstream; the second does
        for _ in range(2):
            list(gateway.client().chat.completions.create(
                model="vllm", stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "hello there"}]))
        records = gateway.usage.wait_for(2)
        servers = [s for s in exporter.wait_for_servers(2) if s.kind is SpanKind.SERVER]
    finally:
        gateway.stop()  # flushes the ledger
    marks = {r.request_id: r.usage is not None and r.usage.estimated for r in records}
    assert sorted(marks.values()) == [False, True]
    first, second = sorted(servers, key=lambda span: span.start_time or 0)
    spans = [(span.attributes or {})["switchboard.usage_estimated"] for span in (first, second)]
    connection = sqlite3.connect(tmp_path / "ledger.sqlite")
    rows = dict(connection.execute("SELECT request_id, usage_estimated FROM usage").fetchall())
    connection.close()
    assert spans == [True, False] and [marks[r.request_id] for r in records] == [True, False]
    assert {request_id: bool(mark) for request_id, mark in rows.items()} == marks
