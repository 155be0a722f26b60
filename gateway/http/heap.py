"""Interpreter settings for a server process: the garbage collector and the GIL's switch interval.

Every request allocates a few hundred short-lived containers. With CPython's
defaults a generation-0 collection runs every 700 net allocations, and the
older generations keep re-walking every object created at startup (modules,
pydantic schemas, the policy): measured at ~40 µs of CPU per proxied request,
about a sixth of the gateway's cost (loadtests/README.md, 2026-11-28).

Freezing the startup heap moves it out of the collector's sight, and a larger
generation-0 threshold lets short-lived objects die by reference count before
a collection looks at them. Cyclic garbage is still collected; only
objects alive at startup are exempt, and they live as long as the process.

The ledger writer, the access log's and the span exporter's are threads that
run some Python code (writing rows, posting a batch of spans already encoded
on the loop) on the same core as the event loop. A thread holding the GIL
keeps it until it blocks or another thread has waited the switch interval
(CPython's default: 5 ms), so a request that arrives meanwhile waits up to
5 ms before the loop runs again. A 0.5 ms interval bounds that wait; a forced
switch costs a few microseconds and happens only while two threads want the
interpreter.
"""

from __future__ import annotations

import gc
import sys

# Generation-0 threshold for a serving process (CPython's default is 700).
GEN0_THRESHOLD = 10_000
# The longest a thread that wants the GIL waits for another to give it up (CPython's default is 0.005).
SWITCH_INTERVAL_S = 0.0005


def settle_for_serving() -> None:
    """Collect once, freeze what survived startup, raise the generation-0 threshold, shorten the switch interval."""
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GEN0_THRESHOLD), gen1, gen2)
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
