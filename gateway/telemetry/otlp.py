"""OTLP/HTTP span export with a small hand-written protobuf encoder.

Why not the SDK's exporter: its encoder builds protobuf message objects
attribute by attribute and measured ~95 µs of CPU per gateway span on the
target machine, on the export thread that shares the core with requests. This
encoder writes the same wire format (opentelemetry-proto `trace.proto`,
`ExportTraceServiceRequest`) directly and costs a fraction of that; the test
suite decodes its output with the official protobuf classes.

It encodes the SDK's `ReadableSpan`s (the `SpanExporter` interface) and the
gateway's own traces as rows (`SpanRow`): each finished trace into its spans'
bytes at the end of the loop turn it ends in (`framed_spans`, on the event
loop), which a batch then joins into one request (`request_of`,
`export_encoded`, on the export thread).
The transport is one persistent `http.client` connection on the export
thread. A failed export is dropped, not retried: spans are
best-effort, and a dead collector must cost nothing but the lost spans.
"""

from __future__ import annotations

import http.client
import logging
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from operator import call
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.span import DEFAULT_TRACE_STATE, TraceState

log = logging.getLogger("switchboard.telemetry")

_DOUBLE = struct.Struct("<d")


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 two's complement, as protobuf encodes negative int64
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Every field number used here is < 16, so a length-delimited tag is one byte; most lengths are < 128.
_TAGS = tuple(bytes((number << 3 | 2,)) for number in range(16))
_SMALL = tuple(bytes((n,)) for n in range(128))


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    size = len(payload)
    # A join, not `+`: concatenating bytes goes through the buffer protocol, joining them does not.
    return b"".join((_TAGS[number], _SMALL[size] if size < 128 else _varint(size), payload))


# Names whose values repeat from request to request (team, model, provider, outcome...): their whole encoded
# key-values are memoised, so most of a span's attributes cost one dict lookup.
_REPEATING = frozenset({
    "gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "gen_ai.response.model",
    "gen_ai.response.finish_reasons", "gen_ai.request.stream", "server.address", "server.port",
    "switchboard.team", "switchboard.key_id", "switchboard.model", "switchboard.provider",
    "switchboard.upstream_model", "switchboard.outcome", "switchboard.stream", "switchboard.price_version",
    "switchboard.route", "switchboard.attempts", "switchboard.attempt", "switchboard.usage_estimated",
    "http.response.status_code", "error.type", "gen_ai.request.temperature", "gen_ai.request.max_tokens",
    "gen_ai.request.top_p", "openinference.span.kind", "langsmith.span.kind", "llm.model_name", "llm.provider",
    # Decision events (gateway/telemetry/decisions.py): the same few candidates and verdicts recur.
    "switchboard.route.model", "switchboard.route.strategy", "switchboard.route.attempt",
    "switchboard.route.candidates", "switchboard.route.weights", "switchboard.route.states",
    "switchboard.route.order", "switchboard.route.chosen", "switchboard.route.reason",
    "switchboard.cache.result", "switchboard.cache.mode", "switchboard.cache.scope", "switchboard.cache.backend",
    "switchboard.cache.source", "switchboard.admission.verdict", "switchboard.admission.model",
    "switchboard.admission.checks", "switchboard.admission.limits",
})


class SharedAttributes(dict[str, Any]):
    """Attributes made once and shared by many spans or events, never changed after they are made (a route
    decision that is the same for every request that meets the same standing, gateway/telemetry/decisions.py):
    an encoder encodes each such object once and keeps its bytes for as long as it keeps the object."""

    __slots__ = ()


class Doubles(tuple[float, ...]):
    """A tuple whose elements are all floats, by construction (quotients: an admission's used, requested and
    remaining amounts, gateway/telemetry/decisions.py): encoded as an array of doubles without checking each
    element's type, which for these per-request tuples cost more than framing them."""

    __slots__ = ()


# Types of values an encoded pair can be memoised by (exactly these: a subclass may hash differently).
_HASHABLE = frozenset({str, bool, int, float, tuple})


# `AnyValue`s of the integers below 128 (token counts, attempts): field 3, one byte of varint.
_SMALL_INTS = tuple(b"\x18" + bytes((n,)) for n in range(128))


