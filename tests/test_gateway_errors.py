"""Every failure reaches the client as an OpenAI-format error with an honest status, and leaks nothing."""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx
import openai
import pytest

from tests.conftest import RunningGateway, standard_policy
from tests.fakes import Behaviour, FakeOpenAIUpstream

CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}]}


def _post(gateway: RunningGateway, body: object = CHAT, key: str | None = "sk-alpha",
          **kwargs: object) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return httpx.post(gateway.v1 + "/chat/completions", headers=headers, content=body, **kwargs)  # type: ignore[arg-type]
    return httpx.post(gateway.v1 + "/chat/completions", headers=headers, json=body, **kwargs)  # type: ignore[arg-type]


def _error(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert response.headers.get("x-request-id")
    return body["error"]


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_missing_or_unknown_key_is_401(gateway: RunningGateway, key: str | None) -> None:
    response = _post(gateway, key=key)
    assert response.status_code == 401
    assert _error(response)["code"] in {"missing_api_key", "invalid_api_key"}
    with pytest.raises(openai.AuthenticationError):
        gateway.client(key or "sk-nope").chat.completions.create(**CHAT)


def test_forbidden_model_looks_exactly_like_a_missing_one(gateway: RunningGateway) -> None:
    forbidden = _post(gateway, {**CHAT, "model": "beta-model"})
    missing = _post(gateway, {**CHAT, "model": "no-such-model"})
    assert forbidden.status_code == missing.status_code == 404
    assert _error(forbidden)["code"] == _error(missing)["code"] == "model_not_found"
    assert _error(forbidden)["message"].replace("beta-model", "X") == _error(missing)["message"].replace(
        "no-such-model", "X")


def test_malformed_json_is_400(gateway: RunningGateway, upstream: FakeOpenAIUpstream) -> None:
    response = _post(gateway, b'{"model": "chat-model", "messages": [')
    assert response.status_code == 400 and _error(response)["code"] == "invalid_json"
    missing = _post(gateway, {"model": "chat-model"})
    assert missing.status_code == 400 and _error(missing)["param"] == "messages"
    assert upstream.request_count == 0


def test_oversized_body_is_413(gateway: RunningGateway, upstream: FakeOpenAIUpstream) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 70_000}]}
    response = _post(gateway, big)
    assert response.status_code == 413 and _error(response)["code"] == "request_too_large"
    assert upstream.request_count == 0


def test_unknown_endpoint_and_wrong_method(gateway: RunningGateway) -> None:
    missing = httpx.post(gateway.v1 + "/images/generations", json={})
    assert missing.status_code == 404 and _error(missing)["code"] == "unknown_url"
    wrong = httpx.get(gateway.v1 + "/chat/completions")
    assert wrong.status_code == 405 and _error(wrong)["code"] == "method_not_allowed"


def test_upstream_500_is_a_502_naming_the_upstream_failure(gateway: RunningGateway,
                                                            upstream: FakeOpenAIUpstream) -> None:
    upstream.script(Behaviour.error(500, "model crashed"))
    response = _post(gateway)
    assert response.status_code == 502
    error = _error(response)
    assert "HTTP 500" in str(error["message"]) and "model crashed" in str(error["message"])


def test_upstream_429_passes_through_with_retry_after(gateway: RunningGateway, upstream: FakeOpenAIUpstream) -> None:
    upstream.script(Behaviour.rate_limited(retry_after=7))
    response = _post(gateway)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    with pytest.raises(openai.RateLimitError):
        upstream.script(Behaviour.rate_limited(retry_after=7))
        gateway.client().chat.completions.create(**CHAT)


def test_upstream_400_keeps_its_message_and_code(gateway: RunningGateway, upstream: FakeOpenAIUpstream) -> None:
    upstream.script(Behaviour.error(400, "This model's maximum context length is 8192 tokens",
                                    code="context_length_exceeded"))
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().chat.completions.create(**CHAT)
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length" in caught.value.message


def test_upstream_rejecting_our_credentials_never_shows_the_key(gateway: RunningGateway,
                                                                upstream: FakeOpenAIUpstream) -> None:
    upstream.script(Behaviour.error(401, "Incorrect API key provided: sk-upstream-secret", code="invalid_api_key"))
    response = _post(gateway)
    assert response.status_code == 502 and _error(response)["code"] == "upstream_auth_failed"
    assert "sk-upstream" not in response.text


