"""Decision provenance: the span events that say how each request was admitted, cached and routed."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from tests.conftest import ADMIN_POLICY, RunningGateway, metrics_text, standard_policy
from tests.fakes import Behaviour, FakeOpenAIUpstream
from tests.fakes.otlp_receiver import WaitingSpanExporter

CHAT_BLOCK = "  chat-model:\n    targets:\n      - provider: upstream\n        model: upstream-chat\n"
ALPHA_MODELS = "    models: [chat-model, embed-model]\n"
PRICES = """
prices:
  version: decisions-1
  targets:
    upstream:
      "*": {input: 2.00, output: 8.00}
"""
ASK = [{"role": "user", "content": "which way did this request go"}]
Start = Callable[..., RunningGateway]


@pytest.fixture
def exporter() -> WaitingSpanExporter:
    return WaitingSpanExporter()


def policy(upstream: FakeOpenAIUpstream, chat_block: str = CHAT_BLOCK, alpha_lines: str = "",
           alpha_models: str = ALPHA_MODELS) -> str:
    text = standard_policy(upstream.base_url, extra=PRICES + ADMIN_POLICY).replace(CHAT_BLOCK, chat_block, 1)
    return text.replace(ALPHA_MODELS, alpha_models + alpha_lines, 1)


def servers(exporter: WaitingSpanExporter, count: int) -> list[ReadableSpan]:
    """The SERVER spans of `count` finished requests, in the order they started."""
    spans = exporter.wait_for_servers(count)
    return sorted((s for s in spans if s.kind is SpanKind.SERVER), key=lambda s: s.start_time or 0)


def clients_of(exporter: WaitingSpanExporter, server: ReadableSpan) -> list[ReadableSpan]:
    assert server.context is not None
    return sorted((s for s in exporter.get_finished_spans()
                   if s.parent is not None and s.parent.span_id == server.context.span_id),
                  key=lambda s: s.start_time or 0)


def events(span: ReadableSpan, prefix: str = "switchboard.") -> list[tuple[str, dict[str, Any]]]:
    return [(e.name, dict(e.attributes or {})) for e in span.events if e.name.startswith(prefix)]


def named(span: ReadableSpan, name: str) -> list[dict[str, Any]]:
    return [attributes for event, attributes in events(span) if event == name]


def test_weighted_route_names_every_candidate_its_weight_and_the_choice(
        upstream: FakeOpenAIUpstream, start_gateway: Start, exporter: WaitingSpanExporter) -> None:
    weighted = ("  chat-model:\n    routing: {strategy: weighted}\n    targets:\n"
                "      - {provider: upstream, model: upstream-chat, weight: 3}\n"
                "      - {provider: upstream, model: upstream-alt, weight: 1}\n")
    gateway = start_gateway(policy(upstream, weighted), span_exporter=exporter)
    client = gateway.client()
    answered_by = [client.chat.completions.create(model="chat-model", messages=ASK).model for _ in range(4)]

    chosen = []
    for server in servers(exporter, 4):
        (route,) = named(server, "switchboard.route")
        assert route["switchboard.route.strategy"] == "weighted"
        assert route["switchboard.route.model"] == "chat-model"
        assert route["switchboard.route.attempt"] == 1
        assert route["switchboard.route.candidates"] == ("upstream/upstream-chat", "upstream/upstream-alt")
        assert route["switchboard.route.weights"] == (3.0, 1.0)
        assert route["switchboard.route.states"] == ("closed", "closed")
        assert "weighted round-robin" in route["switchboard.route.reason"]
        assert "switchboard.route.scores" not in route  # weights are the whole story for this strategy
        order = route.get("switchboard.route.order", route["switchboard.route.candidates"])
        assert order[0] == route["switchboard.route.chosen"]
        # The event names the target the CLIENT span actually called.
        (attempt,) = clients_of(exporter, server)
        assert route["switchboard.route.chosen"] == f"upstream/{(attempt.attributes or {})['gen_ai.request.model']}"
        chosen.append(route["switchboard.route.chosen"])
    assert sorted(chosen) == ["upstream/upstream-alt"] + ["upstream/upstream-chat"] * 3
    assert [c.removeprefix("upstream/") for c in chosen] == answered_by


def test_a_route_pinned_by_tags_names_only_the_pinned_candidates(
        upstream: FakeOpenAIUpstream, start_gateway: Start, exporter: WaitingSpanExporter) -> None:
    pinnable = ("  chat-model:\n    routing: {strategy: weighted, allow_tag_pinning: true}\n    targets:\n"
                "      - {provider: upstream, model: upstream-us, weight: 4, tags: {region: us}}\n"
                "      - {provider: upstream, model: upstream-eu, weight: 2, tags: {region: eu}}\n"
                "      - {provider: upstream, model: upstream-eu2, weight: 1, tags: {region: eu}}\n")
    gateway = start_gateway(policy(upstream, pinnable), span_exporter=exporter)
    client = gateway.client()
    client.chat.completions.create(model="chat-model", messages=ASK, extra_headers={"x-switchboard-tags": "region=eu"})
    client.chat.completions.create(model="chat-model", messages=ASK)

    pinned, whole = (named(server, "switchboard.route")[0] for server in servers(exporter, 2))
    assert pinned["switchboard.route.candidates"] == ("upstream/upstream-eu", "upstream/upstream-eu2")
    assert pinned["switchboard.route.weights"] == (2.0, 1.0)
    assert pinned["switchboard.route.states"] == ("closed", "closed")
    assert pinned["switchboard.route.chosen"] in pinned["switchboard.route.candidates"]
    assert whole["switchboard.route.candidates"] == ("upstream/upstream-us", "upstream/upstream-eu",
                                                     "upstream/upstream-eu2")
    assert whole["switchboard.route.weights"] == (4.0, 2.0, 1.0)


def test_a_reload_that_changes_a_weight_shows_in_the_next_route_event(
        upstream: FakeOpenAIUpstream, start_gateway: Start, exporter: WaitingSpanExporter) -> None:
    weighted = ("  chat-model:\n    routing: {strategy: weighted}\n    targets:\n"
                "      - {provider: upstream, model: upstream-chat, weight: 3}\n"
                "      - {provider: upstream, model: upstream-alt, weight: 1}\n")
    text = policy(upstream, weighted)
    gateway = start_gateway(text, span_exporter=exporter)
    client = gateway.client()
    client.chat.completions.create(model="chat-model", messages=ASK)
    applied = threading.Event()
    gateway.store.on_change(lambda _policy: applied.set())
    gateway.policy_path.write_text(text.replace("model: upstream-alt, weight: 1}", "model: upstream-alt, weight: 5}"))
    assert applied.wait(5)
    client.chat.completions.create(model="chat-model", messages=ASK)

    before, after = (named(server, "switchboard.route")[0] for server in servers(exporter, 2))
    assert before["switchboard.route.weights"] == (3.0, 1.0)
    assert after["switchboard.route.weights"] == (3.0, 5.0)
    assert after["switchboard.route.candidates"] == ("upstream/upstream-chat", "upstream/upstream-alt")


def test_retry_then_fallback_records_each_hop_and_its_cause(
        upstream: FakeOpenAIUpstream, start_gateway: Start, exporter: WaitingSpanExporter) -> None:
    chain = (CHAT_BLOCK + "    retries: 1\n    backoff: {initial_s: 0, max_s: 0}\n"
             "    fallbacks: {default: [backup-model]}\n"
             "  backup-model:\n    targets:\n      - provider: upstream\n        model: upstream-backup\n")
    gateway = start_gateway(policy(upstream, chain, alpha_models="    models: [chat-model, backup-model]\n"),
                            span_exporter=exporter)
    upstream.script(Behaviour.error(503), Behaviour.error(503))
    answer = gateway.client().chat.completions.create(model="chat-model", messages=ASK)
    assert answer.model == "upstream-backup"

    (server,) = servers(exporter, 1)
    hops = [(name, a.get("switchboard.route.model") or a.get("switchboard.retry.model")
             or a.get("switchboard.fallback.from")) for name, a in events(server)]
    assert hops == [("switchboard.route", "chat-model"), ("switchboard.retry", "chat-model"),
                    ("switchboard.route", "chat-model"), ("switchboard.fallback", "chat-model"),
                    ("switchboard.route", "backup-model")]
    (retry,) = named(server, "switchboard.retry")
    assert retry["switchboard.retry.failed_target"] == "upstream/upstream-chat"
    assert retry["switchboard.retry.failed_attempt"] == 1
    assert retry["switchboard.retry.status"] == 503
    assert retry["switchboard.retry.cause"] == "overloaded"
    assert retry["switchboard.retry.backoff_s"] == 0
    second = named(server, "switchboard.route")[1]
    assert second["switchboard.route.attempt"] == 2
    assert second["switchboard.route.reason"].startswith("retry")
    (fallback,) = named(server, "switchboard.fallback")
    assert fallback == {"switchboard.fallback.from": "chat-model", "switchboard.fallback.to": "backup-model",
                        "switchboard.fallback.reason": "default", "switchboard.fallback.cause": "upstream_overloaded"}
    attempts = clients_of(exporter, server)
    assert [(a.attributes or {}).get("error.type") for a in attempts] == ["503", "503", None]


@pytest.mark.parametrize(("behaviour", "model_lines", "error_type"), [
    (Behaviour.slow_first_byte(2000), "    ttft_timeout_s: 0.2\n", "timeout"),
    (Behaviour.die_mid_stream(after_chunks=1), "", "connection"),
], ids=["ttft-timeout", "died-before-content"])
def test_an_attempt_that_fails_after_it_began_gets_the_right_error_type(
        upstream: FakeOpenAIUpstream, start_gateway: Start, exporter: WaitingSpanExporter,
        behaviour: Behaviour, model_lines: str, error_type: str) -> None:
    block = CHAT_BLOCK + "    retries: 1\n    backoff: {initial_s: 0, max_s: 0}\n" + model_lines
    gateway = start_gateway(policy(upstream, block), span_exporter=exporter)
    upstream.script(behaviour)
    chunks = list(gateway.client().chat.completions.create(model="chat-model", messages=ASK, stream=True))
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    (server,) = servers(exporter, 1)
    attempts = clients_of(exporter, server)
    assert [(a.attributes or {}).get("error.type") for a in attempts] == [error_type, None]
    (retry,) = named(server, "switchboard.retry")
    assert retry["switchboard.retry.cause"] == error_type
    metrics = metrics_text(gateway)
    assert f'switchboard_upstream_errors_total{{provider="upstream",type="{error_type}"}} 1.0' in metrics


def test_rate_limit_rejection_shows_the_limit_checked_and_what_remained(
        upstream: FakeOpenAIUpstream, start_gateway: Start, exporter: WaitingSpanExporter) -> None:
    gateway = start_gateway(policy(upstream, alpha_lines="    limits: {rpm: 1, tpm: 100000}\n"),
                            span_exporter=exporter)
    client = gateway.client()
    client.chat.completions.create(model="chat-model", messages=ASK, max_tokens=10)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="chat-model", messages=ASK, max_tokens=10)
    admitted, refused = servers(exporter, 2)

    (verdict,) = named(admitted, "switchboard.admission")
    assert verdict["switchboard.admission.verdict"] == "admitted"
    assert verdict["switchboard.admission.checks"] == ("team alpha: requests per minute",
                                                       "team alpha: tokens per minute")
    assert verdict["switchboard.admission.limits"] == (1.0, 100000.0)
    assert verdict["switchboard.admission.used"] == (0.0, 0.0)
    reserved = verdict["switchboard.admission.reserved_tokens"]
    assert reserved > 10  # the prompt plus max_tokens
    assert verdict["switchboard.admission.requested"] == (1.0, float(reserved))
    assert verdict["switchboard.admission.remaining"] == (0.0, 100000.0 - reserved)
    (settled,) = named(admitted, "switchboard.admission.settled")
    actual = (admitted.attributes or {})["switchboard.usage.input_tokens"] + (admitted.attributes or {})[
        "switchboard.usage.output_tokens"]
    assert settled["switchboard.admission.reserved_tokens"] == reserved
    assert settled["switchboard.admission.actual_tokens"] == actual
    assert settled["switchboard.admission.refunded_tokens"] == reserved - actual

    (verdict,) = named(refused, "switchboard.admission")
    assert verdict["switchboard.admission.verdict"] == "refused"
    assert verdict["switchboard.admission.denied"] == "team alpha: requests per minute"
    assert verdict["switchboard.admission.used"][0] == 1.0
    assert verdict["switchboard.admission.remaining"][0] == 0.0
    assert named(refused, "switchboard.route") == []  # never routed
    assert named(refused, "switchboard.admission.settled") == []  # nothing was reserved


@pytest.mark.parametrize("admission_events", ["notable", "all"])
def test_a_routine_admission_makes_an_event_only_when_every_admission_is_asked_for(
        upstream: FakeOpenAIUpstream, start_gateway: Start, exporter: WaitingSpanExporter,
        admission_events: str) -> None:
    # A 1,000-token budget: the first request reserves a few dozen tokens (routine), the second 900 more, which
    # leaves the budget under 10% of its room: news under `notable` too.
    text = policy(upstream, alpha_lines="    budget: {tokens: 1000}\n")
    text += f"telemetry:\n  traces: {{admission_events: {admission_events}}}\n"
    gateway = start_gateway(text, span_exporter=exporter)
    client = gateway.client()
    client.chat.completions.create(model="chat-model", messages=ASK, max_tokens=10)
    client.chat.completions.create(model="chat-model", messages=ASK, max_tokens=900)
    routine, near = servers(exporter, 2)

    if admission_events == "notable":
        assert named(routine, "switchboard.admission") == []
        assert named(routine, "switchboard.admission.settled") == []
    else:
        (verdict,) = named(routine, "switchboard.admission")
        assert verdict["switchboard.admission.remaining"][0] > 900
        (settled,) = named(routine, "switchboard.admission.settled")
        assert settled["switchboard.admission.actual_tokens"] > 0
    # Without its event the request's span still says who, where, what it used and cost.
    attributes = routine.attributes or {}
    assert attributes["switchboard.team"] == "alpha"
    assert attributes["switchboard.usage.input_tokens"] > 0 and attributes["switchboard.cost_usd"] > 0
    assert len(named(routine, "switchboard.route")) == 1

    (verdict,) = named(near, "switchboard.admission")
    assert verdict["switchboard.admission.verdict"] == "admitted"
    assert verdict["switchboard.admission.checks"] == ("team alpha: monthly tokens budget",)
    assert 0 <= verdict["switchboard.admission.remaining"][0] < 100
    (settled,) = named(near, "switchboard.admission.settled")
    assert settled["switchboard.admission.reserved_tokens"] == verdict["switchboard.admission.reserved_tokens"]


def test_budget_downgrade_records_the_refusal_and_the_cheaper_model(
        upstream: FakeOpenAIUpstream, start_gateway: Start, exporter: WaitingSpanExporter) -> None:
    small = CHAT_BLOCK + "  small-model:\n    targets:\n      - provider: upstream\n        model: upstream-small\n"
    gateway = start_gateway(policy(upstream, small, alpha_models="    models: [chat-model, small-model]\n",
                                   alpha_lines="    budget: {tokens: 5, on_exhaust: downgrade, "
                                               "downgrade_to: small-model}\n"), span_exporter=exporter)
    raw = gateway.client().chat.completions.with_raw_response.create(model="chat-model", messages=ASK)
    assert raw.headers["x-switchboard-downgraded-from"] == "chat-model"
    assert raw.parse().model == "upstream-small"

    (server,) = servers(exporter, 1)
    downgraded, admitted = named(server, "switchboard.admission")
    assert downgraded["switchboard.admission.verdict"] == "downgraded"
    assert downgraded["switchboard.admission.model"] == "chat-model"
    assert downgraded["switchboard.admission.downgraded_to"] == "small-model"
    assert downgraded["switchboard.admission.denied"] == "team alpha: monthly tokens budget"
    assert downgraded["switchboard.admission.limits"] == (5.0,)
    assert admitted["switchboard.admission.verdict"] == "admitted"
    assert admitted["switchboard.admission.model"] == "small-model"
    (route,) = named(server, "switchboard.route")
    assert route["switchboard.route.model"] == "small-model"
    assert route["switchboard.route.chosen"] == "upstream/upstream-small"
    assert [name for name, _ in events(server)] == ["switchboard.admission", "switchboard.admission",
                                                    "switchboard.route", "switchboard.admission.settled"]


def test_cache_miss_then_hit_records_the_decision_and_the_saved_cost(
        upstream: FakeOpenAIUpstream, start_gateway: Start, exporter: WaitingSpanExporter) -> None:
    cached = CHAT_BLOCK + "    cache: {mode: exact, scope: team}\n"
    gateway = start_gateway(policy(upstream, cached), span_exporter=exporter)
    client = gateway.client()
    first = client.chat.completions.with_raw_response.create(model="chat-model", messages=ASK)
    second = client.chat.completions.with_raw_response.create(model="chat-model", messages=ASK)
    assert (first.headers["x-switchboard-cache"], second.headers["x-switchboard-cache"]) == ("miss", "hit")
    usage = first.parse().usage
    assert usage is not None
    miss, hit = servers(exporter, 2)

    (decision,) = named(miss, "switchboard.cache")
    assert decision["switchboard.cache.result"] == "miss"
    assert (decision["switchboard.cache.mode"], decision["switchboard.cache.scope"]) == ("exact", "team")
    assert decision["switchboard.cache.backend"] == "memory"
    assert decision["switchboard.cache.coalescing"] is True  # identical requests meanwhile would wait for it
    assert [name for name, _ in events(miss)] == ["switchboard.cache", "switchboard.route"]
    attributes = dict(miss.attributes or {})
    assert attributes["switchboard.cache"] == "miss" and attributes["switchboard.cache.hit"] is False

    (decision,) = named(hit, "switchboard.cache")
    assert decision["switchboard.cache.result"] == "hit"
    assert decision["switchboard.cache.source"] == "exact"
    assert decision["switchboard.cache.age_s"] >= 0
    assert named(hit, "switchboard.route") == [] and clients_of(exporter, hit) == []
    attributes = dict(hit.attributes or {})
    assert attributes["switchboard.cache.hit"] is True
    assert attributes["switchboard.cache.tokens"] == usage.total_tokens
    expected = (usage.prompt_tokens * 2.0 + usage.completion_tokens * 8.0) / 1_000_000
    assert attributes["switchboard.cache.cost_saved_usd"] == pytest.approx(expected)
    assert "switchboard.cost_usd" not in attributes  # a hit bills nothing
    # ...and no tool may count tokens for it: no LLM call happened.
    assert not [name for name in attributes if name.startswith(("gen_ai.usage.", "llm."))]


def test_uncacheable_request_is_a_bypass_with_its_reason(
        upstream: FakeOpenAIUpstream, start_gateway: Start, exporter: WaitingSpanExporter) -> None:
    cached = CHAT_BLOCK + "    cache: {mode: exact}\n"
    gateway = start_gateway(policy(upstream, cached), span_exporter=exporter)
    gateway.client().chat.completions.create(model="chat-model", messages=ASK,
                                             extra_headers={"x-switchboard-cache": "no-store"})
    (server,) = servers(exporter, 1)
    assert named(server, "switchboard.cache") == [{"switchboard.cache.result": "bypass",
                                                   "switchboard.cache.reason": "no-store"}]


def test_route_event_shows_live_scores_and_ejected_targets() -> None:
    from gateway.compiled.policy import parse_policy
    from gateway.policy.model_schema import CircuitBreakerPolicy
    from gateway.routing.strategies import RouteRequest, RouteState
    from gateway.telemetry.decisions import route_event

    parsed = parse_policy("""