def _any_value(value: Any) -> bytes:
    """An `AnyValue` message."""
    kind = type(value)
    if kind is str:
        return _field(1, value.encode())
    if kind is int:
        return _SMALL_INTS[value] if 0 <= value < 128 else b"\x18" + _varint(value)
    if kind is float:
        return b"\x21" + _DOUBLE.pack(value)
    if kind is bool:
        return b"\x10" + (b"\x01" if value else b"\x00")
    if kind is tuple:
        return _field(5, _array_values(value))
    if isinstance(value, str):
        return _field(1, value.encode())
    if isinstance(value, bool):
        return b"\x10" + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    if isinstance(value, bytes):
        return _field(7, value)
    if isinstance(value, Sequence):
        return _field(5, _array_values(value))
    return _field(1, str(value).encode())


# An `ArrayValue` element holding a double: field 1, 9 bytes long, then the AnyValue's double (field 4, fixed64).
_DOUBLE_ELEMENT = b"\x0a\x09\x21"


def _array_values(values: Sequence[Any]) -> bytes:
    """The elements of an `ArrayValue`. Decision events carry several tuples of numbers (an admission's limits,
    used, requested and remaining, one per check): a tuple of doubles only is framed in C, each element as the
    separator of a join."""
    if values and list(map(type, values)).count(float) == len(values):
        return _DOUBLE_ELEMENT + _DOUBLE_ELEMENT.join(map(_DOUBLE.pack, values))
    parts = []
    for value in values:
        if type(value) is float:
            parts.append(_DOUBLE_ELEMENT + _DOUBLE.pack(value))
        else:
            parts.append(_field(1, _any_value(value)))
    return b"".join(parts)


_DEFAULT_STATE = DEFAULT_TRACE_STATE
# The span kind field (5, varint): the SDK's INTERNAL=0 is the protocol's SPAN_KIND_INTERNAL=1, and so on.
# By the members' identity: the enums' own `__hash__` is Python code.
_KIND_FIELDS = {id(kind): b"\x30" + bytes((kind.value + 1,)) for kind in SpanKind}
_STATUS_CODES = {id(StatusCode.UNSET): 0, id(StatusCode.OK): 1, id(StatusCode.ERROR): 2}
# start_time_unix_nano (field 7) and end_time_unix_nano (field 8), both fixed64.
_TIMES = struct.Struct("<BQBQ")
# An event's time_unix_nano (field 1, fixed64).
_EVENT_TIME = struct.Struct("<BQ")
# flags (field 16, fixed32): a two-byte tag.
_FLAGS = struct.Struct("<BBI")
# Memo bounds: a memo of a pure function, bounded against unbounded name, value or layout sets.
_NAMES_MEMORY = 4096
_LAYOUTS_MEMORY = 1024  # per field number
_VALUES_MEMORY = 1024  # per attribute name and type
_ALL_VALUES_MEMORY = 65_536  # per encoder, all names' together (~100 bytes each)
_SHARED_MEMORY = 1024  # `SharedAttributes` objects whose bytes an encoder keeps


def _framed(tag: int, size: int) -> bytes:
    """A length-delimited field's tag (one byte) and length: most messages here are under 16 KiB."""
    if size < 128:
        return bytes((tag, size))
    if size < 16384:
        return bytes((tag, size & 0x7F | 0x80, size >> 7))
    return bytes((tag,)) + _varint(size)


# A finished span as plain values, what the encoder reads: trace id, span id, W3C trace flags, trace state (or
# None), parent span id (or None), whether the parent is remote, name, kind, start and end (ns since the epoch),
# attributes, events as (name, attributes or None, time in ns), status code (0 unset, 1 ok, 2 error) and its
# description (or None). The gateway's traces give rows directly (gateway/telemetry/request_trace.py); the SDK's
# spans are read into one by `span_row`.
SpanRow = tuple[int, int, int, "TraceState | None", "int | None", bool, str, SpanKind, int, int,
                "Mapping[str, Any] | None", "Sequence[tuple[str, Mapping[str, Any] | None, int]]", int, "str | None"]


def span_row(span: ReadableSpan) -> SpanRow:
    """An SDK span as a `SpanRow`."""
    context = span.context
    assert context is not None
    # SpanContext is a tuple: unpacked at once rather than through a property call per field.
    trace_id, span_id, _, trace_flags, state, _ = context
    parent = span.parent
    status = span.status
    return (trace_id, span_id, int(trace_flags), state, parent[1] if parent is not None else None,
            parent is not None and parent[2], span.name, span.kind, span.start_time or 0, span.end_time or 0,
            span.attributes, [(event.name, event.attributes, event.timestamp or 0) for event in span.events],
            _STATUS_CODES.get(id(status.status_code), 0), status.description)


