"""Unix times as ISO 8601 text, the one way every report, header and payload of the gateway writes them."""

from __future__ import annotations

import datetime as dt


def iso_time(timestamp: float, zone: dt.tzinfo = dt.UTC, timespec: str = "seconds") -> str:
    """`timestamp` in `zone` with its UTC offset, e.g. 2026-12-04T00:00:00+01:00."""
    return dt.datetime.fromtimestamp(timestamp, zone).isoformat(timespec=timespec)
