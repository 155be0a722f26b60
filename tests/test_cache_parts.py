"""The cache's parts on their own: keys, entries, the byte-bounded LRU, the vector index."""

from __future__ import annotations

import asyncio

import orjson

from gateway.cache.backends import MemoryBackend
from gateway.cache.entry import Entry, from_response, from_stream
from gateway.cache.keys import exact_key, semantic_parts
from gateway.cache.semantic import normalized
from gateway.cache.vector_index import SemanticIndex
from providers.base import Endpoint, Usage

CHAT = Endpoint.CHAT
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]}


def test_the_key_ignores_order_and_delivery_fields_but_not_what_changes_the_answer() -> None:
    key = exact_key(b"team\x00a", CHAT, BODY, "m")
    reordered = dict(reversed(list(BODY.items())))
    assert exact_key(b"team\x00a", CHAT, reordered, "m") == key
    delivery = {**BODY, "stream": True, "stream_options": {"include_usage": True}, "user": "u", "metadata": {"x": 1}}
    assert exact_key(b"team\x00a", CHAT, delivery, "m") == key
    for changed in ({**BODY, "temperature": 0.5}, {**BODY, "tools": []}, {**BODY, "n": 2}, {**BODY, "seed": 1},
                    {**BODY, "response_format": {"type": "json_object"}}):
        assert exact_key(b"team\x00a", CHAT, changed, "m") != key
    assert exact_key(b"team\x00b", CHAT, BODY, "m") != key
    assert exact_key(b"team\x00a", Endpoint.COMPLETIONS, BODY, "m") != key
    assert exact_key(b"team\x00a", CHAT, BODY, "downgraded") != key


def test_the_semantic_partition_is_everything_but_the_last_user_turn() -> None:
    first = semantic_parts(b"s", CHAT, BODY, "m")
    other = semantic_parts(b"s", CHAT, {**BODY, "messages": [{"role": "user", "content": "hello"}]}, "m")
    assert first is not None and other is not None
    assert first[0] == other[0] and (first[1], other[1]) == ("hi", "hello")
    with_system = {**BODY, "messages": [{"role": "system", "content": "be brief"}, *BODY["messages"]]}
    assert semantic_parts(b"s", CHAT, with_system, "m")[0] != first[0]  # type: ignore[index]
    assert semantic_parts(b"other", CHAT, BODY, "m")[0] != first[0]  # type: ignore[index]
    parts = [{"type": "text", "text": "hi"}]
    assert semantic_parts(b"s", CHAT, {**BODY, "messages": [{"role": "user", "content": parts}]}, "m") is None


