"""Routing strategies: weighted, least-busy, latency, cost, tag pinning - unit and through a gateway."""

from __future__ import annotations

import collections
import concurrent.futures
import random
from collections.abc import Callable, Iterator

import httpx
import pytest

from gateway.compiled.policy import Target, parse_policy
from gateway.routing.plan import build_plan
from gateway.routing.strategies import RouteRequest, RouteState
from tests.conftest import RunningGateway
from tests.fakes import Behaviour, FakeOpenAIUpstream
from tests.fakes.routing_policy import ADMIN_KEY, chat, multi_policy


@pytest.fixture
def fakes() -> Iterator[list[FakeOpenAIUpstream]]:
    with FakeOpenAIUpstream() as a, FakeOpenAIUpstream() as b, FakeOpenAIUpstream() as c:
        yield [a, b, c]


def _targets(fakes: list[FakeOpenAIUpstream], strategy: str, extra: str = "", target_extra: list[str] | None = None
             ) -> str:
    lines = [f"  m:\n    routing: {{strategy: {strategy}}}\n{extra}    targets:"]
    for index, _ in enumerate(fakes):
        more = target_extra[index] if target_extra else ""
        lines.append(f"      - {{provider: p{index}, model: up-{index}{more}}}")
    return "\n".join(lines)


def _start(start_gateway: Callable[[str], RunningGateway], fakes: list[FakeOpenAIUpstream], models: str
           ) -> RunningGateway:
    return start_gateway(multi_policy({f"p{i}": f.base_url for i, f in enumerate(fakes)}, models))


def _served_by(response_model: str) -> int:
    return int(response_model.rsplit("-", 1)[1])


# --- unit: strategies over runtime targets --------------------------------------------------------


def _model(strategy: str, weights: list[float], **routing: object) -> tuple[list[Target], object]:
    targets = "\n".join(f"      - {{provider: p, model: t{i}, weight: {w}}}" for i, w in enumerate(weights))
    extra = "".join(f", {k}: {v}" for k, v in routing.items())
    policy = parse_policy(f"""
providers: {{p: {{kind: openai_compatible, base_url: "http://127.0.0.1:9/v1"}}}}
models:
  m:
    routing: {{strategy: {strategy}{extra}}}
    targets:
{targets}
teams: {{t: {{models: ["*"]}}}}
""")
    model = policy.models["m"]
    return list(model.targets), model.plan


def test_weighted_round_robin_gives_exact_shares_over_a_window() -> None:
    targets, plan = _model("weighted", [5, 1, 1])
    states = RouteState()
    picks = [plan.strategy.rank(targets, states, RouteRequest({}))[0].upstream_model for _ in range(700)]
    assert collections.Counter(picks) == {"t0": 500, "t1": 100, "t2": 100}
    # Smooth: the heavy target never gets more than its share in any window of 7.
    assert all(picks[i:i + 7].count("t0") == 5 for i in range(0, 700, 7))


def test_least_busy_prefers_idle_targets_and_breaks_ties_by_weight() -> None:
    targets, plan = _model("least-busy", [1, 3, 2])
    states = RouteState()
    assert plan.strategy.rank(targets, states, RouteRequest({}))[0].upstream_model == "t1"
    states.state(targets[1]).in_flight = 2
    states.state(targets[2]).in_flight = 1
    assert [t.upstream_model for t in plan.strategy.rank(targets, states, RouteRequest({}))] == ["t0", "t2", "t1"]


def test_latency_shifts_away_from_a_slow_target_and_back_after_it_recovers() -> None:
    targets, plan = _model("latency", [1, 1], exploration=0.1)
    states = RouteState(rng=random.Random(7))
    latency = {"t0": 0.05, "t1": 0.5}

    def run(requests: int) -> collections.Counter[str]:
        served: collections.Counter[str] = collections.Counter()
        for _ in range(requests):
            target = plan.strategy.rank(targets, states, RouteRequest({}))[0]
            served[target.upstream_model] += 1
            states.observe_latency(target, latency[target.upstream_model], 0.3)
        return served

    first = run(200)
    assert first["t0"] > 170
    latency.update(t0=0.8, t1=0.05)  # t0 slows down, t1 recovered
    run(60)
    later = run(200)
    assert later["t1"] > 170


def test_cost_ranks_cheapest_first_and_unpriced_last() -> None:
    policy = parse_policy("""
providers: {p: {kind: openai_compatible, base_url: "http://127.0.0.1:9/v1"}}
models:
  m:
    routing: {strategy: cost}
    targets:
      - {provider: p, model: unpriced}
      - {provider: p, model: dear, cost: 10}
      - {provider: p, model: cheap, cost: 0.5}
teams: {t: {models: ["*"]}}
""")
    model = policy.models["m"]
    ranked = model.plan.strategy.rank(list(model.targets), RouteState(), RouteRequest({}))
    assert [t.upstream_model for t in ranked] == ["cheap", "dear", "unpriced"]


