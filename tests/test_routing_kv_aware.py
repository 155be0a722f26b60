"""KV-cache-aware routing through running gateways: agreement across gateway replicas, load-aware scoring,
the precise index fed by vLLM-format KV-cache events, and what explain / the route event show."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis
from opentelemetry.trace import SpanKind

from gateway.cli.main import main
from tests.conftest import RunningGateway
from tests.fakes.otlp_receiver import WaitingSpanExporter
from tests.fakes.routing_policy import ADMIN_KEY, multi_policy
from tests.fakes.vllm_replica import FakeVLLMReplica

Start = Callable[..., RunningGateway]
STALE_S = 30.0  # kv_events.stale_after_s: events never go stale by accident on a loaded CI machine
# Scrapes are trusted for three intervals: 1 s leaves a loaded machine room, and a test waits ~1 s per change.
SCRAPE = "    metrics: {interval_s: 1}\n"
SYSTEM = {"role": "system", "content": "You answer questions about the quarterly report in detail. " * 8}


@pytest.fixture
def replicas() -> Iterator[list[FakeVLLMReplica]]:
    with FakeVLLMReplica("r0", miss_ms=0, hit_ms=0) as a, FakeVLLMReplica("r1", miss_ms=0, hit_ms=0) as b, \
            FakeVLLMReplica("r2", miss_ms=0, hit_ms=0) as c:
        yield [a, b, c]


@pytest.fixture
def publishing() -> Iterator[list[FakeVLLMReplica]]:
    """Three replicas publishing KV-cache events (vLLM's ZMQ wire format)."""
    with FakeVLLMReplica("r0", miss_ms=0, hit_ms=0, kv_events=True) as a, \
            FakeVLLMReplica("r1", miss_ms=0, hit_ms=0, kv_events=True) as b, \
            FakeVLLMReplica("r2", miss_ms=0, hit_ms=0, kv_events=True) as c:
        yield [a, b, c]


def _policy(replicas: list[FakeVLLMReplica], strategy: str, provider_extra: str = "", stale_s: float = STALE_S) -> str:
    targets = "\n".join(f"      - {{provider: r{i}, model: up-{i}}}" for i in range(len(replicas)))
    models = f"  m:\n    routing: {strategy}\n    targets:\n{targets}"
    policy = multi_policy({f"r{i}": r.base_url for i, r in enumerate(replicas)}, models, kind="vllm",
                          provider_extra=provider_extra)
    for index, replica in enumerate(replicas):
        if replica.events is not None:  # each provider its own publisher
            policy = policy.replace(
                f"  r{index}:\n    kind: vllm\n",
                f"  r{index}:\n    kind: vllm\n    kv_events: {{endpoint: '{replica.events.endpoint}', "
                f"replay_endpoint: '{replica.events.replay_endpoint}', stale_after_s: {stale_s}}}\n", 1)
    return policy


def _index(model: str) -> int:
    return int(model.rsplit("-", 1)[1])


def _ask(gateway: RunningGateway, messages: list[dict[str, Any]]) -> str:
    return gateway.client().chat.completions.create(model="m", messages=messages).model


def _next_turn(messages: list[dict[str, Any]], served: str, question: str) -> list[dict[str, Any]]:
    return [*messages, {"role": "assistant", "content": f"reply {sum(m['role'] == 'user' for m in messages)} "
                        f"from r{_index(served)}"}, {"role": "user", "content": question}]


def _alternating(gateways: list[RunningGateway], conversations: int, turns: int) -> list[list[str]]:
    """Each conversation's turns sent to the gateways in turn, as a client behind a load balancer would."""
    served_all = []
    for number in range(conversations):
        messages = [SYSTEM, {"role": "user", "content": f"conversation {number}: what changed in revenue?"}]
        served = []
        for turn in range(turns):
            model = _ask(gateways[(number + turn) % len(gateways)], messages)
            served.append(model)
            messages = _next_turn(messages, model, f"conversation {number}, follow-up {turn}")
        served_all.append(served)
    return served_all


def _hit_rate(replicas: list[FakeVLLMReplica]) -> float:
    return sum(r.hits for r in replicas) / sum(r.queries for r in replicas)


def test_gateway_replicas_agree_on_each_conversations_replica(replicas, start_gateway: Start) -> None:
    policy = _policy(replicas, "{strategy: kv-aware, kv_aware: {home_blocks: 2}}")
    gateways = [start_gateway(policy), start_gateway(policy), start_gateway(policy)]
    served = _alternating(gateways, conversations=24, turns=4)
    # Every turn reached a different gateway than the last, none of which had seen the conversation before.
    assert all(len(set(s)) == 1 for s in served)
    assert _hit_rate(replicas) == 1.0
    # Homes spread the conversations instead of piling them onto one replica (each gets ~8 of 24 by
    # rendezvous hashing; none getting any would happen by chance once in ~5,000 runs).
    assert min(r.requests for r in replicas) >= 4


def test_prefix_affinity_tie_break_agrees_across_gateway_replicas(replicas, start_gateway: Start) -> None:
    # The tie-break used to hash the prompt's last block, which changes every turn: a conversation's next
    # turn at another gateway then landed on a replica chosen afresh. It now hashes the leading blocks.
    policy = _policy(replicas, "{strategy: prefix-affinity}")
    gateways = [start_gateway(policy), start_gateway(policy)]
    served = _alternating(gateways, conversations=18, turns=3)
    assert all(len(set(s)) == 1 for s in served)
    assert len({s[0] for s in served}) == 3


def test_a_long_queue_or_full_kv_cache_outweighs_a_cache_hit(replicas, start_gateway: Start) -> None:
    policy = _policy(replicas, "{strategy: kv-aware, kv_aware: {max_waiting: 8, max_kv_usage: 0.9}}",
                     provider_extra=SCRAPE)
    gateway = start_gateway(policy)
    messages = [SYSTEM, {"role": "user", "content": "where is the conversation's cache?"}]
    owner = _ask(gateway, messages)
    home = replicas[_index(owner)]
    messages = _next_turn(messages, owner, "and the next turn?")

    home.reported_waiting = 4  # a short queue: the hit is still worth it
    _wait_for_target(gateway, owner, lambda row: row["scraped_waiting"] == 4)
    assert _ask(gateway, messages) == owner
    messages = _next_turn(messages, owner, "and now?")

    home.reported_waiting = 20  # past max_waiting: a miss elsewhere starts sooner
    _wait_for_target(gateway, owner, lambda row: row["scraped_waiting"] == 20)
    elsewhere = _ask(gateway, messages)
    assert elsewhere != owner

    home.reported_waiting = 0  # the queue is gone, but the conversation's longer prefix now lives elsewhere
    _wait_for_target(gateway, owner, lambda row: row["scraped_waiting"] == 0)
    assert _ask(gateway, _next_turn(messages, elsewhere, "do you remember?")) == elsewhere

    home.reported_kv_usage = 0.97  # nearly full: the request would wait for KV memory
    _wait_for_target(gateway, owner, lambda row: row["scraped_waiting"] == 0 and row["kv_cache_usage"] == 0.97)
    fresh = [SYSTEM, {"role": "user", "content": "a new conversation, whose home may be the full replica"}]
    chosen = {_ask(gateway, [*fresh, {"role": "user", "content": f"variant {n}"}]) for n in range(6)}
    assert owner not in chosen


def test_the_route_event_lists_every_candidates_scores(replicas, start_gateway: Start) -> None:
    exporter = WaitingSpanExporter()
    gateway = start_gateway(_policy(replicas, "{strategy: kv-aware}"), span_exporter=exporter)
    messages = [SYSTEM, {"role": "user", "content": "score me"}]
    owner = _ask(gateway, messages)
    chosen = _ask(gateway, _next_turn(messages, owner, "again"))
    assert chosen == owner
    servers = sorted((s for s in exporter.wait_for_servers(2) if s.kind is SpanKind.SERVER),
                     key=lambda s: s.start_time or 0)
    event = next(dict(e.attributes or {}) for e in servers[-1].events if e.name == "switchboard.route")
    candidates = event["switchboard.route.candidates"]
    assert event["switchboard.route.strategy"] == "kv-aware"
    assert event["switchboard.route.chosen"] == f"r{_index(owner)}/{owner}"
    for scorer in ("prefix", "queue", "kv_usage", "in_flight"):
        assert len(event[f"switchboard.route.score.{scorer}"]) == len(candidates)
    prefix = event["switchboard.route.score.prefix"]
    best = candidates.index(event["switchboard.route.chosen"])
    # The second turn's replica holds everything but the new question; the others nothing.
    assert prefix[best] > 0.8 and all(p == 0 for i, p in enumerate(prefix) if i != best)
    totals = event["switchboard.route.scores"]
    assert totals[best] == max(totals)
    assert event["switchboard.route.filtered"] == (False, False, False)


def test_explain_shows_the_scorers_and_their_weights(replicas, tmp_path, capsys) -> None:
    path = tmp_path / "kv.yaml"
    path.write_text(_policy(replicas, "{strategy: kv-aware, kv_aware: {weights: {prefix: 5, queue: 1.5}}}"))
    assert main(["policy", "explain", str(path), "--model", "m"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "  scorers (0-1 each, higher is better) and weights: prefix x5, queue x1.5, kv_usage x1, in_flight x1" \
        in lines
    assert "  prefix index: approximate; home: rendezvous on the first 1 prompt block(s)" in lines
    assert sum("score 3.5" in line for line in lines) == 3  # cold: no prefix, no load, equal scores


# --- the precise index: vLLM KV-cache events ---------------------------------------------------


def _rows(gateway: RunningGateway) -> list[dict[str, Any]]:
    response = httpx.get(gateway.base_url + "/admin/targets", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    return response.json()["data"]


def _wait_for_target(gateway: RunningGateway, model: str, condition: Callable[[dict[str, Any]], bool],
                     timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while time.monotonic() < deadline:
        row = next(r for r in _rows(gateway) if r["model"] == model)
        if condition(row):
            return row
        pause.wait(0.02)
    raise AssertionError(f"{model}: condition never met; last row {row}")


def _subscribed(gateway: RunningGateway, replicas: list[FakeVLLMReplica]) -> None:
    """Publish empty batches until every subscription has taken (ZMQ drops what is sent before)."""
    for index, replica in enumerate(replicas):
        assert replica.events is not None
        deadline = time.monotonic() + 5
        while True:
            replica.events.publish([])
            row = next(r for r in _rows(gateway) if r["model"] == f"up-{index}")
            if row.get("kv_events_age_s") is not None:
                break
            assert time.monotonic() < deadline, "the gateway never received the replica's events"
            threading.Event().wait(0.02)


def _blocks(gateway: RunningGateway, index: int) -> int:
    return next(r for r in _rows(gateway) if r["model"] == f"up-{index}")["kv_blocks"]


def test_precise_index_follows_the_engines_events_not_the_gateways_guess(publishing, start_gateway: Start) -> None:
    gateway = start_gateway(_policy(publishing, "{strategy: kv-aware, kv_aware: {index: precise}}"))
    _subscribed(gateway, publishing)
    messages = [SYSTEM, {"role": "user", "content": "which replica holds this conversation?"}]
    first = _ask(gateway, messages)
    owner = _index(first)
    _wait_for_target(gateway, first, lambda row: row["kv_blocks"] > 0)
    messages = _next_turn(messages, first, "a second question")

    # The owner's cache is reset and another replica computed this prompt (for another gateway, say):
    # the events say so, while the gateway's own routing history still points at the owner.
    other = (owner + 1) % 3
    publishing[owner].clear_kv()
    publishing[other].preload(messages)
    _wait_for_target(gateway, first, lambda row: row["kv_blocks"] == 0)
    _wait_for_target(gateway, f"up-{other}", lambda row: row["kv_blocks"] > 0)
    assert _ask(gateway, messages) == f"up-{other}"


def test_stale_events_fall_back_to_the_approximate_index(publishing, start_gateway: Start) -> None:
    gateway = start_gateway(_policy(publishing, "{strategy: kv-aware, kv_aware: {index: precise}}", stale_s=1.0))
    _subscribed(gateway, publishing)
    messages = [SYSTEM, {"role": "user", "content": "where did my first turn go?"}]
    first = _ask(gateway, messages)
    owner = _index(first)
    messages = _next_turn(messages, first, "and the second?")
    other = (owner + 1) % 3
    publishing[other].preload(messages)  # the events would send the next turn there...
    _wait_for_target(gateway, f"up-{other}", lambda row: row["kv_blocks"] > 0)
    for replica in publishing:
        assert replica.events is not None
        replica.events.paused = True  # ...but every publisher goes silent
    for index in range(3):
        _wait_for_target(gateway, f"up-{index}", lambda row: row["kv_events_age_s"] > 1.0)
    # Past stale_after_s the events are not trusted: the gateway's own history (the owner) decides.
    assert _ask(gateway, messages) == first


def test_missed_batches_are_replayed(publishing, start_gateway: Start) -> None:
    gateway = start_gateway(_policy(publishing, "{strategy: kv-aware, kv_aware: {index: precise}}"))
    _subscribed(gateway, publishing)
    replica = publishing[1]
    assert replica.events is not None
    replica.events.dropping = 1  # the next batch never reaches the subscriber's socket
    replica.preload([SYSTEM, {"role": "user", "content": "a prompt whose announcement is lost"}])
    assert _blocks(gateway, 1) == 0
    replica.events.publish([])  # the next batch reveals the gap; the subscriber asks for a replay
    row = _wait_for_target(gateway, "up-1", lambda row: row["kv_blocks"] > 0)
    assert row["kv_events_gaps"] == 1
    assert row["kv_blocks"] == replica.events.held  # every block the engine announced, none twice


def test_a_cleared_engine_and_evictions_leave_the_index(publishing, start_gateway: Start) -> None:
    with FakeVLLMReplica("small", miss_ms=0, hit_ms=0, kv_events=True, kv_blocks=8) as small:
        gateway = start_gateway(_policy([small], "{strategy: kv-aware, kv_aware: {index: precise}}"))
        _subscribed(gateway, [small])
        for number in range(4):
            small.preload([SYSTEM, {"role": "user", "content": f"prompt {number} " * 20}])
        # Blocks evicted past the engine's 8 are removed from the index too.
        _wait_for_target(gateway, "up-0", lambda row: row["kv_blocks"] == 8)
        small.clear_kv()
        _wait_for_target(gateway, "up-0", lambda row: row["kv_blocks"] == 0)


# --- learned ownership shared through Redis ----------------------------------------------------


@pytest.mark.parametrize("shared", [True, False])
def test_a_conversation_moved_by_load_is_followed_by_the_other_gateway_through_redis(
        replicas, start_gateway: Start, shared: bool) -> None:
    prefix = f"sb-test-kv-{uuid.uuid4().hex}:"
    routing = f"{{strategy: kv-aware, kv_aware: {{max_waiting: 8, shared_table: {str(shared).lower()}}}}}"
    policy = _policy(replicas, routing, provider_extra=SCRAPE)
    state = f"state: {{url: 'redis://127.0.0.1:6379/0', key_prefix: '{prefix}'}}\n"
    policy = policy.replace("teams:\n", state + "teams:\n", 1)
    first_gateway, second_gateway = start_gateway(policy), start_gateway(policy)
    try:
        messages = [SYSTEM, {"role": "user", "content": "a conversation that will have to move"}]
        home = _ask(first_gateway, messages)
        replicas[_index(home)].reported_waiting = 20  # its home gets busy: the first gateway moves it
        _wait_for_target(first_gateway, home, lambda row: row["scraped_waiting"] == 20)
        messages = _next_turn(messages, home, "second question")
        moved = _ask(first_gateway, messages)
        assert moved != home
        replicas[_index(home)].reported_waiting = 0
        _wait_for_target(second_gateway, home, lambda row: row["scraped_waiting"] == 0)
        if shared:
            deadline = time.monotonic() + 5
            while _shared_received(second_gateway) < 2:
                assert time.monotonic() < deadline, "the second gateway never read the first one's records"
                threading.Event().wait(0.02)
        # The third turn reaches the other gateway, which never routed this conversation.
        third = _ask(second_gateway, _next_turn(messages, moved, "third question"))
        assert third == (moved if shared else home)
    finally:
        with contextlib.suppress(redis.RedisError):
            redis.Redis().delete(prefix + "kv-owners")


def _shared_received(gateway: RunningGateway) -> int:
    response = httpx.get(gateway.base_url + "/admin/targets", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    return response.json()["shared_ownership"]["received"]


def test_shared_table_needs_a_redis(replicas, tmp_path) -> None:
    from gateway.compiled.policy import PolicyError, parse_policy

    with pytest.raises(PolicyError) as raised:
        parse_policy(_policy(replicas, "{strategy: kv-aware, kv_aware: {shared_table: true}}"))
    assert "models.m.routing.kv_aware.shared_table: needs a Redis to share through: set state.url" in str(raised.value)
