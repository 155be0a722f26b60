"""Token counting for prompts, completions and cut-off streams.

Plain text is counted exactly with tiktoken. Chat framing, tools, images, audio, files
and non-OpenAI tokenizers are **estimates** (OpenAI's published rules where they exist),
meant for rate-limit reservations and cut streams and reconciled from reported usage.
An encoding that cannot be loaded (tiktoken downloads on a cache miss, which fails
offline) falls back to ~4 chars/token, with one warning per encoding.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import tiktoken
from tiktoken.model import encoding_name_for_model

logger = logging.getLogger("switchboard.tokens")

DEFAULT_ENCODING = "o200k_base"
PRELOAD_ENCODINGS = ("o200k_base", "cl100k_base")
# gpt-oss's o200k_harmony is o200k_base plus special tokens: ordinary text tokenizes
# identically, so it is served by o200k_base instead of loading a second table.
_ENCODING_ALIASES = {"o200k_harmony": "o200k_base"}
CHARS_PER_TOKEN = 4  # offline fallback: OpenAI's rule of thumb for English text

# OpenAI cookbook "How to count tokens with tiktoken" (gpt-3.5-turbo-0613+, gpt-4*, gpt-4o*).
TOKENS_PER_MESSAGE, TOKENS_PER_NAME, REPLY_PRIMING = 3, 1, 3
FUNC_INIT = {"cl100k_base": 10}  # per tool definition; 7 for o200k_base and the rest
FUNC_INIT_DEFAULT = 7
PROP_INIT, PROP_KEY, ENUM_INIT, ENUM_ITEM, FUNC_END = 3, 3, -3, 3, 12
TOOL_CALL_OVERHEAD = 3  # per assistant tool call: our estimate, the framing is unpublished
# OpenAI vision rules (gpt-4o family): 85 base + 170 per 512px tile; low detail = 85.
IMAGE_BASE_TOKENS, IMAGE_TILE_TOKENS, IMAGE_TILE = 85, 170, 512
IMAGE_DEFAULT_SIDE = 1024  # size unknown (remote URL): 1024x1024 -> 765 tokens
AUDIO_TOKENS_PER_SECOND = 10  # OpenAI: user audio ~1 token per 100 ms
AUDIO_DEFAULT_BYTES_PER_SECOND = 16_000  # 128 kbit/s mp3 unless a WAV header says otherwise
FILE_DEFAULT_TOKENS = 1_000  # file_id alone, and the floor for file_data
FILE_BYTES_PER_TOKEN = 50  # file_data: rough density of a PDF (extracted text + page images)
_MODEL_CACHE_MAX = 4096
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_PLAIN_PROP_KEYS = frozenset({"type", "description", "enum"})


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

    __slots__ = ("_count", "_lock", "_memo", "roles")

    def __init__(self, encoding: tiktoken.Encoding | None) -> None:
        self._count: Callable[[str], int] = estimate_tokens
        if encoding is not None:
            # encode_ordinary: prompts may contain "<|endoftext|>", on which encode() raises.
            encode = encoding.encode_ordinary
            self._count = lambda text: len(encode(text))
        self._memo: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()
        self.roles = {role: self.count(role) for role in _ROLES}  # one per message

    def count(self, text: str) -> int:
        if len(text) < LARGE_TEXT_CHARS:
            return self._count(text)
        key = (len(text), hash(text))
        found = self._memo.get(key)
        if found is None:
            found = sum(map(self._count, _pieces(text)))
            with self._lock:
                if len(self._memo) >= _MEMO_ENTRIES:
                    del self._memo[next(iter(self._memo))]
                self._memo[key] = found
        return found


@dataclass(frozen=True, slots=True)
class PromptCount:
    """A request's prompt tokens as counted for one upstream model and tokenizer family.

    Admission counts the prompt; the context-window check reuses the figure when it
    would count the same way, so a request is not tokenized twice.
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
            total += sum(_count_message(codec, m) for m in messages if isinstance(m, Mapping))
        tools = body.get("tools") or body.get("functions")
        if isinstance(tools, list) and tools:
            func_init = FUNC_INIT.get(self.encoding_for(model), FUNC_INIT_DEFAULT)
            total += FUNC_END + sum(_count_tool(codec, tool, func_init) for tool in tools)
        response_format = body.get("response_format")
        if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
            total += codec.count(_compact(response_format.get("json_schema")))
        return _scaled(total, family)

    def count_completion_prompt(self, body: Mapping[str, Any], model: str, family: str = "openai") -> int:
        """Prompt tokens of a legacy /v1/completions ``prompt``: str, [str], [int] or [[int]]."""
        return _scaled(_count_prompt_value(self._codec(model, family), body.get("prompt")), family)

    def count_embedding_input(self, body: Mapping[str, Any], model: str, family: str = "openai") -> int:
        """Input tokens of a /v1/embeddings ``input``: str, [str], [int] or [[int]]."""
        return _scaled(_count_prompt_value(self._codec(model, family), body.get("input")), family)

    def count_responses_input(self, body: Mapping[str, Any], model: str, family: str = "openai") -> int:
        """Input tokens of a /v1/responses body: ``instructions`` and ``input`` (string or items).

        Items are counted as chat messages (function calls and their outputs by their
        text), so the estimate follows the same rules as ``count_chat_prompt``.
        """
        codec = self._codec(model, family)
        total = REPLY_PRIMING
        if isinstance(instructions := body.get("instructions"), str):
            total += _count_message(codec, {"role": "system", "content": instructions})
        source = body.get("input")
        items = [{"role": "user", "content": source}] if isinstance(source, str) else source
        for item in items if isinstance(items, list) else ():
            if isinstance(item, Mapping):
                total += _count_message(codec, {k: v for k, v in item.items() if k not in ("type", "id", "status")})
        return _scaled(total, family)

    def count_stream_output(self, chunks: Iterable[bytes | str | Mapping[str, Any]], model: str,
                            family: str = "openai") -> int:
        """Completion tokens for the stream chunks seen so far (see StreamUsageEstimator)."""
        estimator = StreamUsageEstimator(self, model, family)
        for chunk in chunks:
            estimator.feed(chunk)
        return estimator.completion_tokens()


