"""Tests for gateway.tokens.counter: exact counts, estimates and the offline fallback."""

from __future__ import annotations

import base64
import logging
import os
import struct
from collections.abc import Iterator

import orjson
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from gateway.tokens.counter import CHARS_PER_TOKEN, TokenCounter, estimate_tokens
from gateway.tokens.framing import TOOL_CALL_OVERHEAD, audio_tokens, image_tokens

SHARED_CACHE = "/work/shared/tiktoken"

# The OpenAI cookbook's "How to count tokens with tiktoken" example conversation.
COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon "
        "into plain English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for "
        "increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]

COOKBOOK_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def counter() -> Iterator[TokenCounter]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", os.environ.get("TIKTOKEN_CACHE_DIR", SHARED_CACHE))
        c = TokenCounter()
        c.preload()
        # "hello world" is 2 tokens in both encodings; the ~4 chars/token estimate would say 3.
        assert c.count_text("hello world", "gpt-4o") == c.count_text("hello world", "gpt-4") == 2
        yield c


def enc(name: str) -> tiktoken.Encoding:
    return tiktoken.get_encoding(name)  # already loaded by the fixture


def cookbook_messages(messages: list[dict], encoding: tiktoken.Encoding) -> int:
    """The cookbook's num_tokens_from_messages, written against tiktoken directly."""
    n = 3
    for message in messages:
        n += 3
        for key, value in message.items():
            n += len(encoding.encode(value))
            n += 1 if key == "name" else 0
    return n


def cookbook_tools(tools: list[dict], encoding: tiktoken.Encoding, func_init: int) -> int:
    """The cookbook's num_tokens_for_tools (without the messages part)."""
    n = 0
    for tool in tools:
        fn = tool["function"]
        n += func_init + len(encoding.encode(fn["name"] + ":" + fn["description"].removesuffix(".")))
        props = fn["parameters"]["properties"]
        if props:
            n += 3
            for key, prop in props.items():
                n += 3
                if "enum" in prop:
                    n += -3 + sum(3 + len(encoding.encode(item)) for item in prop["enum"])
                desc = prop["description"].removesuffix(".")
                n += len(encoding.encode(f"{key}:{prop['type']}:{desc}"))
    return n + 12


def png_data_url(width: int, height: int) -> str:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0\0\0\0" + b"\0" * 64
    return "data:image/png;base64," + base64.b64encode(png).decode()


def chat(*parts: dict) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}]}


# -- plain text and model mapping ---------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-5-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("azure/gpt-35-turbo", "cl100k_base"),
        ("llama-3", "o200k_base"),
        ("claude-sonnet-4-5", "o200k_base"),
        ("", "o200k_base"),
        ("gpt-oss-120b", "o200k_harmony"),
    ],
)
def test_encoding_for(counter: TokenCounter, model: str, encoding: str) -> None:
    assert counter.encoding_for(model) == encoding


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4", "llama-3"])
@pytest.mark.parametrize(
    "text",
    ["", "hello world", "antidisestablishmentarianism", "お誕生日おめでとう", "def f(x):\n    return x**2\n"],
)
def test_count_text_matches_tiktoken(counter: TokenCounter, model: str, text: str) -> None:
    expected = len(enc(counter.encoding_for(model)).encode(text))
    assert counter.count_text(text, model) == expected


def test_special_token_text_is_counted_as_plain_text(counter: TokenCounter) -> None:
    text = "a <|endoftext|> b <|im_start|>"
    assert counter.count_text(text, "gpt-4o") == len(enc("o200k_base").encode(text, disallowed_special=()))


def test_gpt_oss_is_counted_with_o200k_base(counter: TokenCounter) -> None:
    text = "Harmony shares the o200k vocabulary for ordinary text."
    assert counter.count_text(text, "gpt-oss-20b") == len(enc("o200k_base").encode(text))


def test_unpreloaded_encoding_uses_default_without_io(counter: TokenCounter, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_io(name: str) -> None:
        raise AssertionError(f"hot path tried to load {name}")

    expected = len(enc("o200k_base").encode("hello world"))
    monkeypatch.setattr(tiktoken, "get_encoding", no_io)
    assert counter.encoding_for("text-davinci-003") == "p50k_base"
    assert counter.count_text("hello world", "text-davinci-003") == expected


# -- chat prompts ------------------------------------------------------------


@pytest.mark.parametrize(("model", "published"), [("gpt-4-0613", 129), ("gpt-3.5-turbo", 129), ("gpt-4o", 124)])
def test_cookbook_example(counter: TokenCounter, model: str, published: int) -> None:
    independent = cookbook_messages(COOKBOOK_MESSAGES, enc(counter.encoding_for(model)))
    assert independent == published  # the cookbook's printed count
    assert counter.count_chat_prompt({"messages": COOKBOOK_MESSAGES}, model) == published


@pytest.mark.parametrize(("model", "func_init"), [("gpt-4o", 7), ("gpt-4", 10)])
def test_tools_match_cookbook_formula(counter: TokenCounter, model: str, func_init: int) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant that can answer questions about the weather."},
        {"role": "user", "content": "What's the weather like in San Francisco?"},
    ]
    encoding = enc(counter.encoding_for(model))
    expected = cookbook_messages(messages, encoding) + cookbook_tools(COOKBOOK_TOOLS, encoding, func_init)
    assert counter.count_chat_prompt({"messages": messages, "tools": COOKBOOK_TOOLS}, model) == expected
    legacy = {"messages": messages, "functions": [COOKBOOK_TOOLS[0]["function"]]}
    assert counter.count_chat_prompt(legacy, model) == expected


