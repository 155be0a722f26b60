"""The adapter contract: what every provider module gives the gateway.

An adapter translates between the canonical form (OpenAI-shaped JSON) and one
upstream wire format. It never performs I/O: the gateway sends the
`UpstreamRequest` an adapter builds, and hands the bytes it gets back to the
adapter's parse and stream functions. That keeps adapters plain functions over
data, testable against recorded fixtures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict


class Endpoint(StrEnum):
    """The canonical operations a client can ask for."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    # OpenAI's Responses API, passed through natively to upstreams that declare it;
    # /v1/responses is translated to CHAT for every other provider.
    RESPONSES = "responses"


class FailureKind(StrEnum):
    """The closed set of ways an upstream call can fail, as the gateway sees them."""

    BAD_REQUEST = "bad_request"
    AUTHENTICATION = "authentication"
    PERMISSION = "permission"
    NOT_FOUND = "not_found"
    RATE_LIMITED = "rate_limited"
    CONTEXT_LENGTH = "context_length"
    CONTENT_FILTER = "content_filter"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    UPSTREAM_ERROR = "upstream_error"


class NoOptions(BaseModel):
    """Options model for adapters that take no kind-specific settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    """What an adapter needs to know about one configured provider."""

    name: str
    kind: str
    base_url: str
    api_key: str | None
    extra_headers: Mapping[str, str]
    options: BaseModel


@dataclass(slots=True)
class Call:
    """One upstream call: the canonical request and how it is to be made.

    `body` is the client's JSON object, already validated as an object; adapters
    must not mutate it (it is shared by retries and fallbacks).
    """

    endpoint: Endpoint
    body: Mapping[str, Any]
    upstream_model: str
    stream: bool
    # The client asked for a usage chunk (stream_options.include_usage); the
    # gateway always asks the upstream for one so it can settle usage.
    client_wants_usage: bool = False


@dataclass(slots=True)
class UpstreamRequest:
    method: str
    url: str
    # A fresh dict per request: the gateway adds correlation headers to it.
    headers: dict[str, str]
    body: bytes | None


@dataclass(slots=True)
class Usage:
    """Token usage in canonical terms; `cached_tokens` is a subset of `prompt_tokens`."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    # True when the numbers were estimated by the gateway, not reported upstream.
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class ParsedResponse:
    """A complete (non-streamed) upstream response in canonical form.

    `body` is the JSON the client receives, as bytes: for pass-through adapters
    it is the upstream's own bytes, untouched.
    """

    body: bytes
    usage: Usage | None
    response_model: str | None = None
    finish_reasons: tuple[str, ...] = ()


@dataclass(slots=True)
class StreamChunk:
    """One canonical SSE `data:` payload (encoded JSON) ready for the client.

    `usage` is set on the chunk that carries the final usage; `usage_only`
    marks the OpenAI trailing chunk (`choices: []`) that exists only to carry
    it, which the gateway drops when the client did not ask for usage.
    """

    data: bytes
    usage: Usage | None = None
    usage_only: bool = False
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    """An upstream error, classified. `message` is safe to show a client."""

    kind: FailureKind
    status: int
    message: str
    code: str | None = None
    param: str | None = None
    error_type: str | None = None
    retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE_FAILURES


RETRYABLE_FAILURES = frozenset(
    {FailureKind.RATE_LIMITED, FailureKind.OVERLOADED, FailureKind.TIMEOUT,
     FailureKind.CONNECTION, FailureKind.UPSTREAM_ERROR}
)


class TokenCounting(Protocol):
    """What an in-process engine counts its usage with (the gateway's TokenCounter)."""

    def count_text(self, text: str, model: str) -> int: ...
    def count_chat_prompt(self, body: Mapping[str, Any], model: str) -> int: ...
    def count_completion_prompt(self, body: Mapping[str, Any], model: str) -> int: ...
    def count_embedding_input(self, body: Mapping[str, Any], model: str) -> int: ...


