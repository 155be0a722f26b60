"""No model-existence oracle (issue 14.4): on every endpoint, with any body, with or without a key, a model
the caller may not use and a model that does not exist get the same answer; a bad key always gets 401 first."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RunningGateway, key_hash, run_gateway
from tests.fakes.responses_upstream import FakeResponsesUpstream

UNKNOWN, FORBIDDEN_NATIVE, FORBIDDEN_CHAT = "no-such-model", "theirs", "theirs-chat"
MESSAGES = [{"role": "user", "content": "hi"}]
# Per endpoint: valid bodies, wrongly typed fields, missing fields, stateful and account-resource fields.
BODIES: dict[str, list[dict[str, Any]]] = {
    "/v1/chat/completions": [{"messages": MESSAGES}, {"messages": MESSAGES, "stream": True}, {"messages": 5},
                             {}, {"messages": MESSAGES, "stream": "yes"}],
    "/v1/completions": [{"prompt": "hi"}, {"prompt": 5}, {}],
    "/v1/embeddings": [{"input": "hi"}, {"input": 5}, {"input": "hi", "stream": True}],
    "/v1/responses": [{"input": "hi"}, {"input": 5}, {}, {"input": "hi", "stream": True},
                      {"input": [{"type": "nonsense"}]}, {"input": "hi", "tools": [{"type": "web_search"}]},
                      {"input": "hi", "previous_response_id": "resp_" + "0" * 48},
                      {"input": "hi", "previous_response_id": 5}, {"input": "hi", "store": "yes"},
                      {"input": "hi", "conversation": "conv_1"},
                      {"input": "hi", "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]},
                      {"input": "hi", "prompt": {"id": "pmpt_1"}}],
    "/v1/messages": [{"max_tokens": 5, "messages": MESSAGES}, {"max_tokens": 5, "messages": 5},
                     {"max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}],
}
CASES = [(path, body) for path, bodies in BODIES.items() for body in bodies]
KEYS = {"good": {"authorization": "Bearer sk-alpha"}, "missing": {}, "bad": {"authorization": "Bearer sk-nope"},
        "x-api-key": {"x-api-key": "sk-alpha"}}
_VOLATILE = {"x-request-id", "x-switchboard-overhead-ms", "date", "content-length"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeResponsesUpstream]:
    with FakeResponsesUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def gateway(upstream: FakeResponsesUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    path: Path = tmp_path_factory.mktemp("oracle") / "policy.yaml"
    path.write_text(f"""
version: 1
providers:
  native: {{kind: openai, base_url: {upstream.base_url}, api_key: sk-up}}
  chat: {{kind: openai_compatible, base_url: {upstream.base_url}}}
models:
  mine: {{targets: [{{provider: native, model: m}}]}}
  {FORBIDDEN_NATIVE}: {{targets: [{{provider: native, model: t}}]}}
  {FORBIDDEN_CHAT}: {{targets: [{{provider: chat, model: t}}]}}
teams:
  alpha:
    keys: [{{id: alpha-key, hash: "{key_hash('sk-alpha')}"}}]
    models: [mine]
  beta:
    keys: [{{id: beta-key, hash: "{key_hash('sk-beta')}"}}]
    models: ["*"]
""")
    running = run_gateway(path)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(gateway: RunningGateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
        yield client


def answer(http: httpx.Client, path: str, body: dict[str, Any], model: str, headers: dict[str, str]) -> tuple:
    """Status, body (the model's name masked) and stable headers of one call."""
    if path == "/v1/models":
        reply = http.get(f"/v1/models/{model}", headers=headers)
    else:
        reply = http.post(path, json={"model": model, **body}, headers=headers)
    text = reply.text.replace(model, "<model>")
    return reply.status_code, text, sorted((k, v) for k, v in reply.headers.items() if k not in _VOLATILE)


@pytest.mark.parametrize("key", list(KEYS))
@pytest.mark.parametrize(("path", "body"), [*CASES, ("/v1/models", {})],
                         ids=[f"{p}-{i}" for i, (p, _) in enumerate([*CASES, ("/v1/models", {})])])
def test_an_unknown_and_a_forbidden_model_are_indistinguishable(http: httpx.Client, upstream: FakeResponsesUpstream,
                                                                path: str, body: dict[str, Any], key: str) -> None:
    upstream.reset()
    unknown = answer(http, path, body, UNKNOWN, KEYS[key])
    for forbidden in (FORBIDDEN_NATIVE, FORBIDDEN_CHAT):
        assert answer(http, path, body, forbidden, KEYS[key]) == unknown
    if key in ("missing", "bad"):
        assert unknown[0] == 401
    assert upstream.requests == []  # nothing about either model was asked of an upstream


def test_a_model_the_caller_may_use_is_still_validated(http: httpx.Client) -> None:
    reply = http.post("/v1/responses", json={"model": "mine", "input": "hi", "store": "yes"}, headers=KEYS["good"])
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "store"
    reply = http.post("/v1/responses", json={"model": "mine", "input": "hi", "previous_response_id": "resp_1"},
                      headers=KEYS["good"])
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "previous_response_not_found"
    assert http.post("/v1/responses", json={"model": "mine", "input": "hi"}, headers=KEYS["good"]).status_code == 200
