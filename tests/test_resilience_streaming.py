"""The streaming contract: failures before the first content byte are invisible; after it, in-band errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from tests.conftest import RunningGateway
from tests.fakes import Behaviour, FakeOpenAIUpstream
from tests.fakes.routing_policy import ADMIN_KEY, chat, multi_policy

MODELS = """
  m:
    retries: 1
    backoff: {{initial_s: 0, max_s: 0}}
{extra}    targets:
      - {{provider: p0, model: up-0}}
      - {{provider: p1, model: up-1}}
"""


@pytest.fixture
def fakes() -> Iterator[list[FakeOpenAIUpstream]]:
    with FakeOpenAIUpstream(stream_chunks=4) as a, FakeOpenAIUpstream(stream_chunks=4) as b:
        yield [a, b]


@pytest.fixture
def start(fakes, start_gateway) -> Callable[[str], RunningGateway]:
    def start(extra: str = "") -> RunningGateway:
        return start_gateway(multi_policy({"p0": fakes[0].base_url, "p1": fakes[1].base_url},
                                          MODELS.format(extra=extra)))
    return start


def _stream_text(gateway: RunningGateway, **kwargs: object) -> tuple[str, list[str | None], set[str]]:
    stream = gateway.client().chat.completions.create(model="m", messages=chat("tell me"), stream=True, **kwargs)
    text, reasons, models = "", [], set()
    for chunk in stream:
        models.add(chunk.model)
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reasons.append(choice.finish_reason)
    return text, reasons, models


def _raw_stream(gateway: RunningGateway) -> httpx.Response:
    return httpx.post(gateway.v1 + "/chat/completions", headers={"authorization": "Bearer sk-alpha"},
                      json={"model": "m", "messages": chat("tell me"), "stream": True}, timeout=10)


@pytest.mark.parametrize("behaviour", [
    Behaviour.error(503),
    Behaviour.abrupt_close(),
    Behaviour.die_mid_stream(after_chunks=1),  # only the role chunk, then the connection drops
    Behaviour.error_mid_stream(after_chunks=1),
], ids=["error-status", "connect-drop", "dies-after-role-chunk", "error-event-before-content"])
def test_a_failure_before_content_is_invisible_to_the_sdk(fakes, start, behaviour) -> None:
    gateway = start()
    fakes[0].script(behaviour)
    text, reasons, models = _stream_text(gateway)
    assert text == "echo: tell me"
    assert reasons[-1] == "stop"
    assert models == {"up-1"}
    assert fakes[0].request_count == 1


def test_a_stream_that_stalls_before_its_first_token_fails_over_at_the_ttft_deadline(fakes, start) -> None:
    gateway = start("    ttft_timeout_s: 0.3\n")
    fakes[0].script(Behaviour(stream_chunks=4, chunk_delay_ms=5000))  # role chunk, then silence
    text, _, models = _stream_text(gateway)
    assert (text, models) == ("echo: tell me", {"up-1"})
    assert fakes[0].wait_for_disconnect()  # the stalled upstream was let go


def test_a_slow_first_byte_fails_over_at_the_ttft_deadline(fakes, start) -> None:
    gateway = start("    ttft_timeout_s: 0.3\n")
    fakes[0].script(Behaviour.slow_first_byte(5000))
    response = _raw_stream(gateway)
    assert response.headers["x-switchboard-route"] == "m@p0:timeout,m@p1:ok"
    assert response.text.endswith("data: [DONE]\n\n")


def test_a_failure_after_content_ends_with_an_error_event_and_no_done(fakes, start) -> None:
    gateway = start()
    fakes[0].script(Behaviour.die_mid_stream(after_chunks=3))
    with pytest.raises(openai.APIError):
        _stream_text(gateway)
    fakes[0].script(Behaviour.die_mid_stream(after_chunks=3))
    response = _raw_stream(gateway)
    assert "[DONE]" not in response.text
    assert response.text.rstrip().splitlines()[-1].startswith('data: {"error"')
    assert fakes[1].request_count == 0  # content had reached the client: no retry


def test_a_stream_idle_past_the_timeout_ends_with_an_in_band_error(fakes, start) -> None:
    gateway = start("    stream_idle_timeout_s: 0.3\n")
    fakes[0].script(Behaviour(stream_chunks=4, chunk_delay_ms=600))
    response = _raw_stream(gateway)
    assert "[DONE]" not in response.text
    assert "stalled" in response.text.rstrip().splitlines()[-1]


def test_finish_reason_is_the_upstreams(fakes, start) -> None:
    gateway = start()
    _, reasons, _ = _stream_text(gateway, max_tokens=1)
    assert reasons[-1] == "length"


def test_streams_release_their_in_flight_slot_however_they_end(fakes, start) -> None:
    gateway = start()
    fakes[0].script(Behaviour.die_mid_stream(after_chunks=3))
    _raw_stream(gateway)
    _raw_stream(gateway)
    _stream_text(gateway)
    rows = httpx.get(gateway.base_url + "/admin/targets", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert [row["in_flight"] for row in rows.json()["data"]] == [0, 0]
    failures = {row["model"]: row["failures"] for row in rows.json()["data"]}
    assert failures["up-0"] + failures["up-1"] == 1
