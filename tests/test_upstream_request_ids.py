"""The request id on the way upstream: a header per provider kind, in a form the upstream accepts.

llama-cpp-python's server answers an `x-request-id` that is not a UUID with an empty 400, which had failed
every call through the gateway; tests/test_selfhosted_servers.py shows the real server accepting what is sent
now. Here the fake records what each kind gets.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import RunningGateway, serving
from tests.fakes import Behaviour, FakeOpenAIUpstream


def _policy(base_url: str) -> str:
    return f"""
providers:
  llama:
    kind: llamacpp
    base_url: {base_url}
    headers: {{x-request-id: "from-the-policy"}}
  hosted:
    kind: openai
    base_url: {base_url}
    api_key: sk-upstream
  silent:
    kind: vllm
    base_url: {base_url}
    request_id: {{send: false}}
  custom:
    kind: openai_compatible
    base_url: {base_url}
    request_id: {{header: X-Correlation-Id, format: as_is}}
models:
  llama: {{targets: [{{provider: llama, model: tiny}}]}}
  hosted: {{targets: [{{provider: hosted, model: gpt-4o-mini}}]}}
  silent: {{targets: [{{provider: silent, model: m}}]}}
  custom: {{targets: [{{provider: custom, model: m}}]}}
"""


@pytest.fixture
def gateway(upstream: FakeOpenAIUpstream, tmp_path: Path) -> Iterator[RunningGateway]:
    with serving(tmp_path / "policy.yaml", _policy(upstream.base_url)) as running:
        yield running


def _ask(gateway: RunningGateway, model: str, request_id: str | None = None) -> str:
    headers = {"x-request-id": request_id} if request_id else {}
    raw = gateway.client().chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], extra_headers=headers)
    raw.parse()
    return raw.headers["x-request-id"]


def test_a_self_hosted_server_gets_the_id_as_a_uuid_over_the_policys_own_header(
        gateway: RunningGateway, upstream: FakeOpenAIUpstream) -> None:
    gateways_id = _ask(gateway, "llama")  # no id from the client: the gateway's own, a UUIDv7, goes as it is
    sent = upstream.last_request
    assert sent is not None
    assert sent.header("x-request-id") == gateways_id and uuid.UUID(gateways_id).version == 7

    clients_id = "order-1234"  # not a UUID: the upstream gets one derived from it, which an operator can recompute
    assert _ask(gateway, "llama", clients_id) == clients_id
    assert upstream.last_request is not None
    assert upstream.last_request.header("x-request-id") == str(uuid.uuid5(uuid.NAMESPACE_URL,
                                                                           "switchboard:" + clients_id))

    client_uuid = str(uuid.uuid4())
    assert _ask(gateway, "llama", client_uuid) == client_uuid
    assert upstream.last_request is not None and upstream.last_request.header("x-request-id") == client_uuid


def test_openai_gets_the_id_as_sent_under_its_own_header(gateway: RunningGateway,
                                                        upstream: FakeOpenAIUpstream) -> None:
    assert _ask(gateway, "hosted", "trace-me-42") == "trace-me-42"
    sent = upstream.last_request
    assert sent is not None
    assert sent.header("x-client-request-id") == "trace-me-42"
    assert sent.header("x-request-id") is None


def test_the_header_can_be_renamed_or_not_sent(gateway: RunningGateway, upstream: FakeOpenAIUpstream) -> None:
    _ask(gateway, "silent", "trace-me-43")
    sent = upstream.last_request
    assert sent is not None and sent.header("x-request-id") is None

    _ask(gateway, "custom", "trace-me-44")
    sent = upstream.last_request
    assert sent is not None
    assert sent.header("x-correlation-id") == "trace-me-44"
    assert sent.header("x-request-id") is None


@pytest.mark.parametrize("stream", [False, True])
def test_an_empty_400_says_which_upstream_refused_which_request(gateway: RunningGateway,
                                                                upstream: FakeOpenAIUpstream, stream: bool) -> None:
    upstream.script(Behaviour(status=400, body=b""))
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().chat.completions.create(model="llama", stream=stream,
                                                 messages=[{"role": "user", "content": "hi"}])
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "upstream_refused"
    assert error["message"] == ("upstream `llama` (kind llamacpp) refused the chat request for model `tiny` "
                                "with HTTP 400 and an empty body")
