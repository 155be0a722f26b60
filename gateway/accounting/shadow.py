"""Shadow rules: limits and budgets with `mode: shadow`, judged as if enforced but never refusing.

A shadow rule's check goes to the state store with no limit, so it never
refuses; after the store admits, `would_refuse` compares each shadow counter
with its limit the way the store would have: `used + amount > limit` is a
request enforcement would have refused. Such a request is served, and its
reservation on that rule is taken back (`unreserve`, one settlement), so the
rule's counter holds exactly what it would hold were the rule enforced (a
request another, enforced rule refuses is counted by no rule; in the moment
between admission and that settlement a concurrent request sees the counter
higher by this one's amount). The request is

- named in `x-switchboard-shadow-reject` (only the caller's own team, key and
  model rules are ever in its plan, so nothing of another team leaks),
- traced as a `switchboard.shadow` event on the SERVER span,
- counted in `switchboard_shadow_rejections{team,scope,rule}` and in a
  would-refuse counter beside the rule's own (`<counter>:x`) that
  `/admin/usage` reports per window as `would_reject`.

Whether a plan has shadow rules is decided when the policy is built
(`Plan.shadowed`), so a gateway without them pays one boolean test per
admitted request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gateway.state import Check, Delta, Verdict
from gateway.telemetry.decisions import meter_label

if TYPE_CHECKING:
    from gateway.accounting.plans import Meter

HEADER = "x-switchboard-shadow-reject"
EVENT = "switchboard.shadow"
# Suffix of the would-refuse counter kept beside each of a shadow rule's counter slices.
_TALLY = ":x"
_WINDOW_NAMES = {("requests", 60): "rpm", ("tokens", 60): "tpm", ("requests", 86_400): "rpd",
                 ("tokens", 86_400): "tpd"}


def would_refuse(meters: Sequence[Meter], checks: Sequence[Check], verdict: Verdict) -> tuple[int, ...]:
    """Indexes of the shadow checks an enforcing store would have refused this request on."""
    return tuple(index for index, meter in enumerate(meters)
                 if meter.shadow and verdict.used[index] + checks[index].amount > meter.limit)


def rule_name(meter: Meter) -> str:
    """The short kind of rule a meter measures: rpm, tpm, rpd, tpd, budget_tokens or budget_usd."""
    if meter.rule is not None:
        return _WINDOW_NAMES[(meter.rule.unit, meter.rule.window_s)]
    return f"budget_{meter.unit}"


def rule_id(meter: Meter) -> str:
    """How the response header names a rule to its own caller: `team:rpm`, `key:budget_usd`, `model:tpm`."""
    scope = meter.rule.scope if meter.rule is not None else meter.budget.scope  # type: ignore[union-attr]
    return f"{scope}:{rule_name(meter)}"


def tally_slices(slices: Sequence[str]) -> tuple[str, ...]:
    """The would-refuse counter beside a rule's counter slices (summed over the same window)."""
    return tuple(name + _TALLY for name in slices)


def unreserve(checks: Sequence[Check], refused: Sequence[int]) -> list[Delta]:
    """For each shadow rule that would have refused: take back the reservation enforcement would never have
    made, and count one would-refuse in the rule's current window."""
    deltas = []
    for index in refused:
        check = checks[index]
        deltas.append(Delta(check.slices[-1], -check.amount, check.expires_at))
        deltas.append(Delta(check.slices[-1] + _TALLY, 1, check.expires_at))
    return deltas


def shadow_event(meters: Sequence[Meter], checks: Sequence[Check], verdict: Verdict,
                 refused: Sequence[int]) -> dict[str, Any]:
    """The trace event of a request that shadow rules would have refused: which rules, their numbers."""
    scale = [1_000_000 if meters[i].unit == "usd" else 1 for i in refused]
    return {
        "switchboard.shadow.verdict": "would_reject",
        "switchboard.shadow.rules": tuple(meter_label(meters[i]) for i in refused),
        "switchboard.shadow.limits": tuple(meters[i].limit / s for i, s in zip(refused, scale, strict=True)),
        "switchboard.shadow.used": tuple(verdict.used[i] / s for i, s in zip(refused, scale, strict=True)),
        "switchboard.shadow.requested": tuple(checks[i].amount / s for i, s in zip(refused, scale, strict=True)),
    }
