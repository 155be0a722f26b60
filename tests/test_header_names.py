"""gateway/http/asgi.py `HeaderNames`: the app's bounded memo of header names converts as the codecs do."""

from __future__ import annotations

from gateway.http.asgi import HeaderNames, request_headers


def test_names_convert_as_the_codec_does_within_the_bound_and_past_it() -> None:
    names = HeaderNames(size=2)
    reply = {"x-a": "1", "x-b": "caf\u00e9", "x-c": "3"}
    expected = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in reply.items()]
    assert names.encoded(reply) == expected  # learnt: two, the bound; the third converted each time
    assert names.encoded(reply) == expected
    assert len(names._raw) == 2
    raw = [(b"x-a", b"1"), (b"x-b", b"caf\xe9"), (b"x-c", b"3"), (b"x-a", b"4")]
    assert names.decoded(raw) == {"x-a": "4", "x-b": "caf\u00e9", "x-c": "3"}  # the last of a repeated name
    assert len(names._text) == 2
    assert names.decoded([(bytearray(b"x-d"), b"5")]) == {"x-d": "5"}


def test_each_app_has_its_own_names_and_a_scope_of_its_own_decodes_without_them() -> None:
    first, second = HeaderNames(), HeaderNames()
    first.encoded({"x-only-first": "1"})
    assert "x-only-first" in first._raw and "x-only-first" not in second._raw
    scope = {"headers": [(b"x-request-id", b"abc")]}
    assert request_headers(scope) == {"x-request-id": "abc"}
