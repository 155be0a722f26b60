"""How a chat request's framing is counted: messages, names, tools, images, audio and files.

OpenAI's published rules where they exist (the cookbook's per-message and
per-tool overheads, the vision tile rule, audio at ~10 tokens a second), and
stated estimates where they do not. Each rule takes an `Encoder`, the text
tokenizer for the model being counted, so the same rules serve every family.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from typing import Any, Protocol

import orjson

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
# Chat roles; an encoder knows each one's token count up front (one token per message).
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_PLAIN_PROP_KEYS = frozenset({"type", "description", "enum"})


class Encoder(Protocol):
    """Counts the tokens of plain text for one model's encoding."""

    roles: Mapping[str, int]  # the token count of each of `ROLES`

    def count(self, text: str) -> int: ...


def compact(value: Any) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except (orjson.JSONEncodeError, TypeError):  # e.g. >64-bit ints from a stdlib-json body
        return str(value)


def call_strings(function: Mapping[str, Any]) -> list[str]:
    return [v for k in ("name", "arguments") if isinstance(v := function.get(k), str)]


def count_message(codec: Encoder, message: Mapping[str, Any]) -> int:
    if len(message) == 2:  # `{"role": ..., "content": ...}`, nearly every message: the loop below, spelled out
        role, content = message.get("role"), message.get("content")
        if role.__class__ is str and content.__class__ is str:
            cached = codec.roles.get(role)
            return TOKENS_PER_MESSAGE + (codec.count(role) if cached is None else cached) + codec.count(content)
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
                    n += TOOL_CALL_OVERHEAD + sum(map(codec.count, call_strings(fn)))
    return n


def _count_part(codec: Encoder, part: Any) -> int:
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


def count_tool(codec: Encoder, tool: Any, func_init: int) -> int:
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
        n += codec.count(compact(fn["format"]))
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
        ptype = ptype if isinstance(ptype, str) else compact(ptype)
        n += codec.count(f"{key}:{ptype}:{_strip_dot(schema.get('description'))}")
        if extra := {k: v for k, v in schema.items() if k not in _PLAIN_PROP_KEYS}:
            n += codec.count(compact(extra))
    return n


def _strip_dot(text: Any) -> str:
    return text.removesuffix(".") if isinstance(text, str) else ""


def count_prompt_value(codec: Encoder, value: Any) -> int:
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
