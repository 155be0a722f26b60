"""Behaviours of real servers that fakes written from OpenAI's documentation never show.

FastAPI-shaped 422s (llama-cpp-python, TGI), validation reports sent as a 500 (llama-cpp-python), streams that
end with `[DONE]` but no finish reason (llama-cpp-python's interrupted ones), integers beyond 64 bits,
`prompt: null`. The real servers themselves are exercised in tests/test_selfhosted_servers.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import orjson
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
    assert error["param"] == "messages[0].role"
    assert error["type"] == "invalid_request_error"
    assert error["message"] == ("messages[0].role: Input should be 'system', 'user' or 'assistant' "
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


# llama-cpp-python 0.3.36's answer to a tool message without `tool_call_id`, as the suite's real server sent it
# (tests/test_selfhosted_servers.py), shortened to three of its six errors.
_REPORT_500 = {"error": {"message": (
    "3 validation errors:\n"
    "  {'type': 'literal_error', 'loc': ('body', 'messages', 0, 'ChatCompletionRequestUserMessage', 'role'), "
    "'msg': \"Input should be 'user'\", 'input': 'tool', 'ctx': {'expected': \"'user'\"}}\n"
    "  {'type': 'missing', 'loc': ('body', 'messages', 0, 'ChatCompletionRequestToolMessage', 'tool_call_id'), "
    "'msg': 'Field required', 'input': {'role': 'tool', 'content': 'sk-secret-in-the-input'}}\n"
    "  {'type': 'literal_error', 'loc': ('body', 'messages', 0, 'ChatCompletionRequestFunctionMessage', 'role'), "
    "'msg': \"Input should be 'function'\", 'input': 'tool', 'ctx': {'expected': \"'function'\"}}\n\n"
    "  File \"/opt/llama/site-packages/llama_cpp/server/app.py\", line 376, in create_chat_completion\n"
    "    POST /v1/chat/completions"), "type": "internal_server_error", "param": None, "code": None}}


def test_a_validation_report_sent_as_a_500_is_a_400_that_leaks_nothing_and_trips_no_breaker(
        upstream: FakeOpenAIUpstream, tmp_path: Path) -> None:
    """Any one failure counted against this target would eject it (`consecutive_failures: 1`, one team enough)."""
    policy = f"""
providers:
  llama: {{kind: llamacpp, base_url: {upstream.base_url}}}
models:
  llama:
    circuit_breaker: {{consecutive_failures: 1, cooldown_s: 60, min_callers: 1}}
    targets: [{{provider: llama, model: tiny}}]
"""
    with serving(tmp_path / "policy.yaml", policy) as gateway:
        upstream.script(*[Behaviour(status=500, body=_REPORT_500)] * 3)
        for _ in range(3):
            response = httpx.post(gateway.v1 + "/chat/completions", headers={"authorization": "Bearer sk-alpha"},
                                  json={"model": "llama", "messages": [{"role": "tool", "content": "x"}]})
            assert response.status_code == 400, response.text
            assert response.json() == {"error": {
                "message": "messages[0].tool_call_id: Field required", "type": "invalid_request_error",
                "param": "messages[0].tool_call_id", "code": "invalid_request"}}
        reply = gateway.client().chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "echo: hi"


def test_other_500s_keep_their_message_but_not_the_servers_source_locations(gateway: RunningGateway,
                                                                           upstream: FakeOpenAIUpstream) -> None:
    message = ("Llama model must be created with embedding=True to call this method\n"
               "Traceback (most recent call last):\n  File \"/opt/llama/llama_cpp/llama.py\", line 9, in embed")
    upstream.script(Behaviour.error(500, message))
    with pytest.raises(openai.InternalServerError) as caught:
        gateway.client().chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 502
    assert "embedding=True" in caught.value.message
    assert "/opt/llama" not in caught.value.message and "Traceback" not in caught.value.message


def _sse(*events: dict[str, object]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def _chunk(delta: dict[str, object], finish_reason: str | None = None) -> dict[str, object]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "tiny",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def _interrupted(*deltas: dict[str, object]) -> Behaviour:
    """What llama-cpp-python sends when another request arrives mid-stream: `[DONE]` with no finish reason."""
    return Behaviour(status=200, body=_sse(*(_chunk(d) for d in deltas)), headers={"Content-Type": "text/event-stream"})


def test_a_stream_stopped_with_done_but_no_finish_reason_is_retried_or_reported(upstream: FakeOpenAIUpstream,
                                                                                tmp_path: Path) -> None:
    policy = f"""
providers:
  llama: {{kind: llamacpp, base_url: {upstream.base_url}}}
models:
  llama:
    retries: 1
    backoff: {{initial_s: 0, max_s: 0}}
    targets: [{{provider: llama, model: tiny}}]
"""
    with serving(tmp_path / "policy.yaml", policy) as gateway:
        # Before any content: invisible to the client, retried.
        upstream.script(_interrupted({"role": "assistant", "content": ""}))
        raw = gateway.client().chat.completions.with_raw_response.create(
            model="llama", stream=True, messages=[{"role": "user", "content": "again"}])
        chunks = list(raw.parse())
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: again"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert raw.headers["x-switchboard-route"] == "llama@llama:503,llama@llama:ok"
        assert upstream.requests[-1].header("connection") == "close"  # see test_selfhosted_servers' overflow
        # After content: the client is told, instead of getting a short answer that looks complete.
        upstream.script(_interrupted({"role": "assistant", "content": ""}, {"content": "half an"}))
        seen: list[str] = []
        with pytest.raises(openai.APIError) as caught:
            for chunk in gateway.client().chat.completions.create(
                    model="llama", stream=True, messages=[{"role": "user", "content": "x"}]):
                seen += [c.delta.content or "" for c in chunk.choices]
        assert "".join(seen) == "half an"
        assert "stopped the stream before the answer's end" in caught.value.message


def test_a_json_schema_response_format_reaches_llamacpp_as_json_object_with_its_schema(
        gateway: RunningGateway, upstream: FakeOpenAIUpstream) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    gateway.client().chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}],
                                             response_format={"type": "json_schema",
                                                              "json_schema": {"name": "n", "schema": schema}})
    assert upstream.last_request is not None
    assert upstream.last_request.json["response_format"] == {"type": "json_object", "schema": schema}
    for kept in ({"type": "json_object"}, {"type": "text"}):
        gateway.client().chat.completions.create(model="llama", messages=[{"role": "user", "content": "hi"}],
                                                 response_format=kept)  # type: ignore[arg-type]
        assert upstream.last_request.json["response_format"] == kept
