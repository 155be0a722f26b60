"""The `llamacpp` kind against real servers nobody here wrote, serving a tiny model the tests generate.

Two implementations of the same kind, started once per module on free ports (tests/real_servers.py):
`llama-server` (llama.cpp's C++ server, from the xllamacpp wheel) and `llama-cpp-python` (its FastAPI server).
Through the gateway with the openai SDK: every call had failed on llama-cpp-python (the gateway's request id
was not a UUID), `max_completion_tokens: 5` had produced 2,032 tokens, `include_usage` had got no usage chunk,
a streamed context overflow had ended in a 502 (the server drops the connection after it), an unknown role in a
500 carrying the server's file paths, and a stream interrupted by another request looked complete. The tiny
model never emits its end token, so a reply runs exactly to the cap, one token per chunk.
"""

from __future__ import annotations

import base64
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests import real_servers
from tests.conftest import RunningGateway, key_hash, serving

SERVERS = ["llama-server", "llama-cpp-python"]
_STARTERS = {"llama-server": real_servers.llama_server, "llama-cpp-python": real_servers.llama_cpp_python}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return real_servers.write_tiny_model(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest, tiny_model: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[real_servers.RunningServer]:
    with _STARTERS[request.param](tiny_model, tmp_path_factory.mktemp(request.param)) as running:
        yield running


@pytest.fixture(scope="module")
def gateway(server: real_servers.RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    policy = f"""
providers:
  local:
    kind: llamacpp
    base_url: {server.base_url}
    timeouts: {{connect_s: 5, first_byte_s: 60, total_s: 120}}
models:
  tiny:
    targets: [{{provider: local, model: tiny}}]
  tiny-small-window:
    context_window: 100000
    fallbacks: {{context_window: [tiny-fallback]}}
    targets: [{{provider: local, model: tiny}}]
  tiny-fallback:
    targets: [{{provider: local, model: tiny}}]
  tiny-strict:
    circuit_breaker: {{consecutive_failures: 1, cooldown_s: 600, min_callers: 1}}
    targets: [{{provider: local, model: tiny}}]
"""
    with serving(tmp_path_factory.mktemp("gateway") / "policy.yaml", policy) as running:
        yield running


def _cells(feature: str = "text", endpoint: str = "chat") -> pytest.MarkDecorator:
    return pytest.mark.conformance(provider={s: s for s in SERVERS}, endpoint=endpoint, feature=feature, by="server")


@pytest.fixture
def server_name(server: real_servers.RunningServer) -> str:
    return server.name


@pytest.fixture
def sent(gateway: RunningGateway) -> RunningGateway:
    gateway.usage.clear()
    return gateway


@_cells()
@pytest.mark.parametrize("stream", [False, True])
def test_chat_answers_with_the_clients_own_request_id(sent: RunningGateway, server_name: str, stream: bool) -> None:
    """A request id that is no UUID (the client's here) reached llama-cpp-python as one, so it answered."""
    client = sent.client()
    headers = {"x-request-id": "trace-me-1"}
    messages = [{"role": "user", "content": "hello world"}]
    if stream:
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, stream=True,
                                                     extra_headers=headers))  # type: ignore[arg-type]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    else:
        raw = client.chat.completions.with_raw_response.create(model="tiny", messages=messages,  # type: ignore[arg-type]
                                                               max_tokens=6, extra_headers=headers)
        assert raw.headers["x-request-id"] == "trace-me-1"
        reply = raw.parse()
        text = reply.choices[0].message.content or ""
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage is not None and reply.usage.completion_tokens == 6
    assert text.strip() and set(text.replace(" ", "")) <= set("abcdefghijklmnopqrstuvwxyz,.!?:|<>\n")


