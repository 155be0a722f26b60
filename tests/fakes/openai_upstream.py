"""A fake OpenAI-compatible upstream: a real aiohttp server on loopback for tests and load tests.

In tests it runs on its own thread and event loop behind a synchronous API::

    with FakeOpenAIUpstream() as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="k", max_retries=0)
        fake.script(Behaviour.rate_limited(retry_after=2))
        ...                                   # first request gets a 429, later ones succeed
        assert fake.last_request.json["model"] == "gpt-4o-mini"

As a separate process (load tests)::

    python -m tests.fakes.openai_upstream --port 9100 --stream-chunks 20

Replies are deterministic: text is ``"echo: <last user text>"``, tool calls and structured outputs are
minimal valid instances of the request's JSON schema, and token counts are whitespace-separated words,
computed the same way for streamed and non-streamed replies.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import hashlib
import itertools
import random
import signal
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import orjson
from aiohttp import web

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-3.5-turbo-instruct", "text-embedding-3-small")
TOOL_CALL_ID = "call_fake_1"

_CHAT = "/v1/chat/completions"
_COMPLETIONS = "/v1/completions"
_EMBEDDINGS = "/v1/embeddings"
_MODELS = "/v1/models"
_HEALTH = "/health"
# A behaviour without an explicit path is consumed only by these, so a gateway's health checks and
# model listings never eat a behaviour a test scripted for its next completion.
_INFERENCE_PATHS = frozenset({_CHAT, _COMPLETIONS, _EMBEDDINGS})

_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
_JSON_TYPE = "application/json"
_DONE = b"data: [DONE]\n\n"


# --- public data types -------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it.

    ``headers`` has lowercase keys (a repeated header keeps its last value); ``json`` is the parsed
    body or None when the body is empty or not JSON; ``received_at`` is ``time.monotonic()``;
    ``peer`` is the client's (host, port): requests with the same peer came over the same connection.
    """

    method: str
    path: str
    query_string: str
    headers: dict[str, str]
    body: bytes
    json: Any
    received_at: float
    peer: tuple[str, int] | None = None

    def header(self, name: str) -> str | None:
        """Return a header's value, matching the name case-insensitively."""
        return self.headers.get(name.lower())


@dataclass(frozen=True)
class ClientDisconnect:
    """The client went away before the fake finished responding.

    ``request_index`` indexes ``FakeOpenAIUpstream.requests`` (-1 when recording is off);
    ``chunks_sent`` counts SSE events written before the disconnect was noticed.
    """

    request_index: int
    path: str
    streaming: bool
    chunks_sent: int
    at: float


