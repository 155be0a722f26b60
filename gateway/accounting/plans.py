"""What admission checks for one key and model: its rate rules and its budgets, every level's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.accounting.budgets import Budget

_LABELS = {("requests", 60): "requests per minute", ("tokens", 60): "tokens per minute",
           ("requests", 86_400): "requests per day", ("tokens", 86_400): "tokens per day"}


@dataclass(frozen=True, slots=True)
class RateRule:
    """One rate limit of one scope: `limit` requests or tokens per fixed window."""

    scope: str  # "team", "key" or "model"
    owner: str  # team name, key id or model name
    team: str
    unit: str  # "requests" or "tokens"
    window_s: int
    limit: int
    base: str  # counter key prefix, hash-tagged by team
    shadow: bool = False  # mode: shadow: counted and reported, never refusing (gateway/accounting/shadow.py)

    @property
    def label(self) -> str:
        return _LABELS[(self.unit, self.window_s)]

    @property
    def who(self) -> str:
        if self.scope == "team":
            return f"team {self.team}"
        if self.scope == "key":
            return f"key {self.owner} (team {self.team})"
        return f"model {self.owner} for team {self.team}"


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything that applies to one (key, model): what admission checks."""

    rates: tuple[RateRule, ...]
    budgets: tuple[Budget, ...]
    needs_tokens: bool
    needs_usd: bool
    shadowed: bool = False  # some rule is in shadow mode: admission looks for what it would refuse
