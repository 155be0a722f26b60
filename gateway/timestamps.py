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
    # Whole milliseconds: integers print exactly, and faster than floats.
    whole, fraction = divmod(math.ceil(seconds * 1000), 1000)
    minutes, secs = divmod(whole, 60)
    if not minutes:
        return f"{secs}{_FRACTIONS[fraction]}"
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}{_FRACTIONS[fraction]}"
    return f"{minutes}m{secs}{_FRACTIONS[fraction]}"


# Each millisecond's ending of the seconds, made once: `s`, `.001s` ... `.39s` ... `.999s` (no trailing zeros).
_FRACTIONS = tuple(f".{fraction:03d}".rstrip("0") + "s" if fraction else "s" for fraction in range(1000))