@dataclass(frozen=True)
class Behaviour:
    """A scripted reaction for one request; queue it with ``FakeOpenAIUpstream.script``.

    Steps run in this order, each only if set: wait ``delay_ms`` (before any byte is sent), ``hang``
    until ``release()``/``reset()``/``stop()``, ``close_connection`` (no response at all), answer
    ``status`` with ``body``/``headers``. Without ``status`` the normal reply is sent, shaped by the
    remaining fields. Prefer the constructors (``Behaviour.error(500)``, ``Behaviour.hanging()``...).

    Fields:
        path: only a request to this path consumes the behaviour; None means any POST inference route.
        status, body, headers: a canned response. ``body`` is JSON-encoded unless it is bytes; when
            None it is an OpenAI error body for status >= 400, else ``{}``.
        delay_ms: extra delay before the response headers (slow first byte).
        hang: never respond until released; the released request then gets the normal reply.
        close_connection: close the TCP connection without sending anything.
        stream_chunks: content chunks for this reply (overrides the server default).
        chunk_delay_ms: delay between SSE events (overrides the server default).
        drop_after_chunks: send this many SSE events (the role chunk counts), then close the
            connection without ``[DONE]``. A non-streamed reply sends its headers and half its body.
        stream_error: with ``drop_after_chunks``, send ``data: {"error": stream_error}`` before closing.
        end_delay_ms: after a stream's last event, wait this long before ending the response body, as a
            server does whose end of body trails its ``[DONE]``.
        content: replace the generated text content.
        overrun: ignore the request's token caps, as a server that reads another cap field does.
        no_usage: report no usage, streamed or not, as llama-cpp-python ignores `stream_options`.
        tail_in_one_write: write a stream's last three events (the last content chunk, the usage chunk when
            asked for, ``[DONE]``) in one write, as servers that buffer their output do, so the gateway reads
            the end of the answer and its terminator in one read.
    """

    path: str | None = None
    status: int | None = None
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_ms: float = 0.0
    hang: bool = False
    close_connection: bool = False
    stream_chunks: int | None = None
    chunk_delay_ms: float | None = None
    drop_after_chunks: int | None = None
    stream_error: Mapping[str, Any] | None = None
    end_delay_ms: float = 0.0
    content: str | None = None
    overrun: bool = False
    no_usage: bool = False
    tail_in_one_write: bool = False

    @classmethod
    def error(
        cls,
        status: int,
        message: str | None = None,
        *,
        type: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        path: str | None = None,
    ) -> Behaviour:
        """Answer with ``status`` and an OpenAI error body ``{"error": {message, type, param, code}}``."""
        return cls(path=path, status=status, body=error_body(status, message, type, code), headers=headers or {})

    @classmethod
    def rate_limited(cls, retry_after: float = 1.0, *, path: str | None = None) -> Behaviour:
        """Answer 429 with ``retry-after`` and ``x-ratelimit-*`` headers as OpenAI sends them."""
        headers = {
            "retry-after": f"{retry_after:g}",
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": f"{retry_after:g}s",
        }
        return cls.error(429, "Rate limit reached (fake upstream)", headers=headers, path=path)

    @classmethod
    def hanging(cls, *, path: str | None = None) -> Behaviour:
        """Never respond until ``release()``, ``reset()`` or ``stop()`` (for timeout tests)."""
        return cls(path=path, hang=True)

    @classmethod
    def slow_first_byte(cls, delay_ms: float, *, path: str | None = None) -> Behaviour:
        """Wait ``delay_ms`` before sending the response headers, then reply normally."""
        return cls(path=path, delay_ms=delay_ms)

    @classmethod
    def abrupt_close(cls, *, path: str | None = None) -> Behaviour:
        """Close the connection without sending a response."""
        return cls(path=path, close_connection=True)

    @classmethod
    def die_mid_stream(cls, after_chunks: int = 2, *, path: str | None = None) -> Behaviour:
        """Send ``after_chunks`` SSE events, then drop the connection (no ``[DONE]``, no usage)."""
        return cls(path=path, drop_after_chunks=after_chunks)

    @classmethod
    def error_mid_stream(
        cls, after_chunks: int = 2, message: str = "upstream failed mid-stream", *, path: str | None = None
    ) -> Behaviour:
        """Send ``after_chunks`` SSE events, then an SSE ``error`` event, then close."""
        error = {"message": message, "type": "server_error", "param": None, "code": None}
        return cls(path=path, drop_after_chunks=after_chunks, stream_error=error)

    @classmethod
    def slow_stream(cls, chunks: int = 100, chunk_delay_ms: float = 50.0, *, path: str | None = None) -> Behaviour:
        """Stream ``chunks`` content chunks ``chunk_delay_ms`` apart, so a client can leave mid-stream."""
        return cls(path=path, stream_chunks=chunks, chunk_delay_ms=chunk_delay_ms)


def error_body(
    status: int,
    message: str | None = None,
    type: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """Build an OpenAI-shaped error body, filling type/code with what OpenAI uses for ``status``."""
    default_type, default_code = _ERROR_TYPES.get(status, ("server_error" if status >= 500 else "api_error", None))
    return {
        "error": {
            "message": message or f"fake upstream error {status}",
            "type": type or default_type,
            "param": None,
            "code": code if code is not None else default_code,
        }
    }


# --- deterministic content ---------------------------------------------------------------------


def count_tokens(text: str) -> int:
    """The fake's token count: whitespace-separated words."""
    return len(text.split())


def minimal_instance(schema: Mapping[str, Any], root: Mapping[str, Any] | None = None, _depth: int = 0) -> Any:
    """Return a small value valid against a JSON schema of the kind pydantic and tool authors write.

    Objects get their required properties only; strings "x" (or a sample for common formats), numbers
    1 (moved into minimum/maximum bounds), booleans true, arrays their minimum length. ``enum``/
    ``const`` give their first value, ``anyOf``/``oneOf`` their first non-null branch, and local
    ``$ref``s (``#/$defs/...``) are followed.
    """
    root = schema if root is None else root
    if _depth > 64:  # a self-referential schema that requires itself has no finite instance
        return None
    nested = _depth + 1
    if "$ref" in schema:
        return minimal_instance(_resolve_ref(root, schema["$ref"]), root, nested)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            branches = [b for b in schema[key] if b.get("type") != "null"] or schema[key]
            return minimal_instance(branches[0], root, nested)
    if "allOf" in schema:
        parts = [minimal_instance(part, root, nested) for part in schema["allOf"]]
        if all(isinstance(part, dict) for part in parts):
            return {k: v for part in parts for k, v in part.items()}
        return parts[0] if parts else None

    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"

    if kind == "object":
        properties = schema.get("properties", {})
        return {
            name: minimal_instance(properties[name], root, nested) if name in properties else "x"
            for name in schema.get("required", [])
        }
    if kind == "array":
        items = schema.get("items")
        count = schema.get("minItems", 0)
        return [minimal_instance(items, root, nested) if isinstance(items, dict) else "x"] * count
    if kind in ("integer", "number"):
        return _bounded_number(schema, integer=kind == "integer")
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return _string_for(schema)


_FORMAT_SAMPLES = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00",
    "email": "x@example.com",
    "uri": "https://example.com",
    "uuid": "00000000-0000-0000-0000-000000000000",
}


