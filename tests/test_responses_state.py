"""Stateful Responses API through the gateway: previous_response_id chains across a native (OpenAI) and a
translated (Anthropic) provider, retrieval, input_items pages, deletion, store: false, expiry, the size cap,
another team's or key's ids, account resources (issue 14.7) and accounting of re-sent context."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from gateway.response_store.sqlite import SqliteResponseStore
from tests.conftest import RunningGateway, key_hash, run_gateway
from tests.fakes.anthropic_upstream import FakeAnthropicUpstream
from tests.fakes.openai_upstream import Behaviour
from tests.fakes.responses_upstream import FakeResponsesUpstream
from tests.fakes.state_stores import FakeClock

WEATHER = {"type": "function", "name": "get_weather", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
UNKNOWN_ID = "resp_" + "0" * 48


def policy(oai: str, claude: str, extra_teams: str = "", store: str = "") -> str:
    return f"""
version: 1
{store}
providers:
  oai: {{kind: openai, base_url: {oai}, api_key: sk-openai-upstream}}
  claude: {{kind: anthropic, base_url: {claude}, api_key: sk-ant-x}}
models:
  gpt: {{targets: [{{provider: oai, model: gpt-5-mini}}]}}
  claude: {{targets: [{{provider: claude, model: claude-sonnet-4-6}}]}}
  gpt-or-claude:
    targets: [{{provider: oai, model: gpt-5-mini}}]
    fallbacks: {{default: [claude]}}