providers: {p: {kind: openai_compatible, base_url: "http://127.0.0.1:9/v1"}}
models:
  m:
    routing: {strategy: least-busy}
    targets:
      - {provider: p, model: a}
      - {provider: p, model: b}
      - {provider: p, model: c}
teams: {t: {models: ["*"]}}
""")
    model = parsed.models["m"]
    a, b, c = model.targets
    states = RouteState(clock=lambda: 50.0)
    states.state(a).in_flight = 3
    states.state(b).in_flight = 1
    states.state(c).breaker.on_failure(50.0, CircuitBreakerPolicy(consecutive_failures=1, cooldown_s=30))
    available = [t for t in model.targets if states.available(t, 50.0)]
    ranked = model.plan.strategy.rank(available, states, RouteRequest({}))
    event = route_event(model, ranked, model.targets, states, 50.0, 1, None)
    assert event["switchboard.route.candidates"] == ("p/a", "p/b", "p/c")
    assert event["switchboard.route.scores"] == (3.0, 1.0, 0.0)
    assert event["switchboard.route.states"] == ("closed", "closed", "open")
    assert event["switchboard.route.order"] == ("p/b", "p/a")
    assert event["switchboard.route.chosen"] == "p/b"
    assert event["switchboard.route.reason"] == "fewest requests in flight"


def test_a_route_decided_by_the_policy_alone_is_one_shared_event_per_standing_and_encodes_as_a_fresh_one() -> None:
    """A priority route's event follows from its targets' standing alone: requests that meet the same standing share
    one event (built and encoded once), and a breaker that opens, a retry or a target that comes back each give the
    event their own standing at once."""
    from gateway.compiled.policy import parse_policy
    from gateway.policy.model_schema import CircuitBreakerPolicy
    from gateway.routing.strategies import RouteRequest, RouteState
    from gateway.telemetry.decisions import route_event
    from gateway.telemetry.otlp import SharedAttributes, SpanEncoder

    model = parse_policy("""