def _string_for(schema: Mapping[str, Any]) -> str:
    sample = _FORMAT_SAMPLES.get(schema.get("format", ""), "x")
    return sample.ljust(schema.get("minLength", 0), "x")


def _bounded_number(schema: Mapping[str, Any], *, integer: bool) -> int | float:
    value: int | float = 1
    if "minimum" in schema and value < schema["minimum"]:
        value = schema["minimum"]
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        value = schema["exclusiveMinimum"] + 1
    if "maximum" in schema and value > schema["maximum"]:
        value = schema["maximum"]
    if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
        value = schema["exclusiveMaximum"] - 1
    return int(value) if integer else value


def _resolve_ref(root: Mapping[str, Any], ref: str) -> Mapping[str, Any]:
    if not ref.startswith("#"):
        raise ValueError(f"only local $refs are supported, got {ref!r}")
    node: Any = root
    for part in ref.lstrip("#").strip("/").split("/"):
        if part:
            node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _text_of(content: Any) -> str:
    """Text of a message ``content``: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _split(text: str, parts: int) -> list[str]:
    """Cut ``text`` into exactly ``parts`` contiguous slices (empty ones when text is short)."""
    parts = max(parts, 1)
    size, extra = divmod(len(text), parts)
    slices, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        slices.append(text[start:end])
        start = end
    return slices


def _truncate_words(text: str, limit: int) -> str:
    """Keep the first ``limit`` words of ``text`` (with the spacing between them)."""
    words = 0
    in_word = False
    for i, char in enumerate(text):
        if char.isspace():
            if in_word:
                words += 1
                if words == limit:
                    return text[:i]
            in_word = False
        else:
            in_word = True
    return text


def _embedding(text: str, dimensions: int) -> tuple[list[float], bytes]:
    """A deterministic vector for ``text``, as float32-exact floats and their little-endian bytes."""
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    rng = random.Random(seed)
    packed = struct.pack(f"<{dimensions}f", *(rng.uniform(-1.0, 1.0) for _ in range(dimensions)))
    return list(struct.unpack(f"<{dimensions}f", packed)), packed


@dataclass(frozen=True)
class _Reply:
    """What one choice says: text, or a single tool call."""

    text: str | None
    finish_reason: str
    tool_name: str | None = None
    arguments: str = ""

    @property
    def tokens(self) -> int:
        return count_tokens(self.arguments if self.text is None else self.text)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


_CAPS = ("max_tokens", "max_completion_tokens")


def _limit(text: str, body: Mapping[str, Any]) -> tuple[str, str]:
    """Apply the request's token limit; return the text and its finish_reason."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and 0 < limit < count_tokens(text):
        return _truncate_words(text, limit), "length"
    return text, "stop"