teams:
  alpha:
    keys: [{{id: alpha-key, hash: "{key_hash('sk-alpha')}"}}]
    models: ["*"]
  beta:
    keys: [{{id: beta-key, hash: "{key_hash('sk-beta')}"}}]
    models: ["*"]
  solo:
    keys: [{{id: solo-1, hash: "{key_hash('sk-solo-1')}"}}, {{id: solo-2, hash: "{key_hash('sk-solo-2')}"}}]
    models: ["*"]
    responses: {{scope: key}}
  trusted:
    keys: [{{id: trusted-key, hash: "{key_hash('sk-trusted')}"}}]
    models: ["*"]
    responses:
      upstream_store: true
      allowed_prompts: [pmpt_ok]
      allowed_vector_stores: [vs_ok]
      allowed_files: [file-ok]
      allowed_containers: [cntr_ok]
  metered:
    keys: [{{id: metered-key, hash: "{key_hash('sk-metered')}"}}]
    models: ["*"]
    budget: {{period: rolling, window_s: 3600, tokens: 600}}
{extra_teams}
"""


@pytest.fixture(scope="module")
def oai() -> Iterator[FakeResponsesUpstream]:
    with FakeResponsesUpstream(require_api_key="sk-openai-upstream") as fake:
        yield fake


@pytest.fixture(scope="module")
def claude() -> Iterator[FakeAnthropicUpstream]:
    with FakeAnthropicUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def module_gateway(oai: FakeResponsesUpstream, claude: FakeAnthropicUpstream,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    path = tmp_path_factory.mktemp("responses-state") / "policy.yaml"
    path.write_text(policy(oai.base_url, claude.base_url))
    gateway = run_gateway(path)
    yield gateway
    gateway.stop()


@pytest.fixture
def gateway(module_gateway: RunningGateway, oai: FakeResponsesUpstream,
            claude: FakeAnthropicUpstream) -> RunningGateway:
    oai.reset()
    claude.reset()
    module_gateway.usage.clear()
    return module_gateway


def create(client: openai.OpenAI, stream: bool, **kwargs: Any) -> Any:
    """A Response, made with or without streaming; a stream must end in response.completed."""
    if not stream:
        return client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    assert events[-1].type == "response.completed", [e.type for e in events]
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1  # one id from first to last
    return events[-1].response


def text_of(items: list[dict[str, Any]]) -> list[str]:
    return [part.get("text", "") for item in items if item.get("type", "message") == "message"
            for part in (item["content"] if isinstance(item["content"], list) else [{"text": item["content"]}])]


@pytest.mark.parametrize("stream", [False, True])
def test_a_chain_with_tools_moves_between_a_native_and_a_translated_provider(
        gateway: RunningGateway, oai: FakeResponsesUpstream, claude: FakeAnthropicUpstream, stream: bool) -> None:
    client = gateway.client()
    first = create(client, stream, model="gpt", input="weather in Paris?", tools=[WEATHER], tool_choice="required")
    call = next(item for item in first.output if item.type == "function_call")
    assert first.id.startswith("resp_") and len(first.id) == 53 and first.store
    sent = oai.last_request.json
    assert sent["store"] is False and "previous_response_id" not in sent  # nothing kept on the account

    # Turn 2 on Claude, by translation: the function call and its result are rebuilt from the store.
    second = create(client, stream, model="claude", previous_response_id=first.id, tools=[WEATHER],
                    input=[{"type": "function_call_output", "call_id": call.call_id, "output": "12 degrees"}])
    assert second.previous_response_id == first.id and second.output_text == "echo: tool said 12 degrees"
    messages = claude.last_request.json["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"][0] == {"type": "tool_use", "id": call.call_id, "name": "get_weather",
                                         "input": {"city": "x"}}
    assert messages[0]["content"][-1]["cache_control"] == {"type": "ephemeral"}  # where turn 1 ended
    assert messages[2]["content"][0]["type"] == "tool_result" and messages[2]["content"][0]["content"] in (
        "12 degrees", [{"type": "text", "text": "12 degrees"}])

    # Turn 3 back on OpenAI, natively: every earlier item, in order, without the gateway's item ids.
    third = create(client, stream, model="gpt", previous_response_id=second.id, input="thanks")
    sent = oai.last_request.json
    assert [item.get("type", "message") for item in sent["input"]] == [
        "message", "function_call", "function_call_output", "message", "message"]
    assert not any("id" in item for item in sent["input"])
    assert sent["input"][2]["output"] == "12 degrees" and text_of(sent["input"])[-1] == "thanks"
    assert sent["store"] is False and "previous_response_id" not in sent
    assert third.output_text == "echo: thanks" and third.previous_response_id == second.id
    assert client.responses.retrieve(third.id).output_text == "echo: thanks"


def test_reasoning_items_are_replayed_only_natively_and_only_with_their_encrypted_content(
        gateway: RunningGateway, oai: FakeResponsesUpstream, claude: FakeAnthropicUpstream) -> None:
    client = gateway.client()
    sealed = {"type": "reasoning", "id": "rs_sealed", "summary": [], "encrypted_content": "opaque-blob"}
    bare = {"type": "reasoning", "id": "rs_bare", "summary": [{"type": "summary_text", "text": "thought"}]}
    first = client.responses.create(model="gpt", input=[{"role": "user", "content": "hi"}, sealed, bare])
    second = client.responses.create(model="gpt", previous_response_id=first.id, input="go on")
    replayed = [item for item in oai.last_request.json["input"] if item.get("type") == "reasoning"]
    assert replayed == [sealed]  # with its id: the upstream needs both to use it
    client.responses.create(model="claude", previous_response_id=second.id, input="and now?")
    assert "opaque-blob" not in orjson.dumps(claude.last_request.json).decode()
    assert [m["role"] for m in claude.last_request.json["messages"]] == ["user", "assistant"] * 2 + ["user"]
    kept = [item.type for item in client.responses.input_items.list(second.id, order="asc")]
    assert kept == ["message", "reasoning", "reasoning", "message", "message"]


def test_a_fallback_in_the_middle_of_a_chain_continues_the_conversation_elsewhere(
        gateway: RunningGateway, oai: FakeResponsesUpstream, claude: FakeAnthropicUpstream) -> None:
    client = gateway.client()
    first = client.responses.create(model="gpt-or-claude", input="remember the word teapot")
    assert oai.last_request.path == "/v1/chat/completions"  # a model that may fall back is translated
    oai.script(Behaviour.error(500))
    second = client.responses.create(model="gpt-or-claude", previous_response_id=first.id, input="which word?")
    assert second.output_text == "echo: which word?"
    assert gateway.usage.wait_for(2)[-1].provider == "claude"
    sent = claude.last_request.json["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert "teapot" in orjson.dumps(sent[0]).decode() and "echo: remember the word teapot" in orjson.dumps(
        sent[1]).decode()


def test_a_long_conversation_chains_alike(gateway: RunningGateway, claude: FakeAnthropicUpstream) -> None:
    client = gateway.client()
    long_text = "lorem " * 60_000  # 360 kB: the stored record is (de)serialized off the event loop
    first = client.responses.create(model="claude", input=long_text)
    second = client.responses.create(model="claude", previous_response_id=first.id, input="tl;dr?")
    third = client.responses.create(model="claude", previous_response_id=second.id, input="thanks")
    assert claude.last_request.json["messages"][0]["content"][0]["text"] == long_text
    assert [m["role"] for m in claude.last_request.json["messages"]] == ["user", "assistant"] * 2 + ["user"]
    assert client.responses.retrieve(third.id).output_text == "echo: thanks"


def test_retrieve_input_items_pages_and_delete(gateway: RunningGateway) -> None:
    client = gateway.client()
    first = client.responses.create(model="claude", input=[{"role": "user", "content": "one"},
                                                           {"role": "assistant", "content": "two"},
                                                           {"role": "user", "content": "three"}])
    second = client.responses.create(model="claude", previous_response_id=first.id,
                                     input=[{"role": "user", "content": "four"}, {"role": "user", "content": "five"}])
    got = client.responses.retrieve(second.id)
    assert got.id == second.id and got.output_text == second.output_text == "echo: four five"

    expected = ["one", "two", "three", "echo: three", "four", "five"]
    pages = client.responses.input_items.list(second.id, limit=4, order="asc")
    assert len(pages.data) == 4 and pages.has_more
    items = list(pages)  # the SDK follows `after` from page to page
    assert [item.content[0].text for item in items] == expected
    assert len({item.id for item in items}) == len(items)
    newest_first = list(client.responses.input_items.list(second.id, limit=1))
    assert [item.content[0].text for item in newest_first] == expected[::-1]

    client.responses.delete(second.id)
    for attempt in (lambda: client.responses.retrieve(second.id), lambda: client.responses.delete(second.id),
                    lambda: client.responses.input_items.list(second.id),
                    lambda: client.responses.create(model="claude", previous_response_id=second.id, input="x")):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert client.responses.retrieve(first.id).id == first.id  # deleting one turn leaves the others


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_a_chained_turn_still_validates_its_own_fields(gateway: RunningGateway, model: str) -> None:
    client = gateway.client()
    first = client.responses.create(model=model, input="hi")
    for bad, param in (({"input": 5}, "input"), ({"input": ["not an item"]}, "input"), ({"store": "yes"}, "store"),
                       ({"input": "x", "previous_response_id": 7}, "previous_response_id")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.create(**{"model": model, "previous_response_id": first.id, **bad})
        assert caught.value.body["param"] == param


@pytest.mark.parametrize("model", ["gpt", "claude"])
def test_store_false_keeps_nothing(gateway: RunningGateway, model: str) -> None:
    client = gateway.client()
    reply = client.responses.create(model=model, input="not for keeping", store=False)
    assert reply.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(reply.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=model, input="more", previous_response_id=reply.id)
    database = gateway.policy_path.parent / "policy.responses.sqlite"
    if database.exists():  # the store makes its file on first write: with nothing stored it may not exist yet
        connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "responses" in tables:
            kept = connection.execute("SELECT COUNT(*) FROM responses WHERE id = ?", (reply.id,)).fetchone()
            assert kept == (0,)
        connection.close()


def _not_found(gateway: RunningGateway, key: str, response_id: str) -> list[tuple[int, Any]]:
    """What every way of using `response_id` answers `key` (status and body)."""
    url = f"/v1/responses/{response_id}"
    with httpx.Client(base_url=gateway.base_url, headers={"authorization": f"Bearer {key}"}) as http:
        answers = [http.get(url), http.delete(url), http.get(url + "/input_items"),
                   http.post("/v1/responses", json={"model": "claude", "input": "x",
                                                    "previous_response_id": response_id})]
    return [(a.status_code, a.json()) for a in answers]


def test_another_team_or_key_gets_exactly_the_unknown_id_answer(gateway: RunningGateway,
                                                                claude: FakeAnthropicUpstream) -> None:
    mine = gateway.client().responses.create(model="claude", input="secret plans")
    keys = gateway.client("sk-solo-1").responses.create(model="claude", input="solo plans")
    claude.reset()
    unknown = _not_found(gateway, "sk-beta", UNKNOWN_ID)
    assert [status for status, _ in unknown] == [404, 404, 404, 404]
    assert _not_found(gateway, "sk-beta", mine.id) == unknown
    assert _not_found(gateway, "sk-solo-2", keys.id) == _not_found(gateway, "sk-solo-2", UNKNOWN_ID)
    assert _not_found(gateway, "sk-beta", "resp_../../etc") == unknown  # not even shaped like an id
    assert claude.requests == []  # nothing reached the upstream
    assert gateway.client("sk-solo-1").responses.retrieve(keys.id).output_text == "echo: solo plans"
    assert gateway.client().responses.retrieve(mine.id).output_text == "echo: secret plans"
    assert httpx.get(f"{gateway.v1}/responses/{mine.id}").status_code == 401


def test_native_pass_through_keeps_the_operator_account_closed(gateway: RunningGateway,
                                                               oai: FakeResponsesUpstream) -> None:
    client = gateway.client()
    refused: list[dict[str, Any]] = [
        {"prompt": {"id": "pmpt_ok"}},  # allow-listed for another team only
        {"tools": [{"type": "file_search", "vector_store_ids": ["vs_ok"]}]},
        {"tools": [{"type": "code_interpreter", "container": "cntr_ok"}]},
        {"tools": [{"type": "code_interpreter", "container": {"type": "auto", "file_ids": ["file-ok"]}}]},
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-ok"}]}]},
        {"input": [{"type": "item_reference", "id": "msg_123"}]},
    ]
    for extra in refused:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            client.responses.create(**{"model": "gpt", "input": "hi", **extra})
        assert caught.value.body["code"] == "resource_not_allowed"
    assert oai.requests == []
    client.responses.create(model="gpt", input="hi", store=True)
    assert oai.last_request.json["store"] is False
    trusted = gateway.client("sk-trusted")
    trusted.responses.create(model="gpt", input="hi", prompt={"id": "pmpt_ok"},
                             tools=[{"type": "file_search", "vector_store_ids": ["vs_ok"]}])
    sent = oai.last_request.json
    assert sent["prompt"] == {"id": "pmpt_ok"} and "store" not in sent  # the team may store upstream
    with pytest.raises(openai.PermissionDeniedError):
        trusted.responses.create(model="gpt", input="hi", tools=[{"type": "file_search",
                                                                  "vector_store_ids": ["vs_other"]}])


def test_chained_turns_count_their_context_and_steer_prompt_caches(
        gateway: RunningGateway, oai: FakeResponsesUpstream, claude: FakeAnthropicUpstream) -> None:
    client = gateway.client()
    long_input = " ".join(f"word{i}" for i in range(200))
    first = client.responses.create(model="claude", input=long_input)
    second = client.responses.create(model="claude", previous_response_id=first.id, input="short")
    records = gateway.usage.wait_for(2)
    # The context re-sent (the first prompt and its answer) is billed as prompt tokens of the second turn.
    assert records[1].usage.prompt_tokens > records[0].usage.prompt_tokens + records[0].usage.completion_tokens
    assert records[1].cost_usd is not None and records[1].endpoint == "chat"
    assert second.usage.input_tokens == records[1].usage.prompt_tokens
    # Anthropic breakpoints: the end of what the previous turn sent (a cache read) and the new end (a write).
    marked = [i for i, m in enumerate(claude.last_request.json["messages"])
              if any("cache_control" in block for block in m["content"])]
    assert marked == [0, 2]
    # OpenAI: one prompt_cache_key for every turn of a conversation, another for another conversation.
    one = client.responses.create(model="gpt", input="conversation one")
    key = oai.last_request.json["prompt_cache_key"]
    client.responses.create(model="gpt", input="next", previous_response_id=one.id)
    assert oai.last_request.json["prompt_cache_key"] == key
    client.responses.create(model="gpt", input="conversation two")
    assert oai.last_request.json["prompt_cache_key"] != key


def test_re_sent_context_counts_against_token_budgets(gateway: RunningGateway, claude: FakeAnthropicUpstream) -> None:
    client = gateway.client("sk-metered")
    first = client.responses.create(model="claude", input=" ".join(f"w{i}" for i in range(120)), max_output_tokens=130)
    used = first.usage.input_tokens + first.usage.output_tokens
    assert 150 < used < 300, used  # room left for a short new prompt, not for the stored context again
    with pytest.raises(openai.RateLimitError) as caught:
        client.responses.create(model="claude", previous_response_id=first.id, input="more", max_output_tokens=5)
    assert caught.value.body["code"] == "budget_exceeded"
    assert client.responses.create(model="claude", input="more", max_output_tokens=5).output_text == "echo: more"


def test_expiry_and_the_size_cap(oai: FakeResponsesUpstream, claude: FakeAnthropicUpstream, tmp_path: Path) -> None:
    clock = FakeClock()
    store = SqliteResponseStore(tmp_path / "responses.sqlite", clock=clock)
    teams = f"""  short:
    keys: [{{id: short-key, hash: "{key_hash('sk-short')}"}}]
    models: ["*"]
    responses: {{ttl_s: 60, max_bytes: 4000}}
