"""Traces: the span tree and its attributes for plain, streamed, failed and retried requests."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import httpx
import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from gateway.compiled.policy import parse_policy
from gateway.exchange import Exchange
from gateway.telemetry.content import redact_content
from gateway.telemetry.request_trace import NO_TRACE
from gateway.telemetry.traces import Telemetry
from tests.conftest import ADMIN_POLICY, RunningGateway, metrics_text, standard_policy
from tests.fakes import Behaviour, FakeOpenAIUpstream
from tests.fakes.otlp_receiver import WaitingSpanExporter

PRICES = """
prices:
  version: test-prices-1
  targets:
    upstream:
      upstream-chat: {input: 2.50, cached_input: 1.25, output: 10.00}
"""


def tree(spans: list[ReadableSpan]) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The one SERVER span and its CLIENT children, in start order."""
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    assert len(servers) == 1, [s.name for s in spans]
    server = servers[0]
    assert server.context is not None
    children = sorted((s for s in spans if s.parent is not None and s.parent.span_id == server.context.span_id),
                      key=lambda s: s.start_time or 0)
    assert all(s.kind is SpanKind.CLIENT for s in children)
    return server, children


def summed_as_tools_do(spans: list[ReadableSpan]) -> dict[str, float]:
    """A trace's totals the way each tool adds them up: every span of its LLM kind, summed.

    Phoenix: spans with `openinference.span.kind` LLM, `llm.token_count.*` and the cost of those tokens.
    LangSmith: runs with `langsmith.span.kind` llm, `gen_ai.usage.*`.
    """
    totals = {"phoenix_tokens": 0.0, "phoenix_cost": 0.0, "langsmith_tokens": 0.0}
    for span in spans:
        attributes = span.attributes or {}
        if attributes.get("openinference.span.kind") == "LLM":
            totals["phoenix_tokens"] += attributes.get("llm.token_count.total", 0)  # type: ignore[operator]
            totals["phoenix_cost"] += attributes.get("llm.cost.total", 0)  # type: ignore[operator]
        if attributes.get("langsmith.span.kind") == "llm":
            totals["langsmith_tokens"] += attributes.get("gen_ai.usage.input_tokens", 0)  # type: ignore[operator]
            totals["langsmith_tokens"] += attributes.get("gen_ai.usage.output_tokens", 0)  # type: ignore[operator]
    return totals


def usage_names(span: ReadableSpan) -> list[str]:
    return [name for name in span.attributes or {} if name.startswith(("gen_ai.usage.", "llm.token_count."))]


@pytest.fixture
def exporter() -> WaitingSpanExporter:
    return WaitingSpanExporter()


@pytest.fixture
def traced(upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway],
           exporter: WaitingSpanExporter) -> RunningGateway:
    return start_gateway(standard_policy(upstream.base_url, extra=PRICES), span_exporter=exporter)