def _value_pair(tag: bytes, encoded_key: bytes, value: Any) -> bytes:
    """A `KeyValue` field: its tag, its length, the encoded key, then the value as an `AnyValue` (field 2)."""
    any_value = _any_value(value)
    size = len(any_value)
    key_value_size = len(encoded_key) + 2 + size  # the key, the value's tag and length, the value
    if key_value_size < 128:  # (so is the value's own size)
        return b"".join((tag, _SMALL[key_value_size], encoded_key, b"\x12", _SMALL[size], any_value))
    key_value = b"".join((encoded_key, b"\x12", _SMALL[size] if size < 128 else _varint(size), any_value))
    size = len(key_value)
    return b"".join((tag, _SMALL[size] if size < 128 else _varint(size), key_value))


def _str_pair(tag: bytes, encoded_key: bytes, value: str) -> bytes:
    """`_value_pair` for a string (request and response ids), framed in one join when it all fits in 127 bytes."""
    data = value.encode()
    size = len(data)
    key_value_size = len(encoded_key) + 4 + size  # the key, the AnyValue's tag and length, its string's too
    if key_value_size < 128:
        return b"".join((tag, _SMALL[key_value_size], encoded_key, b"\x12", _SMALL[size + 2], b"\x0a", _SMALL[size],
                         data))
    return _value_pair(tag, encoded_key, value)


def _tuple_pair(tag: bytes, encoded_key: bytes, values: tuple[Any, ...]) -> bytes:
    """`_value_pair` for a tuple that does not repeat: `_doubles_pair` when it holds doubles only."""
    if values and list(map(type, values)).count(float) == len(values):
        return _doubles_pair(tag, encoded_key, values)
    return _value_pair(tag, encoded_key, values)


def _doubles_pair(tag: bytes, encoded_key: bytes, values: tuple[float, ...]) -> bytes:
    """`_value_pair` for a tuple of doubles (`Doubles`, or a tuple checked to hold only floats), framed in one
    join when it all fits in 127 bytes."""
    size = 11 * len(values)  # each element: its tag and length, the AnyValue's tag, 8 bytes
    key_value_size = len(encoded_key) + 4 + size  # the key, the AnyValue's tag and length, the array's too
    if values and key_value_size < 128:
        return b"".join((tag, _SMALL[key_value_size], encoded_key, b"\x12", _SMALL[size + 2], b"\x2a", _SMALL[size],
                         _DOUBLE_ELEMENT, _DOUBLE_ELEMENT.join(map(_DOUBLE.pack, values))))
    return _value_pair(tag, encoded_key, values)


class _Room:
    """How many more values an encoder's memos may keep, between them."""

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values = _ALL_VALUES_MEMORY


class _Memo(dict[Any, bytes]):
    """Encoded key-values of one attribute name by value: a hit is a lookup in C, a miss encodes the value and keeps
    it while the memo holds fewer than `_VALUES_MEMORY` values and the encoder's memos have room (then it only
    encodes)."""

    __slots__ = ("_encode", "_room")

    def __init__(self, encode: Callable[[Any], bytes], room: _Room) -> None:
        super().__init__()
        self._encode = encode
        self._room = room

    def __missing__(self, value: Any) -> bytes:
        encoded = self._encode(value)
        room = self._room
        if room.values > 0 and len(self) < _VALUES_MEMORY:
            room.values -= 1
            self[value] = encoded
        return encoded


