"""Where finished spans go: the exporter the policy names, and the policy's cross-checks.

OTLP/HTTP uses Switchboard's own small protobuf encoder (gateway/telemetry/otlp.py);
OTLP/gRPC needs the optional `opentelemetry-exporter-otlp-proto-grpc` package.
Every exporter is wrapped so a failing collector is one log line per outage.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExporter, SpanExportResult

from gateway.policy.parts import PolicyPart
from gateway.policy.schema import PolicyDocument, TracesPolicy

log = logging.getLogger("switchboard.telemetry")


def build_exporter(settings: TracesPolicy) -> SpanExporter:
    """The span exporter `telemetry.traces.exporter` names (never `none`: no exporter is built then)."""
    timeout_s = settings.batch.export_timeout_ms / 1000
    headers = export_headers(settings)
    if settings.exporter == "otlp_http":
        from gateway.telemetry.otlp import OtlpHttpExporter

        return OtlpHttpExporter(settings.endpoint or "http://localhost:4318/v1/traces", headers, timeout_s)
    if settings.exporter == "otlp_grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
            OTLPSpanExporter as GrpcSpanExporter,
        )

        # The exporter logs every failed batch itself; LoggedExporter logs once per outage instead.
        logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").setLevel(logging.CRITICAL)
        endpoint = settings.endpoint or "localhost:4317"
        return GrpcSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"),  # type: ignore[no-any-return]
                                headers=tuple((k.lower(), v) for k, v in headers.items()), timeout=timeout_s)
    return ConsoleSpanExporter()


def export_headers(settings: TracesPolicy) -> dict[str, str]:
    """Headers sent with every export: the project's, then the policy's own (which win)."""
    if not settings.project:
        return dict(settings.headers)
    # Phoenix reads x-project-name, LangSmith Langsmith-Project; each ignores the other's.
    project = {"x-project-name": settings.project, "Langsmith-Project": settings.project}
    given = {name.lower() for name in settings.headers}
    return {**{k: v for k, v in project.items() if k.lower() not in given}, **settings.headers}


class LoggedExporter(SpanExporter):
    """Wraps an exporter so an unreachable collector is one log line per outage, not one per batch."""

    def __init__(self, inner: SpanExporter, name: str) -> None:
        self._inner = inner
        self._name = name
        self._failing = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.logged(self._inner.export, spans)

    def logged(self, export: Callable[..., SpanExportResult], *batch: Any) -> SpanExportResult:
        """Run one export of the inner exporter's (`export`, or another of its methods) and log outages."""
        try:
            result = export(*batch)
        except Exception:  # an exporter bug must not kill the export thread
            log.debug("span exporter raised", exc_info=True)
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.FAILURE and not self._failing:
            self._failing = True
            log.warning("span export (%s) is failing; spans are being dropped until it recovers", self._name)
        elif result is SpanExportResult.SUCCESS and self._failing:
            self._failing = False
            log.info("span export (%s) recovered", self._name)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def telemetry_problems(document: PolicyDocument) -> list[tuple[tuple[str | int, ...], str]]:
    """Cross-references of the `telemetry:` section, as (YAML path, message) pairs for the policy loader."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    traces = document.telemetry.traces
    for index, team in enumerate(traces.record_content):
        if team != "*" and team not in document.teams:
            problems.append((("telemetry", "traces", "record_content", index),
                             f"unknown team {team!r}; defined: " + ", ".join(sorted(document.teams))))
    if traces.exporter == "otlp_grpc" and not _importable("opentelemetry.exporter.otlp.proto.grpc"):
        problems.append((("telemetry", "traces", "exporter"),
                         "otlp_grpc needs the package opentelemetry-exporter-otlp-proto-grpc (or use otlp_http)"))
    if traces.exporter == "otlp_http" and traces.endpoint and not traces.endpoint.startswith(("http://", "https://")):
        problems.append((("telemetry", "traces", "endpoint"), "must be an http:// or https:// URL"))
    return problems


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# Trace export settings that need other sections (the settings themselves are `Policy.telemetry`).
TRACES = PolicyPart("telemetry", check=telemetry_problems, build=lambda compiling: compiling.document.telemetry)
