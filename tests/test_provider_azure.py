"""`kind: azure_openai` through a running gateway: deployment URLs, api-version, api-key, Azure error shapes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest
from pydantic import BaseModel

from tests.chat_accumulator import accumulate, from_completion, same_message
from tests.conftest import RunningGateway, key_hash, run_gateway
from tests.fakes.azure_upstream import FakeAzureUpstream, azure_error
from tests.fakes.openai_upstream import Behaviour

UPSTREAM_KEY = "azure-upstream-secret"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}


def _policy(resource_url: str) -> str:
    return f"""
version: 1
providers:
  azure:
    kind: azure_openai
    base_url: {resource_url}
    api_key: {UPSTREAM_KEY}
    options: {{api_version: "2024-10-21"}}
  azure-entra:
    kind: azure_openai
    base_url: {resource_url}/openai
    headers: {{Authorization: "Bearer entra-token"}}
models:
  gpt-4o: {{targets: [{{provider: azure, model: my-gpt4o-deployment}}]}}
  embed: {{targets: [{{provider: azure, model: my-embedding}}]}}
  gpt-4o-entra: {{targets: [{{provider: azure-entra, model: my-gpt4o-deployment}}]}}
teams:
  alpha:
    keys: [{{id: alpha-key, hash: "{key_hash('sk-alpha')}"}}]
    models: ["*"]
"""


@pytest.fixture(scope="module")
def module_fake() -> Iterator[FakeAzureUpstream]:
    with FakeAzureUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def module_gateway(module_fake: FakeAzureUpstream, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[RunningGateway]:
    path = tmp_path_factory.mktemp("azure") / "policy.yaml"
    path.write_text(_policy(module_fake.url))
    gateway = run_gateway(path)
    yield gateway
    gateway.stop()


@pytest.fixture
def fake(module_fake: FakeAzureUpstream) -> FakeAzureUpstream:
    module_fake.reset()
    module_fake.api_key = UPSTREAM_KEY
    return module_fake


@pytest.fixture
def client(module_gateway: RunningGateway, fake: FakeAzureUpstream) -> openai.OpenAI:
    return module_gateway.client()


@pytest.mark.conformance(provider="azure_openai", endpoint="chat", feature="text", stream=False)
def test_chat_goes_to_the_deployment_url_with_api_key(client: openai.OpenAI, fake: FakeAzureUpstream) -> None:
    reply = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content == "echo: hello"
    request = fake.last_request
    assert request is not None
    assert request.path == "/openai/deployments/my-gpt4o-deployment/chat/completions"
    assert request.query_string == "api-version=2024-10-21"
    assert request.header("api-key") == UPSTREAM_KEY
    assert request.header("authorization") is None


def test_entra_token_from_provider_headers(client: openai.OpenAI, fake: FakeAzureUpstream) -> None:
    fake.api_key = None
    client.chat.completions.create(model="gpt-4o-entra", messages=[{"role": "user", "content": "hi"}])
    request = fake.last_request
    assert request is not None and request.path.startswith("/openai/deployments/my-gpt4o-deployment/")
    assert request.header("authorization") == "Bearer entra-token" and request.header("api-key") is None


@pytest.mark.conformance(provider="azure_openai", endpoint="chat", feature="tools", stream=True)
def test_streaming_tools_and_usage(client: openai.OpenAI, fake: FakeAzureUpstream) -> None:
    messages = [{"role": "user", "content": "weather?"}]
    whole = client.chat.completions.create(model="gpt-4o", messages=messages, tools=[WEATHER_TOOL])
    chunks = [c.model_dump() for c in client.chat.completions.create(
        model="gpt-4o", messages=messages, tools=[WEATHER_TOOL], stream=True, stream_options={"include_usage": True})]
    streamed = accumulate(chunks)
    assert streamed["finish_reason"] == "tool_calls"
    assert orjson.loads(streamed["tool_calls"][0]["arguments"]) == {"city": "x"}
    assert same_message(streamed, from_completion(whole.model_dump()))


@pytest.mark.conformance(provider="azure_openai", endpoint="chat", feature="json_schema", stream=False)
@pytest.mark.conformance(provider="azure_openai", endpoint="embeddings", feature="text", stream=False)
def test_parse_and_embeddings(client: openai.OpenAI, fake: FakeAzureUpstream) -> None:
    class City(BaseModel):
        name: str

    parsed = client.chat.completions.parse(model="gpt-4o", response_format=City,
                                           messages=[{"role": "user", "content": "a city"}])
    assert parsed.choices[0].message.parsed == City(name="x")
    vectors = client.embeddings.create(model="embed", input=["a", "b"])
    assert len(vectors.data) == 2
    assert fake.last_request is not None and fake.last_request.path == "/openai/deployments/my-embedding/embeddings"


@pytest.mark.parametrize(("behaviour", "status", "code"), [
    (azure_error(404, "DeploymentNotFound", "The API deployment for this resource does not exist."), 404,
     "DeploymentNotFound"),
    (azure_error(400, "content_filter", "The response was filtered", inner_code="ResponsibleAIPolicyViolation"),
     400, "content_filter"),
    (azure_error(429, "429", "Requests have exceeded the call rate limit. Please retry after 3 seconds.",
                 headers={"retry-after": "3"}), 429, None),
    (azure_error(401, "401", "Access denied due to invalid subscription key."), 502, "upstream_auth_failed"),
    (azure_error(503, "ServiceUnavailable", "The service is temporarily unable to process your request."), 503,
     "upstream_overloaded"),
    (azure_error(500, "InternalServerError", "The server had an error."), 502, "upstream_error"),
])
def test_azure_errors_map_to_openai_classes(client: openai.OpenAI, fake: FakeAzureUpstream, behaviour: Behaviour,
                                            status: int, code: str | None) -> None:
    fake.script(behaviour)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == status
    body: dict[str, Any] = caught.value.body  # type: ignore[assignment]
    assert body["code"] == code
    if status == 429:
        assert caught.value.response.headers["retry-after"] == "3"


def test_wrong_upstream_key_is_a_502(client: openai.OpenAI, fake: FakeAzureUpstream) -> None:
    fake.api_key = "another-key"
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502 and UPSTREAM_KEY not in str(caught.value.body)