class SpanEncoder:
    """Spans as an OTLP `ExportTraceServiceRequest`, with memos of what repeats from span to span.

    One per exporter, used by its one export thread. A span's attributes are encoded by their layout: the names
    and types of its attributes, in order, which repeat from span to span of the same kind (an attempt's, a
    request's, an admission event's). A layout is a tuple of encoders, one per attribute, built once; encoding a
    set is then one call per attribute mapped in C and one join. An encoder belongs to an attribute name and type:
    a memo of whole key-values for names whose values repeat (team, model, outcome) and for integers and
    booleans; a struct packing the key-value's prefix with the value for doubles; a function for strings and
    tuples that do not repeat (ids; an admission's numbers, `Doubles`). Memos are per field number (resource
    attributes 1, event attributes 3, span attributes 9; event names 2, span names 5).
    """

    __slots__ = ("_encoders", "_keys", "_layouts", "_names", "_prefixes", "_room", "_shared")

    def __init__(self) -> None:
        self._keys: dict[str, tuple[bytes, bool]] = {}  # name -> (encoded key, its values repeat)
        self._prefixes: tuple[dict[str, tuple[bytes, bytes, bytes, bool]], ...] = tuple({} for _ in range(16))
        self._names: tuple[dict[str, bytes], ...] = tuple({} for _ in range(16))
        # (*names, *types of their values) -> one encoder per attribute; (name, type) -> its encoder.
        self._layouts: tuple[dict[tuple[Any, ...], tuple[Callable[[Any], bytes], ...]], ...] = tuple(
            {} for _ in range(16))
        self._encoders: tuple[dict[tuple[str, type], Callable[[Any], bytes]], ...] = tuple({} for _ in range(16))
        self._room = _Room()  # the memos' values, all names together
        # (field number, id) of a `SharedAttributes` -> the object (held, so its id is not reused) and its bytes.
        self._shared: dict[tuple[int, int], tuple[SharedAttributes, bytes]] = {}

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        """An `ExportTraceServiceRequest` for the SDK's spans; grouped by resource and instrumentation scope."""
        groups: dict[tuple[int, str, str], list[SpanRow]] = {}
        resources: dict[int, Resource] = {}
        for span in spans:
            scope = span.instrumentation_scope
            key = (id(span.resource), scope.name if scope else "", (scope.version or "") if scope else "")
            resources[id(span.resource)] = span.resource
            groups.setdefault(key, []).append(span_row(span))
        by_resource: dict[int, list[bytes]] = {}
        for (resource_id, scope_name, scope_version), rows in groups.items():
            by_resource.setdefault(resource_id, []).extend(
                self._scope_spans(scope_name, scope_version, (self.framed_spans(rows),)))
        return b"".join([part for resource_id, scopes in by_resource.items()
                         for part in self._resource_spans(resources[resource_id].attributes, scopes)])

    def encode_rows(self, rows: Iterable[SpanRow], resource: Mapping[str, Any], scope_name: str) -> bytes:
        """An `ExportTraceServiceRequest` for spans as rows, all of one resource and one instrumentation scope."""
        return self.request_of(resource, scope_name, (self.framed_spans(rows),))

    def framed_spans(self, rows: Iterable[SpanRow]) -> bytes:
        """Spans as rows, encoded and framed as `ScopeSpans.spans` fields: one trace's part of a request, which
        `request_of` joins with others' as they are."""
        parts = []
        encode_row = self._row
        for row in rows:
            body = encode_row(row)
            parts.append(_framed(0x12, len(body)))  # ScopeSpans.spans: field 2
            parts.append(body)
        return b"".join(parts)

    def request_of(self, resource: Mapping[str, Any], scope_name: str, encoded: Sequence[bytes]) -> bytes:
        """An `ExportTraceServiceRequest` of spans `framed_spans` encoded (one resource, one scope): framing and a
        join, no span encoded again."""
        return b"".join(self._resource_spans(resource, self._scope_spans(scope_name, "", encoded)))

    def _resource_spans(self, resource: Mapping[str, Any], scopes: list[bytes]) -> list[bytes]:
        """ResourceSpans (field 1 of the request): the resource, then its ScopeSpans, each framed already.

        Each nested message is framed by its length without copying its contents: the parts are joined once."""
        encoded = _field(1, self._attributes(1, resource))
        return [_framed(0x0A, len(encoded) + sum(map(len, scopes))), encoded, *scopes]

    def _scope_spans(self, name: str, version: str, encoded: Sequence[bytes]) -> list[bytes]:
        """ScopeSpans (field 2 of ResourceSpans): its framing, the scope, then the spans `framed_spans` encoded."""
        scope = _field(1, name.encode()) + (_field(2, version.encode()) if version else b"")
        parts = [b"", _field(1, scope), *encoded]
        parts[0] = _framed(0x12, sum(map(len, parts)))  # ResourceSpans.scope_spans: field 2
        return parts

    def _row(self, row: SpanRow) -> bytes:
        """One `Span` message."""
        (trace_id, span_id, trace_flags, state, parent_id, parent_remote, name, kind, start, end, attributes,
         events, code, description) = row
        # trace_id: field 1, 16 bytes; span_id: field 2, 8 bytes.
        parts = [b"\x0a\x10", trace_id.to_bytes(16, "big"), b"\x12\x08", span_id.to_bytes(8, "big")]
        if state is not None and state is not _DEFAULT_STATE and state:
            parts.append(_field(3, state.to_header().encode()))
        if parent_id is not None:
            parts.append(b"\x22\x08")  # parent_span_id: field 4, 8 bytes
            parts.append(parent_id.to_bytes(8, "big"))
        parts += (self._names[5].get(name) or self._name(5, name),
                  _KIND_FIELDS.get(id(kind)) or b"\x30" + _varint(kind.value + 1),
                  _TIMES.pack(0x39, start, 0x41, end),
                  self._attributes(9, attributes))
        for event_name, event_attributes, timestamp in events:
            encoded = self._attributes(3, event_attributes)
            event_name = self._names[2].get(event_name) or self._name(2, event_name)
            parts += (_framed(0x5A, 9 + len(event_name) + len(encoded)),  # events: field 11
                      _EVENT_TIME.pack(0x09, timestamp), event_name, encoded)
        if code or description:
            parts.append(_field(15, (_field(2, description.encode()) if description else b"")
                                + (b"\x18" + _varint(code) if code else b"")))
        # flags: the W3C trace flags in the low byte, plus "parent is remote" knowledge (bits 8-9).
        parts.append(_FLAGS.pack(0x85, 0x01, trace_flags | 0x100 | (0x200 if parent_remote else 0)))
        return b"".join(parts)

    def _attributes(self, number: int, attributes: Mapping[str, Any] | None) -> bytes:
        """Repeated `KeyValue` fields numbered `number`: the hot loop of span encoding (~25 attributes a span and
        ~20 more in its events), one encoder call per attribute, mapped in C over the set's layout."""
        if not attributes:
            return b""
        if type(attributes) is SharedAttributes:
            known = self._shared.get((number, id(attributes)))
            if known is not None:
                return known[1]
            return self._share(number, attributes)
        values = attributes.values()
        # The names, then their values' types, in one flat tuple: one tuple built and hashed, not three.
        layout = (*attributes, *map(type, values))
        encoders = self._layouts[number].get(layout) or self._layout(number, layout)
        try:
            return b"".join(map(call, encoders, values))
        except TypeError:  # a value that cannot be hashed (a tuple holding a list...): encoded, not looked up
            return b"".join([self._pair(number, key, value) for key, value in attributes.items()])

    def _share(self, number: int, attributes: SharedAttributes) -> bytes:
        """Encode a `SharedAttributes` as any other set, and keep its bytes (a bounded number of them)."""
        encoded = self._attributes(number, dict(attributes))
        if len(self._shared) >= _SHARED_MEMORY:
            self._shared.clear()
        self._shared[(number, id(attributes))] = (attributes, encoded)
        return encoded

    def _layout(self, number: int, layout: tuple[Any, ...]) -> tuple[Callable[[Any], bytes], ...]:
        """The encoders of an attribute set's names and types (`layout`: the names, then the types), kept for the
        next set of the same layout."""
        known = self._encoders[number]
        half = len(layout) // 2
        encoders = tuple(known.get(name_and_type) or self._encoder(number, *name_and_type)
                         for name_and_type in zip(layout[:half], layout[half:], strict=True))
        if len(self._layouts[number]) < _LAYOUTS_MEMORY:
            self._layouts[number][layout] = encoders
        return encoders

    def _encoder(self, number: int, key: str, kind: type) -> Callable[[Any], bytes]:
        """What encodes the values of type `kind` of attribute `key` as whole `KeyValue` fields."""
        prefixes = self._prefixes[number].get(key) or self._prefixes_of(number, key)
        encoder: Callable[[Any], bytes]
        if kind is float and not prefixes[3]:
            encoder = partial(struct.Struct(f"<{len(prefixes[0])}sd").pack, prefixes[0])  # the prefix and the double
        elif kind in _HASHABLE and (prefixes[3] or kind is int or kind is bool):
            encoder = _Memo(partial(self._pair, number, key), self._room).__getitem__
        elif kind is str or kind is tuple or kind is Doubles:
            encoder = partial(_str_pair if kind is str else _tuple_pair if kind is tuple else _doubles_pair,
                              _TAGS[number], (self._keys.get(key) or self._key(key))[0])
        else:
            encoder = partial(self._pair, number, key)
        if len(self._encoders[number]) < _NAMES_MEMORY:
            self._encoders[number][(key, kind)] = encoder
        return encoder

    def _pair(self, number: int, key: str, value: Any) -> bytes:
        """One attribute as a whole `KeyValue` field numbered `number`."""
        kind = type(value)
        if kind is float:
            prefixes = self._prefixes[number].get(key) or self._prefixes_of(number, key)
            return prefixes[0] + _DOUBLE.pack(value)
        if kind is int and 0 <= value < 16384:
            prefixes = self._prefixes[number].get(key) or self._prefixes_of(number, key)
            return (prefixes[1] + _SMALL[value] if value < 128
                    else prefixes[2] + bytes((value & 0x7F | 0x80, value >> 7)))
        return _value_pair(_TAGS[number], (self._keys.get(key) or self._key(key))[0], value)

    def _prefixes_of(self, number: int, key: str) -> tuple[bytes, bytes, bytes, bool]:
        """The `KeyValue` field up to the last bytes of its value, for a double (8 bytes), an integer below 128
        (one byte of varint) and one below 16384 (two bytes); then whether the name's values repeat."""
        encoded_key, repeating = self._keys.get(key) or self._key(key)
        tag, size = _TAGS[number], len(encoded_key)
        # KeyValue: the key, then the value (field 2) framed by its length, holding the double (field 4,
        # fixed64) or the integer (field 3, varint).
        prefixes = (tag + _varint(size + 11) + encoded_key + b"\x12\x09\x21",
                    tag + _varint(size + 4) + encoded_key + b"\x12\x02\x18",
                    tag + _varint(size + 5) + encoded_key + b"\x12\x03\x18",
                    repeating)
        if len(self._prefixes[number]) < _NAMES_MEMORY:
            self._prefixes[number][key] = prefixes
        return prefixes

    def _key(self, name: str) -> tuple[bytes, bool]:
        """`name` encoded as a `KeyValue.key`, and whether its values repeat from request to request."""
        known = (_field(1, name.encode()), name in _REPEATING)
        if len(self._keys) < _NAMES_MEMORY:
            self._keys[name] = known
        return known

    def _name(self, number: int, name: str) -> bytes:
        """A span name (field 5) or an event name (field 2), encoded; they repeat per model."""
        encoded = _field(number, name.encode())
        if len(self._names[number]) < _NAMES_MEMORY:
            self._names[number][name] = encoded
        return encoded


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """`SpanEncoder().encode(spans)`, with memos of its own (for tests and one-off use)."""
    return SpanEncoder().encode(spans)