def test_leaked_credentials_in_upstream_messages_are_redacted(gateway: RunningGateway,
                                                              upstream: FakeOpenAIUpstream) -> None:
    upstream.script(Behaviour.error(400, "bad request for key sk-upstream-secret at https://user:pw@host/v1"))
    response = _post(gateway)
    assert response.status_code == 400
    assert "sk-upstream-secret" not in response.text and "user:pw" not in response.text


def test_upstream_timeout_is_504(upstream: FakeOpenAIUpstream, start_gateway: Callable[[str], RunningGateway]) -> None:
    gateway = start_gateway(standard_policy(upstream.base_url).replace("first_byte_s: 2", "first_byte_s: 0.3"))
    upstream.script(Behaviour.hanging())
    response = _post(gateway)
    assert response.status_code == 504 and _error(response)["code"] == "upstream_timeout"
    upstream.release()


def test_connection_refused_is_502(start_gateway: Callable[[str], RunningGateway]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    gateway = start_gateway(standard_policy(f"http://127.0.0.1:{closed_port}/v1"))
    response = _post(gateway)
    assert response.status_code == 502 and _error(response)["code"] == "upstream_unreachable"
    with pytest.raises(openai.InternalServerError):
        gateway.client().chat.completions.create(**CHAT)


def test_stream_cut_by_the_upstream_ends_with_an_error_not_done(gateway: RunningGateway,
                                                                 upstream: FakeOpenAIUpstream) -> None:
    upstream.script(Behaviour.die_mid_stream(after_chunks=2))
    with httpx.stream("POST", gateway.v1 + "/chat/completions", headers={"authorization": "Bearer sk-alpha"},
                      json={**CHAT, "stream": True}) as response:
        body = response.read().decode()
    assert "[DONE]" not in body
    assert body.rstrip().splitlines()[-1].startswith('data: {"error"')
    upstream.script(Behaviour.die_mid_stream(after_chunks=2))
    with pytest.raises(openai.APIError):
        list(gateway.client().chat.completions.create(**CHAT, stream=True))


def test_client_disconnect_mid_stream_cancels_the_upstream_and_settles_usage(
    gateway: RunningGateway, upstream: FakeOpenAIUpstream
) -> None:
    upstream.script(Behaviour.slow_stream(chunks=200, chunk_delay_ms=20))
    with httpx.stream("POST", gateway.v1 + "/chat/completions", headers={"authorization": "Bearer sk-alpha"},
                      json={**CHAT, "stream": True}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    assert upstream.wait_for_disconnect(timeout=5), "the gateway kept the upstream stream open"
    assert upstream.disconnects[0].chunks_sent < 200
    record = gateway.usage.wait_for(1)[0]
    assert record.outcome == "client_disconnected"
    assert record.usage is not None and record.usage.estimated and record.usage.prompt_tokens > 0


def test_an_unknown_message_role_is_refused_before_any_upstream_call(gateway: RunningGateway,
                                                                     upstream: FakeOpenAIUpstream) -> None:
    """llama-cpp-python had answered a role outside OpenAI's with a 500 carrying its file paths."""
    turns = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]
    response = _post(gateway, {**CHAT, "messages": turns})
    assert response.status_code == 400
    assert _error(response) == {"message": "Invalid value: 'robot'. Supported values are: 'system', 'developer', "
                                "'user', 'assistant', 'tool', and 'function'.", "type": "invalid_request_error",
                                "param": "messages[1].role", "code": "invalid_value"}
    for role in (5, ["user"], {"user": 1}, None):
        response = _post(gateway, {**CHAT, "messages": [{"role": role, "content": "x"}]})
        assert response.status_code == 400 and _error(response)["param"] == "messages[0].role", response.text
    assert upstream.request_count == 0
    every_role = [{"role": "system", "content": "s"}, {"role": "developer", "content": "d"},
                  {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                  {"role": "tool", "content": "t", "tool_call_id": "call_1"},
                  {"role": "function", "content": "f", "name": "lookup"}]
    assert _post(gateway, {**CHAT, "messages": every_role}).status_code == 200
    assert upstream.request_count == 1