@pytest.mark.parametrize("stream", [False, True])
def test_max_completion_tokens_is_the_cap_the_server_applies(sent: RunningGateway, stream: bool) -> None:
    """max_completion_tokens: 5 had produced 2,032 tokens on llama-cpp-python, all billed, 5 reserved."""
    client = sent.client()
    messages = [{"role": "user", "content": "hello"}]
    if stream:
        chunks = list(client.chat.completions.create(model="tiny", messages=messages,  # type: ignore[arg-type]
                                                     max_completion_tokens=5, stream=True))
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 5
    else:
        reply = client.chat.completions.create(model="tiny", messages=messages,  # type: ignore[arg-type]
                                               max_completion_tokens=5)
        assert reply.usage is not None and reply.usage.completion_tokens == 5
    (record,) = sent.usage.wait_for(1)
    assert record.usage is not None and record.usage.completion_tokens == 5


def test_include_usage_gets_exactly_one_usage_chunk(sent: RunningGateway, server_name: str) -> None:
    """llama-cpp-python ignores stream_options: the gateway sends the one usage chunk, marked estimated."""
    chunks = list(sent.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True}))
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    usage = usage_chunks[0].usage
    assert usage is not None and usage.prompt_tokens > 0
    estimated = ((usage_chunks[0].model_extra or {}).get("switchboard") or {}).get("usage_estimated", False)
    (record,) = sent.usage.wait_for(1)
    assert record.usage is not None and record.usage.estimated is estimated
    if server_name == "llama-server":
        assert not estimated and usage.completion_tokens == 4  # the server's own count
    else:  # the version the issue was found with sent none; either way the client gets exactly one
        assert usage.completion_tokens == 4 if not estimated else usage.completion_tokens > 0


@_cells(endpoint="messages")
@pytest.mark.parametrize("stream", [False, True])
def test_the_messages_front_door_serves_it(sent: RunningGateway, server_name: str, stream: bool) -> None:
    client = anthropic.Anthropic(base_url=sent.base_url, api_key="sk-alpha", max_retries=0)
    if stream:
        with client.messages.stream(model="tiny", max_tokens=5,
                                    messages=[{"role": "user", "content": "hello"}]) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(model="tiny", max_tokens=5, messages=[{"role": "user", "content": "hello"}])
    assert message.stop_reason == "max_tokens"
    assert message.content and message.content[0].type == "text" and message.content[0].text.strip()


@_cells(endpoint="responses")
@pytest.mark.parametrize("stream", [False, True])
def test_the_responses_front_door_serves_it(sent: RunningGateway, server_name: str, stream: bool) -> None:
    """The model never stops by itself, so the answer is `incomplete` at `max_output_tokens`, as OpenAI's would be."""
    client = sent.client()
    if stream:
        with client.responses.stream(model="tiny", input="hello", max_output_tokens=5) as events:
            seen = list(events)
        text = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
        assert seen[-1].type == "response.incomplete"
        response = seen[-1].response
    else:
        response = client.responses.create(model="tiny", input="hello", max_output_tokens=5)
        text = response.output_text
    assert text.strip()
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"


def test_completions_take_a_null_prompt(sent: RunningGateway) -> None:
    reply = sent.client().completions.create(model="tiny", prompt=None, max_tokens=3)  # type: ignore[arg-type]
    assert reply.choices[0].text.strip()


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_beyond_the_context_window_is_a_context_error_and_falls_back(sent: RunningGateway, server_name: str,
                                                                             stream: bool) -> None:
    """llama-cpp-python ends a streamed overflow right after its headers (its 400 comes only without `stream`)."""
    long = [{"role": "user", "content": "hello world " * 400}]  # ~4,800 tokens; the servers' window is 512
    with pytest.raises(openai.BadRequestError) as caught:
        sent.client().chat.completions.create(model="tiny", messages=long, max_tokens=3,  # type: ignore[arg-type]
                                              stream=stream)
    assert caught.value.code == "context_length_exceeded"
    (record,) = sent.usage.wait_for(1)
    assert record.outcome == "context_length_exceeded"
    # The model's context-window fallback is tried (and fails the same way here: one server behind both).
    with pytest.raises(openai.BadRequestError) as caught:
        sent.client().chat.completions.with_raw_response.create(model="tiny-small-window", messages=long,
                                                                max_tokens=3, stream=stream)  # type: ignore[arg-type]
    route = caught.value.response.headers["x-switchboard-route"]
    assert route.startswith("tiny-small-window@local:400,tiny-fallback@local:400"), route


