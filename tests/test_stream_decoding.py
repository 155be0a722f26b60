"""SSE decoding and the OpenAI-compatible stream translator, fed the way networks deliver bytes."""

from __future__ import annotations

import itertools

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from providers import ADAPTERS
from providers.base import Call, Endpoint, UpstreamFailed
from providers.sse import SseDecoder
from tests.stream_translation import translate_bytes

EVENTS = [b'{"a":1}', b'{"b":"x\\ny"}', b"[DONE]"]
WIRE = b"".join(b"data: " + e + b"\n\n" for e in EVENTS)


def _decode(pieces: list[bytes]) -> list[bytes]:
    decoder = SseDecoder()
    out = [data for piece in pieces for data in decoder.feed(piece)]
    return out + decoder.end()


@given(st.lists(st.integers(min_value=0, max_value=len(WIRE)), max_size=6))
def test_events_survive_any_split_of_the_byte_stream(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(WIRE)]
    assert _decode([WIRE[a:b] for a, b in itertools.pairwise(bounds)]) == EVENTS


def test_decoder_joins_multiline_data_and_ignores_other_fields() -> None:
    wire = b": keep-alive\n\nevent: delta\nid: 7\ndata: {\"x\":\ndata: 1}\n\nretry: 10\n\n"
    assert _decode([wire]) == [b'{"x":\n1}']


def test_decoder_accepts_crlf_and_data_without_a_space() -> None:
    assert _decode([b"data:{\"a\":1}\r\n\r\ndata: [DONE]\r\n\r\n"]) == [b'{"a":1}', b"[DONE]"]


def test_an_event_missing_only_its_final_blank_line_still_counts() -> None:
    assert _decode([b"data: {\"a\":1}\n\ndata: {\"b\":2}\n"]) == [b'{"a":1}', b'{"b":2}']


ADAPTER = ADAPTERS["openai"]
CALL = Call(Endpoint.CHAT, {"model": "m", "messages": []}, "m", True)


def _sse(*payloads: object, spaced: bool = False) -> bytes:
    def dump(payload: object) -> bytes:
        return payload if isinstance(payload, bytes) else orjson.dumps(payload)
    wire = b"".join(b"data: " + dump(p) + b"\n\n" for p in payloads)
    return wire.replace(b'":', b'": ') if spaced else wire


def _chunk(index: int, content: str | None, finish: str | None) -> dict[str, object]:
    delta = {} if content is None else {"content": content}
    return {"index": index, "delta": delta, "finish_reason": finish}


@pytest.mark.parametrize("spaced", [False, True], ids=["compact", "spaced"])
def test_usage_and_finish_reasons_are_read_in_compact_and_spaced_json(spaced: bool) -> None:
    wire = _sse({"choices": [_chunk(0, "hi", None)], "usage": None},
                # Two choices in one chunk, only the second finishing: still a finish reason to read.
                {"choices": [_chunk(0, "!", None), _chunk(1, None, "length")], "usage": None},
                {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
                b"[DONE]", spaced=spaced)
    chunks = translate_bytes(ADAPTER, CALL, [wire])
    assert [c.finish_reason for c in chunks] == [None, "length", None]
    usage = chunks[-1].usage
    assert chunks[-1].usage_only and usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, 4)


def test_a_key_quoted_inside_content_is_not_mistaken_for_one() -> None:
    text = '"finish_reason":"stop","usage":{"prompt_tokens":1}'
    wire = _sse({"choices": [_chunk(0, text, None)], "usage": None}, b"[DONE]")
    (chunk,) = translate_bytes(ADAPTER, CALL, [wire])
    assert chunk.finish_reason is None and chunk.usage is None
    assert orjson.loads(chunk.data)["choices"][0]["delta"]["content"] == text  # relayed byte for byte


def test_error_event_and_missing_done_are_failures() -> None:
    with pytest.raises(UpstreamFailed) as error:
        translate_bytes(ADAPTER, CALL, [_sse({"error": {"message": "boom", "type": "server_error"}})])
    assert "boom" in error.value.failure.message
    with pytest.raises(UpstreamFailed, match="ended before completing"):
        translate_bytes(ADAPTER, CALL, [_sse({"choices": [_chunk(0, "hi", None)]})])


PLAIN = [{"choices": [_chunk(0, f"word{n} ", None)], "usage": None} for n in range(6)]
ENDING = [{"choices": [_chunk(0, None, "stop")], "usage": None},
          {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}}, b"[DONE]"]


@given(st.lists(st.integers(min_value=0, max_value=len(_sse(*PLAIN, *ENDING))), max_size=5))
def test_reads_translate_as_the_same_chunks_however_the_events_are_grouped(cuts: list[int]) -> None:
    """Reads of content deltas only are relayed after one scan; the rest event by event: same chunks either way."""
    wire = _sse(*PLAIN, *ENDING)
    bounds = [0, *sorted(cuts), len(wire)]
    by_read = translate_bytes(ADAPTER, CALL, [wire[a:b] for a, b in itertools.pairwise(bounds)])
    translator = ADAPTER.stream_translator(CALL)
    one_by_one = [chunk for data in _decode([wire]) for chunk in translator.feed(data)]
    assert [(c.data, c.finish_reason, c.usage, c.usage_only) for c in by_read] == [
        (c.data, c.finish_reason, c.usage, c.usage_only) for c in one_by_one]
    assert [c.finish_reason for c in by_read][-2:] == ["stop", None] and by_read[-1].usage_only


def test_an_error_event_among_content_deltas_in_one_read_is_a_failure() -> None:
    wire = _sse(*PLAIN[:3], {"error": {"message": "overloaded", "type": "server_error"}})
    with pytest.raises(UpstreamFailed) as error:
        translate_bytes(ADAPTER, CALL, [wire])
    assert "overloaded" in error.value.failure.message


def test_many_single_line_events_in_one_read_keep_a_partial_event_for_the_next() -> None:
    wire = _sse(*PLAIN)
    decoder = SseDecoder()
    first = decoder.feed(wire[:-10])
    assert first == [orjson.dumps(p) for p in PLAIN[:-1]]
    assert decoder.feed(wire[-10:]) == [orjson.dumps(PLAIN[-1])]


def test_an_error_event_before_the_ending_in_one_read_is_still_a_failure() -> None:
    """The content before a read's ending is judged by one scan: an error among it is still found."""
    wire = _sse(*PLAIN[:3], {"error": {"message": "overloaded", "type": "server_error"}}, *PLAIN[3:], *ENDING)
    with pytest.raises(UpstreamFailed) as error:
        translate_bytes(ADAPTER, CALL, [wire])
    assert "overloaded" in error.value.failure.message


def test_content_quoting_done_before_the_ending_in_one_read_is_relayed_as_content() -> None:
    quoting = {"choices": [_chunk(0, "say [DONE] ", None)], "usage": None}
    wire = _sse(*PLAIN[:2], quoting, *PLAIN[2:], *ENDING)
    chunks = translate_bytes(ADAPTER, CALL, [wire])
    assert [c.data for c in chunks[:-1]] == [orjson.dumps(p) for p in (*PLAIN[:2], quoting, *PLAIN[2:], ENDING[0])]
    assert chunks[-1].usage_only and chunks[-2].finish_reason == "stop"
