"""Interpreter settings of a serving process (gateway/http/heap.py), checked in a child process."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import gc, sys
from gateway.http.heap import GEN0_THRESHOLD, SWITCH_INTERVAL_S, settle_for_serving
assert sys.getswitchinterval() > SWITCH_INTERVAL_S  # CPython's default before
kept = [{"startup": n} for n in range(1000)]  # alive at startup: frozen
settle_for_serving()
cycle = []
cycle.append(cycle)  # created afterwards: still collected
del cycle
print(gc.get_threshold()[0] == GEN0_THRESHOLD, gc.get_freeze_count() >= 1000, gc.collect() >= 1,
      sys.getswitchinterval() == SWITCH_INTERVAL_S)
"""


def test_serving_process_freezes_startup_heap_still_collects_cycles_and_shortens_the_switch_interval() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "True", "True", "True"]