class StreamUsageEstimator:
    """Accumulates one streamed response so its usage can be estimated if it is cut.

    Feed it each ``data:`` payload of a chat or legacy completions stream (JSON bytes/str
    or the parsed dict); anything malformed is ignored. Only generated text is kept, and
    it is encoded once per choice at the end since chunk boundaries split tokens.
    """

    __slots__ = ("_counter", "_family", "_model", "_reported", "_text", "_tools")

    def __init__(self, counter: TokenCounter, model: str, family: str = "openai") -> None:
        self._counter, self._model, self._family = counter, model, family
        self._text: dict[int, list[str]] = {}
        self._tools: dict[tuple[int, int], list[str]] = {}
        self._reported: int | None = None

    def feed(self, chunk: bytes | str | Mapping[str, Any]) -> None:
        """Record one chunk. Never raises."""
        if isinstance(chunk, bytes | str):
            data = chunk.strip()
            if data[:5] in (b"data:", "data:"):
                data = data[5:].lstrip()
            if not data or data in (b"[DONE]", "[DONE]"):
                return
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                return
        if not isinstance(chunk, Mapping):
            return
        usage = chunk.get("usage")
        if isinstance(usage, Mapping) and isinstance(usage.get("completion_tokens"), int):
            self._reported = usage["completion_tokens"]
        if isinstance(kind := chunk.get("type"), str):  # a Responses API stream event
            self._feed_event(kind, chunk)
            return
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, Mapping):
                self._feed_choice(choice)

    def _feed_event(self, kind: str, event: Mapping[str, Any]) -> None:
        if kind in ("response.output_text.delta", "response.refusal.delta", "response.function_call_arguments.delta",
                    "response.reasoning_summary_text.delta") and isinstance(event.get("delta"), str):
            index = event.get("output_index")
            self._text.setdefault(index if isinstance(index, int) else 0, []).append(event["delta"])
        elif kind in ("response.completed", "response.incomplete") and isinstance(event.get("response"), Mapping):
            usage = event["response"].get("usage")
            if isinstance(usage, Mapping) and isinstance(usage.get("output_tokens"), int):
                self._reported = usage["output_tokens"]

    def _feed_choice(self, choice: Mapping[str, Any]) -> None:
        index = choice.get("index")
        index = index if isinstance(index, int) else 0
        pieces = self._text.setdefault(index, [])
        if isinstance(choice.get("text"), str):  # legacy /v1/completions
            pieces.append(choice["text"])
        delta = choice.get("delta")
        if not isinstance(delta, Mapping):
            return
        # reasoning_content/reasoning: vLLM, SGLang, DeepSeek; billed as completion tokens.
        for key in ("content", "refusal", "reasoning_content", "reasoning"):
            if isinstance(value := delta.get(key), str):
                pieces.append(value)
        calls = delta.get("tool_calls")
        calls = list(calls) if isinstance(calls, list) else []
        if "function_call" in delta:  # legacy functions API
            calls.append({"index": -1, "function": delta["function_call"]})
        for call in calls:
            if isinstance(call, Mapping) and isinstance(fn := call.get("function"), Mapping):
                slot = call.get("index")
                key = (index, slot if isinstance(slot, int) else 0)
                self._tools.setdefault(key, []).extend(_call_strings(fn))

    def completion_tokens(self) -> int:
        """The upstream-reported completion tokens if a usage chunk was seen, else the estimate."""
        if self._reported is not None:
            return self._reported
        count, model, family = self._counter.count_text, self._model, self._family
        total = sum(count("".join(pieces), model, family) for pieces in self._text.values() if pieces)
        return total + sum(TOOL_CALL_OVERHEAD + count("".join(p), model, family) for p in self._tools.values())


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