class OtlpHttpExporter(SpanExporter):
    """POSTs `application/x-protobuf` batches to an OTLP/HTTP traces endpoint."""

    def __init__(self, endpoint: str, headers: Mapping[str, str] | None = None, timeout_s: float = 10.0) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {endpoint!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._path = (parts.path or "/v1/traces") + (f"?{parts.query}" if parts.query else "")
        self._headers = {"content-type": "application/x-protobuf", **(headers or {})}
        self._timeout = timeout_s
        self._connection: http.client.HTTPConnection | None = None
        self._encoder = SpanEncoder()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._post(self._encoder.encode(spans))

    def export_encoded(self, encoded: Sequence[bytes], resource: Mapping[str, Any],
                       scope_name: str) -> SpanExportResult:
        """Export spans already encoded by `SpanEncoder.framed_spans` (the gateway's own traces), all of one
        resource and scope."""
        return self._post(self._encoder.request_of(resource, scope_name, encoded))

    def _post(self, body: bytes) -> SpanExportResult:
        for attempt in (1, 2):  # a kept-alive connection the collector closed gets one fresh retry
            connection = self._connection or self._connect()
            try:
                connection.request("POST", self._path, body=body, headers=self._headers)
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                connection.close()
                self._connection = None
                if attempt == 2:
                    return SpanExportResult.FAILURE
                continue
            if response.status >= 400:
                log.debug("collector answered %s", response.status)
                return SpanExportResult.FAILURE
            return SpanExportResult.SUCCESS
        return SpanExportResult.FAILURE

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        self._connection = cls(self._host, self._port, timeout=self._timeout)
        return self._connection

    def shutdown(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