@dataclass(frozen=True, slots=True)
class EngineReply:
    """What an in-process engine answers: one body, or a list of SSE events, with pacing."""

    status: int
    body: bytes = b""
    events: tuple[bytes, ...] = ()
    first_delay_s: float = 0.0
    event_interval_s: float = 0.0

    @property
    def streamed(self) -> bool:
        return bool(self.events)


class InProcessEngine(Protocol):
    """An upstream played inside the gateway process (`Capabilities.in_process`; the mock)."""

    def respond(self, request: UpstreamRequest) -> EngineReply: ...


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an adapter can do, declared as data rather than methods that raise."""

    endpoints: frozenset[Endpoint]
    # The upstream reports usage in streams when asked (stream_options.include_usage).
    stream_usage: bool = True
    default_base_url: str | None = None
    requires_api_key: bool = False
    # Served by an engine inside the gateway process (the mock) instead of over HTTP;
    # such an adapter also provides `engine(options, token_counter)`.
    in_process: bool = False
    # The tokenizer family that limits and budgets count prompts with (gateway/tokens/counter.py
    # FAMILIES): "openai" counts exactly with tiktoken; the others are documented estimates.
    tokenizer: str = "openai"
    # The header that carries the request id upstream (None: the kind takes none, so none is sent), and
    # whether it must be a UUID: llama-cpp-python answers any other `x-request-id` with an empty 400.
    request_id_header: str | None = "x-request-id"
    request_id_uuid: bool = True


class UpstreamFailed(Exception):
    """Raised by a stream translator when the upstream reports an error in-band."""

    def __init__(self, failure: UpstreamFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class StreamTranslator(Protocol):
    """One stream's translation state, fed one SSE `data:` payload at a time.

    Synchronous on purpose: the gateway decodes every event of one network
    read and translates them in a plain loop, then relays the whole batch in
    one write. With an async generator per layer and a write per event, a
    20-chunk stream cost twice the bare pass-through's CPU (loadtests/README.md).

    - `feed` translates one payload into zero or more canonical chunks; it
      raises `UpstreamFailed` for an error event inside the stream.
    - `feed_all` translates the payloads of one network read, stopping once
      `finished`; `PayloadTranslator` gives every translator the plain loop.
    - `finished` turns true once the upstream has said everything (OpenAI's
      `[DONE]`, Anthropic's `message_stop`, ...): the gateway reads no further.
    - `end` is called when the upstream closed the stream without `finished`:
      it returns any last chunks (Gemini ends streams by closing them), or
      raises `UpstreamFailed` when the answer was cut short.
    """

    finished: bool

    def feed(self, data: bytes) -> Sequence[StreamChunk]: ...

    def feed_all(self, payloads: Sequence[bytes]) -> list[StreamChunk]: ...

    def end(self) -> Sequence[StreamChunk]: ...


class PayloadTranslator:
    """What every stream translator shares: a read's payloads translated one at a time.

    A translator that can judge a whole read at once overrides `feed_all` (the
    OpenAI-compatible one relays most reads byte for byte after one scan).
    """

    __slots__ = ()
    finished: bool

    def feed(self, data: bytes) -> Sequence[StreamChunk]:
        raise NotImplementedError

    def feed_all(self, payloads: Sequence[bytes]) -> list[StreamChunk]:
        out: list[StreamChunk] = []
        for data in payloads:
            out.extend(self.feed(data))
            if self.finished:  # nothing after the end of the answer counts
                break
        return out


class Adapter(Protocol):
    """The contract every provider module implements.

    - `build_request` turns a canonical call into the upstream's HTTP request.
    - `parse_response` turns a successful upstream body into canonical bytes + usage.
    - `stream_translator` returns a fresh `StreamTranslator`: the per-stream
      state that turns the upstream's SSE `data:` payloads into canonical chunks.
    - `classify_error` turns an upstream error response into an `UpstreamFailure`.
    """

    kind: str
    capabilities: Capabilities
    options_model: type[BaseModel]

    def build_request(self, provider: ProviderSettings, call: Call) -> UpstreamRequest: ...

    def parse_response(self, call: Call, body: bytes) -> ParsedResponse: ...

    def stream_translator(self, call: Call) -> StreamTranslator: ...

    def classify_error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamFailure: ...
