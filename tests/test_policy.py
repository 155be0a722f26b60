"""Policy files: valid ones load, each invalid one is refused with its precise error, reloads swap atomically."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from gateway.compiled.policy import PolicyError, load_policy, parse_policy
from tests.conftest import RunningGateway, key_hash, standard_policy
from tests.fakes import Behaviour, FakeOpenAIUpstream

ROOT = Path(__file__).resolve().parents[1]
INVALID = sorted((Path(__file__).parent / "policies" / "invalid").glob("*.yaml"))
EXAMPLES = [ROOT / "policies" / "demo.yaml", *sorted((ROOT / "policies" / "examples").glob("*.yaml"))]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_policies_load(path: Path) -> None:
    policy = load_policy(path, environ={})
    assert policy.models and policy.teams


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_policy_is_refused_with_its_precise_error(path: Path) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    with pytest.raises(PolicyError) as caught:
        load_policy(path, environ={})
    assert any(problem.startswith(expected) for problem in caught.value.problems), caught.value.problems


def test_every_problem_is_reported_at_once() -> None:
    text = """
version: 1
providers:
  a: {kind: vllm, base_url: "http://x:1/v1", colour: red}
models:
  m: {targets: [{provider: a, model: x, weigth: 2}]}
teams:
  t: {models: ["*"], keys: [{id: "has space", hash: "sha256:00"}]}
"""
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    paths = sorted(problem.split(":")[0] for problem in caught.value.problems)
    assert paths == ["models.m.targets.0.weigth", "providers.a.colour", "teams.t.keys.0.hash", "teams.t.keys.0.id"]


def test_environment_interpolation_with_defaults() -> None:
    text = """
version: 1
providers:
  oai: {kind: openai, api_key: "${OAI_KEY}", base_url: "${OAI_URL:-https://api.openai.com/v1}"}
models: {m: {targets: [{provider: oai, model: gpt-4o}]}}
teams: {t: {models: ["*"]}}
"""
    policy = parse_policy(text, environ={"OAI_KEY": "sk-from-env"})
    settings = policy.providers["oai"].settings
    assert settings.api_key == "sk-from-env" and settings.base_url == "https://api.openai.com/v1"


def _watch(gateway: RunningGateway) -> tuple[threading.Event, threading.Event]:
    applied, refused = threading.Event(), threading.Event()
    gateway.store.on_change(lambda policy: applied.set())
    gateway.store.on_refusal(lambda error: refused.set())
    return applied, refused


def test_reload_applies_a_valid_edit_without_restart(gateway: RunningGateway, upstream: FakeOpenAIUpstream) -> None:
    applied, _ = _watch(gateway)
    extra = f"""
  gamma:
    keys: [{{id: gamma-key, hash: "{key_hash('sk-gamma')}"}}]
    models: [chat-model]
"""
    gateway.policy_path.write_text(standard_policy(upstream.base_url) + extra)
    assert applied.wait(5), "the edited policy was not applied"
    reply = gateway.client("sk-gamma").chat.completions.create(
        model="chat-model", messages=[{"role": "user", "content": "new team"}])
    assert reply.choices[0].message.content == "echo: new team"


def test_bad_reload_keeps_the_old_policy_serving(gateway: RunningGateway) -> None:
    applied, refused = _watch(gateway)
    before = gateway.store.current
    gateway.policy_path.write_text("version: 1\nproviders: {}\n")
    assert refused.wait(5), "the invalid policy was not noticed"
    assert not applied.is_set() and gateway.store.current is before
    reply = gateway.client().chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "ok"}])
    assert reply.choices[0].message.content == "echo: ok"


def test_in_flight_stream_finishes_on_the_policy_it_started_with(
    gateway: RunningGateway, upstream: FakeOpenAIUpstream
) -> None:
    applied, _ = _watch(gateway)
    upstream.script(Behaviour.slow_stream(chunks=20, chunk_delay_ms=10))
    without_chat = standard_policy(upstream.base_url).replace("models: [chat-model, embed-model]",
                                                              "models: [embed-model]")
    with httpx.stream("POST", gateway.v1 + "/chat/completions", headers={"authorization": "Bearer sk-alpha"},
                      json={"model": "chat-model", "stream": True,
                            "messages": [{"role": "user", "content": "long"}]}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        gateway.policy_path.write_text(without_chat)
        assert applied.wait(5)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    with pytest.raises(openai.NotFoundError):
        gateway.client().chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "x"}])


def test_policy_swap_is_atomic_under_concurrent_requests(
    gateway: RunningGateway, upstream: FakeOpenAIUpstream, start_gateway: Callable[[str], RunningGateway]
) -> None:
    applied, _ = _watch(gateway)
    renamed = standard_policy(upstream.base_url).replace("model: upstream-chat", "model: upstream-chat-v2")
    client = gateway.client()
    gateway.policy_path.write_text(renamed)
    seen = set()
    while not applied.is_set():
        client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "x"}])
        seen.add(upstream.last_request.json["model"])  # type: ignore[union-attr]
    client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "x"}])
    assert upstream.last_request is not None and upstream.last_request.json["model"] == "upstream-chat-v2"
    assert seen <= {"upstream-chat", "upstream-chat-v2"}


def _schema_fields() -> set[str]:
    from gateway.policy.schema import json_schema

    schema = json_schema()
    names: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for name, child in (node.get("properties") or {}).items():
                names.add(name)
                walk(child)
            for key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf"):
                child = node.get(key)
                for item in child if isinstance(child, list) else [child]:
                    walk(item)

    walk(schema)
    for definition in schema.get("$defs", {}).values():
        walk(definition)
    return names


def test_every_policy_field_is_documented_and_shown_in_an_example() -> None:
    readme = (ROOT / "policies" / "README.md").read_text()
    # policies/prices.yaml is the shipped price table, written in the policy's `prices:` format.
    examples = "".join(path.read_text() for path in [*EXAMPLES, ROOT / "policies" / "prices.yaml"])
    fields = _schema_fields()
    assert len(fields) > 100
    assert sorted(f for f in fields if not re.search(rf"\b{re.escape(f)}\b", readme)) == []
    assert sorted(f for f in fields if not re.search(rf"\b{re.escape(f)}\s*:", examples)) == []
