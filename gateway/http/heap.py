"""Garbage-collector settings for a server process.

Every request allocates a few hundred short-lived containers. With CPython's
defaults a generation-0 collection runs every 700 net allocations, and the
older generations keep re-walking every object created at startup (modules,
pydantic schemas, the policy): measured at ~40 µs of CPU per proxied request,
about a sixth of the gateway's cost (loadtests/README.md, 2026-11-28).

Freezing the startup heap moves it out of the collector's sight, and a larger
generation-0 threshold lets short-lived objects die by reference count before
a collection looks at them. Cyclic garbage is still collected; only
objects alive at startup are exempt, and they live as long as the process.
"""

from __future__ import annotations

import gc

# Generation-0 threshold for a serving process (CPython's default is 700).
GEN0_THRESHOLD = 10_000


def settle_for_serving() -> None:
    """Collect once, freeze what survived startup, and raise the generation-0 threshold."""
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GEN0_THRESHOLD), gen1, gen2)