def _response() -> bytes:
    return orjson.dumps({
        "id": "c1", "object": "chat.completion", "created": 5, "model": "m", "system_fingerprint": "fp",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 600}, "finish_reason": "stop"},
                    {"index": 1, "message": {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "t1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]},
                     "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})


def test_a_response_turned_into_a_stream_assembles_back_into_the_same_answer() -> None:
    entry = from_response(CHAT, _response(), Usage(3, 4), 100.0)
    chunks = [event.removeprefix(b"data: ") for event in entry.events.split(b"\n\n") if event]
    assert len(chunks) == 8  # role, 3 pieces of up to 256 chars, finish; role, tool call, finish
    usage_data = entry.usage_event.removeprefix(b"data: ").rstrip()
    again = from_stream(CHAT, chunks, None, usage_data, 100.0)
    original, assembled = orjson.loads(_response()), orjson.loads(again.body)
    for mine, theirs in zip(assembled["choices"], original["choices"], strict=True):
        assert mine["finish_reason"] == theirs["finish_reason"]
        assert mine["message"]["content"] == theirs["message"]["content"]
        assert mine["message"].get("tool_calls") == theirs["message"].get("tool_calls")
    assert assembled["usage"] == original["usage"] and assembled["id"] == "c1"
    assert again.usage == Usage(3, 4)
    assert entry.stream_bytes(False).endswith(b"data: [DONE]\n\n") and b'"usage"' not in entry.stream_bytes(False)


def test_legacy_completions_round_trip() -> None:
    body = orjson.dumps({"id": "k", "object": "text_completion", "created": 1, "model": "m",
                         "choices": [{"text": "hello", "index": 0, "logprobs": None, "finish_reason": "length"}]})
    entry = from_response(Endpoint.COMPLETIONS, body, None, 1.0)
    chunks = [event.removeprefix(b"data: ") for event in entry.events.split(b"\n\n") if event]
    again = orjson.loads(from_stream(Endpoint.COMPLETIONS, chunks, None, None, 1.0).body)
    assert again["choices"] == [{"text": "hello", "index": 0, "logprobs": None, "finish_reason": "length"}]


def test_entries_survive_encoding_and_refuse_garbage() -> None:
    entry = from_response(CHAT, _response(), Usage(3, 4, 1, 0, 2), 123.5)
    assert Entry.decode(entry.encode()) == entry
    assert Entry.decode(b"not an entry") is None
    assert Entry.decode(b'{"v":99}\nxx') is None


def test_the_memory_store_stays_within_its_bytes_and_evicts_the_least_recent() -> None:
    now = [0.0]
    store = MemoryBackend(max_bytes=3000, clock=lambda: now[0])
    entry = Entry(0.0, b"x" * 800, b"", b"", None)  # 1000 bytes with overhead
    done: list[bytes] = []
    for key in (b"a", b"b", b"c"):
        store.put(key, entry, 60, True, lambda k=key: done.append(k))
    assert store.bytes == 3000 and done == [b"a", b"b", b"c"]
    assert asyncio.run(store.get(b"a")) is entry  # a is now the most recent
    store.put(b"d", entry, 60, True, lambda: None)
    assert store.bytes <= 3000 and len(store) == 3
    assert asyncio.run(store.get(b"b")) is None and asyncio.run(store.get(b"a")) is entry
    store.put(b"huge", Entry(0.0, b"x" * 5000, b"", b"", None), 60, True, lambda: None)
    assert asyncio.run(store.get(b"huge")) is None
    now[0] = 61.0
    assert asyncio.run(store.get(b"a")) is None and store.bytes == 2000


def test_the_index_finds_the_nearest_above_the_threshold_within_its_bound() -> None:
    index = SemanticIndex(max_entries=2)
    a, b = normalized([1.0, 0.0]), normalized([0.6, 0.8])
    assert a is not None and b is not None
    index.add(b"p", b"a", a, expires_at=100)
    index.add(b"p", b"b", b, expires_at=100)
    query = normalized([0.9, 0.1])
    assert query is not None
    found = index.nearest(b"p", query, 0.9, now=0)
    assert found is not None and found[0] == b"a"
    assert index.nearest(b"p", query, 0.999, now=0) is None
    assert index.nearest(b"other", query, 0.1, now=0) is None
    assert index.nearest(b"p", query, 0.1, now=100) is None  # expired
    index.add(b"p", b"a", a, expires_at=100)
    index.add(b"p", b"b", b, expires_at=100)
    index.add(b"p", b"c", b, expires_at=100)
    assert len(index) == 2


def test_a_big_partition_is_scored_off_the_loop_with_the_same_answer() -> None:
    import random

    from gateway.cache.vector_index import OFF_LOOP_ELEMENTS

    rng = random.Random(7)
    dims, count = 1536, OFF_LOOP_ELEMENTS // 1536 + 50  # past the threshold: find() scores in a thread
    index = SemanticIndex(max_entries=count)
    vectors = []
    for i in range(count):
        vector = normalized([rng.gauss(0, 1) for _ in range(dims)])
        assert vector is not None
        vectors.append(vector)
        index.add(b"p", f"k{i}".encode(), vector, expires_at=100 if i != 3 else 10)
    query = normalized([x + rng.gauss(0, 0.01) for x in vectors[42]])
    assert query is not None
    found = asyncio.run(index.find(b"p", query, 0.9, now=0))
    assert found is not None and found[0] == b"k42" and found[1] > 0.9
    assert found == index.nearest(b"p", query, 0.9, now=0)
    expired = normalized([x + rng.gauss(0, 0.01) for x in vectors[3]])
    assert expired is not None
    assert asyncio.run(index.find(b"p", expired, 0.9, now=50)) is None  # k3 expired at 10, and is forgotten
    assert len(index) == count - 1
