"""The OTLP/HTTP exporter ships real protobuf to a collector; a dead collector costs requests nothing."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import ADMIN_POLICY, RunningGateway, metrics_text, standard_policy
from tests.fakes import FakeOpenAIUpstream
from tests.fakes.otlp_receiver import OtlpReceiver, count_spans


def otlp_policy(upstream: FakeOpenAIUpstream, endpoint: str, timeout_ms: int = 5000) -> str:
    return standard_policy(upstream.base_url, extra=f"""
prices:
  targets:
    upstream:
      upstream-chat: {{input: 2.50, output: 10.00, version: otlp-test}}
telemetry:
  traces:
    exporter: otlp_http
    endpoint: {endpoint}
    headers: {{x-collector-key: collector-secret}}
    service_name: switchboard-test
    project: checkout-prod
    batch: {{schedule_delay_ms: 20, export_timeout_ms: {timeout_ms}}}
""")


@pytest.fixture
def collector() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


def test_spans_reach_a_real_otlp_collector(upstream: FakeOpenAIUpstream, collector: OtlpReceiver,
                                           start_gateway: Callable[..., RunningGateway]) -> None:
    gateway = start_gateway(otlp_policy(upstream, collector.traces_url))
    client = gateway.client()
    raw = client.chat.completions.with_raw_response.create(model="chat-model",
                                                           messages=[{"role": "user", "content": "a b c"}])
    list(client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "d e"}],
                                        stream=True))
    records = gateway.usage.wait_for(2)
    spans = collector.wait_for(lambda s: sum(x.kind == "SERVER" for x in s) >= 2)
    servers = {s.trace_id: s for s in spans if s.kind == "SERVER"}
    assert set(servers) == {r.trace_id for r in records}
    for record in records:
        server = servers[record.trace_id]
        (attempt,) = [s for s in spans if s.parent_span_id == server.span_id]
        assert (server.name, attempt.name, attempt.kind) == ("chat chat-model", "chat upstream-chat", "CLIENT")
        assert server.attributes["switchboard.team"] == "alpha"
        assert server.attributes["switchboard.key_id"] == "alpha-key"
        assert "gen_ai.usage.input_tokens" not in server.attributes  # counted once: on the attempt
        assert attempt.attributes["gen_ai.usage.input_tokens"] == record.usage.prompt_tokens  # type: ignore[union-attr]
        assert attempt.attributes["llm.token_count.prompt"] == record.usage.prompt_tokens  # type: ignore[union-attr]
        assert (server.attributes["openinference.span.kind"], attempt.attributes["openinference.span.kind"]) == (
            "CHAIN", "LLM")
        assert server.attributes["switchboard.cost_usd"] == pytest.approx(record.cost_usd)
        assert server.attributes["switchboard.price_version"] == "otlp-test"
        assert attempt.attributes["gen_ai.provider.name"] == "openai_compatible"
        assert attempt.attributes["gen_ai.response.finish_reasons"] == ("stop",)
        assert server.resource["service.name"] == "switchboard-test"
        assert server.resource["openinference.project.name"] == "checkout-prod"  # Phoenix's project
    first = next(r for r in records if not r.stream)
    assert servers[first.trace_id].attributes["switchboard.cost_usd"] == pytest.approx(
        float(raw.headers["x-switchboard-cost-usd"]))
    assert collector.headers[0]["x-collector-key"] == "collector-secret"
    # Phoenix and LangSmith read the project from these export headers.
    assert collector.headers[0]["x-project-name"] == "checkout-prod"
    assert collector.headers[0]["langsmith-project"] == "checkout-prod"
    assert collector.headers[0]["content-type"] == "application/x-protobuf"


class _Watch(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if "failing" in record.getMessage():
            self.seen.set()


def test_dead_collector_drops_spans_with_one_log_line(upstream: FakeOpenAIUpstream,
                                                      start_gateway: Callable[..., RunningGateway]) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/v1/traces"
    watch = _Watch()
    telemetry_log = logging.getLogger("switchboard.telemetry")
    telemetry_log.addHandler(watch)
    telemetry_log.setLevel(logging.INFO)
    try:
        gateway = start_gateway(otlp_policy(upstream, dead, timeout_ms=200) + ADMIN_POLICY)
        client = gateway.client()
        for _ in range(10):
            raw = client.chat.completions.with_raw_response.create(
                model="chat-model", messages=[{"role": "user", "content": "x"}])
            assert raw.http_response.status_code == 200
            assert float(raw.headers["x-switchboard-overhead-ms"]) < 100
        assert watch.seen.wait(10), watch.messages
        for _ in range(10):
            client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "y"}])
        gateway.usage.wait_for(20)
        assert sum("failing" in m for m in watch.messages) == 1
        # Every span was lost, and every one is counted (2 a request: the upstream attempt and the request), once
        # the export thread has tried the last batch (a 20 ms schedule, refused at once).
        deadline = time.monotonic() + 10
        while (dropped := _dropped_spans(gateway)) < 40:
            assert time.monotonic() < deadline, dropped
            time.sleep(0.02)
        assert dropped == 40
    finally:
        telemetry_log.removeHandler(watch)


def test_encoder_output_decodes_with_the_official_protobuf_classes() -> None:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    from gateway.telemetry.otlp import encode_request
    from tests.fakes.otlp_receiver import decode

    parent = SpanContext(0xABC, 0x123, True, TraceFlags(1))
    span = ReadableSpan(
        name="chat m", context=SpanContext(0xABC, 0x456, False, TraceFlags(1)), parent=parent,
        resource=Resource.create({"service.name": "svc"}), kind=SpanKind.SERVER,
        attributes={"s": "ünïcode " * 40, "i": -5, "big": 2**40, "f": 0.25, "b": False, "t": ("a", "b"),
                    "n": (1, 2)},
        events=[Event("switchboard.route", {"chosen": "b"}, 1_000)], status=Status(StatusCode.ERROR, "boom"),
        start_time=10, end_time=20, instrumentation_scope=InstrumentationScope("switchboard"))
    (decoded,) = decode(encode_request([span, ]))
    assert (decoded.name, decoded.kind, decoded.status) == ("chat m", "SERVER", "ERROR")
    assert (decoded.trace_id, decoded.span_id, decoded.parent_span_id) == (
        f"{0xABC:032x}", f"{0x456:016x}", f"{0x123:016x}")
    assert decoded.attributes == {"s": "ünïcode " * 40, "i": -5, "big": 2**40, "f": 0.25, "b": False,
                                  "t": ("a", "b"), "n": (1, 2)}
    assert decoded.events == ["switchboard.route"] and decoded.resource["service.name"] == "svc"


def test_encoder_memos_give_the_same_bytes_and_keep_value_types_apart() -> None:
    """The encoder memoises whole pairs of repeating attributes and per-name prefixes of numbers: a batch encodes
    to the same bytes the second time, and a repeating attribute's 1, 1.0 and True stay an int, a double and a
    bool, whatever came first."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

    from gateway.telemetry.otlp import encode_request
    from tests.fakes.otlp_receiver import decode

    resource = Resource.create({"service.name": "svc"})
    values = (1, 1.0, True, 300, 20000, -3, 2**40, 0.1, "x" * 200, (1.0, 2.5), (1, 2), (), ("a", 1.5))

    def span(number: int, value: object) -> ReadableSpan:
        attributes = {"switchboard.attempts": value, "gen_ai.request.temperature": value, "memo.test.value": value,
                      "switchboard.cost_usd": 0.5 + number, "gen_ai.usage.input_tokens": 100 * number}
        return ReadableSpan(
            name=f"chat m{number % 2}", context=SpanContext(0xABC, 0x456 + number, False, TraceFlags(1)),
            resource=resource, kind=SpanKind.CLIENT, attributes=attributes, start_time=10, end_time=20,
            events=[Event("switchboard.admission", {"switchboard.admission.used": (1.0, 2.5 * number),
                                                    "memo.test.event": value}, 5)],
            instrumentation_scope=InstrumentationScope("switchboard"))

    for order in (values, values[::-1]):
        spans = [span(number, value) for number, value in enumerate(order)]
        first = encode_request(spans)
        assert encode_request(spans) == first
        assert b"".join(encode_request([s]) for s in spans[:1]) == encode_request(spans[:1])
        for decoded, value in zip(decode(first), order, strict=True):
            for name in ("switchboard.attempts", "gen_ai.request.temperature", "memo.test.value"):
                assert decoded.attributes[name] == value
                assert type(decoded.attributes[name]) is type(value)
                if isinstance(value, tuple):
                    assert [type(v) for v in decoded.attributes[name]] == [type(v) for v in value]