def test_an_unknown_role_is_refused_by_the_gateway_itself(sent: RunningGateway) -> None:
    """llama-cpp-python had answered it with a 500 naming its own source file (llama-server takes any role)."""
    raw = httpx.post(sent.v1 + "/chat/completions", headers={"authorization": "Bearer sk-alpha"},
                     json={"model": "tiny", "max_tokens": 3, "messages": [{"role": "robot", "content": "beep"}]})
    assert raw.status_code == 400
    error = raw.json()["error"]
    assert (error["param"], error["code"], error["type"]) == ("messages[0].role", "invalid_value",
                                                             "invalid_request_error")
    assert "x-switchboard-route" not in raw.headers  # no upstream was tried


def test_a_request_the_server_refuses_is_an_openai_400_that_trips_no_breaker(sent: RunningGateway,
                                                                             server_name: str) -> None:
    """A tool message without `tool_call_id`: llama-server takes it; llama-cpp-python answers a 500 whose message is
    pydantic's report and its source file. `tiny-strict` ejects its target on any one failure counted against it."""
    client = sent.client()
    messages = [{"role": "tool", "content": "beep"}]
    if server_name == "llama-server":
        assert client.chat.completions.create(model="tiny-strict", max_tokens=3, messages=messages)  # type: ignore[arg-type]
        return
    for _ in range(3):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="tiny-strict", max_tokens=3, messages=messages)  # type: ignore[arg-type]
        assert caught.value.status_code == 400
        assert caught.value.body == {"message": "messages[0].tool_call_id: Field required", "code": "invalid_request",
                                     "type": "invalid_request_error", "param": "messages[0].tool_call_id"}
    reply = client.chat.completions.create(model="tiny-strict", max_tokens=3,
                                           messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content


def test_a_stream_another_request_interrupts_is_reported_not_passed_off_as_complete(sent: RunningGateway,
                                                                                   server_name: str) -> None:
    """llama-cpp-python stops a running stream when a second request arrives (`interrupt_requests`), and ends it with
    `[DONE]` but no finish reason: a short answer that looked complete. llama-server queues the second request.

    The second request races the first stream's ~450 tokens (about 0.4 s here): on a busy machine it can arrive after
    they are all generated, and the stream then ends complete, with its finish reason. That attempt proves nothing,
    and the race is run again (CI lost it once, on a clean clone); a truncated stream passed off as complete fails
    at once, whichever attempt it comes in."""
    client = sent.client()
    for _ in range(5):
        stream = client.chat.completions.create(model="tiny", max_tokens=450, stream=True,
                                                messages=[{"role": "user", "content": "hello"}])
        chunks = iter(stream)
        text = ""
        while not text:  # the stream is under way: the server is generating when the second request arrives
            text += "".join(c.delta.content or "" for c in next(chunks).choices)
        second = client.chat.completions.create(model="tiny", max_tokens=3,
                                                messages=[{"role": "user", "content": "hi"}])
        assert second.choices[0].finish_reason == "length"
        finish: list[str] = []
        try:
            for chunk in chunks:
                finish += [c.finish_reason for c in chunk.choices if c.finish_reason]
        except openai.APIError as error:
            assert server_name == "llama-cpp-python", error  # llama-server finishes every stream it starts
            assert finish == [] and "stopped the stream before the answer's end" in error.message
            return
        assert finish == ["length"]  # complete: never a stream cut short without an error
        if server_name == "llama-server":
            return
    pytest.fail("the second request never arrived while the first stream was being generated (5 attempts)")


@pytest.fixture(scope="module", params=SERVERS)
def embedding_gateway(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[RunningGateway]:
    """Each server in embeddings mode (llama-server serves nothing else then), on a model that declares pooling."""
    workdir = tmp_path_factory.mktemp(f"{request.param}-embed")
    model = real_servers.write_tiny_model(workdir / "tiny-embed.gguf", pooled=True)
    with _STARTERS[request.param](model, workdir, embedding=True) as running:
        policy = f"""
providers:
  local: {{kind: llamacpp, base_url: {running.base_url}}}
models:
  tiny-embed: {{targets: [{{provider: local, model: tiny}}]}}
"""
        with serving(workdir / "policy.yaml", policy) as gateway:
            yield gateway


@pytest.mark.conformance(provider={s: s for s in SERVERS}, endpoint="embeddings", feature="text", stream=False,
                         by="embedding_gateway")
@pytest.mark.parametrize("encoding_format", ["float", "base64", None])
def test_embeddings_are_one_vector_per_input_in_the_encoding_asked_for(embedding_gateway: RunningGateway,
                                                                      encoding_format: str | None) -> None:
    """llama-cpp-python sends floats when asked for base64: a client decoding base64 itself could not read them.
    Without `encoding_format` the openai SDK asks for base64 and decodes it."""
    embedding_gateway.usage.clear()
    reply = embedding_gateway.client().embeddings.create(
        model="tiny-embed", input=["hello world", "the cat sat"],
        **({"encoding_format": encoding_format} if encoding_format else {}))  # type: ignore[arg-type]
    assert [d.index for d in reply.data] == [0, 1]
    vectors: list[Any] = [d.embedding for d in reply.data]
    if encoding_format == "base64":
        assert all(isinstance(v, str) for v in vectors)
        vectors = [list(struct.unpack(f"<{real_servers.N_EMBD}f", base64.b64decode(v))) for v in vectors]
    assert all(len(v) == real_servers.N_EMBD and all(isinstance(x, float) for x in v) for v in vectors)
    assert vectors[0] != vectors[1]
    assert reply.usage.prompt_tokens > 0
    (record,) = embedding_gateway.usage.wait_for(1)
    assert record.usage is not None and record.usage.prompt_tokens == reply.usage.prompt_tokens


@pytest.mark.conformance(provider={"llama-server": "llama-server"}, endpoint="chat", feature="cached_usage",
                         by="server")
@pytest.mark.parametrize("stream", [False, True])
def test_a_repeated_prompt_reports_the_servers_cached_tokens(sent: RunningGateway, server_name: str,
                                                             stream: bool) -> None:
    """llama-server reuses its KV cache for a prompt it has just seen and says so; llama-cpp-python reports none."""
    client = sent.client()
    messages = [{"role": "user", "content": f"the quick cat sat on the big mat {stream} " * 8}]
    for _ in range(2):
        if stream:
            *_, last = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2,  # type: ignore[arg-type]
                                                      stream=True, stream_options={"include_usage": True})
            usage = last.usage
        else:
            usage = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2).usage  # type: ignore[arg-type]
    assert usage is not None
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    record = sent.usage.wait_for(2)[1]
    assert record.usage is not None and record.usage.cached_tokens == cached
    if server_name == "llama-server":
        assert 0 < (cached or 0) < usage.prompt_tokens
    else:
        assert not cached


