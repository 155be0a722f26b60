"""The Redis response store through the gateway: a chain, pages, isolation, the cap and deletion on the shared
Redis; and the store going down on a private redis-server: a clear 503, no upstream call, nothing half kept."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from gateway.response_store.redis import RedisResponseStore
from tests import test_responses_state
from tests.conftest import key_hash, run_gateway
from tests.fakes.anthropic_upstream import FakeAnthropicUpstream
from tests.fakes.responses_upstream import FakeResponsesUpstream
from tests.fakes.state_stores import SHARED_REDIS, drop_prefix, private_redis, unique_prefix
from tests.test_responses_state import policy

# The same fake upstreams (module fixtures) as the SQLite store's tests.
oai, claude = test_responses_state.oai, test_responses_state.claude
SMALL_TEAM = f"""  short:
    keys: [{{id: short-key, hash: "{key_hash('sk-short')}"}}]
    models: ["*"]
    responses: {{max_bytes: 4000}}
"""


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_chains_pages_isolation_cap_and_deletion_on_redis(oai: FakeResponsesUpstream, claude: FakeAnthropicUpstream,
                                                          tmp_path: Path) -> None:
    prefix = unique_prefix()
    path = tmp_path / "policy.yaml"
    store = f"response_store: {{backend: redis, url: '{SHARED_REDIS}', key_prefix: '{prefix}'}}"
    path.write_text(policy(oai.base_url, claude.base_url, SMALL_TEAM, store))
    gateway = run_gateway(path)
    try:
        client = gateway.client()
        first = client.responses.create(model="gpt", input="remember teapot")
        second = client.responses.create(model="claude", previous_response_id=first.id, input="which word?")
        assert "remember teapot" in str(claude.last_request.json["messages"][0])
        items = list(client.responses.input_items.list(second.id, order="asc", limit=1))
        assert [item.content[0].text for item in items] == ["remember teapot", "echo: remember teapot", "which word?"]
        assert not (tmp_path / "policy.responses.sqlite").exists()  # nothing written beside the policy

        beta = gateway.client("sk-beta")
        with pytest.raises(openai.NotFoundError) as theirs:
            beta.responses.retrieve(second.id)
        with pytest.raises(openai.NotFoundError) as unknown:
            beta.responses.retrieve("resp_" + "1" * 48)
        assert theirs.value.body == unknown.value.body
        with pytest.raises(openai.NotFoundError):
            beta.responses.delete(second.id)
        assert client.responses.retrieve(second.id).id == second.id  # their delete did nothing

        short = gateway.client("sk-short")
        kept = [short.responses.create(model="claude", input=f"turn {i}") for i in range(5)]
        with pytest.raises(openai.NotFoundError):
            short.responses.retrieve(kept[0].id)  # evicted, oldest first, to keep the team under its cap
        assert [short.responses.retrieve(r.id).id for r in kept[1:]] == [r.id for r in kept[1:]]

        client.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model="claude", previous_response_id=first.id, input="again")
        assert client.responses.retrieve(second.id).id == second.id
    finally:
        gateway.stop()
        drop_prefix(SHARED_REDIS, prefix)


def test_the_store_going_down_is_a_clear_503_and_nothing_is_half_kept(
        oai: FakeResponsesUpstream, claude: FakeAnthropicUpstream, tmp_path: Path) -> None:
    with private_redis(tmp_path) as server:
        store = RedisResponseStore(server.url, timeout_s=0.3, retry_interval_s=0.3)
        path = tmp_path / "policy.yaml"
        path.write_text(policy(oai.base_url, claude.base_url, "",
                               f"response_store: {{backend: redis, url: '{server.url}'}}"))
        gateway = run_gateway(path, response_store=store)
        try:
            client = gateway.client()
            first = client.responses.create(model="claude", input="hello")
            server.stop()
            claude.reset()
            with pytest.raises(openai.InternalServerError) as caught:
                client.responses.create(model="claude", previous_response_id=first.id, input="more")
            assert caught.value.status_code == 503
            assert caught.value.body == {"message": caught.value.body["message"], "type": "server_error",
                                         "param": None, "code": "response_store_unavailable"}
            assert caught.value.response.headers["retry-after"] == "1"
            # While the failure is fresh, a turn to be kept is refused before anything is bought upstream.
            with pytest.raises(openai.InternalServerError):
                client.responses.create(model="claude", input="new conversation")
            assert claude.requests == []
            answer = httpx.get(f"{gateway.v1}/responses/{first.id}", headers={"authorization": "Bearer sk-alpha"})
            assert answer.status_code == 503 and answer.json()["error"]["code"] == "response_store_unavailable"
            # A request that keeps nothing is served all along.
            assert client.responses.create(model="claude", input="fine", store=False).output_text == "echo: fine"

            # Once the store is tried again and fails while keeping: the answer was bought but is not
            # returned as kept: a 503, or for a stream an `error` event in place of response.completed.
            wait_until(lambda: store.healthy)
            with pytest.raises(openai.InternalServerError):
                client.responses.create(model="claude", input="lost")
            wait_until(lambda: store.healthy)
            events = list(client.responses.create(model="gpt", input="lost stream", stream=True))
            assert events[-1].type == "error" and events[-1].code == "response_store_unavailable"
            assert "response.completed" not in [e.type for e in events]
            assert [e.sequence_number for e in events] == list(range(len(events)))

            server.start()
            wait_until(lambda: store.healthy)
            again = client.responses.create(model="claude", input="back")
            assert client.responses.create(model="gpt", previous_response_id=again.id, input="on").output_text == (
                "echo: on")
        finally:
            gateway.stop()
