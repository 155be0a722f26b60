"""Protocol loose ends (issue 16, item 5): empty `messages`, Anthropic token counting, Anthropic-shaped 404s."""

from __future__ import annotations

from collections.abc import Callable

import anthropic
import httpx
import openai
import pytest

from tests.conftest import RunningGateway
from tests.demo_policy import DEMO_KEY, INTERN_KEY, demo_text


@pytest.fixture
def demo(start_gateway: Callable[[str], RunningGateway]) -> RunningGateway:
    return start_gateway(demo_text())


@pytest.fixture
def claude(demo: RunningGateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=demo.base_url, api_key=DEMO_KEY, max_retries=0)


@pytest.mark.parametrize(("path", "field"), [("/v1/chat/completions", "messages"), ("/v1/embeddings", "input"),
                                             ("/v1/completions", "prompt")])
def test_an_empty_array_is_a_400_and_reaches_no_upstream(demo: RunningGateway, path: str, field: str) -> None:
    model = "text-embedding-3-small" if field == "input" else "gpt-4o-mini"
    response = httpx.post(demo.v1 + path.removeprefix("/v1"), json={"model": model, field: []},
                          headers={"authorization": f"Bearer {DEMO_KEY}"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "empty_array" and error["param"] == field and error["type"] == "invalid_request_error"
    (record,) = demo.usage.wait_for(1)  # refused before routing: no provider, nothing billed
    assert record.status == 400 and record.provider is None and record.cost_usd is None


def test_the_openai_sdk_raises_bad_request_for_empty_messages(demo: RunningGateway) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        demo.client(DEMO_KEY).chat.completions.create(model="gpt-4o-mini", messages=[])
    assert refused.value.code == "empty_array"


def test_empty_messages_on_the_anthropic_front_door_is_an_anthropic_400(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude.messages.create(model="claude-sonnet-4-5", max_tokens=10, messages=[])
    assert refused.value.body["type"] == "error"
    assert refused.value.body["error"] == {"type": "invalid_request_error",
                                           "message": "messages: at least one message is required"}


def test_count_tokens_matches_what_the_reply_reports(claude: anthropic.Anthropic) -> None:
    messages = [{"role": "user", "content": "How many tokens is this sentence, roughly?"}]
    counted = claude.messages.count_tokens(model="claude-sonnet-4-5", system="Be brief.", messages=messages)
    reply = claude.messages.create(model="claude-sonnet-4-5", max_tokens=50, system="Be brief.", messages=messages)
    assert counted.input_tokens == reply.usage.input_tokens > 0
    longer = claude.messages.count_tokens(model="claude-sonnet-4-5", system="Be brief.",
                                          messages=[{"role": "user", "content": messages[0]["content"] * 10}])
    assert longer.input_tokens > counted.input_tokens


def test_count_tokens_counts_tools_too(claude: anthropic.Anthropic) -> None:
    messages = [{"role": "user", "content": "Weather?"}]
    tool = {"name": "get_weather", "description": "Weather in a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    bare = claude.messages.count_tokens(model="gpt-4o-mini", messages=messages)
    with_tool = claude.messages.count_tokens(model="gpt-4o-mini", messages=messages, tools=[tool])
    assert with_tool.input_tokens > bare.input_tokens


def test_count_tokens_checks_the_key_and_the_model_like_messages_does(demo: RunningGateway) -> None:
    anonymous = anthropic.Anthropic(base_url=demo.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        anonymous.messages.count_tokens(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.body["error"]["type"] == "authentication_error"
    intern = anthropic.Anthropic(base_url=demo.base_url, api_key=INTERN_KEY, max_retries=0)
    for model in ("claude-sonnet-4-5", "no-such-model"):  # not the team's, and not anyone's: the same answer
        with pytest.raises(anthropic.NotFoundError) as missing:
            intern.messages.count_tokens(model=model, messages=[{"role": "user", "content": "hi"}])
        assert missing.value.body["error"] == {"type": "not_found_error", "message":
                                               f"The model `{model}` does not exist or you do not have access to it."}
    assert demo.usage.records == []  # counting is free: no ledger row, no budget spent


@pytest.mark.parametrize(("method", "path", "status", "error_type"), [
    ("POST", "/v1/messages/batches", 404, "not_found_error"),
    ("GET", "/v1/messages/msg_123", 404, "not_found_error"),
    ("GET", "/v1/messages", 405, "invalid_request_error"),
])
def test_unknown_paths_under_the_anthropic_front_door_answer_in_anthropics_shape(
        demo: RunningGateway, method: str, path: str, status: int, error_type: str) -> None:
    response = httpx.request(method, demo.base_url + path, headers={"x-api-key": DEMO_KEY})
    assert response.status_code == status
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == error_type and body["error"]["message"]


def test_the_anthropic_sdk_raises_not_found_for_an_unknown_anthropic_path(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.get("/v1/messages/batches/msgbatch_1", cast_to=object)
    assert missing.value.body["error"]["type"] == "not_found_error"


def test_other_unknown_paths_keep_openais_shape(demo: RunningGateway) -> None:
    response = httpx.post(demo.v1 + "/nothing-here", headers={"authorization": f"Bearer {DEMO_KEY}"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_url"