def test_nested_tool_schema_counts_more_than_flat(counter: TokenCounter) -> None:
    flat = {"type": "function", "function": {"name": "f", "parameters": {"properties": {"xs": {"type": "array"}}}}}
    nested = orjson.loads(orjson.dumps(flat))
    nested["function"]["parameters"]["properties"]["xs"]["items"] = {
        "type": "object",
        "properties": {"id": {"type": "integer"}},
    }
    base = {"messages": [{"role": "user", "content": "hi"}]}
    assert counter.count_chat_prompt({**base, "tools": [flat]}, "gpt-4o") > counter.count_chat_prompt(base, "gpt-4o")
    extra = counter.count_text('{"items":{"type":"object","properties":{"id":{"type":"integer"}}}}', "gpt-4o")
    assert counter.count_chat_prompt({**base, "tools": [nested]}, "gpt-4o") == (
        counter.count_chat_prompt({**base, "tools": [flat]}, "gpt-4o") + extra
    )


def test_tool_calls_and_tool_results_are_counted(counter: TokenCounter) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    with_call = {"role": "assistant", "content": None, "tool_calls": [call]}
    without = {"role": "assistant", "content": None}

    def prompt(*messages: dict) -> int:
        return counter.count_chat_prompt({"messages": list(messages)}, "gpt-4o")

    def text(value: str) -> int:
        return counter.count_text(value, "gpt-4o")

    added = prompt(with_call) - prompt(without)
    assert added == TOOL_CALL_OVERHEAD + text("get_weather") + text('{"city":"Paris"}')
    result = {"role": "tool", "tool_call_id": "call_1", "content": '{"temp":12}'}
    assert prompt(result) == 3 + 3 + sum(map(text, result.values()))  # the cookbook rule, all fields


def test_response_format_json_schema_counts_compact_json(counter: TokenCounter) -> None:
    schema = {"name": "Person", "strict": True, "schema": {"type": "object", "properties": {"n": {"type": "string"}}}}
    base = {"messages": [{"role": "user", "content": "hi"}]}
    with_rf = {**base, "response_format": {"type": "json_schema", "json_schema": schema}}
    diff = counter.count_chat_prompt(with_rf, "gpt-4o") - counter.count_chat_prompt(base, "gpt-4o")
    assert diff == counter.count_text(orjson.dumps(schema).decode(), "gpt-4o")
    json_object = {**base, "response_format": {"type": "json_object"}}
    assert counter.count_chat_prompt(json_object, "gpt-4o") == counter.count_chat_prompt(base, "gpt-4o")


def test_text_parts_equal_string_content(counter: TokenCounter) -> None:
    as_parts = chat({"type": "text", "text": "Hello"}, {"type": "text", "text": " there"})
    as_string = {"messages": [{"role": "user", "content": "Hello there"}]}
    # Parts are encoded one by one; this split lands on a token boundary, so the counts agree.
    assert counter.count_chat_prompt(as_parts, "gpt-4o") == counter.count_chat_prompt(as_string, "gpt-4o")


# -- images, audio, files ----------------------------------------------------


def test_image_detail_rules(counter: TokenCounter) -> None:
    text_only = counter.count_chat_prompt(chat(), "gpt-4o")
    low = chat({"type": "image_url", "image_url": {"url": "https://x/y.jpg", "detail": "low"}})
    high = chat({"type": "image_url", "image_url": {"url": "https://x/y.jpg", "detail": "high"}})
    auto = chat({"type": "image_url", "image_url": {"url": "https://x/y.jpg"}})
    assert counter.count_chat_prompt(low, "gpt-4o") - text_only == 85
    assert counter.count_chat_prompt(high, "gpt-4o") - text_only == 765  # assumed 1024x1024
    assert counter.count_chat_prompt(auto, "gpt-4o") - text_only == 765


