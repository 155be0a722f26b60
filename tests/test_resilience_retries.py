"""Retries, Retry-After, deadlines and fallbacks, through a real gateway in front of fake upstreams."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from tests.conftest import RunningGateway
from tests.fakes import Behaviour, FakeOpenAIUpstream
from tests.fakes.routing_policy import chat, multi_policy


@pytest.fixture
def fakes() -> Iterator[list[FakeOpenAIUpstream]]:
    with FakeOpenAIUpstream() as a, FakeOpenAIUpstream() as b, FakeOpenAIUpstream() as c:
        yield [a, b, c]


def _start(start_gateway: Callable[[str], RunningGateway], fakes: list[FakeOpenAIUpstream], models: str
           ) -> RunningGateway:
    return start_gateway(multi_policy({f"p{i}": f.base_url for i, f in enumerate(fakes)}, models))


def _post(gateway: RunningGateway, model: str, messages: list[dict[str, str]] | None = None) -> httpx.Response:
    return httpx.post(gateway.v1 + "/chat/completions", headers={"authorization": "Bearer sk-alpha"},
                      json={"model": model, "messages": messages or chat()}, timeout=10)


ONE_TARGET = """
  m:
    retries: {retries}
    backoff: {{initial_s: 0.01, max_s: 0.02}}
{extra}    targets:
      - {{provider: p0, model: up-0}}
"""


def test_retryable_failures_are_retried_and_the_trail_shows_each_attempt(fakes, start_gateway) -> None:
    gateway = _start(start_gateway, fakes, ONE_TARGET.format(retries=3, extra=""))
    fakes[0].script(Behaviour.error(503), Behaviour.error(500), Behaviour.abrupt_close())
    response = _post(gateway, "m")
    assert response.status_code == 200
    assert fakes[0].request_count == 4
    assert response.headers["x-switchboard-route"] == "m@p0:503,m@p0:500,m@p0:502,m@p0:ok"
    assert response.headers["x-switchboard-model"] == "m"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_are_never_retried(fakes, start_gateway, status) -> None:
    gateway = _start(start_gateway, fakes, ONE_TARGET.format(retries=3, extra=""))
    fakes[0].script(Behaviour.error(status))
    response = _post(gateway, "m")
    assert response.status_code != 200
    assert fakes[0].request_count == 1


def test_retry_after_is_honoured_within_the_deadline(fakes, start_gateway) -> None:
    # Honoured up to the longest backoff (here 1 s): beyond it the error goes back to the client (next test).
    models = ONE_TARGET.format(retries=1, extra="    deadline_s: 5\n").replace("max_s: 0.02", "max_s: 1")
    gateway = _start(start_gateway, fakes, models)
    fakes[0].script(Behaviour.rate_limited(retry_after=0.4))
    started = time.monotonic()
    response = _post(gateway, "m")
    assert response.status_code == 200
    first, second = fakes[0].requests
    assert second.received_at - first.received_at >= 0.4
    assert time.monotonic() - started < 3


def test_retry_after_beyond_the_deadline_is_not_waited_for(fakes, start_gateway) -> None:
    # The longest backoff would allow the 30 s wait; the 10 s deadline does not. Waiting on either would take
    # 10 s or more, far above what a loaded machine adds to an immediate answer.
    models = ONE_TARGET.format(retries=2, extra="    deadline_s: 10\n").replace("max_s: 0.02", "max_s: 60")
    gateway = _start(start_gateway, fakes, models)
    fakes[0].script(Behaviour.rate_limited(retry_after=30))
    started = time.monotonic()
    response = _post(gateway, "m")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "30"
    assert fakes[0].request_count == 1
    assert time.monotonic() - started < 5


def test_retry_after_longer_than_the_longest_backoff_goes_back_to_the_client(fakes, start_gateway) -> None:
    # No deadline_s in the policy: the default deadline (300 s) would allow the wait, backoff.max_s does not.
    gateway = _start(start_gateway, fakes, ONE_TARGET.format(retries=2, extra=""))
    fakes[0].script(Behaviour.rate_limited(retry_after=3600))
    started = time.monotonic()
    response = _post(gateway, "m")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3600"
    assert fakes[0].request_count == 1
    assert time.monotonic() - started < 2  # not slept on: no reservation held for an hour


def test_the_deadline_bounds_a_hanging_upstream(fakes, start_gateway) -> None:
    gateway = _start(start_gateway, fakes, ONE_TARGET.format(retries=2, extra="    deadline_s: 0.3\n"))
    fakes[0].script(Behaviour.hanging())
    started = time.monotonic()
    response = _post(gateway, "m")
    assert response.status_code == 504
    assert time.monotonic() - started < 2
    assert response.headers["x-switchboard-route"] == "m@p0:timeout"


def test_a_retry_moves_to_another_target(fakes, start_gateway) -> None:
    models = """
  m:
    retries: 1
    backoff: {initial_s: 0, max_s: 0}
    targets:
      - {provider: p0, model: up-0}
      - {provider: p1, model: up-1}