def test_plain_call_has_a_server_span_and_one_client_span(traced: RunningGateway, exporter: WaitingSpanExporter,
                                                         upstream: FakeOpenAIUpstream) -> None:
    raw = traced.client().chat.completions.with_raw_response.create(
        model="chat-model", messages=[{"role": "user", "content": "one two three"}], temperature=0.2, max_tokens=50)
    completion = raw.parse()
    server, (client,) = tree(exporter.wait_for_servers(1))
    assert server.name == "chat chat-model"
    assert client.name == "chat upstream-chat"
    attributes = dict(server.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    # The SERVER span is a chain with no model and no usage under any tool's names, so tools that sum
    # every span (Phoenix, LangSmith, Helicone) count the request's tokens once: on its attempt.
    assert attributes["openinference.span.kind"] == "CHAIN" and attributes["langsmith.span.kind"] == "chain"
    assert not [name for name in attributes if name.startswith(("gen_ai.usage.", "gen_ai.request.", "llm."))]
    assert attributes["switchboard.team"] == "alpha"
    assert attributes["switchboard.key_id"] == "alpha-key"
    assert attributes["switchboard.model"] == "chat-model"
    assert attributes["switchboard.outcome"] == "completed"
    assert attributes["http.response.status_code"] == 200
    assert attributes["switchboard.route"] == "chat-model@upstream:ok"
    assert completion.usage is not None
    assert attributes["switchboard.usage.input_tokens"] == completion.usage.prompt_tokens
    assert attributes["switchboard.usage.output_tokens"] == completion.usage.completion_tokens
    assert attributes["switchboard.usage.cached_input_tokens"] == 0
    assert Decimal(str(attributes["switchboard.cost_usd"])) == pytest.approx(
        Decimal(raw.headers["x-switchboard-cost-usd"]))
    assert attributes["switchboard.price_version"] == "test-prices-1"
    assert server.status.status_code is StatusCode.UNSET

    upstream_attributes = dict(client.attributes or {})
    assert upstream_attributes["gen_ai.provider.name"] == "openai_compatible"
    assert upstream_attributes["gen_ai.request.model"] == "upstream-chat"
    assert upstream_attributes["gen_ai.response.model"] == completion.model
    assert upstream_attributes["gen_ai.response.id"] == completion.id
    assert upstream_attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert upstream_attributes["gen_ai.request.temperature"] == 0.2
    assert upstream_attributes["gen_ai.request.max_tokens"] == 50
    assert upstream_attributes["server.address"] == "127.0.0.1"
    assert upstream_attributes["server.port"] == upstream.port
    assert upstream_attributes["openinference.span.kind"] == "LLM"
    assert upstream_attributes["langsmith.span.kind"] == "llm"
    assert (upstream_attributes["llm.model_name"], upstream_attributes["llm.provider"]) == ("upstream-chat", "upstream")
    assert upstream_attributes["gen_ai.usage.input_tokens"] == completion.usage.prompt_tokens
    assert upstream_attributes["gen_ai.usage.output_tokens"] == completion.usage.completion_tokens
    assert upstream_attributes["gen_ai.usage.cache_read.input_tokens"] == 0
    assert upstream_attributes["llm.token_count.prompt"] == completion.usage.prompt_tokens
    assert upstream_attributes["llm.token_count.completion"] == completion.usage.completion_tokens
    assert upstream_attributes["llm.token_count.total"] == completion.usage.total_tokens
    assert upstream_attributes["llm.cost.total"] == attributes["switchboard.cost_usd"]
    assert "switchboard.team" not in upstream_attributes
    # The caller's key never appears anywhere in a span.
    for span in (server, client):
        assert all("sk-alpha" not in str(value) for value in (span.attributes or {}).values())
    assert traced.usage.wait_for(1)[0].trace_id == format(server.context.trace_id, "032x")  # type: ignore[union-attr]


def test_stream_records_time_to_first_token_and_usage(traced: RunningGateway, exporter: WaitingSpanExporter) -> None:
    chunks = list(traced.client().chat.completions.create(
        model="chat-model", messages=[{"role": "user", "content": "stream me please"}], stream=True,
        stream_options={"include_usage": True}))
    server, (client,) = tree(exporter.wait_for_servers(1))
    attributes = dict(server.attributes or {})
    assert attributes["switchboard.stream"] is True
    assert attributes["switchboard.ttft_ms"] > 0
    usage = chunks[-1].usage
    assert usage is not None and attributes["switchboard.usage.output_tokens"] == usage.completion_tokens
    upstream_attributes = dict(client.attributes or {})
    assert upstream_attributes["gen_ai.request.stream"] is True
    assert upstream_attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert upstream_attributes["llm.token_count.completion"] == usage.completion_tokens
    assert upstream_attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert upstream_attributes["gen_ai.response.id"] == chunks[0].id
    assert 0 < upstream_attributes["gen_ai.response.time_to_first_chunk"] < 5
    assert upstream_attributes["switchboard.cost_usd"] == attributes["switchboard.cost_usd"]
    # The CLIENT span covers the whole upstream stream and ends before the SERVER span.
    assert client.end_time is not None and server.end_time is not None and client.end_time <= server.end_time


def test_upstream_error_marks_both_spans(traced: RunningGateway, exporter: WaitingSpanExporter,
                                         upstream: FakeOpenAIUpstream) -> None:
    upstream.script(Behaviour.error(500, "boom"))
    with pytest.raises(openai.InternalServerError):
        traced.client().chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "x"}])
    server, (client,) = tree(exporter.wait_for_servers(1))
    assert client.status.status_code is StatusCode.ERROR
    assert (client.attributes or {})["error.type"] == "500"
    assert server.status.status_code is StatusCode.ERROR
    assert (server.attributes or {})["error.type"] == "upstream_error"
    assert (server.attributes or {})["http.response.status_code"] == 502


