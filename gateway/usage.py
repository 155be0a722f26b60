"""Settling a request: the usage record every finished request produces."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import orjson

from providers.base import Usage

access_log = logging.getLogger("switchboard.access")


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What one request used, settled once when its response (or stream) ends."""

    request_id: str
    team: str
    key_id: str
    endpoint: str
    public_model: str
    provider: str | None
    upstream_model: str | None
    stream: bool
    status: int
    usage: Usage | None
    duration_ms: float
    overhead_ms: float
    time_to_first_token_ms: float | None = None
    # Why a stream ended early: "client_disconnected", "upstream_error", ...
    outcome: str = "completed"


class UsageSink(Protocol):
    """Receives every settled record. Must not block: it runs on the event loop."""

    def record(self, record: UsageRecord) -> None: ...


class AccessLogSink:
    """Writes one JSON line per request to the `switchboard.access` logger.

    The CLI routes that logger through a queue to a writer thread, so the
    event loop never waits on the terminal or a file.
    """

    def record(self, record: UsageRecord) -> None:
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(orjson.dumps(asdict(record)).decode())


class UsageRecorder:
    """Fans a settled record out to every sink; a failing sink never fails a request."""

    def __init__(self, sinks: Sequence[UsageSink]) -> None:
        self._sinks = tuple(sinks)

    def settle(self, record: UsageRecord) -> None:
        for sink in self._sinks:
            try:
                sink.record(record)
            except Exception:
                logging.getLogger("switchboard.usage").exception("usage sink %r failed", sink)
