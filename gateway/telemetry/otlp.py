"""OTLP/HTTP span export with a small hand-written protobuf encoder.

Why not the SDK's exporter: its encoder builds protobuf message objects
attribute by attribute and measured ~95 µs of CPU per gateway span on the
target machine, on the export thread that shares the core with requests. This
encoder writes the same wire format (opentelemetry-proto `trace.proto`,
`ExportTraceServiceRequest`) directly and costs a fraction of that; the test
suite decodes its output with the official protobuf classes.

The transport is one persistent `http.client` connection on the batch
processor's thread. A failed export is dropped, not retried: spans are
best-effort, and a dead collector must cost nothing but the lost spans.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

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


# Attribute names encoded (`KeyValue.key` with its tag and length), and whether their values repeat.
_KEYS: dict[str, tuple[bytes, bool]] = {}
# Whole encoded key-values of attributes whose values repeat from request to request (team, model,
# provider, outcome...), so most of a span's attributes cost one dict lookup: by field number, then by
# (name, value, type of value).
_PAIRS: tuple[dict[tuple[str, Any, type], bytes], ...] = tuple({} for _ in range(16))
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


# Types of values an encoded pair can be cached by (exactly these: a subclass may hash differently).
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


def _attributes(number: int, attributes: Mapping[str, Any] | None) -> bytes:
    """Repeated `KeyValue` fields numbered `number`: the hot loop of span encoding (~25 attributes a span and
    ~20 more in its events, most of them repeating from request to request)."""
    if not attributes:
        return b""
    get = _PAIRS[number].get
    try:
        # Each attribute's cached pair, else encoded by `_pair` (which alone fills the cache). Keyed by the
        # value's type too: 1, 1.0 and True are equal as keys but encode differently.
        return b"".join([get((key, value, type(value))) or _pair(number, key, value)
                         for key, value in attributes.items()])
    except Exception:  # a value that cannot be hashed (a tuple holding a list...): encoded, not looked up
        return b"".join([_pair(number, key, value) for key, value in attributes.items()])


# Per field number, by attribute name: the `KeyValue` field up to the last bytes of its value, for a double
# (8 bytes), an integer below 128 (one byte of varint) and one below 16384 (two bytes), each of a fixed length;
# then whether the name's values repeat. Token counts, costs and durations vary per request: each of those is
# a lookup and a concatenation.
_PREFIXES: tuple[dict[str, tuple[bytes, bytes, bytes, bool]], ...] = tuple({} for _ in range(16))


def _prefixes(number: int, key: str) -> tuple[bytes, bytes, bytes, bool]:
    known = _KEYS.get(key)
    if known is None:
        known = _key(key)
    encoded_key, repeating = known
    tag, size = _TAGS[number], len(encoded_key)
    # KeyValue: the key, then the value (field 2) framed by its length, holding the double (field 4, fixed64) or
    # the integer (field 3, varint).
    prefixes = (tag + _varint(size + 11) + encoded_key + b"\x12\x09\x21",
                tag + _varint(size + 4) + encoded_key + b"\x12\x02\x18",
                tag + _varint(size + 5) + encoded_key + b"\x12\x03\x18",
                repeating)
    if len(_PREFIXES[number]) < 4096:
        _PREFIXES[number][key] = prefixes
    return prefixes


def _pair(number: int, key: str, value: Any) -> bytes:
    """One attribute as a whole `KeyValue` field numbered `number` (cached when its values repeat)."""
    prefixes = _PREFIXES[number].get(key) or _prefixes(number, key)
    kind = type(value)
    if kind is float:
        encoded = prefixes[0] + _DOUBLE.pack(value)
    elif kind is int and 0 <= value < 16384:
        encoded = (prefixes[1] + _SMALL[value] if value < 128
                   else prefixes[2] + bytes((value & 0x7F | 0x80, value >> 7)))
    else:
        encoded_key = _KEYS[key][0] if key in _KEYS else _key(key)[0]
        any_value = _any_value(value)
        size = len(any_value)
        key_value_size = len(encoded_key) + 2 + size  # the key, the value's tag and length, the value
        if key_value_size < 128:  # (so is the value's own size)
            encoded = b"".join((_TAGS[number], _SMALL[key_value_size], encoded_key, b"\x12", _SMALL[size],
                                any_value))
        else:
            key_value = b"".join((encoded_key, b"\x12", _SMALL[size] if size < 128 else _varint(size), any_value))
            size = len(key_value)
            encoded = b"".join((_TAGS[number], _SMALL[size] if size < 128 else _varint(size), key_value))
    if prefixes[3] and kind in _HASHABLE and len(_PAIRS[number]) < 8192:
        with contextlib.suppress(TypeError):  # a tuple holding something unhashable: encoded, not cached
            _PAIRS[number][(key, value, kind)] = encoded
    return encoded


def _key(name: str) -> tuple[bytes, bool]:
    """`name` encoded as a `KeyValue.key`, and whether its values repeat from request to request."""
    known = (_field(1, name.encode()), name in _REPEATING)
    if len(_KEYS) < 4096:  # a memo of a pure function, bounded against unbounded key sets
        _KEYS[name] = known
    return known


# Span names and event names encoded as their field (span name: 5, event name: 2); they repeat per model.
_NAMES: tuple[dict[str, bytes], ...] = tuple({} for _ in range(16))
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


def _name(number: int, name: str) -> bytes:
    names = _NAMES[number]
    encoded = names.get(name)
    if encoded is None:
        encoded = _field(number, name.encode())
        if len(names) < 4096:
            names[name] = encoded
    return encoded


def _framed(tag: int, size: int) -> bytes:
    """A length-delimited field's tag (one byte) and length: most messages here are under 16 KiB."""
    if size < 128:
        return bytes((tag, size))
    if size < 16384:
        return bytes((tag, size & 0x7F | 0x80, size >> 7))
    return bytes((tag,)) + _varint(size)