"""
    gateway = _start(start_gateway, fakes, models)
    fakes[0].script(Behaviour.error(502))
    response = _post(gateway, "m")
    assert response.json()["model"] == "up-1"
    assert response.headers["x-switchboard-route"] == "m@p0:502,m@p1:ok"


FALLBACK_CHAIN = """
  first:
    fallbacks: {default: [second, third]}
    targets: [{provider: p0, model: up-0}]
  second:
    targets: [{provider: p1, model: up-1}]
  third:
    targets: [{provider: p2, model: up-2}]
"""


def test_fallbacks_are_tried_in_order_and_the_answer_names_its_model(fakes, start_gateway) -> None:
    gateway = _start(start_gateway, fakes, FALLBACK_CHAIN)
    fakes[0].script(Behaviour.error(500))
    fakes[1].script(Behaviour.error(503))
    completion = gateway.client().chat.completions.with_raw_response.create(model="first", messages=chat())
    assert completion.parse().model == "up-2"
    assert completion.headers["x-switchboard-model"] == "third"
    assert completion.headers["x-switchboard-route"] == "first@p0:500,second@p1:503,third@p2:ok"
    record = gateway.usage.wait_for(1)[0]
    assert (record.public_model, record.provider) == ("first", "p2")


def test_when_every_fallback_fails_the_client_gets_the_last_error(fakes, start_gateway) -> None:
    gateway = _start(start_gateway, fakes, FALLBACK_CHAIN)
    for fake in fakes:
        fake.script(Behaviour.error(500))
    with pytest.raises(openai.APIStatusError) as raised:
        gateway.client().chat.completions.create(model="first", messages=chat())
    assert raised.value.status_code == 502
    assert raised.value.response.headers["x-switchboard-route"] == "first@p0:500,second@p1:500,third@p2:500"


CONTEXT = """
  small:
    context_window: 20
    fallbacks: {{context_window: [large], default: [other]}}
    targets: [{{provider: p0, model: up-0}}]
  large:
    targets: [{{provider: p1, model: up-1}}]
  other:
    targets: [{{provider: p2, model: up-2}}]
"""


def test_a_prompt_longer_than_the_context_window_goes_straight_to_the_larger_model(fakes, start_gateway) -> None:
    gateway = _start(start_gateway, fakes, CONTEXT.format())
    long_prompt = chat("word " * 200)
    response = _post(gateway, "small", long_prompt)
    assert response.json()["model"] == "up-1"
    assert fakes[0].request_count == 0
    assert response.headers["x-switchboard-route"] == "small:context_window,large@p1:ok"
    assert _post(gateway, "small").json()["model"] == "up-0"  # a short prompt stays


def test_an_upstream_context_length_error_falls_back_to_the_larger_model(fakes, start_gateway) -> None:
    gateway = _start(start_gateway, fakes, CONTEXT.format())
    fakes[0].script(Behaviour.error(400, "This model's maximum context length is 20 tokens",
                                    code="context_length_exceeded"))
    response = _post(gateway, "small")
    assert response.json()["model"] == "up-1"
    assert fakes[2].request_count == 0


def test_a_content_policy_refusal_uses_its_own_fallback_list(fakes, start_gateway) -> None:
    models = """
  strict:
    fallbacks: {content_policy: [lenient], default: [other]}
    targets: [{provider: p0, model: up-0}]
  lenient:
    targets: [{provider: p1, model: up-1}]
  other:
    targets: [{provider: p2, model: up-2}]
"""
    gateway = _start(start_gateway, fakes, models)
    fakes[0].script(Behaviour.error(400, "flagged by the content filter", code="content_filter"))
    response = _post(gateway, "strict")
    assert response.json()["model"] == "up-1"
    assert fakes[2].request_count == 0


def test_fallbacks_to_unknown_models_are_refused_at_load(tmp_path) -> None:
    from gateway.compiled.policy import PolicyError, parse_policy

    text = multi_policy({"p0": "http://127.0.0.1:9/v1"},
                        "  m:\n    fallbacks: {default: [nope, m]}\n    targets: [{provider: p0, model: x}]")
    with pytest.raises(PolicyError) as raised:
        parse_policy(text)
    assert any(p.startswith("models.m.fallbacks.default.0: unknown model 'nope'") for p in raised.value.problems)
    assert any(p.startswith("models.m.fallbacks.default.1: a model cannot fall back to itself")
               for p in raised.value.problems)