def _chat_reply(body: Mapping[str, Any], override: str | None) -> _Reply:
    messages = body.get("messages") or []
    user_text = next(
        (_text_of(m.get("content")) for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"),
        "",
    )
    tool = _chosen_tool(body)
    if tool is not None and override is None:
        function = tool["function"]
        arguments = _tool_arguments(function.get("parameters") or {}, user_text)
        return _Reply(None, "tool_calls", function.get("name", "tool"), orjson.dumps(arguments).decode())

    if override is not None:
        text = override
    else:
        response_format = body.get("response_format") or {}
        if response_format.get("type") == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema") or {}
            text = orjson.dumps(minimal_instance(schema)).decode()
        elif response_format.get("type") == "json_object":
            text = orjson.dumps({"echo": user_text}).decode()
        else:
            text = f"echo: {user_text}"
    text, finish_reason = _limit(text, body)
    return _Reply(text, finish_reason)


def _chosen_tool(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and t.get("type") == "function"]
    choice = body.get("tool_choice", "auto")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        wanted = choice["function"].get("name")
        return next((t for t in tools if t["function"].get("name") == wanted), tools[0])
    return tools[0]


def _tool_arguments(parameters: Mapping[str, Any], user_text: str) -> dict[str, Any]:
    """``{"echo": <text>}``, unless the schema requires other properties: then a minimal instance."""
    if not [name for name in parameters.get("required", []) if name != "echo"]:
        return {"echo": user_text}
    arguments = minimal_instance(parameters)
    if isinstance(arguments.get("echo"), str):
        arguments["echo"] = user_text
    return arguments


def _prompt_tokens(body: Mapping[str, Any]) -> int:
    return sum(count_tokens(_text_of(m.get("content"))) for m in body.get("messages") or [] if isinstance(m, dict))


def _prompts(prompt: Any) -> list[str]:
    """Legacy ``prompt``: a string, strings, a token array, or token arrays, each made into text."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) for p in prompt):
            return [" ".join(map(str, prompt))]
        return [p if isinstance(p, str) else " ".join(map(str, p)) for p in prompt]
    return [""]


# --- the server --------------------------------------------------------------------------------


@dataclass
class _Exchange:
    """Per-request state the disconnect recorder reads."""

    index: int
    path: str
    streaming: bool = False
    chunks_sent: int = 0


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# An endpoint gets the parsed JSON body and the behaviour that applies to this request.
_Endpoint = Callable[[web.Request, _Exchange, Any, Behaviour], Awaitable[web.StreamResponse]]


class _StreamFrames:
    """Builds ``data: {...}\\n\\n`` events that share id/created/model, from prebuilt byte slices."""

    __slots__ = ("_head", "_tail")

    def __init__(self, object_type: str, response_id: str, created: int, model: bytes, include_usage: bool) -> None:
        self._head = b'data: {"id":"%s","object":"%s","created":%d,"model":%s,"system_fingerprint":"fp_fake",' % (
            response_id.encode(),
            object_type.encode(),
            created,
            model,
        )
        # OpenAI sends "usage": null on every chunk once include_usage is on, and no key otherwise.
        self._tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"

    def choice(self, choice: Mapping[str, Any]) -> bytes:
        return self._head + b'"choices":[' + orjson.dumps(choice) + b"]" + self._tail

    def usage(self, usage: Mapping[str, Any]) -> bytes:
        return self._head + b'"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n"


class FakeOpenAIUpstream:
    """A fake OpenAI-compatible server; see the module docstring for an example.

    Args:
        host, port: where to listen; port 0 picks a free ephemeral port.
        latency_ms: delay before every response (except /health).
        stream_chunks: content chunks per streamed choice (tool arguments use up to this many fragments).
        chunk_delay_ms: delay between SSE events.
        require_api_key: when set, requests lacking ``Authorization: Bearer <key>`` get a 401.
        models: ids listed by ``GET /v1/models``.
        embedding_dimensions: vector length when the request has no ``dimensions``.
        record: keep every request in ``requests`` (the CLI turns this off for load tests).

    The state accessors and ``script``/``release``/``reset`` are thread-safe; the server thread only
    takes the lock for short, non-blocking updates.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_ms: float = 0.0,
        stream_chunks: int = 5,
        chunk_delay_ms: float = 0.0,
        require_api_key: str | None = None,
        models: Sequence[str] = DEFAULT_MODELS,
        embedding_dimensions: int = 16,
        record: bool = True,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.latency_ms = latency_ms
        self.stream_chunks = stream_chunks
        self.chunk_delay_ms = chunk_delay_ms
        self.require_api_key = require_api_key
        self.models = tuple(models)
        self.embedding_dimensions = embedding_dimensions
        self.record = record

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._requests: list[RecordedRequest] = []
        self._request_count = 0
        self._streams_ended = 0
        self._script: collections.deque[Behaviour] = collections.deque()
        self._disconnects: list[ClientDisconnect] = []
        self._ids = itertools.count(1)

        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._release: asyncio.Event | None = None
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self._models_body = orjson.dumps({"object": "list", "data": [self._model_entry(m) for m in self.models]})

    # -- lifecycle (sync, for tests) --

    def start(self) -> Self:
        """Start serving on a background thread; returns once the socket is listening."""
        if self._thread is not None:
            raise RuntimeError("FakeOpenAIUpstream is already running")
        sock = _bind(self.host, self._requested_port)
        loop = asyncio.new_event_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.serve(sock))
            except BaseException as exc:
                ready.set_exception(exc)
                loop.close()
                return
            ready.set_result(None)
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=serve, name="fake-openai-upstream", daemon=True)
        self._thread.start()
        try:
            ready.result(timeout=10)
        except BaseException:
            self._thread.join(timeout=5)
            self._thread = None
            raise
        return self

    def stop(self) -> None:
        """Stop the server; in-flight and hung requests are cut off. Safe to call twice."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(concurrent.futures.TimeoutError):
            asyncio.run_coroutine_threadsafe(self.shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- lifecycle (async, shared with the CLI) --

    async def serve(self, sock: socket.socket) -> None:
        """Start serving on an already bound socket in the running loop (the CLI's entry point)."""
        self._loop = asyncio.get_running_loop()
        self._release = asyncio.Event()
        self._stopping = False
        # handler_cancellation makes aiohttp cancel a handler as soon as its client disconnects,
        # which is what lets the fake notice a gateway abandoning a stream between two chunks.
        self._runner = web.AppRunner(self.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, backlog=1024).start()
        self._port = sock.getsockname()[1]

    async def shutdown(self) -> None:
        """Cut off in-flight requests and close the server (from the server's loop)."""
        self._stopping = True
        for task in list(self._in_flight):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def make_app(self) -> web.Application:
        """The aiohttp application; handlers close over this object's state."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(_CHAT, self._wrap(_CHAT, self._chat))
        app.router.add_post(_COMPLETIONS, self._wrap(_COMPLETIONS, self._completions))
        app.router.add_post(_EMBEDDINGS, self._wrap(_EMBEDDINGS, self._embeddings))
        app.router.add_get(_MODELS, self._wrap(_MODELS, self._list_models))
        app.router.add_get(_MODELS + "/{model:.+}", self._wrap(None, self._get_model))
        app.router.add_get(_HEALTH, self._wrap(_HEALTH, self._health))
        app.router.add_route("*", "/{tail:.*}", self._wrap(None, self._not_found))
        return app

    # -- addresses --

    @property
    def port(self) -> int:
        """The port the server listens on."""
        if self._port is None:
            raise RuntimeError("FakeOpenAIUpstream is not started")
        return self._port

    @property
    def url(self) -> str:
        """Server root, e.g. ``http://127.0.0.1:54321``."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, e.g. ``http://127.0.0.1:54321/v1``."""
        return self.url + "/v1"

    # -- scripting --

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours; each matching request takes the oldest one that applies to its path.

        A request with no applicable behaviour gets the normal reply. Repeat one with
        ``fake.script(*[Behaviour.error(503)] * 3)``.
        """
        with self._lock:
            self._script.extend(behaviours)

    @property
    def pending_behaviours(self) -> int:
        """Scripted behaviours not consumed yet."""
        with self._lock:
            return len(self._script)

    def release(self) -> None:
        """Let every currently hung request go on with its normal reply."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._release_hung)

    def reset(self) -> None:
        """Forget recordings, disconnects and queued behaviours, and release hung requests."""
        with self._lock:
            self._requests.clear()
            self._request_count = 0
            self._streams_ended = 0
            self._script.clear()
            self._disconnects.clear()
        self.release()

    # -- observations --

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the recorded requests, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def last_request(self) -> RecordedRequest | None:
        """The most recent recorded request, if any."""
        with self._lock:
            return self._requests[-1] if self._requests else None

    @property
    def request_count(self) -> int:
        """Requests received since start or the last ``reset()`` (counted even when not recording)."""
        with self._lock:
            return self._request_count

    @property
    def disconnects(self) -> list[ClientDisconnect]:
        """A snapshot of client disconnects noticed mid-response, oldest first."""
        with self._lock:
            return list(self._disconnects)

    @property
    def stream_disconnects(self) -> int:
        """How many streamed responses the client abandoned before ``[DONE]``."""
        with self._lock:
            return sum(d.streaming for d in self._disconnects)

    def wait_for_requests(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Block until ``count`` requests have arrived; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._request_count >= count, timeout)

    def wait_for_streams_ended(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Block until ``count`` streamed responses were written to their end of body; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._streams_ended >= count, timeout)

    def wait_for_disconnect(self, timeout: float = 5.0, count: int = 1) -> bool:
        """Block until ``count`` client disconnects have been noticed; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self._disconnects) >= count, timeout)

    # -- request plumbing --

    def _wrap(self, path: str | None, endpoint: _Endpoint) -> _Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            parsed = _loads(body)
            exchange = _Exchange(self._record(request, body, parsed), path or request.path)
            task = asyncio.current_task()
            assert task is not None
            self._in_flight.add(task)
            try:
                return await self._respond(request, exchange, endpoint, parsed)
            except asyncio.CancelledError:
                self._note_disconnect(exchange)
                raise
            except ConnectionResetError:
                # Returning (rather than raising) keeps aiohttp from logging it as a handler error.
                self._note_disconnect(exchange)
                return web.Response()
            finally:
                self._in_flight.discard(task)

        return handler

    async def _respond(
        self, request: web.Request, exchange: _Exchange, endpoint: _Endpoint, body: Any
    ) -> web.StreamResponse:
        path = exchange.path
        if path == _HEALTH:
            return await endpoint(request, exchange, body, _NORMAL)
        if self.require_api_key is not None and (
            request.headers.get("Authorization") != f"Bearer {self.require_api_key}"
        ):
            return _json_response(401, error_body(401, "Incorrect API key provided (fake upstream)"))

        behaviour = self._next_behaviour(path)
        delay = self.latency_ms + behaviour.delay_ms
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        if behaviour.hang:
            assert self._release is not None
            await self._release.wait()
        if behaviour.close_connection:
            _close(request)
            return web.Response()
        if behaviour.status is not None:
            payload = (
                behaviour.body
                if behaviour.body is not None
                else (error_body(behaviour.status) if behaviour.status >= 400 else {})
            )
            return _json_response(behaviour.status, payload, behaviour.headers)
        if path in _INFERENCE_PATHS and not isinstance(body, dict):
            return _json_response(400, error_body(400, "Request body must be a JSON object"))
        return await endpoint(request, exchange, body, behaviour)

    def _record(self, request: web.Request, body: bytes, parsed: Any) -> int:
        recorded = None
        if self.record:
            recorded = RecordedRequest(
                method=request.method,
                path=request.path,
                query_string=request.query_string,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
                json=parsed,
                received_at=time.monotonic(),
                peer=request.transport.get_extra_info("peername") if request.transport is not None else None,
            )
        with self._changed:
            self._request_count += 1
            index = -1
            if recorded is not None:
                index = len(self._requests)
                self._requests.append(recorded)
            self._changed.notify_all()
        return index

    def _note_disconnect(self, exchange: _Exchange) -> None:
        if self._stopping:  # our own shutdown cancelled the handler; the client did nothing
            return
        event = ClientDisconnect(
            exchange.index, exchange.path, exchange.streaming, exchange.chunks_sent, time.monotonic()
        )
        with self._changed:
            self._disconnects.append(event)
            self._changed.notify_all()

    def _next_behaviour(self, path: str) -> Behaviour:
        with self._lock:
            for i, behaviour in enumerate(self._script):
                if behaviour.path == path or (behaviour.path is None and path in _INFERENCE_PATHS):
                    del self._script[i]
                    return behaviour
        return _NORMAL

    def _release_hung(self) -> None:
        if self._release is not None:
            released, self._release = self._release, asyncio.Event()
            released.set()

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-fake{next(self._ids)}"

    async def _stream(
        self, request: web.Request, exchange: _Exchange, frames: Iterator[bytes], behaviour: Behaviour
    ) -> web.StreamResponse:
        exchange.streaming = True
        headers = {**_SSE_HEADERS, "x-request-id": self._new_id("req")}
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        delay_ms = self.chunk_delay_ms if behaviour.chunk_delay_ms is None else behaviour.chunk_delay_ms
        delay = delay_ms / 1000
        drop_after = behaviour.drop_after_chunks
        if behaviour.tail_in_one_write:
            listed = list(frames)
            frames = iter([*listed[:-3], b"".join(listed[-3:])])
        for frame in frames:
            if drop_after is not None and exchange.chunks_sent >= drop_after:
                if behaviour.stream_error is not None:
                    await response.write(b"data: " + orjson.dumps({"error": behaviour.stream_error}) + b"\n\n")
                _close(request)
                return response
            if delay > 0 and exchange.chunks_sent:
                await asyncio.sleep(delay)
            await response.write(frame)
            exchange.chunks_sent += 1
        if behaviour.end_delay_ms:
            await asyncio.sleep(behaviour.end_delay_ms / 1000)
        await response.write_eof()
        with self._changed:
            self._streams_ended += 1
            self._changed.notify_all()
        return response

    async def _respond_json(self, request: web.Request, payload: Any, behaviour: Behaviour) -> web.StreamResponse:
        body = orjson.dumps(payload)
        headers = {"Content-Type": _JSON_TYPE, "x-request-id": self._new_id("req")}
        if behaviour.drop_after_chunks is None:
            return web.Response(body=body, headers=headers)
        # Promise the whole body, deliver half: the client sees a truncated response.
        response = web.StreamResponse(headers={**headers, "Content-Length": str(len(body))})
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        _close(request)
        return response

    # -- endpoints --

    async def _chat(
        self, request: web.Request, exchange: _Exchange, body: dict[str, Any], behaviour: Behaviour
    ) -> web.StreamResponse:
        if not isinstance(body.get("messages"), list):
            return _json_response(400, error_body(400, "'messages' is a required property"))
        reply = _chat_reply({k: v for k, v in body.items() if k not in _CAPS} if behaviour.overrun else body,
                            behaviour.content)
        n = max(int(body.get("n") or 1), 1)
        model = body.get("model", "fake-model")
        response_id = self._new_id("chatcmpl")
        created = int(time.time())
        usage = None if behaviour.no_usage else _usage(_prompt_tokens(body), reply.tokens * n)
        chunks = self.stream_chunks if behaviour.stream_chunks is None else behaviour.stream_chunks

        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and usage is not None
            frames = _StreamFrames("chat.completion.chunk", response_id, created, orjson.dumps(model), include_usage)
            return await self._stream(
                request,
                exchange,
                _chat_frames(frames, reply, n, chunks, usage if include_usage else None),
                behaviour,
            )

        if reply.text is None:
            message = {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "annotations": [],
                "tool_calls": [
                    {
                        "id": TOOL_CALL_ID,
                        "type": "function",
                        "function": {"name": reply.tool_name, "arguments": reply.arguments},
                    }
                ],
            }
        else:
            message = {"role": "assistant", "content": reply.text, "refusal": None, "annotations": []}
        payload = {
            "id": response_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": i, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}
                for i in range(n)
            ],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }
        return await self._respond_json(request, payload, behaviour)

    async def _completions(
        self, request: web.Request, exchange: _Exchange, body: dict[str, Any], behaviour: Behaviour
    ) -> web.StreamResponse:
        prompts = _prompts(body.get("prompt"))
        n = max(int(body.get("n") or 1), 1)
        capped = {k: v for k, v in body.items() if k not in _CAPS} if behaviour.overrun else body
        texts = [_limit(behaviour.content if behaviour.content is not None else f"echo: {p}", capped) for p in prompts]
        # Legacy completions give each prompt n consecutive choices.
        choices = [texts[i // n] for i in range(len(prompts) * n)]
        model = body.get("model", "fake-model")
        response_id = self._new_id("cmpl")
        created = int(time.time())
        usage = None if behaviour.no_usage else _usage(sum(count_tokens(p) for p in prompts),
                                                      sum(count_tokens(t) for t, _ in choices))
        chunks = self.stream_chunks if behaviour.stream_chunks is None else behaviour.stream_chunks

        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and usage is not None
            frames = _StreamFrames("text_completion", response_id, created, orjson.dumps(model), include_usage)
            return await self._stream(
                request,
                exchange,
                _completion_frames(frames, choices, chunks, usage if include_usage else None),
                behaviour,
            )
        payload = {
            "id": response_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {"text": text, "index": i, "logprobs": None, "finish_reason": finish}
                for i, (text, finish) in enumerate(choices)
            ],
            "usage": usage,
            "system_fingerprint": "fp_fake",
        }
        return await self._respond_json(request, payload, behaviour)

    async def _embeddings(
        self, request: web.Request, exchange: _Exchange, body: dict[str, Any], behaviour: Behaviour
    ) -> web.StreamResponse:
        raw = body.get("input")
        if raw is None or raw == "" or raw == []:
            return _json_response(400, error_body(400, "'input' is a required property"))
        inputs = _prompts(raw)
        dimensions = int(body.get("dimensions") or self.embedding_dimensions)
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(inputs):
            floats, packed = _embedding(text, dimensions)
            vector: Any = base64.b64encode(packed).decode() if as_base64 else floats
            data.append({"object": "embedding", "index": i, "embedding": vector})
        tokens = sum(count_tokens(t) for t in inputs)
        payload = {
            "object": "list",
            "data": data,
            "model": body.get("model", "fake-embedding"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return await self._respond_json(request, payload, behaviour)

    async def _list_models(
        self, request: web.Request, exchange: _Exchange, body: Any, behaviour: Behaviour
    ) -> web.StreamResponse:
        return web.Response(body=self._models_body, content_type=_JSON_TYPE)

    async def _get_model(
        self, request: web.Request, exchange: _Exchange, body: Any, behaviour: Behaviour
    ) -> web.StreamResponse:
        model = request.match_info["model"]
        if model not in self.models:
            return _json_response(404, error_body(404, f"The model '{model}' does not exist"))
        return _json_response(200, self._model_entry(model))

    async def _health(
        self, request: web.Request, exchange: _Exchange, body: Any, behaviour: Behaviour
    ) -> web.StreamResponse:
        return web.Response(body=b'{"status":"ok"}', content_type=_JSON_TYPE)

    async def _not_found(
        self, request: web.Request, exchange: _Exchange, body: Any, behaviour: Behaviour
    ) -> web.StreamResponse:
        return _json_response(404, error_body(404, f"Unknown path {request.method} {request.path}", code="not_found"))

    @staticmethod
    def _model_entry(model: str) -> dict[str, Any]:
        return {"id": model, "object": "model", "created": 1715367049, "owned_by": "system"}


_NORMAL = Behaviour()


def _chat_frames(
    frames: _StreamFrames, reply: _Reply, n: int, chunks: int, usage: Mapping[str, Any] | None
) -> Iterator[bytes]:
    for index in range(n):
        if reply.text is None:
            # OpenAI streams a tool call as: one delta with id/type/name and empty arguments, then
            # deltas carrying only index + argument fragments.
            call = {
                "index": 0,
                "id": TOOL_CALL_ID,
                "type": "function",
                "function": {"name": reply.tool_name, "arguments": ""},
            }
            delta: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [call]}
            yield frames.choice({"index": index, "delta": delta, "logprobs": None, "finish_reason": None})
            for fragment in _split(reply.arguments, min(chunks, len(reply.arguments))):
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}
                yield frames.choice({"index": index, "delta": delta, "logprobs": None, "finish_reason": None})
        else:
            delta = {"role": "assistant", "content": "", "refusal": None}
            yield frames.choice({"index": index, "delta": delta, "logprobs": None, "finish_reason": None})
            for piece in _split(reply.text, chunks):
                yield frames.choice(
                    {"index": index, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}
                )
        yield frames.choice({"index": index, "delta": {}, "logprobs": None, "finish_reason": reply.finish_reason})
    if usage is not None:
        yield frames.usage(usage)
    yield _DONE


def _completion_frames(
    frames: _StreamFrames, choices: list[tuple[str, str]], chunks: int, usage: Mapping[str, Any] | None
) -> Iterator[bytes]:
    for index, (text, finish_reason) in enumerate(choices):
        for piece in _split(text, chunks):
            yield frames.choice({"text": piece, "index": index, "logprobs": None, "finish_reason": None})
        yield frames.choice({"text": "", "index": index, "logprobs": None, "finish_reason": finish_reason})
    if usage is not None:
        yield frames.usage(usage)
    yield _DONE


def _json_response(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    response = web.Response(status=status, body=body, headers=headers)
    if "Content-Type" not in response.headers:
        response.content_type = _JSON_TYPE
    return response


def _close(request: web.BaseRequest) -> None:
    """Close the client's TCP connection now (buffered bytes are still flushed first)."""
    if request.transport is not None:
        request.transport.close()


def _loads(body: bytes) -> Any:
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _bind(host: str, port: int) -> socket.socket:
    """Bind in the caller's thread so a busy port fails ``start()`` directly."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


# --- CLI ---------------------------------------------------------------------------------------


async def _run_cli(fake: FakeOpenAIUpstream, port: int) -> None:
    await fake.serve(_bind(fake.host, port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {fake.base_url}", flush=True)  # noqa: T201 - the launcher waits for this line
    await stop.wait()
    await fake.shutdown()


def main(argv: Sequence[str] | None = None) -> None:
    """Run the fake in the foreground until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible upstream for tests and load tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--stream-chunks", type=int, default=5)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    parser.add_argument("--require-api-key", default=None)
    parser.add_argument("--embedding-dimensions", type=int, default=16)
    parser.add_argument("--record", action="store_true", help="keep every request in memory (off: load tests)")
    args = parser.parse_args(argv)
    fake = FakeOpenAIUpstream(
        host=args.host,
        latency_ms=args.latency_ms,
        stream_chunks=args.stream_chunks,
        chunk_delay_ms=args.chunk_delay_ms,
        require_api_key=args.require_api_key,
        embedding_dimensions=args.embedding_dimensions,
        record=args.record,
    )
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop  # optional: the benchmark wants the fake's own CPU cost as low as possible

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_run_cli(fake, args.port))


if __name__ == "__main__":
    main()