def test_plan_is_built_at_load_and_strategy_state_lives_outside_the_policy() -> None:
    _, plan = _model("weighted", [1])
    assert plan is not build_plan("m", plan.config)  # a reload builds a new plan; RouteState is kept by the app


# --- through a gateway ----------------------------------------------------------------------------


def test_weighted_distribution_through_the_gateway(fakes, start_gateway) -> None:
    gateway = _start(start_gateway, fakes, _targets(fakes, "weighted",
                                                    target_extra=[", weight: 2", ", weight: 1", ", weight: 1"]))
    client = gateway.client()
    served = collections.Counter(
        _served_by(client.chat.completions.create(model="m", messages=chat()).model) for _ in range(40)
    )
    assert served == {0: 20, 1: 10, 2: 10}


def test_least_busy_avoids_the_replica_that_is_stuck(fakes, start_gateway) -> None:
    fakes = fakes[:2]
    gateway = _start(start_gateway, fakes, _targets(fakes, "least-busy"))
    fakes[0].script(Behaviour.hanging())
    client = gateway.client()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(client.chat.completions.create, model="m", messages=chat("slow"))
        assert fakes[0].wait_for_requests(1)
        served = [_served_by(client.chat.completions.create(model="m", messages=chat()).model) for _ in range(10)]
        fakes[0].release()
        assert stuck.result(timeout=5).model == "up-0"
    assert served == [1] * 10


def test_tag_pinning_selects_the_tagged_targets_only_when_allowed(fakes, start_gateway) -> None:
    fakes = fakes[:2]
    tags = [", tags: {region: us}", ", tags: {region: eu}"]
    models = (_targets(fakes, "weighted", target_extra=tags).replace("  m:", "  pinned:", 1).replace(
        "strategy: weighted}", "strategy: weighted, allow_tag_pinning: true}") + "\n"
        + _targets(fakes, "weighted", target_extra=tags).replace("  m:", "  unpinned:", 1))
    gateway = _start(start_gateway, fakes, models)
    client = gateway.client()
    eu = {"x-switchboard-tags": "region=eu"}
    pinned = {client.chat.completions.create(model="pinned", messages=chat(), extra_headers=eu).model
              for _ in range(6)}
    assert pinned == {"up-1"}
    unpinned = {client.chat.completions.create(model="unpinned", messages=chat(), extra_headers=eu).model
                for _ in range(6)}
    assert unpinned == {"up-0", "up-1"}
    response = httpx.post(gateway.v1 + "/chat/completions", headers={"authorization": "Bearer sk-alpha",
                          "x-switchboard-tags": "region=mars"}, json={"model": "pinned", "messages": chat()})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "no_matching_target"


def test_admin_targets_lists_state_for_admin_keys_only(fakes, start_gateway) -> None:
    fakes = fakes[:2]
    gateway = _start(start_gateway, fakes, _targets(fakes, "weighted"))
    gateway.client().chat.completions.create(model="m", messages=chat())
    assert httpx.get(gateway.base_url + "/admin/targets",
                     headers={"authorization": "Bearer sk-alpha"}).status_code == 401
    rows = httpx.get(gateway.base_url + "/admin/targets",
                     headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
    by_model = {row["model"]: row for row in rows}
    assert set(by_model) == {"up-0", "up-1"}
    assert by_model["up-0"]["state"] == "closed"
    assert by_model["up-0"]["models"] == ["m"]
    assert sum(row["requests"] for row in rows) == 1
    assert all(row["in_flight"] == 0 for row in rows)


def test_latency_routing_measures_real_upstream_time(start_gateway) -> None:
    with FakeOpenAIUpstream(latency_ms=150) as slow, FakeOpenAIUpstream() as fast:
        models = """
  m:
    routing: {strategy: latency, exploration: 0}
    targets: [{provider: p0, model: up-0}, {provider: p1, model: up-1}]
"""
        gateway = _start(start_gateway, [slow, fast], models)
        client = gateway.client()
        warmup = {client.chat.completions.create(model="m", messages=chat()).model for _ in range(2)}
        assert warmup == {"up-0", "up-1"}  # each untried target is measured once
        served = {client.chat.completions.create(model="m", messages=chat()).model for _ in range(4)}
        served |= {chunk.model for _ in range(4)
                   for chunk in client.chat.completions.create(model="m", messages=chat(), stream=True)}
        assert served == {"up-1"}
        rows = httpx.get(gateway.base_url + "/admin/targets", headers={"authorization": f"Bearer {ADMIN_KEY}"})
        ewma = {row["model"]: row["latency_ewma_ms"] for row in rows.json()["data"]}
        assert ewma["up-0"] >= 150 > ewma["up-1"]