@pytest.mark.parametrize(
    ("width", "height", "tokens"),
    [
        (128, 128, 255),  # one tile: small images are never upscaled
        (1024, 1024, 765),  # -> 768x768: 4 tiles (published example)
        (2048, 4096, 1105),  # -> 1024x2048 -> 768x1536: 6 tiles (published example)
        (1920, 1080, 1105),  # -> 1365x768: 3x2 tiles
        (513, 100, 425),  # 2x1 tiles
    ],
)
def test_image_tiles_from_png_header(width: int, height: int, tokens: int) -> None:
    assert image_tokens(png_data_url(width, height), "high") == tokens
    assert image_tokens(png_data_url(width, height), "low") == 85


@pytest.mark.parametrize(
    "url",
    ["data:image/png;base64,!!!!", "data:image/jpeg;base64,/9j/4AAQ", "data:,plain", "data:image/png;base64,"],
)
def test_unreadable_data_urls_use_default(url: str) -> None:
    assert image_tokens(url, "auto") == 765


def test_malformed_image_part_does_not_crash(counter: TokenCounter) -> None:
    bad = chat({"type": "image_url", "image_url": {"url": 5}}, {"type": "image_url"}, {"type": "image_url", "x": 1})
    assert counter.count_chat_prompt(bad, "gpt-4o") >= counter.count_chat_prompt(chat(), "gpt-4o")


def test_audio_estimate_reads_wav_byte_rate() -> None:
    byte_rate = 48_000  # 24 kHz 16-bit mono
    header = (
        b"RIFF"
        + struct.pack("<I", 36 + byte_rate)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, 24_000, byte_rate, 2, 16)
    )
    wav = header + b"data" + struct.pack("<I", byte_rate - 44) + b"\0" * (byte_rate - 44)  # 1 s in all
    assert audio_tokens(base64.b64encode(wav).decode()) == 10
    mp3_like = base64.b64encode(b"\xff\xfb" + b"\0" * 15_998).decode()  # 1 s at 128 kbit/s
    assert audio_tokens(mp3_like) == 10
    assert audio_tokens(None) == 0


def test_file_parts_are_estimated(counter: TokenCounter) -> None:
    by_id = chat({"type": "file", "file": {"file_id": "file-abc"}})
    big = chat({"type": "file", "file": {"file_data": base64.b64encode(b"%PDF" + b"\0" * 200_000).decode()}})
    base = counter.count_chat_prompt(chat(), "gpt-4o")
    assert counter.count_chat_prompt(by_id, "gpt-4o") - base == 1_000
    assert counter.count_chat_prompt(big, "gpt-4o") - base == 200_004 // 50


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"messages": None},
        {"messages": "hi"},
        {"messages": [None, 3, {"role": "user", "content": None}, {"role": "user", "content": [None, 3, {}]}]},
        {"messages": [], "tools": [None, {"type": "function", "function": None}, {"function": {"parameters": 1}}]},
        {"messages": [], "tools": [{"function": {"name": "f", "parameters": {"properties": {"a": None}}}}]},
        {"messages": [{"role": "assistant", "tool_calls": [None, {"function": 1}], "function_call": None}]},
        {"messages": [], "response_format": {"type": "json_schema", "json_schema": {"big": 2**70}}},
    ],
)
def test_malformed_bodies_never_raise(counter: TokenCounter, body: dict) -> None:
    assert counter.count_chat_prompt(body, "gpt-4o") >= 3


# -- completions and embeddings ----------------------------------------------


@pytest.mark.parametrize("field", ["prompt", "input"])
def test_prompt_shapes(counter: TokenCounter, field: str) -> None:
    count = counter.count_completion_prompt if field == "prompt" else counter.count_embedding_input
    m = "text-embedding-3-small"
    one = counter.count_text("The food was delicious", m)
    assert count({field: "The food was delicious"}, m) == one
    assert count({field: ["The food was delicious", "and the waiter"]}, m) == one + counter.count_text(
        "and the waiter", m
    )
    assert count({field: [1, 2, 3, 4]}, m) == 4
    assert count({field: [[1, 2], [3, 4, 5]]}, m) == 5
    assert count({field: []}, m) == 0
    assert count({}, m) == 0
    assert count({field: None}, m) == 0


# -- streams -----------------------------------------------------------------


def chunk(delta: dict, index: int = 0, **extra: object) -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": index, "delta": delta}], **extra}
    return orjson.dumps(body)


def test_stream_content_is_joined_before_encoding(counter: TokenCounter) -> None:
    pieces = ["Hel", "lo, wor", "ld! How are", " you?"]
    chunks = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in pieces]
    assert counter.count_stream_output(chunks, "gpt-4o") == counter.count_text("".join(pieces), "gpt-4o")