def _span(span: ReadableSpan) -> bytes:
    context = span.context
    assert context is not None
    # SpanContext is a tuple: unpacked at once rather than through a property call per field.
    trace_id, span_id, _, trace_flags, state, _ = context
    parent = span.parent
    # trace_id: field 1, 16 bytes; span_id: field 2, 8 bytes.
    parts = [b"\x0a\x10", trace_id.to_bytes(16, "big"), b"\x12\x08", span_id.to_bytes(8, "big")]
    if state is not _DEFAULT_STATE and state:
        parts.append(_field(3, state.to_header().encode()))
    if parent is not None:
        parts.append(b"\x22\x08")  # parent_span_id: field 4, 8 bytes
        parts.append(parent[1].to_bytes(8, "big"))
    kind = span.kind
    parts.append(_name(5, span.name))
    parts.append(_KIND_FIELDS.get(id(kind)) or b"\x30" + _varint(kind.value + 1))
    parts.append(_TIMES.pack(0x39, span.start_time or 0, 0x41, span.end_time or 0))
    parts.append(_attributes(9, span.attributes))
    for event in span.events:
        attributes = _attributes(3, event.attributes)
        name = _name(2, event.name)
        parts.append(_framed(0x5A, 9 + len(name) + len(attributes)))  # events: field 11
        parts.append(_EVENT_TIME.pack(0x09, event.timestamp or 0))
        parts.append(name)
        parts.append(attributes)
    status = span.status
    code = _STATUS_CODES.get(id(status.status_code), 0)
    if code or status.description:
        parts.append(_field(15, (_field(2, status.description.encode()) if status.description else b"")
                            + (b"\x18" + _varint(code) if code else b"")))
    # flags: the W3C trace flags in the low byte, plus "parent is remote" knowledge (bits 8-9).
    flags = int(trace_flags) | 0x100 | (0x200 if parent is not None and parent[2] else 0)
    parts.append(_FLAGS.pack(0x85, 0x01, flags))
    return b"".join(parts)


def encode_request(spans: Sequence[ReadableSpan]) -> bytes:
    """An `ExportTraceServiceRequest` for spans; grouped by resource and instrumentation scope.

    Each nested message is framed by its length without copying its contents: the parts are joined once."""
    groups: dict[tuple[int, str, str], list[ReadableSpan]] = {}
    resources: dict[int, Resource] = {}
    for span in spans:
        scope = span.instrumentation_scope
        key = (id(span.resource), scope.name if scope else "", (scope.version or "") if scope else "")
        resources[id(span.resource)] = span.resource
        groups.setdefault(key, []).append(span)
    # Per resource: the parts of its ScopeSpans messages (field 2 of ResourceSpans) and their size.
    by_resource: dict[int, tuple[list[bytes], list[int]]] = {}
    for (resource_id, scope_name, scope_version), members in groups.items():
        scope = _field(1, scope_name.encode()) + (_field(2, scope_version.encode()) if scope_version else b"")
        scope_parts = [b"", _field(1, scope)]
        for member in members:
            body = _span(member)
            scope_parts.append(_framed(0x12, len(body)))  # ScopeSpans.spans: field 2
            scope_parts.append(body)
        size = sum(map(len, scope_parts))
        scope_parts[0] = _framed(0x12, size)  # ResourceSpans.scope_spans: field 2
        parts, sizes = by_resource.setdefault(resource_id, ([], [0]))
        parts.extend(scope_parts)
        sizes[0] += len(scope_parts[0]) + size
    out = []
    for resource_id, (parts, sizes) in by_resource.items():
        resource = _field(1, _attributes(1, resources[resource_id].attributes))
        size = len(resource) + sizes[0]
        out.append(_framed(0x0A, size))  # ExportTraceServiceRequest.resource_spans: field 1
        out.append(resource)
        out.extend(parts)
    return b"".join(out)


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

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        body = encode_request(spans)
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
