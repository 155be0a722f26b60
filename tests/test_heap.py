"""Garbage-collector settings of a serving process (gateway/http/heap.py), checked in a child process."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import gc
from gateway.http.heap import GEN0_THRESHOLD, settle_for_serving
kept = [{"startup": n} for n in range(1000)]  # alive at startup: frozen
settle_for_serving()
cycle = []
cycle.append(cycle)  # created afterwards: still collected
del cycle
print(gc.get_threshold()[0] == GEN0_THRESHOLD, gc.get_freeze_count() >= 1000, gc.collect() >= 1)
"""


def test_serving_process_freezes_startup_heap_and_still_collects_cycles() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "True", "True"]
