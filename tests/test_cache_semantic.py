"""Semantic mode: near-identical questions answered from the cache, with word-overlap embeddings."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from gateway.cache import ResponseCache
from tests.conftest import RunningGateway, key_hash
from tests.fakes.embeddings_upstream import WordEmbeddingsUpstream, similarity
from tests.fakes.state_stores import GatewayProcess

Start = Callable[..., RunningGateway]
ASKED = "what is the capital city of France"
CLOSE = "what is the capital city of France please"  # same words plus one
FAR = "what is the largest city of Spain"


def semantic_policy(base_url: str, threshold: float, backend: str = "backend: memory") -> str:
    return f"""
version: 1
providers:
  upstream:
    kind: openai_compatible
    base_url: {base_url}
models:
  chat-model:
    targets: [{{provider: upstream, model: upstream-chat}}]
    cache:
      mode: semantic
      {backend}
      semantic: {{embedding_model: embedder, threshold: {threshold}}}
  embedder:
    targets: [{{provider: upstream, model: upstream-embed}}]
teams:
  alpha:
    keys: [{{id: alpha-key, hash: "{key_hash('sk-alpha')}"}}]
    models: [chat-model]
  beta:
    keys: [{{id: beta-key, hash: "{key_hash('sk-beta')}"}}]
    models: [chat-model]
"""


def ask(gateway: RunningGateway, text: str, key: str = "sk-alpha", system: str | None = None) -> tuple[str, dict]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    raw = gateway.client(key).chat.completions.with_raw_response.create(model="chat-model", messages=messages)
    return raw.parse().choices[0].message.content, dict(raw.headers)


def chat_calls(fake: WordEmbeddingsUpstream) -> int:
    return sum(1 for r in fake.requests if r.path.endswith("/chat/completions"))


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_close_question_is_answered_from_the_cache_and_a_far_one_is_not(
        words: WordEmbeddingsUpstream, start_gateway: Start, kind: str) -> None:
    backend = "backend: memory" if kind == "memory" else (
        f'backend: redis\n      url: "redis://127.0.0.1:6379/0"\n      key_prefix: "sbtest:{uuid.uuid4().hex}:"'
        "\n      ttl_s: 5")
    threshold = 0.85
    assert similarity(ASKED, CLOSE) > threshold > similarity(ASKED, FAR)
    gateway = start_gateway(semantic_policy(words.base_url, threshold, backend), cache=ResponseCache())
    first, headers = ask(gateway, ASKED)
    assert headers["x-switchboard-cache"] == "miss"
    close, headers = ask(gateway, CLOSE)
    assert headers["x-switchboard-cache"] == "hit"
    assert float(headers["x-switchboard-cache-similarity"]) == pytest.approx(similarity(ASKED, CLOSE), abs=1e-3)
    assert close == first == f"echo: {ASKED}"
    far, headers = ask(gateway, FAR)
    assert headers["x-switchboard-cache"] == "miss"
    assert far == f"echo: {FAR}"
    assert chat_calls(words) == 2
    # The embeddings were served by the policy's embedding model, through the gateway's provider.
    embeds = [r for r in words.requests if r.path.endswith("/embeddings")]
    assert [r.json["model"] for r in embeds] == ["upstream-embed"] * 3


def test_the_threshold_decides(words: WordEmbeddingsUpstream, start_gateway: Start) -> None:
    gateway = start_gateway(semantic_policy(words.base_url, 0.99), cache=ResponseCache())
    ask(gateway, ASKED)
    _, headers = ask(gateway, CLOSE)
    assert headers["x-switchboard-cache"] == "miss"
    _, headers = ask(gateway, ASKED)  # the exact question still hits
    assert headers["x-switchboard-cache"] == "hit"
    assert chat_calls(words) == 2


def test_semantic_matches_stay_within_the_team_and_the_context(words: WordEmbeddingsUpstream,
                                                               start_gateway: Start) -> None:
    gateway = start_gateway(semantic_policy(words.base_url, 0.85), cache=ResponseCache())
    ask(gateway, ASKED, system="You are terse.")
    _, headers = ask(gateway, CLOSE, key="sk-beta", system="You are terse.")
    assert headers["x-switchboard-cache"] == "miss"
    _, headers = ask(gateway, CLOSE, system="You are verbose.")
    assert headers["x-switchboard-cache"] == "miss"
    _, headers = ask(gateway, CLOSE, system="You are terse.")
    assert headers["x-switchboard-cache"] == "hit"
    assert chat_calls(words) == 3


def test_a_failing_embedding_model_leaves_exact_matching_working(words: WordEmbeddingsUpstream,
                                                                 start_gateway: Start) -> None:
    from tests.fakes import Behaviour

    gateway = start_gateway(semantic_policy(words.base_url, 0.85), cache=ResponseCache())
    words.script(Behaviour.error(500, path="/v1/embeddings"), Behaviour.error(500, path="/v1/embeddings"))
    answer, headers = ask(gateway, ASKED)
    assert answer == f"echo: {ASKED}" and headers["x-switchboard-cache"] == "miss"
    _, headers = ask(gateway, ASKED)
    assert headers["x-switchboard-cache"] == "hit"


def _maps_numpy(pid: int) -> bool:
    """Whether numpy's compiled core is mapped into the process (it is once numpy is imported)."""
    return "_multiarray_umath" in Path(f"/proc/{pid}/maps").read_text()


def test_a_gateway_without_a_semantic_cache_never_loads_numpy(words: WordEmbeddingsUpstream, tmp_path: Path) -> None:
    """numpy (~15 MB of RSS, and OpenBLAS's worker thread) is the semantic index's alone: a served exact-cache
    policy never maps it, and a semantic one does once it stores a question's vector."""
    exact = tmp_path / "exact.yaml"
    exact.write_text("\n".join(line for line in semantic_policy(words.base_url, 0.9).replace(
        "mode: semantic", "mode: exact").splitlines() if not line.strip().startswith("semantic:")))
    semantic = tmp_path / "semantic.yaml"
    semantic.write_text(semantic_policy(words.base_url, 0.9))
    found = {}
    for name, policy in (("exact", exact), ("semantic", semantic)):
        gateway = GatewayProcess(policy, tmp_path / f"{name}.log").start()
        try:
            assert gateway.process is not None
            client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="sk-alpha", max_retries=0)
            for _ in range(2):
                client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": ASKED}])
            found[name] = _maps_numpy(gateway.process.pid)
        finally:
            gateway.terminate()
    assert found == {"exact": False, "semantic": True}
