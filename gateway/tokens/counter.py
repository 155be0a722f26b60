"""Token counting for prompts, completions and cut-off streams.

Plain text is counted exactly with tiktoken. Chat framing, tools, images, audio, files
and non-OpenAI tokenizers are **estimates** (OpenAI's published rules where they exist),
meant for rate-limit reservations and cut streams and reconciled from reported usage.
An encoding that cannot be loaded (tiktoken downloads on a cache miss, which fails
offline) falls back to ~4 chars/token, with one warning per encoding.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import tiktoken
from tiktoken.model import encoding_name_for_model

from gateway.tokens.framing import (
    FUNC_END,
    FUNC_INIT,
    FUNC_INIT_DEFAULT,
    REPLY_PRIMING,
    ROLES,
    compact,
    count_message,
    count_prompt_value,
    count_tool,
)
from gateway.tokens.stream import StreamUsageEstimator
from providers.base import Endpoint, Usage

logger = logging.getLogger("switchboard.tokens")

DEFAULT_ENCODING = "o200k_base"
PRELOAD_ENCODINGS = ("o200k_base", "cl100k_base")
# gpt-oss's o200k_harmony is o200k_base plus special tokens: ordinary text tokenizes
# identically, so it is served by o200k_base instead of loading a second table.
_ENCODING_ALIASES = {"o200k_harmony": "o200k_base"}
CHARS_PER_TOKEN = 4  # offline fallback: OpenAI's rule of thumb for English text

_MODEL_CACHE_MAX = 4096


@dataclass(frozen=True, slots=True)
class TokenizerFamily:
    """How prompts for one provider family are counted (an adapter's `capabilities.tokenizer`).

    `encoding` None means tiktoken's own model-name table (exact for OpenAI models);
    otherwise the named encoding is used whatever the model, and the count is
    multiplied by `factor` (rounded up) to approximate the family's own tokenizer.
    """

    encoding: str | None
    factor: float
    note: str


# No public tokenizer exists for Claude 3+ or Gemini, and an upstream count endpoint
# would put a network call on the hot path, so those families are estimated from o200k.
# Estimates only drive reservations and cut streams; reported usage settles the bill.
FAMILIES: dict[str, TokenizerFamily] = {
    "openai": TokenizerFamily(None, 1.0, "exact: tiktoken's model table, o200k_base for unknown names"),
    # Public comparisons of Claude 3.5 Sonnet with GPT-4o on the same inputs (VentureBeat, May 2025)
    # measured ~16% more tokens for English prose, ~21% for math and ~30% for Python code;
    # 1.2 sits in that range, so reservations err slightly high for prose, low for code.
    "anthropic": TokenizerFamily(DEFAULT_ENCODING, 1.2, "estimate: o200k_base count x 1.2"),
    # Google documents ~4 characters per token for Gemini, the same density as o200k on
    # English text; no calibrated difference is public, so this is plainly the o200k count.
    "gemini": TokenizerFamily(DEFAULT_ENCODING, 1.0, "estimate: the o200k_base count"),
    # Llama 3 (tiktoken-style 128k BPE), Mistral Tekken, Qwen...: served by vLLM and the like
    # under arbitrary names; large-vocabulary BPEs land close to o200k on English text.
    "open_weights": TokenizerFamily(DEFAULT_ENCODING, 1.0, "estimate: the o200k_base count"),
}


def estimate_tokens(text: str) -> int:
    """Fallback count, ceil(len/4): close for English, undercounts CJK and code up to ~2-3x."""
    return -(-len(text) // CHARS_PER_TOKEN)


# Texts this long are counted piece by piece and remembered (see _Codec.count).
LARGE_TEXT_CHARS = 32 * 1024
_PIECE_CHARS = 64 * 1024
_MEMO_ENTRIES = 64
# Shorter texts' counts are remembered too, by length and hash (not the text: no prompt is kept): a conversation
# sends its history again on every turn, and system prompts repeat across requests. Cleared when full.
_SHORT_MEMO_ENTRIES = 8192


def _pieces(text: str) -> Iterator[str]:
    """`text` in pieces of at most _PIECE_CHARS, cut before a space where there is one (a BPE word starts there)."""
    start, end_of_text = 0, len(text)
    while start < end_of_text:
        end = min(end_of_text, start + _PIECE_CHARS)
        if end < end_of_text:
            cut = text.rfind(" ", start + _PIECE_CHARS // 2, end)
            end = cut if cut > start else end
        yield text[start:end]
        start = end


class _Codec:
    """One loaded encoding, or the estimator when ``encoding`` is None.

    A long text (a pasted document, a 4 MB prompt) is counted in pieces of 64K
    characters, cut before a space, and its count remembered by content: tiktoken
    releases the GIL while it encodes but builds the token list holding it, so
    pieces keep every GIL hold short when the count runs in a thread
    (`TokenCounter.count_large_texts`, called off the event loop before the
    pipeline counts), and the pipeline's own counts then find the figure here.
    """

    __slots__ = ("_count", "_lock", "_memo", "_short", "roles")

    def __init__(self, encoding: tiktoken.Encoding | None) -> None:
        self._count: Callable[[str], int] = estimate_tokens
        if encoding is not None:
            # encode_ordinary: prompts may contain "<|endoftext|>", on which encode() raises.
            encode = encoding.encode_ordinary
            self._count = lambda text: len(encode(text))
        self._memo: dict[tuple[int, int], int] = {}
        self._short: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self.roles = {role: self.count(role) for role in ROLES}  # one per message

    def count(self, text: str) -> int:
        size = len(text)
        if size < LARGE_TEXT_CHARS:
            key = (size, hash(text))
            found = self._short.get(key)
            if found is None:
                found = self._count(text)
                if len(self._short) >= _SHORT_MEMO_ENTRIES:
                    self._short.clear()
                self._short[key] = found
            return found
        key = (len(text), hash(text))
        found = self._memo.get(key)
        if found is None:
            found = sum(map(self._count, _pieces(text)))
            with self._lock:
                if len(self._memo) >= _MEMO_ENTRIES:
                    del self._memo[next(iter(self._memo))]
                self._memo[key] = found
        return found


def requested_completion(body: Mapping[str, Any]) -> int | None:
    """The completion cap a request asks for (`max_completion_tokens`, `max_tokens` or `max_output_tokens`)."""
    value = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return None
    return value


class PromptCount(NamedTuple):
    """A request's prompt tokens as counted for one upstream model and tokenizer family.

    Admission counts the prompt; the context-window check reuses the figure when it
    would count the same way, so a request is not tokenized twice. A named tuple, not a frozen dataclass:
    made once per admitted request, and a frozen dataclass's `__init__` sets each field through
    `object.__setattr__` (~4x the bytecodes).
    """

    tokens: int
    endpoint: str
    upstream_model: str
    family: str


class TokenCounter:
    """Counts tokens for OpenAI-shaped request bodies and stream chunks.

    Owned by the app lifespan. :meth:`preload` does blocking disk I/O (network on a
    cache miss; tiktoken sets no timeout), so run it via ``asyncio.to_thread``. After
    it, counting never does I/O: encodings that were not preloaded are served by
    o200k_base. Without it, each encoding loads lazily on first use, blocking once.
    """

    def __init__(self) -> None:
        self._codecs: dict[str, _Codec] = {}
        self._model_encodings: dict[str, str] = {}
        self._estimator = _Codec(None)
        self._frozen = False
        self._lock = threading.Lock()

    def preload(self, encodings: Iterable[str] = PRELOAD_ENCODINGS) -> None:
        """Load ``encodings`` now (blocking). A failure degrades to the estimator, never raises."""
        for name in encodings:
            self._load(_ENCODING_ALIASES.get(name, name))
        self._frozen = True

    def encoding_for(self, model: str) -> str:
        """Model name -> tiktoken encoding name, by tiktoken's own table.

        A provider prefix (``azure/gpt-35-turbo``) is also tried without it. Unknown
        models (gpt-6, Llama, Claude, Gemini, Mistral, Qwen...) get o200k_base. Their
        tokenizers differ: English prose typically lands within ~10-25% (Llama 3 and
        Mistral Tekken are tiktoken-style BPEs and come closer; Claude tends to emit
        more tokens), code and non-Latin scripts are worse. Usage is reconciled from
        the upstream's reported usage after the call.
        """
        name = self._model_encodings.get(model)
        if name is None:
            name = DEFAULT_ENCODING
            for candidate in (model, model.rsplit("/", 1)[-1]):
                try:
                    name = encoding_name_for_model(candidate)
                    break
                except KeyError:
                    continue
            if len(self._model_encodings) >= _MODEL_CACHE_MAX:  # names come from clients
                self._model_encodings.clear()
            self._model_encodings[model] = name
        return name

    def _codec(self, model: str, family: str = "openai") -> _Codec:
        fixed = FAMILIES[family].encoding if family in FAMILIES else DEFAULT_ENCODING
        name = fixed or self.encoding_for(model)
        name = _ENCODING_ALIASES.get(name, name)
        codec = self._codecs.get(name)
        if codec is None and not self._frozen:
            codec = self._load(name)
        elif codec is None:  # after preload the hot path never does I/O: use the default
            codec = self._codecs.get(DEFAULT_ENCODING) or self._estimator
        return codec

    def _load(self, name: str) -> _Codec:
        with self._lock:  # one load, and at most one warning, per encoding
            codec = self._codecs.get(name)
            if codec is None:
                try:
                    codec = _Codec(tiktoken.get_encoding(name))
                # Whatever went wrong (ConnectionError, hash mismatch, unknown name),
                # counting must degrade to the estimate, never take the gateway down.
                except Exception as exc:
                    msg = ("tiktoken encoding %s unavailable (%s); token counts are estimated at ~%d characters "
                           "per token. Point TIKTOKEN_CACHE_DIR at a directory holding the encoding to count exactly.")
                    logger.warning(msg, name, type(exc).__name__, CHARS_PER_TOKEN)
                    codec = _Codec(None)
                self._codecs[name] = codec
            return codec

    def count_large_texts(self, payload: Any, targets: Iterable[tuple[str, str]]) -> int:
        """Count (and remember) every long string in a request `payload` for each (upstream model, family).

        Blocking, seconds for a 4 MB prompt: run it in a thread (`asyncio.to_thread`) before the
        pipeline, whose counts of the same strings then cost a lookup. Returns how many strings it counted.
        """
        texts = list(_long_strings(payload))
        for codec in {id(c): c for c in (self._codec(model, family) for model, family in targets)}.values():
            for text in texts:
                codec.count(text)
        return len(texts)

    def count_text(self, text: str, model: str, family: str = "openai") -> int:
        """Tokens in ``text`` for ``model``'s encoding (special tokens count as plain text).

        ``family`` (an adapter's ``capabilities.tokenizer``, see FAMILIES) picks the
        method for every ``count_*``: exact for "openai", a documented estimate otherwise;
        an unknown family counts like "open_weights".
        """
        return _scaled(self._codec(model, family).count(text), family)

    def count_chat_prompt(self, body: Mapping[str, Any], model: str, family: str = "openai") -> int:
        """Prompt tokens of a /v1/chat/completions body; malformed entries are skipped.

        Cookbook rule: 3 per message + every string field + 1 per ``name`` + 3 reply priming.
        Content parts, tool calls, ``tools``/``functions`` and a json_schema
        ``response_format`` (its compact JSON) are added as estimates.
        """
        codec = self._codec(model, family)
        total = REPLY_PRIMING
        messages = body.get("messages")
        if isinstance(messages, list):
            for message in messages:  # a loop, not sum() over a generator: a frame less to resume per message
                if isinstance(message, Mapping):
                    total += count_message(codec, message)
        tools = body.get("tools") or body.get("functions")
        if isinstance(tools, list) and tools:
            func_init = FUNC_INIT.get(self.encoding_for(model), FUNC_INIT_DEFAULT)
            total += FUNC_END + sum(count_tool(codec, tool, func_init) for tool in tools)
        response_format = body.get("response_format")
        if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
            total += codec.count(compact(response_format.get("json_schema")))
        return _scaled(total, family)

    def count_completion_prompt(self, body: Mapping[str, Any], model: str, family: str = "openai") -> int:
        """Prompt tokens of a legacy /v1/completions ``prompt``: str, [str], [int] or [[int]]."""
        return _scaled(count_prompt_value(self._codec(model, family), body.get("prompt")), family)

    def count_embedding_input(self, body: Mapping[str, Any], model: str, family: str = "openai") -> int:
        """Input tokens of a /v1/embeddings ``input``: str, [str], [int] or [[int]]."""
        return _scaled(count_prompt_value(self._codec(model, family), body.get("input")), family)

    def count_responses_input(self, body: Mapping[str, Any], model: str, family: str = "openai") -> int:
        """Input tokens of a /v1/responses body: ``instructions`` and ``input`` (string or items).

        Items are counted as chat messages (function calls and their outputs by their
        text), so the estimate follows the same rules as ``count_chat_prompt``.
        """
        codec = self._codec(model, family)
        total = REPLY_PRIMING
        if isinstance(instructions := body.get("instructions"), str):
            total += count_message(codec, {"role": "system", "content": instructions})
        source = body.get("input")
        items = [{"role": "user", "content": source}] if isinstance(source, str) else source
        for item in items if isinstance(items, list) else ():
            if isinstance(item, Mapping):
                total += count_message(codec, {k: v for k, v in item.items() if k not in ("type", "id", "status")})
        return _scaled(total, family)

    def count_prompt(self, endpoint: Endpoint, body: Mapping[str, Any], model: str, family: str = "openai") -> int:
        """The prompt of one request, by its endpoint family.

        The one rule that admission (gateway/accounting/limits.py), the context-window
        check (gateway/routing/resilience.py) and usage estimates for answers that came
        without one (gateway/upstream/answer_contract.py) share, so a request is never
        admitted by one count and fitted or billed by another.
        """
        if endpoint is Endpoint.CHAT:
            return self.count_chat_prompt(body, model, family)
        if endpoint is Endpoint.COMPLETIONS:
            return self.count_completion_prompt(body, model, family)
        if endpoint is Endpoint.EMBEDDINGS:
            return self.count_embedding_input(body, model, family)
        return self.count_responses_input(body, model, family)

    def estimate_usage(self, endpoint: Endpoint, body: Mapping[str, Any],
                       relayed: Iterable[bytes | str | Mapping[str, Any]], model: str, family: str = "openai") -> Usage:
        """Usage of an answer the upstream reported none for: the prompt, and the completion relayed so far."""
        return Usage(prompt_tokens=self.count_prompt(endpoint, body, model, family),
                     completion_tokens=self.count_stream_output(relayed, model, family), estimated=True)

    def count_stream_output(self, chunks: Iterable[bytes | str | Mapping[str, Any]], model: str,
                            family: str = "openai") -> int:
        """Completion tokens for the stream chunks seen so far (see StreamUsageEstimator)."""
        estimator = StreamUsageEstimator(self, model, family)
        for chunk in chunks:
            estimator.feed(chunk)
        return estimator.completion_tokens()


def _long_strings(value: Any) -> Iterator[str]:
    pending = [value]  # a stack, not recursion: client JSON may nest a thousand levels deep
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if len(item) >= LARGE_TEXT_CHARS:
                yield item
        elif isinstance(item, Mapping):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


def _scaled(count: int, family: str) -> int:
    spec = FAMILIES.get(family)
    factor = spec.factor if spec is not None else 1.0
    return count if factor == 1.0 else math.ceil(count * factor)
