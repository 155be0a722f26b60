"""Behaviours of real servers that fakes written from OpenAI's documentation never show.

FastAPI-shaped 422s (llama-cpp-python, TGI), integers beyond 64 bits, `prompt: null`. The real servers
themselves are exercised in tests/test_selfhosted_servers.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import RunningGateway, serving
from tests.fakes import Behaviour, FakeOpenAIUpstream


@pytest.fixture
def gateway(upstream: FakeOpenAIUpstream, tmp_path: Path) -> Iterator[RunningGateway]:
    policy = f"""
providers:
  llama: {{kind: llamacpp, base_url: {upstream.base_url}}}
models:
  llama: {{targets: [{{provider: llama, model: tiny}}]}}
"""
    with serving(tmp_path / "policy.yaml", policy) as running:
        yield running


def test_a_fastapi_422_becomes_an_openai_400_naming_the_parameter(gateway: RunningGateway,
                                                                  upstream: FakeOpenAIUpstream) -> None:
    detail = {"detail": [{"type": "literal_error", "loc": ["body", "messages", 0, "role"],
                          "msg": "Input should be 'system', 'user' or 'assistant'", "input": "robot"},
                         {"type": "missing", "loc": ["body", "messages", 0, "content"], "msg": "Field required"}]}
    upstream.script(Behaviour(status=422, body=detail))
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 400
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == "messages.[0].role"
    assert error["type"] == "invalid_request_error"
    assert error["message"] == ("messages.[0].role: Input should be 'system', 'user' or 'assistant' "
                                "(and 1 more problem)")


def test_integers_beyond_64_bits_reach_the_upstream_exactly(gateway: RunningGateway,
                                                            upstream: FakeOpenAIUpstream) -> None:
    raw = (b'{"model": "llama", "messages": [{"role": "user", "content": "hi"}], "seed": -29893437512638976000,'
           b' "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object",'
           b' "properties": {"n": {"type": "integer", "maximum": 340282366920938463463374607431768211455}}}}}}')
    response = httpx.post(gateway.v1 + "/chat/completions", content=raw,
                          headers={"authorization": "Bearer sk-alpha", "content-type": "application/json"})
    assert response.status_code == 200, response.text
    sent = upstream.last_request
    assert sent is not None
    assert b'"seed":-29893437512638976000' in sent.body
    assert b'"maximum":340282366920938463463374607431768211455' in sent.body


def test_completions_take_a_null_prompt_as_the_empty_prompt(gateway: RunningGateway,
                                                            upstream: FakeOpenAIUpstream) -> None:
    response = httpx.post(gateway.v1 + "/completions", json={"model": "llama", "prompt": None, "max_tokens": 3},
                          headers={"authorization": "Bearer sk-alpha"})
    assert response.status_code == 200, response.text
    assert upstream.last_request is not None and upstream.last_request.json["prompt"] == ""
    missing = httpx.post(gateway.v1 + "/completions", json={"model": "llama"},
                         headers={"authorization": "Bearer sk-alpha"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"


def test_a_llamacpp_stream_ending_empty_is_a_context_error_that_falls_back(upstream: FakeOpenAIUpstream,
                                                                          tmp_path: Path) -> None:
    """llama-cpp-python ends a started stream with nothing when the prompt overflows its context window."""
    policy = f"""
providers:
  llama: {{kind: llamacpp, base_url: {upstream.base_url}}}
  other: {{kind: vllm, base_url: {upstream.base_url}}}
models:
  llama:
    targets: [{{provider: llama, model: tiny}}]
    fallbacks: {{context_window: [long]}}
  long: {{targets: [{{provider: other, model: long-context}}]}}
  only: {{targets: [{{provider: llama, model: tiny}}]}}
"""
    with serving(tmp_path / "policy.yaml", policy) as gateway:
        upstream.script(Behaviour.die_mid_stream(after_chunks=1))
        raw = gateway.client().chat.completions.with_raw_response.create(
            model="llama", stream=True, messages=[{"role": "user", "content": "a long prompt"}])
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        assert text == "echo: a long prompt"
        assert raw.headers["x-switchboard-route"] == "llama@llama:400,long@other:ok"

        upstream.script(Behaviour.die_mid_stream(after_chunks=1))
        with pytest.raises(openai.BadRequestError) as caught:
            list(gateway.client().chat.completions.create(model="only", stream=True,
                                                          messages=[{"role": "user", "content": "x"}]))
        assert caught.value.code == "context_length_exceeded"
        # A stream cut after content is no context error: the client sees the in-band error.
        upstream.script(Behaviour.die_mid_stream(after_chunks=3))
        with pytest.raises(openai.APIError) as cut:
            list(gateway.client().chat.completions.create(model="only", stream=True,
                                                          messages=[{"role": "user", "content": "x y z"}]))
        assert not isinstance(cut.value, openai.BadRequestError)