def test_retried_call_shows_each_attempt_as_a_sibling(upstream: FakeOpenAIUpstream, exporter: WaitingSpanExporter,
                                                      start_gateway: Callable[..., RunningGateway]) -> None:
    policy = standard_policy(upstream.base_url, extra=PRICES).replace(
        "      - provider: upstream\n        model: upstream-chat\n",
        "      - provider: upstream\n        model: upstream-chat\n    retries: 2\n"
        "    backoff: {initial_s: 0, max_s: 0}\n", 1)
    gateway = start_gateway(policy, span_exporter=exporter)
    upstream.script(Behaviour.error(503), Behaviour.rate_limited(retry_after=0))
    gateway.client().chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "x"}])
    server, attempts = tree(exporter.wait_for_servers(1))
    assert [(a.attributes or {}).get("error.type") for a in attempts] == ["503", "429", None]
    assert [(a.attributes or {})["switchboard.attempt"] for a in attempts] == [1, 2, 3]
    # Every attempt is an LLM call of its own; the failed ones used (and claim) no tokens.
    assert [(a.attributes or {})["openinference.span.kind"] for a in attempts] == ["LLM"] * 3
    assert [usage_names(a) == [] for a in attempts] == [True, True, False]
    assert [a.status.status_code for a in attempts] == [StatusCode.ERROR, StatusCode.ERROR, StatusCode.UNSET]
    assert (server.attributes or {})["switchboard.attempts"] == 3
    assert server.status.status_code is StatusCode.UNSET
    # Each attempt told the upstream its own span id.
    parents = [r.header("traceparent") for r in upstream.requests]
    assert [p.split("-")[2] for p in parents] == [format(a.context.span_id, "016x") for a in attempts]  # type: ignore[union-attr]


def test_incoming_traceparent_is_joined_and_propagated_upstream(traced: RunningGateway, exporter: WaitingSpanExporter,
                                                               upstream: FakeOpenAIUpstream) -> None:
    trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    traced.client(default_headers={"traceparent": f"00-{trace_id}-{caller_span}-01"}).chat.completions.create(
        model="chat-model", messages=[{"role": "user", "content": "x"}])
    server, (client,) = tree(exporter.wait_for_servers(1))
    assert server.context is not None and server.parent is not None and client.context is not None
    assert format(server.context.trace_id, "032x") == trace_id
    assert format(server.parent.span_id, "016x") == caller_span and server.parent.is_remote
    sent = upstream.last_request.header("traceparent")
    assert sent.startswith(f"00-{trace_id}-{format(client.context.span_id, '016x')}-")
    assert int(sent[-2:], 16) & 1 == 1  # sampled, as the caller asked