providers: {p: {kind: openai_compatible, base_url: "http://127.0.0.1:9/v1"}}
models:
  m:
    targets:
      - {provider: p, model: a}
      - {provider: p, model: b}
teams: {t: {models: ["*"]}}
""").models["m"]
    a = model.targets[0]
    now = [50.0]
    states = RouteState(clock=lambda: now[0])

    def routed(attempt: int = 1, previous: Any = None) -> dict[str, Any]:
        available = [t for t in model.targets if states.available(t, now[0])]
        ranked = model.plan.strategy.rank(available, states, RouteRequest({}))
        return route_event(model, ranked, model.targets, states, now[0], attempt, previous)

    first, second = routed(), routed()
    assert first is second and type(first) is SharedAttributes
    assert first == {"switchboard.route.model": "m", "switchboard.route.strategy": "priority",
                     "switchboard.route.attempt": 1, "switchboard.route.candidates": ("p/a", "p/b"),
                     "switchboard.route.weights": (1.0, 1.0), "switchboard.route.states": ("closed", "closed"),
                     "switchboard.route.chosen": "p/a",
                     "switchboard.route.reason": "first available target in listed order"}
    retry = routed(attempt=2, previous=a)
    assert retry["switchboard.route.attempt"] == 2 and retry["switchboard.route.reason"].startswith("retry")
    states.state(a).breaker.on_failure(now[0], CircuitBreakerPolicy(consecutive_failures=1, cooldown_s=30))
    ejected = routed()
    assert ejected["switchboard.route.states"] == ("open", "closed")
    assert ejected["switchboard.route.chosen"] == "p/b"
    assert ejected["switchboard.route.reason"] == "the only target available"
    now[0] += 31  # the cooldown is over: a trial call may go to `a` again
    assert routed()["switchboard.route.states"][0] == "half_open"

    # The encoder keeps a shared event's bytes: the same as encoding the same attributes afresh, every time.
    encoder = SpanEncoder()
    fresh = SpanEncoder()._attributes(3, dict(first))
    assert encoder._attributes(3, first) == fresh
    assert encoder._attributes(3, first) == fresh
    assert encoder._attributes(3, ejected) == SpanEncoder()._attributes(3, dict(ejected)) != fresh


def test_semantic_hit_records_its_similarity_and_threshold(start_gateway: Start,
                                                           exporter: WaitingSpanExporter) -> None:
    from gateway.cache import ResponseCache
    from tests.fakes.embeddings_upstream import WordEmbeddingsUpstream, similarity
    from tests.test_cache_semantic import ASKED, CLOSE, semantic_policy

    with WordEmbeddingsUpstream() as words:
        gateway = start_gateway(semantic_policy(words.base_url, 0.85), cache=ResponseCache(), span_exporter=exporter)
        client = gateway.client()
        client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": ASKED}])
        raw = client.chat.completions.with_raw_response.create(model="chat-model",
                                                               messages=[{"role": "user", "content": CLOSE}])
        assert raw.headers["x-switchboard-cache"] == "hit"
        spans = exporter.wait_for_servers(2)
    hit = max((s for s in spans if s.kind is SpanKind.SERVER), key=lambda s: s.start_time or 0)
    (decision,) = named(hit, "switchboard.cache")
    assert decision["switchboard.cache.result"] == "hit"
    assert decision["switchboard.cache.source"] == "semantic"
    assert decision["switchboard.cache.similarity"] == pytest.approx(similarity(ASKED, CLOSE), abs=1e-4)
    assert decision["switchboard.cache.threshold"] == 0.85
    # No chat upstream was called; the embedding call that found the neighbour is the hit's one CLIENT span.
    assert named(hit, "switchboard.route") == []
    assert [(c.attributes or {})["gen_ai.request.model"] for c in clients_of(exporter, hit)] == ["upstream-embed"]
