"""Histograms counted per request and turned into Prometheus' cumulative `le` buckets only when scraped."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

# Request duration and time to first token, in seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class Histogram:
    """Bucket counts and a sum: one bisect and two additions per observation."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def merge_into(self, counts: list[int], totals: list[float]) -> None:
        for index, count in enumerate(self.counts):
            counts[index] += count
        totals[0] += self.total


def cumulative_buckets(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Per-bucket counts as Prometheus' `le` buckets: cumulative, ending with `+Inf`."""
    cumulative = list(itertools.accumulate(counts))
    buckets = [(repr(float(bound)), float(count)) for bound, count in zip(bounds, cumulative, strict=False)]
    buckets.append(("+Inf", float(cumulative[-1])))
    return buckets