def test_unsampled_traces_are_dropped_but_errors_are_kept(upstream: FakeOpenAIUpstream, exporter: WaitingSpanExporter,
                                                          start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway(standard_policy(upstream.base_url, extra="telemetry: {traces: {sample_ratio: 0}}"),
                            span_exporter=exporter)
    client = gateway.client()
    for _ in range(3):
        client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "ok"}])
    upstream.script(Behaviour.error(503))
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "fails"}])
    gateway.usage.wait_for(4)
    server, (attempt,) = tree(exporter.wait_for_servers(1))
    assert (attempt.attributes or {})["error.type"] == "503"
    assert server.context is not None and server.context.trace_flags.sampled
    # The upstream was told the truth: these traces were not sampled when the call was made.
    assert all(int(r.header("traceparent")[-2:], 16) & 1 == 0 for r in upstream.requests)  # sampled bit off
    assert len(exporter.get_finished_spans()) == 2


def test_tail_sampling_keeps_slow_and_expensive_traces_outside_the_sample(
        upstream: FakeOpenAIUpstream, exporter: WaitingSpanExporter,
        start_gateway: Callable[..., RunningGateway]) -> None:
    extra = PRICES + "telemetry: {traces: {sample_ratio: 0, keep_slower_than_ms: 250, keep_costlier_than_usd: 0.005}}"
    gateway = start_gateway(standard_policy(upstream.base_url, extra=extra), span_exporter=exporter)
    client = gateway.client()
    client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "fast and cheap"}])
    upstream.script(Behaviour.slow_first_byte(400))
    client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "slow"}])
    long_prompt = "word " * 4000  # ~4,000 tokens at $2.50 per million: ~$0.01
    client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": long_prompt}])
    cheap, slow, costly = gateway.usage.wait_for(3)
    assert cheap.cost_usd is not None and cheap.cost_usd < 0.005 and cheap.duration_ms < 250
    assert slow.duration_ms >= 250 and costly.cost_usd is not None and costly.cost_usd >= 0.005
    servers = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    kept = {(s.attributes or {})["switchboard.request_id"]: (s.attributes or {})["switchboard.trace.kept"]
            for s in servers}
    assert kept == {slow.request_id: "slow", costly.request_id: "expensive"}  # the fast, cheap one: not built
    # Cost attribution never depends on sampling: every request is on the ledger's record, traced or not.
    assert all(r.cost_usd is not None for r in (cheap, slow, costly))


def test_tracing_off_sends_no_trace_context_and_records_no_trace_id(gateway: RunningGateway,
                                                                   upstream: FakeOpenAIUpstream) -> None:
    gateway.client().chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "x"}])
    assert upstream.last_request.header("traceparent") is None
    assert gateway.usage.wait_for(1)[0].trace_id is None


def test_content_is_recorded_only_for_listed_teams_and_redacted(
        upstream: FakeOpenAIUpstream, exporter: WaitingSpanExporter,
        start_gateway: Callable[..., RunningGateway]) -> None:
    extra = "telemetry: {traces: {record_content: [alpha], openinference: true}}"
    gateway = start_gateway(standard_policy(upstream.base_url, extra=extra), span_exporter=exporter)
    secret = "mail ops@example.com with sk-live-0123456789abcdef"
    gateway.client("sk-alpha").chat.completions.create(model="chat-model",
                                                       messages=[{"role": "user", "content": secret}])
    gateway.client("sk-beta").chat.completions.create(model="beta-model",
                                                      messages=[{"role": "user", "content": secret}])
    spans = exporter.wait_for_servers(2)
    by_team = {(s.attributes or {})["switchboard.team"]: s for s in spans if s.kind is SpanKind.SERVER}
    recorded = (by_team["alpha"].attributes or {})["gen_ai.input.messages"]
    assert "[redacted]" in recorded and "ops@example.com" not in recorded and "sk-live" not in recorded
    assert '"role":"user"' in recorded
    assert "echo:" in (by_team["alpha"].attributes or {})["gen_ai.output.messages"]
    assert "gen_ai.input.messages" not in (by_team["beta"].attributes or {})
    llm = [s for s in spans if s.kind is SpanKind.CLIENT and (s.attributes or {}).get("openinference.span.kind")]
    assert len(llm) == 2 and all((s.attributes or {})["llm.token_count.total"] > 0 for s in llm)