"""
    path = tmp_path / "policy.yaml"
    path.write_text(policy(oai.base_url, claude.base_url, teams))
    gateway = run_gateway(path, response_store=store)
    try:
        client = gateway.client("sk-short")
        first = client.responses.create(model="claude", input="a")
        clock.advance(59)
        assert client.responses.retrieve(first.id).id == first.id
        clock.advance(2)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="claude", input="b", previous_response_id=first.id)
        # The cap: four records of 0.8-1 kB fit, so keeping a fifth evicts the oldest; the newest chain goes on.
        kept = [client.responses.create(model="claude", input=f"turn {i}") for i in range(5)]
        sizes = sqlite3.connect(store.path).execute("SELECT size FROM responses").fetchall()
        assert all(800 < size <= 1000 for (size,) in sizes), sizes
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(kept[0].id)
        assert client.responses.retrieve(kept[-1].id).id == kept[-1].id
        assert client.responses.create(model="claude", input="go on", previous_response_id=kept[-1].id).id
        size = sqlite3.connect(store.path).execute("SELECT SUM(size) FROM responses WHERE team = 'short'")
        assert size.fetchone()[0] <= 4000
        big = client.responses.create(model="claude", input="x " * 4000)  # larger than the whole cap
        assert big.store is False
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(big.id)
    finally:
        gateway.stop()


def test_an_unusable_sqlite_file_is_a_503_and_keeps_nothing(oai: FakeResponsesUpstream, claude: FakeAnthropicUpstream,
                                                           tmp_path: Path) -> None:
    claude.reset()
    (tmp_path / "not-a-directory").write_text("")
    store = SqliteResponseStore(tmp_path / "not-a-directory" / "responses.sqlite", retry_interval_s=60)
    path = tmp_path / "policy.yaml"
    path.write_text(policy(oai.base_url, claude.base_url))
    gateway = run_gateway(path, response_store=store)
    try:
        client = gateway.client()
        with pytest.raises(openai.InternalServerError) as caught:
            client.responses.create(model="claude", input="to keep")
        assert caught.value.status_code == 503 and caught.value.body["code"] == "response_store_unavailable"
        assert len(claude.requests) == 1  # bought before the store failed; not returned as if it were kept
        with pytest.raises(openai.InternalServerError):
            client.responses.create(model="claude", input="again")
        assert len(claude.requests) == 1  # the known outage refuses before any upstream call
        assert client.responses.create(model="claude", input="no need", store=False).output_text == "echo: no need"
    finally:
        gateway.stop()
