"""A fake OpenTelemetry collector: a real OTLP/HTTP (protobuf) traces receiver on loopback.

    with OtlpReceiver() as collector:
        ...  # point an exporter at collector.traces_url
        spans = collector.wait_for(lambda spans: len(spans) >= 2)

Each received span is decoded into a plain `ReceivedSpan` (hex ids, attributes as Python values).
Also here: `WaitingSpanExporter`, an in-memory exporter tests can wait on instead of sleeping.
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    kind: str  # SERVER, CLIENT, ...
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root
    status: str  # UNSET, OK, ERROR
    attributes: dict[str, Any]
    events: list[str]
    resource: dict[str, Any] = field(default_factory=dict)


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return tuple(_value(v) for v in value.array_value.values)
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which) if which else None


def decode(payload: bytes) -> list[ReceivedSpan]:
    """The spans of one OTLP ExportTraceServiceRequest."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(payload)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(ReceivedSpan(
                    name=span.name, kind=_KINDS[span.kind], trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(), status=_STATUS[span.status.code],
                    attributes={kv.key: _value(kv.value) for kv in span.attributes},
                    events=[event.name for event in span.events], resource=resource,
                ))
    return spans


def count_spans(payload: bytes) -> int:
    """The number of spans in one OTLP ExportTraceServiceRequest, parsed (by protobuf's C parser) but not turned
    into Python values: a load test's collector shares the harness core with the load generator and the fake
    upstream, and decoding every attribute (~30 ms a batch of 512 spans) delayed them, which the benchmark
    counted as the gateway's latency."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(payload)
    return sum(len(scope_spans.spans) for resource_spans in request.resource_spans
               for scope_spans in resource_spans.scope_spans)


class OtlpReceiver:
    """Accepts POST /v1/traces (application/x-protobuf, optionally gzip/deflate) and keeps the spans.

    `keep=False` (load tests) only counts them; GET /health answers 200.
    """

    def __init__(self, port: int = 0, *, keep: bool = True) -> None:
        self.spans: list[ReceivedSpan] = []
        self.span_count = 0
        self.requests = 0
        self.connections = 0  # accepted, all told: an exporter that keeps its connection alive opens one
        self.headers: list[dict[str, str]] = []
        self._changed = threading.Condition()
        # Kept-alive connections, closed with the receiver: a stopped collector must not go on answering on them.
        self._connections: set[socket.socket] = set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.1 keeps the exporter's connection open between batches, as a real collector does (the
            # OpenTelemetry Collector's Go server, Phoenix's uvicorn). The default, HTTP/1.0, closed it after every
            # batch, so each export paid a new connection: a cost of this fake, not of exporting.
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with receiver._changed:
                    receiver._connections.add(self.connection)
                    receiver.connections += 1

            def finish(self) -> None:
                with receiver._changed:
                    receiver._connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                encoding = self.headers.get("content-encoding")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                spans = decode(body) if keep else []
                with receiver._changed:
                    receiver.span_count += len(spans) if keep else count_spans(body)
                    receiver.spans.extend(spans)
                    receiver.requests += 1
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                    receiver._changed.notify_all()
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def do_GET(self) -> None:
                self.send_response(200 if self.path == "/health" else 404)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    def serve_forever(self) -> None:
        """Serve on this thread until interrupted (the command-line entry point)."""
        self._server.serve_forever()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def traces_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def wait_for(self, condition: Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0) -> list[ReceivedSpan]:
        with self._changed:
            if not self._changed.wait_for(lambda: condition(self.spans), timeout):
                raise AssertionError(f"condition not met; received {[s.name for s in self.spans]}")
            return list(self.spans)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._changed:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class WaitingSpanExporter(InMemorySpanExporter):
    """An in-memory exporter whose spans a test can wait for."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = threading.Condition()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._changed:
            result = super().export(spans)
            self._changed.notify_all()
        return result

    def wait_for(self, condition: Callable[[list[ReadableSpan]], bool], timeout: float = 5.0) -> list[ReadableSpan]:
        with self._changed:
            if not self._changed.wait_for(lambda: condition(list(self.get_finished_spans())), timeout):
                raise AssertionError(f"condition not met; spans: {[s.name for s in self.get_finished_spans()]}")
            return list(self.get_finished_spans())

    def wait_for_servers(self, count: int, timeout: float = 5.0) -> list[ReadableSpan]:
        """Wait until `count` SERVER spans (finished requests) were exported; returns every span."""
        from opentelemetry.trace import SpanKind

        return self.wait_for(lambda spans: sum(s.kind is SpanKind.SERVER for s in spans) >= count, timeout)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="A fake OTLP/HTTP traces collector (counts spans).")
    parser.add_argument("--port", type=int, default=4318)
    options = parser.parse_args()
    receiver = OtlpReceiver(options.port, keep=False)
    with contextlib.suppress(KeyboardInterrupt):
        receiver.serve_forever()