def test_unauthenticated_request_still_ends_its_span(traced: RunningGateway, exporter: WaitingSpanExporter) -> None:
    response = httpx.post(traced.v1 + "/chat/completions", json={"model": "chat-model", "messages": []},
                          headers={"authorization": "Bearer wrong"})
    assert response.status_code == 401
    server, children = tree(exporter.wait_for_servers(1))
    assert children == [] and (server.attributes or {})["error.type"] == "invalid_api_key"


def test_decisions_become_events_on_the_server_span(exporter: WaitingSpanExporter) -> None:
    policy = parse_policy(standard_policy("http://127.0.0.1:9/v1"))
    telemetry = Telemetry(span_exporter=exporter)
    telemetry.configure(policy)
    import time

    trace = telemetry.start("chat", {}, Exchange("req-1", time.perf_counter()))
    assert trace.recording
    trace.decision("switchboard.route", {"candidates": ["a", "b"], "chosen": "b", "reason": "least-busy"})
    trace.finish(None)
    (span,) = exporter.get_finished_spans()
    assert [(e.name, dict(e.attributes or {})) for e in span.events] == [
        ("switchboard.route", {"candidates": ("a", "b"), "chosen": "b", "reason": "least-busy"})]


def test_telemetry_off_builds_no_span_objects() -> None:
    policy = parse_policy(standard_policy("http://127.0.0.1:9/v1"))
    telemetry = Telemetry()
    telemetry.configure(policy)
    import time

    assert telemetry.start("chat", {}, Exchange("req-1", time.perf_counter())) is NO_TRACE


@pytest.mark.parametrize(("text", "hidden"), [
    ("Authorization: Bearer abcdefghijklmnop", "abcdefghijklmnop"),
    ("card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111"),
    ("key AIzaSyA1234567890abcdefghijklmnop", "AIzaSyA1234567890abcdefghijklmnop"),
    ("write to jane.doe+x@corp.example.org", "jane.doe+x@corp.example.org"),
])
def test_redaction_masks_obvious_secrets(text: str, hidden: str) -> None:
    assert hidden not in redact_content(text) and "[redacted]" in redact_content(text)


def test_rate_limited_request_is_traced_and_counted_as_a_rejection(
        upstream: FakeOpenAIUpstream, exporter: WaitingSpanExporter,
        start_gateway: Callable[..., RunningGateway]) -> None:
    policy = standard_policy(upstream.base_url, extra=ADMIN_POLICY).replace(
        "    models: [chat-model, embed-model]\n", "    models: [chat-model, embed-model]\n    limits: {rpm: 1}\n", 1)
    gateway = start_gateway(policy, span_exporter=exporter)
    client = gateway.client()
    client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "y"}])
    spans = exporter.wait_for_servers(2)
    rejected = next(s for s in spans if s.kind is SpanKind.SERVER
                    and (s.attributes or {})["http.response.status_code"] == 429)
    assert (rejected.attributes or {})["error.type"] == "rate_limit_exceeded"
    assert (rejected.attributes or {})["switchboard.outcome"] == "rate_limit_exceeded"
    assert (rejected.attributes or {})["switchboard.attempts"] == 0  # the upstream was never called
    assert len(upstream.requests) == 1
    metrics = metrics_text(gateway)
    assert 'switchboard_rejections_total{reason="rate_limited",scope="team",team="alpha"} 1.0' in metrics