def test_per_request_strings_and_numbers_decode_as_given_whatever_their_size() -> None:
    """Names whose values change per request (ids, tokens, costs) are encoded by a per-name encoder after their
    first value: strings of every length around the one-byte length limits, integers around the varint steps and
    negative ones, doubles; each span decodes to exactly its own values."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

    from gateway.telemetry.otlp import encode_request
    from tests.fakes.otlp_receiver import decode

    texts = ["", "a", "é" * 60, *("x" * n for n in (90, 100, 105, 106, 107, 108, 125, 126, 127, 128, 300, 20000))]
    numbers = [0, 1, 127, 128, 300, 16383, 16384, 2**40, -1, -300]
    spans = [ReadableSpan(name="chat m", context=SpanContext(0xABC, 0x100 + i, False, TraceFlags(1)),
                          resource=Resource.create({"service.name": "svc"}), kind=SpanKind.CLIENT,
                          attributes={"switchboard.request_id": texts[i % len(texts)],
                                      "gen_ai.usage.input_tokens": numbers[i % len(numbers)],
                                      "switchboard.cost_usd": i / 7},
                          start_time=1, end_time=2)
             for i in range(40)]
    for i, decoded in enumerate(decode(encode_request(spans))):
        assert decoded.attributes == {"switchboard.request_id": texts[i % len(texts)],
                                      "gen_ai.usage.input_tokens": numbers[i % len(numbers)],
                                      "switchboard.cost_usd": i / 7}


def test_doubles_encode_to_the_bytes_of_the_same_tuple_of_floats() -> None:
    """`Doubles` (an admission's used, requested and remaining amounts) skip the encoder's check of each element's
    type: at every length, short enough for the one-join framing or not, and as span or event attributes, they
    encode to exactly the bytes of a plain tuple holding the same floats, and decode as doubles."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import Event, ReadableSpan
    from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

    from gateway.telemetry.otlp import Doubles, encode_request
    from tests.fakes.otlp_receiver import decode

    def span(number: int, values: tuple[float, ...]) -> ReadableSpan:
        return ReadableSpan(name="chat m", context=SpanContext(0xABC, 0x100 + number, False, TraceFlags(1)),
                            resource=Resource.create({"service.name": "svc"}), kind=SpanKind.SERVER,
                            attributes={"switchboard.admission.used": values},
                            events=[Event("switchboard.admission", {"switchboard.admission.remaining": values,
                                                                    "switchboard.admission.requested": values}, 5)],
                            start_time=1, end_time=2)

    lengths = (0, 1, 5, 9, 10, 11, 20)  # 9 elements and more no longer fit one 127-byte key-value
    plain = [tuple(float(n * 1000 + i) / 7 for i in range(length)) for n, length in enumerate(lengths)]
    as_doubles = [span(n, Doubles(values)) for n, values in enumerate(plain)]
    assert encode_request(as_doubles) == encode_request([span(n, values) for n, values in enumerate(plain)])
    for decoded, values in zip(decode(encode_request(as_doubles)), plain, strict=True):
        assert decoded.attributes["switchboard.admission.used"] == values
        assert all(type(v) is float for v in decoded.attributes["switchboard.admission.used"])


def test_memos_stop_growing_at_their_bounds_and_unhashable_values_still_encode() -> None:
    """A name's memo of encoded values keeps at most `_VALUES_MEMORY` of them, all names' together what the
    encoder's room allows, and the layouts at most
    `_LAYOUTS_MEMORY` (token counts and optional attributes are unbounded sets); past the bounds and for values
    that cannot be memoised (a tuple holding a list), every span still decodes to exactly its own attributes."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

    from gateway.telemetry import otlp
    from tests.fakes.otlp_receiver import decode

    def span(number: int, attributes: dict[str, object]) -> ReadableSpan:
        return ReadableSpan(name="chat m", context=SpanContext(0xABC, 0x100 + number, False, TraceFlags(1)),
                            resource=Resource.create({"service.name": "svc"}), kind=SpanKind.CLIENT,
                            attributes=attributes, start_time=1, end_time=2)

    count = max(otlp._VALUES_MEMORY, otlp._LAYOUTS_MEMORY) + 50
    attribute_sets: list[dict[str, object]] = [
        {"gen_ai.usage.input_tokens": i, "switchboard.team": f"team-{i}", f"optional.{i}": i % 3 == 0}
        for i in range(count)]
    attribute_sets += [{"switchboard.team": ("a", [1, 2])}, {"switchboard.team": "a"}, {"gen_ai.usage.input_tokens": 7}]
    encoder = otlp.SpanEncoder()
    for round_ in range(2):  # the second time through, from the memos as far as they go
        body = encoder.encode([span(i, attributes) for i, attributes in enumerate(attribute_sets)])
        for decoded, attributes in zip(decode(body), attribute_sets, strict=True):
            expected = {k: ("a", (1, 2)) if isinstance(v, tuple) else v for k, v in attributes.items()}
            assert decoded.attributes == expected, round_
    assert all(len(layouts) <= otlp._LAYOUTS_MEMORY for layouts in encoder._layouts)
    memos = [encoder._encoders[9][(name, kind)].__self__  # type: ignore[attr-defined]
             for name, kind in (("gen_ai.usage.input_tokens", int), ("switchboard.team", str))]
    assert [len(memo) for memo in memos] == [otlp._VALUES_MEMORY] * 2
    # And all names' memos together: given room for 1,500 values, they keep 1,500 and every span still decodes.
    encoder = otlp.SpanEncoder()
    encoder._room.values = 1_500
    for _ in range(2):
        body = encoder.encode([span(i, attributes) for i, attributes in enumerate(attribute_sets)])
        assert len(decode(body)) == len(attribute_sets)
    kept = [len(e.__self__) for e in encoder._encoders[9].values()  # type: ignore[attr-defined]
            if isinstance(getattr(e, "__self__", None), otlp._Memo)]
    assert sum(kept) == 1_500 and encoder._room.values == 0


class _StalledCollector:
    """An OTLP/HTTP collector that holds every export until released, then counts its spans."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.spans = 0
        self._counted = threading.Condition()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                collector.released.wait(30)
                with collector._counted:
                    collector.spans += count_spans(body)
                    collector._counted.notify_all()
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def wait_for_spans(self, count: int) -> int:
        with self._counted:
            self._counted.wait_for(lambda: self.spans >= count, timeout=15)
            return self.spans

    def close(self) -> None:
        self.released.set()
        self._server.shutdown()


def _dropped_spans(gateway: RunningGateway) -> int:
    found = re.search(r"^switchboard_trace_spans_dropped_total (\S+)$", metrics_text(gateway), re.MULTILINE)
    assert found is not None
    return int(float(found.group(1)))


def test_spans_a_stalled_collector_leaves_no_room_for_are_dropped_and_counted_exactly(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    """Every span is either delivered or counted in switchboard_trace_spans_dropped_total, never lost unseen."""
    collector = _StalledCollector()
    try:
        policy = otlp_policy(upstream, collector.url, timeout_ms=30_000).replace(
            "batch: {schedule_delay_ms: 20,", "batch: {max_queue_size: 4, max_export_batch_size: 2, "
            "schedule_delay_ms: 20,") + ADMIN_POLICY
        gateway = start_gateway(policy)
        client = gateway.client()
        for _ in range(10):  # 2 spans each (the upstream attempt and the request): 20
            raw = client.chat.completions.with_raw_response.create(
                model="chat-model", messages=[{"role": "user", "content": "x"}])
            assert raw.http_response.status_code == 200
        gateway.usage.wait_for(10)
        dropped = _dropped_spans(gateway)
        # One batch (2 spans) is held by the collector, at most 4 wait in the queue: the rest are dropped.
        assert 12 <= dropped <= 16 and dropped % 2 == 0
        collector.released.set()
        assert collector.wait_for_spans(20 - dropped) == 20 - dropped
        gateway.stop()  # flushes the exporter: nothing more arrives than was kept
        assert collector.spans == 20 - dropped
    finally:
        collector.close()


def test_the_exporter_keeps_one_connection_and_reconnects_to_a_restarted_collector(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[..., RunningGateway]) -> None:
    first = OtlpReceiver()
    with first:
        gateway = start_gateway(otlp_policy(upstream, first.traces_url) + ADMIN_POLICY)
        client = gateway.client()
        for batch in range(1, 4):  # each request's spans in a batch of their own (a 20 ms schedule)
            client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "a"}])
            first.wait_for(lambda spans, batch=batch: len(spans) >= 2 * batch)
        assert first.requests == 3
        assert first.connections == 1  # kept alive from batch to batch, as with a real collector
    # The exporter still holds its connection to the stopped collector: the next batch finds it closed, and is sent
    # again on a new one, to the collector now listening on the same port.
    with OtlpReceiver(first.port) as second:
        client.chat.completions.create(model="chat-model", messages=[{"role": "user", "content": "b"}])
        spans = second.wait_for(lambda spans: len(spans) >= 2)
        assert {span.kind for span in spans} == {"SERVER", "CLIENT"}
        assert second.connections == 1
    assert _dropped_spans(gateway) == 0
