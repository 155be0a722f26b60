"""Times as text: Unix times as ISO 8601 for reports and payloads, durations as Go prints them for headers."""

from __future__ import annotations

import datetime as dt
import math


def iso_time(timestamp: float, zone: dt.tzinfo = dt.UTC, timespec: str = "seconds") -> str:
    """`timestamp` in `zone` with its UTC offset, e.g. 2026-12-04T00:00:00+01:00."""
    return dt.datetime.fromtimestamp(timestamp, zone).isoformat(timespec=timespec)


def go_duration(seconds: float) -> str:
    """A duration as Go prints it, the format of OpenAI's reset headers: `6m0s`, `1.5s`, `12ms`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    millis = math.ceil(seconds * 1000)
    text = _DURATIONS.get(millis)
    if text is None:
        if len(_DURATIONS) >= _DURATIONS_MEMORY:
            _DURATIONS.clear()
        text = _DURATIONS[millis] = _go_millis(millis)
    return text


# Durations already printed, by millisecond: an admission's reset headers repeat a few (the rate limits' minute,
# the budgets' day), as do requests admitted in the same millisecond.
_DURATIONS: dict[int, str] = {}
_DURATIONS_MEMORY = 4096


def _go_millis(millis: int) -> str:
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, fraction = divmod(rest, 1000)  # whole milliseconds: integers print exactly, and faster than floats
    secs = f"{whole}.{fraction:03d}".rstrip("0") if fraction else str(whole)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