def test_fallback_attempts_are_siblings_and_the_answering_target_is_billed(
        upstream: FakeOpenAIUpstream, exporter: WaitingSpanExporter,
        start_gateway: Callable[..., RunningGateway]) -> None:
    policy = standard_policy(upstream.base_url, extra=PRICES + "      upstream-backup: {input: 1.00, output: 2.00}\n")
    policy = policy.replace("models:\n  chat-model:\n", "models:\n  backup-model:\n    targets:\n"
                            "      - provider: upstream\n        model: upstream-backup\n  chat-model:\n"
                            "    fallbacks: {default: [backup-model]}\n", 1)
    policy = policy.replace("    models: [chat-model, embed-model]\n",  # alpha may be served backup-model as a fallback
                            "    models: [chat-model, embed-model]\n    fallback_models: [backup-model]\n", 1)
    gateway = start_gateway(policy, span_exporter=exporter)
    upstream.script(Behaviour.error(503))
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="chat-model", messages=[{"role": "user", "content": "one two"}])
    usage = raw.parse().usage
    assert usage is not None
    server, (failed, answered) = tree(exporter.wait_for_servers(1))
    assert (failed.name, (failed.attributes or {})["error.type"]) == ("chat upstream-chat", "503")
    assert answered.name == "chat upstream-backup" and answered.status.status_code is StatusCode.UNSET
    assert (server.attributes or {})["switchboard.route"].endswith("backup-model@upstream:ok")
    expected = (Decimal(usage.prompt_tokens) * 1 + Decimal(usage.completion_tokens) * 2) / 1_000_000
    assert Decimal(raw.headers["x-switchboard-cost-usd"]) == pytest.approx(expected)
    assert (answered.attributes or {})["switchboard.cost_usd"] == pytest.approx(float(expected))
    assert usage_names(failed) == [] and usage_names(server) == []
    # Summed the way Phoenix and LangSmith sum a project, the trace costs what the ledger says, once.
    totals = summed_as_tools_do([server, failed, answered])
    assert totals["phoenix_tokens"] == totals["langsmith_tokens"] == usage.total_tokens
    assert Decimal(str(totals["phoenix_cost"])) == pytest.approx(Decimal(str(gateway.usage.wait_for(1)[0].cost_usd)))


def test_chain_attempts_leave_the_llm_call_to_the_client_trace(
        upstream: FakeOpenAIUpstream, exporter: WaitingSpanExporter,
        start_gateway: Callable[..., RunningGateway]) -> None:
    extra = PRICES + "telemetry: {traces: {attempt_span_kind: chain}}\n"
    gateway = start_gateway(standard_policy(upstream.base_url, extra=extra), span_exporter=exporter)
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="chat-model", messages=[{"role": "user", "content": "one two"}])
    server, (attempt,) = tree(exporter.wait_for_servers(1))
    attributes = dict(attempt.attributes or {})
    assert (attributes["openinference.span.kind"], attributes["langsmith.span.kind"]) == ("CHAIN", "chain")
    # The client's own LLM span counts these tokens: here nothing may count them again.
    assert usage_names(attempt) == [] and "llm.model_name" not in attributes and "llm.cost.total" not in attributes
    assert summed_as_tools_do([server, attempt]) == {"phoenix_tokens": 0, "phoenix_cost": 0, "langsmith_tokens": 0}
    # The gateway's own facts are still there.
    assert attributes["switchboard.cost_usd"] == pytest.approx(float(raw.headers["x-switchboard-cost-usd"]))
    assert (server.attributes or {})["switchboard.usage.input_tokens"] == raw.parse().usage.prompt_tokens  # type: ignore[union-attr]


def test_openinference_off_leaves_only_the_genai_names(
        upstream: FakeOpenAIUpstream, exporter: WaitingSpanExporter,
        start_gateway: Callable[..., RunningGateway]) -> None:
    extra = "telemetry: {traces: {openinference: false}}\n"
    gateway = start_gateway(standard_policy(upstream.base_url, extra=extra), span_exporter=exporter)
    gateway.client().chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "x"}])
    _, (attempt,) = tree(exporter.wait_for_servers(1))
    attributes = dict(attempt.attributes or {})
    assert not [name for name in attributes if name.startswith("llm.")]
    assert attributes["langsmith.span.kind"] == "llm" and attributes["gen_ai.usage.output_tokens"] > 0
