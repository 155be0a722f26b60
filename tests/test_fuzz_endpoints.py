"""Fuzzing every endpoint and provider kind with hostile request bodies (hypothesis).

One gateway in front of a fake of each wire format (the conformance module's fixtures). Bodies are
well-formed and malformed JSON of every shape, with the fields each endpoint reads set to values of
every type. Whatever arrives, the gateway never fails with a 500 of its own, and every error is in the
endpoint's own shape: OpenAI's `{"error": {message, type, param, code}}`, or Anthropic's
`{"type": "error", "error": {type, message}}` on /v1/messages.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RunningGateway
from tests.test_provider_conformance import fakes, module_gateway  # noqa: F401 - fixtures

MODELS = ["openai-compatible", "vllm", "anthropic", "gemini", "azure_openai", "mock", "embed-mock",
          "embed-vllm", "no-such-model", "", "x" * 300]
ENDPOINTS = {
    "/v1/chat/completions": ["messages", "tools", "tool_choice", "response_format", "n", "stop"],
    "/v1/completions": ["prompt", "suffix", "echo", "logprobs"],
    "/v1/embeddings": ["input", "encoding_format", "dimensions"],
    "/v1/responses": ["input", "instructions", "tools", "text", "reasoning", "tool_choice", "previous_response_id",
                      "store"],
    "/v1/messages": ["messages", "system", "tools", "max_tokens", "tool_choice", "metadata", "stop_sequences"],
}

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=False),
                     st.text(max_size=40))
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                     max_leaves=12)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "bogus", 5]),
                                  "content": st.one_of(st.text(max_size=30), _json)})


def _body(endpoint: str) -> st.SearchStrategy[bytes]:
    fields = ENDPOINTS[endpoint]
    structured = st.fixed_dictionaries(
        {"model": st.one_of(st.sampled_from(MODELS), _scalars)},
        optional={**{name: _json for name in fields}, "messages": st.lists(_message, max_size=3),
                  "stream": st.one_of(st.booleans(), _scalars), "max_tokens": st.one_of(st.integers(-5, 50), _scalars),
                  "stream_options": _json, "temperature": _scalars},
    ).map(orjson.dumps)
    raw = st.one_of(_json.map(orjson.dumps), st.binary(max_size=60), st.just(b""), st.just(b"{"),
                    # what orjson cannot produce: numbers past 64 bits and past float range, deep nesting
                    st.sampled_from([b'{"model": "mock", "messages": [], "max_tokens": 123456789012345678901234567890}',
                                     b'{"model": "mock", "messages": [{"role": "user", "content": "x"}], "n": 1e400}',
                                     b'{"model": "mock", "input": ' + b"[" * 2000 + b"]" * 2000 + b"}"]))
    return st.one_of(structured, structured, structured, raw)


def _check(endpoint: str, response: httpx.Response) -> None:
    assert response.status_code != 500, response.text
    if response.status_code < 400:
        return
    payload = response.json()
    if endpoint == "/v1/messages":
        assert payload["type"] == "error" and set(payload["error"]) == {"type", "message"}, payload
        assert isinstance(payload["error"]["message"], str)
    else:
        assert set(payload) == {"error"} and set(payload["error"]) == {"message", "type", "param", "code"}, payload
        assert isinstance(payload["error"]["message"], str) and isinstance(payload["error"]["type"], str)


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_no_body_makes_the_gateway_fail_or_answer_out_of_shape(module_gateway: RunningGateway,  # noqa: F811
                                                               endpoint: str) -> None:
    headers = {"authorization": "Bearer sk-alpha", "x-api-key": "sk-alpha", "content-type": "application/json"}
    with httpx.Client(base_url=module_gateway.base_url, headers=headers, timeout=30) as client:

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(body=_body(endpoint))
        def attack(body: bytes) -> None:
            with client.stream("POST", endpoint, content=body) as response:
                response.read()
            _check(endpoint, response)

        attack()


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_without_a_key_every_body_gets_401_in_the_endpoints_shape(module_gateway: RunningGateway,  # noqa: F811
                                                                  endpoint: str) -> None:
    with httpx.Client(base_url=module_gateway.base_url, timeout=30) as client:

        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(body=_body(endpoint), key=st.sampled_from([None, "sk-nobody", "sk-alpha-but-longer"]))
        def attack(body: bytes, key: Any) -> None:
            headers = {} if key is None else {"authorization": f"Bearer {key}", "x-api-key": key}
            response = client.post(endpoint, content=body, headers=headers)
            assert response.status_code == 401, response.text
            _check(endpoint, response)

        attack()