def test_stream_tool_calls_and_garbage(counter: TokenCounter) -> None:
    first = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    chunks: list[object] = [
        chunk({"role": "assistant", "content": None, "tool_calls": [first]}),
        b"not json at all",
        b"",
        b"[DONE]",
        b'{"choices": "nope"}',
        b'{"choices": [null, {"delta": 5}, {"index": "x", "delta": {"tool_calls": [null, {"function": 3}]}}]}',
        b"[1, 2]",
        b'{"error": {"message": "boom"}}',
        b"data: " + chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}}]},
        42,
        b"\xff\xfe",
    ]
    expected = TOOL_CALL_OVERHEAD + counter.count_text('get_weather{"city":"Paris"}', "gpt-4o")
    assert counter.count_stream_output(chunks, "gpt-4o") == expected  # type: ignore[arg-type]


def test_stream_multiple_choices_legacy_text_and_reasoning(counter: TokenCounter) -> None:
    chunks = [
        chunk({"content": "alpha"}, index=0),
        chunk({"content": "beta"}, index=1),
        chunk({"reasoning_content": "thinking"}, index=0),
        orjson.dumps({"object": "text_completion", "choices": [{"index": 2, "text": "legacy text"}]}),
    ]
    m = "gpt-4o"
    expected = sum(counter.count_text(t, m) for t in ("alphathinking", "beta", "legacy text"))
    assert counter.count_stream_output(chunks, m) == expected


def test_stream_reported_usage_wins(counter: TokenCounter) -> None:
    chunks = [
        chunk({"content": "Hello"}, usage=None),
        orjson.dumps({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 42, "total_tokens": 51}}),
    ]
    assert counter.count_stream_output(chunks, "gpt-4o") == 42


def test_empty_stream_is_zero(counter: TokenCounter) -> None:
    assert counter.count_stream_output([], "gpt-4o") == 0


# -- offline fallback --------------------------------------------------------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> list[str]:
    """An empty tiktoken cache, no already-loaded encodings, and every download failing."""
    attempts: list[str] = []

    def fail(url: str) -> bytes:
        attempts.append(url)
        raise ConnectionError(f"offline: {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget encodings other tests loaded
    monkeypatch.setattr(tiktoken.load, "read_file", fail)
    return attempts


def test_offline_preload_falls_back_and_warns_once_per_encoding(
    offline: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="switchboard.tokens")
    c = TokenCounter()
    c.preload()
    text = "x" * 41
    for _ in range(50):
        assert c.count_text(text, "gpt-4o") == 11 == estimate_tokens(text)
        assert c.count_text(text, "gpt-4") == 11
        assert c.count_text(text, "text-davinci-003") == 11  # not preloaded: default, no retry
        c.count_chat_prompt({"messages": COOKBOOK_MESSAGES, "tools": COOKBOOK_TOOLS}, "gpt-4o")
    warnings = [r for r in caplog.records if r.name == "switchboard.tokens"]
    assert len(warnings) == 2
    assert {r.levelno for r in warnings} == {logging.WARNING}
    assert any("o200k_base" in r.getMessage() for r in warnings)
    assert any("cl100k_base" in r.getMessage() for r in warnings)
    assert len(offline) == 2  # one failed fetch per encoding, never retried


def test_offline_lazy_load_warns_once(offline: list[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="switchboard.tokens")
    c = TokenCounter()  # no preload: loads lazily on first use
    for _ in range(20):
        assert c.count_chat_prompt({"messages": [{"role": "user", "content": "abcd" * 10}]}, "llama-3") == (
            3 + 3 + 1 + 10
        )
    assert len([r for r in caplog.records if r.name == "switchboard.tokens"]) == 1
    assert len(offline) == 1


def test_estimate_is_ceil_of_chars_per_token() -> None:
    assert CHARS_PER_TOKEN == 4
    assert [estimate_tokens("a" * n) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]


def test_remembered_counts_are_each_texts_own_and_the_memory_stays_bounded(counter: TokenCounter,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Short texts' counts are remembered (a conversation resends its history every turn): a remembered count is
    the text's own, texts of one length but different content keep theirs, and the memory is cleared at its
    bound rather than growing with every new prompt."""
    from gateway.tokens import counter as module

    monkeypatch.setattr(module, "_SHORT_MEMO_ENTRIES", 50)
    encoding = enc(counter.encoding_for("gpt-4o-mini"))
    codec = counter._codec("gpt-4o-mini", "openai")
    texts = [f"turn {i}: " + "word " * (i % 7) for i in range(120)] + ["aaaa bbbb", "aaaabbbbb", "a a a a a"]
    for _ in range(3):  # the first time counted, then (for those still remembered) from memory
        for text in texts:
            assert codec.count(text) == len(encoding.encode_ordinary(text)), text
            assert len(codec._short) <= 50