def _compact(value: Any) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except (orjson.JSONEncodeError, TypeError):  # e.g. >64-bit ints from a stdlib-json body
        return str(value)


def _call_strings(function: Mapping[str, Any]) -> list[str]:
    return [v for k in ("name", "arguments") if isinstance(v := function.get(k), str)]


def _count_message(codec: _Codec, message: Mapping[str, Any]) -> int:
    n = TOKENS_PER_MESSAGE
    for key, value in message.items():
        if isinstance(value, str):
            cached = codec.roles.get(value) if key == "role" else None
            n += codec.count(value) if cached is None else cached
            n += TOKENS_PER_NAME if key == "name" else 0
        elif key == "content" and isinstance(value, list):
            n += sum(_count_part(codec, part) for part in value)
        elif key in ("tool_calls", "function_call"):  # function_call: legacy functions API
            for call in value if isinstance(value, list) else [{"function": value}]:
                if isinstance(call, Mapping) and isinstance(fn := call.get("function"), Mapping):
                    n += TOOL_CALL_OVERHEAD + sum(map(codec.count, _call_strings(fn)))
    return n


def _count_part(codec: _Codec, part: Any) -> int:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind in ("text", "refusal"):
        return codec.count(part[kind]) if isinstance(part.get(kind), str) else 0
    if kind in ("input_text", "output_text"):  # Responses API parts
        return codec.count(part["text"]) if isinstance(part.get("text"), str) else 0
    if kind == "input_image":
        url = part.get("image_url")
        return image_tokens(url if isinstance(url, str) else "", part.get("detail", "auto"))
    payload = part.get(kind) if isinstance(kind, str) else None
    if not isinstance(payload, Mapping):
        return 0
    if kind == "image_url":
        url = payload.get("url")
        return image_tokens(url if isinstance(url, str) else "", payload.get("detail", "auto"))
    if kind == "input_audio":
        return audio_tokens(payload.get("data"))
    if kind == "file":
        data, filename = payload.get("file_data"), payload.get("filename")
        n = codec.count(filename) if isinstance(filename, str) else 0
        size = _b64_size(data) if isinstance(data, str) else 0
        return n + max(FILE_DEFAULT_TOKENS, size // FILE_BYTES_PER_TOKEN)
    return 0


def _count_tool(codec: _Codec, tool: Any, func_init: int) -> int:
    """Cookbook function-definition estimate, extended to nested schemas and custom tools.

    func_init + "name:description" (one trailing '.' dropped); with properties, PROP_INIT +
    per property PROP_KEY + "key:type:description" + enum items (ENUM_INIT, ENUM_ITEM each).
    Keys the cookbook ignores (items, nested properties, anyOf, a custom tool's format...)
    add their compact JSON.
    """
    # {"type":"function","function":{...}}, {"type":"custom","custom":{...}} or legacy functions[].
    fn = (tool.get("function") or tool.get("custom") or tool) if isinstance(tool, Mapping) else None
    if not isinstance(fn, Mapping):
        return 0
    n = func_init + codec.count(f"{fn.get('name', '')}:{_strip_dot(fn.get('description'))}")
    if "format" in fn:
        n += codec.count(_compact(fn["format"]))
    params = fn.get("parameters")
    props = params.get("properties") if isinstance(params, Mapping) else None
    if not isinstance(props, Mapping) or not props:
        return n
    n += PROP_INIT
    for key, schema in props.items():
        n += PROP_KEY
        if not isinstance(schema, Mapping):
            continue
        if isinstance(enum := schema.get("enum"), list):
            n += ENUM_INIT + sum(ENUM_ITEM + codec.count(str(item)) for item in enum)
        ptype = schema.get("type", "")
        ptype = ptype if isinstance(ptype, str) else _compact(ptype)
        n += codec.count(f"{key}:{ptype}:{_strip_dot(schema.get('description'))}")
        if extra := {k: v for k, v in schema.items() if k not in _PLAIN_PROP_KEYS}:
            n += codec.count(_compact(extra))
    return n


def _strip_dot(text: Any) -> str:
    return text.removesuffix(".") if isinstance(text, str) else ""


def _count_prompt_value(codec: _Codec, value: Any) -> int:
    if isinstance(value, str):
        return codec.count(value)
    # [str]: a batch of prompts; [int]: one prompt of token ids; [[int]]: a batch of those.
    items = value if isinstance(value, list) else ()
    return sum(codec.count(v) if isinstance(v, str) else len(v) if isinstance(v, list) else 1 for v in items)


def image_tokens(url: str, detail: Any = "auto") -> int:
    """OpenAI image input tokens (gpt-4o tiling; an estimate for other models).

    ``low``: 85. Else fit into 2048x2048, shrink the shortest side to 768 (never upscale),
    and charge 85 + 170 per 512px tile; ``original`` counts as ``high``. The size is read
    from a base64 PNG data URL, else 1024x1024 (765 tokens) is assumed.
    """
    if detail == "low":
        return IMAGE_BASE_TOKENS
    width = height = IMAGE_DEFAULT_SIDE
    # A PNG's size is in its first 24 bytes. JPEG's sits after EXIF, up to 64 KiB in, and is
    # not parsed: the default already gives the right 765 for 4:3 photos of any size.
    comma = url.find(",", 0, 256) if url.startswith("data:") else -1
    head = _b64_prefix(url[comma + 1 :], 32) if comma > 0 and ";base64" in url[:comma] else b""
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        size = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        width, height = size if min(size) > 0 else (width, height)
    if (longest := max(width, height)) > 2048:
        width, height = width * 2048 // longest, height * 2048 // longest
    if (shortest := min(width, height)) > 768:
        width, height = width * 768 // shortest, height * 768 // shortest
    tiles = max(1, -(-width // IMAGE_TILE) * -(-height // IMAGE_TILE))
    return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * tiles


def audio_tokens(data: Any) -> int:
    """Estimate for base64 ``input_audio``: duration x 10 tokens/s.

    Duration = decoded bytes / byte rate, read from a WAV header, else 128 kbit/s mp3.
    """
    if not isinstance(data, str):
        return 0
    header, byte_rate = _b64_prefix(data, 44), AUDIO_DEFAULT_BYTES_PER_SECOND
    if header[:4] == b"RIFF" and header[8:12] == b"WAVE":
        byte_rate = int.from_bytes(header[28:32], "little") or byte_rate
    return math.ceil(_b64_size(data) / byte_rate * AUDIO_TOKENS_PER_SECOND)


def _b64_size(data: str) -> int:
    return (len(data) - data[-2:].count("=")) * 3 // 4


def _b64_prefix(data: str, chars: int) -> bytes:
    chunk = data[:chars]
    try:
        return base64.b64decode(chunk[: len(chunk) // 4 * 4])
    except (binascii.Error, ValueError):
        return b""
