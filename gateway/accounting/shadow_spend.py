"""Shadow spend: what a team's shadow calls cost, counted apart from its enforced limits and budgets.

Shadow calls (gateway/shadow_traffic.py) are billed to the team on the ledger,
marked `variant: shadow`, and here: per team and UTC day, in the state store,
as `/admin/usage` reports them (`shadow_spend`). They are never charged to a
limit or budget: a shadow call that spent a team's budget would change the
answers of its real requests.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.accounting.budgets import MICROS
from gateway.policy.experiment_schema import SHADOW
from gateway.state import Delta, safe_key

if TYPE_CHECKING:
    from gateway.accounting.usage import UsageRecord
    from gateway.state import StateStore

_DAY_S = 86_400
# How long a day's shadow-spend counters outlive their day: /admin/usage reads today's and yesterday's.
_KEEP_DAYS = 3


def spend_keys(team: str, day: int) -> tuple[str, str, str]:
    """The team's shadow-spend counters of one UTC day (days since the epoch): USD micros, tokens, calls."""
    base = "{" + safe_key(team) + "}:shadow"  # the team's hash tag, as its limit counters
    return f"{base}:usd:{day}", f"{base}:tok:{day}", f"{base}:req:{day}"


class ShadowSpend:
    """A usage sink: each shadow call's record adds one call, its tokens and its cost (rounded up to the
    micro-dollar, as admission rounds) to its team's shadow-spend counters of the UTC day.

    Fed the very record the ledger row is made of, so the counters and the ledger's shadow rows agree (an
    estimated stream's tokens included). `store` is set once the app has its state store; settling never blocks.
    """

    def __init__(self, store: StateStore | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock

    def record(self, record: UsageRecord) -> None:
        store = self.store
        if record.variant != SHADOW or store is None:
            return
        day = int(self._clock() // _DAY_S)
        expires = (day + _KEEP_DAYS) * _DAY_S
        usd, tokens, calls = spend_keys(record.team, day)
        deltas = [Delta(calls, 1, expires)]
        if record.cost_usd:
            deltas.append(Delta(usd, math.ceil(record.cost_usd * MICROS), expires))
        if record.usage is not None and record.usage.total_tokens:
            deltas.append(Delta(tokens, record.usage.total_tokens, expires))
        store.settle(deltas)


async def shadow_spend(store: StateStore, team: str, period: str, now: float) -> dict[str, Any]:
    """The team's shadow spend of the current (or previous) UTC day, as `/admin/usage` reports it."""
    day = int(now // _DAY_S) - (1 if period == "previous" else 0)
    values = await store.read([(key,) for key in spend_keys(team, day)])
    start = dt.datetime.fromtimestamp(day * _DAY_S, dt.UTC)
    return {"window": "UTC day", "from": start.isoformat(timespec="seconds"),
            "resets_at": (start + dt.timedelta(days=1)).isoformat(timespec="seconds"),
            "usd": values[0] / MICROS, "tokens": values[1], "calls": values[2]}