def test_each_server_has_its_own_health_path(server: real_servers.RunningServer, server_name: str,
                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """`health_check.path` defaults to `/health`, which llama-server serves and llama-cpp-python does not (404). Its
    `/v1/models` takes the model's lock, so a check there would cut running streams (`interrupt_requests`);
    `/openapi.json` answers without it: a stream runs to its end while checks go on twenty times a second."""
    check = "interval_s: 0.05, timeout_s: 2, unhealthy_after: 1"
    policy = f"""
providers:
  at-health: {{kind: llamacpp, base_url: {server.base_url}, health_check: {{path: /health, {check}}}}}
  at-openapi: {{kind: llamacpp, base_url: {server.base_url}, health_check: {{path: /openapi.json, {check}}}}}
models:
  via-health: {{targets: [{{provider: at-health, model: tiny}}]}}
  via-openapi: {{targets: [{{provider: at-openapi, model: tiny}}]}}
admin:
  keys: [{{id: ops, hash: "{key_hash('sk-ops')}"}}]
"""
    works, fails = ("via-health", "via-openapi") if server_name == "llama-server" else ("via-openapi", "via-health")
    with serving(tmp_path_factory.mktemp("health") / "policy.yaml", policy) as gateway:
        client = gateway.client()

        def healthy() -> dict[str, bool]:
            rows = httpx.get(gateway.base_url + "/admin/targets", headers={"authorization": "Bearer sk-ops"}).json()
            return {row["provider"]: row["healthy"] for row in rows["data"]}

        ticker = threading.Event()
        for _ in range(200):
            if healthy().get("at-" + fails.removeprefix("via-")) is False:
                break
            ticker.wait(0.02)  # polling the gateway's view of a background check: no event to wait on
        assert healthy() == {"at-" + works.removeprefix("via-"): True, "at-" + fails.removeprefix("via-"): False}
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=fails, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 503 and caught.value.code == "no_healthy_target"
        chunks = list(client.chat.completions.create(model=works, max_tokens=300, stream=True,
                                                     messages=[{"role": "user", "content": "hello"}]))
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 300


class Reading(BaseModel):
    """Bounded, so a random model under the servers' grammar reaches the closing brace well within its cap."""

    word: str = Field(max_length=6)
    count: int = Field(ge=0, le=99)


@_cells(feature="json_schema")
@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_parses_on_the_chat_front_door(sent: RunningGateway, stream: bool) -> None:
    """llama-cpp-python refuses `response_format.type: json_schema` (400): it is sent as `json_object` + `schema`."""
    client, ask = sent.client(), [{"role": "user", "content": "hello"}]
    if stream:
        with client.chat.completions.stream(model="tiny", messages=ask, response_format=Reading,  # type: ignore[arg-type]
                                            max_tokens=80) as events:
            final = events.get_final_completion()
    else:
        final = client.chat.completions.parse(model="tiny", messages=ask, response_format=Reading,  # type: ignore[arg-type]
                                              max_tokens=80)
    assert final.choices[0].finish_reason == "stop"
    assert isinstance(final.choices[0].message.parsed, Reading)


@_cells(endpoint="responses", feature="json_schema")
@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_parses_on_the_responses_front_door(sent: RunningGateway, stream: bool) -> None:
    client = sent.client()
    if stream:
        with client.responses.stream(model="tiny", input="hello", text_format=Reading, max_output_tokens=80) as events:
            parsed = events.get_final_response().output_parsed
    else:
        parsed = client.responses.parse(model="tiny", input="hello", text_format=Reading,
                                        max_output_tokens=80).output_parsed
    assert isinstance(parsed, Reading)


@_cells(endpoint="messages", feature="json_schema")
@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_parses_on_the_messages_front_door(sent: RunningGateway, stream: bool) -> None:
    client = anthropic.Anthropic(base_url=sent.base_url, api_key="sk-alpha", max_retries=0)
    schema = Reading.model_json_schema() | {"additionalProperties": False}
    ask: dict[str, Any] = {"model": "tiny", "max_tokens": 80, "messages": [{"role": "user", "content": "hello"}],
                           "extra_body": {"output_config": {"format": {"type": "json_schema", "schema": schema}}}}
    if stream:
        with client.messages.stream(**ask) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**ask)
    assert message.stop_reason == "end_turn" and message.content[0].type == "text"
    Reading.model_validate_json(message.content[0].text)
