"""`switchboard policy simulate NEW --ledger PATH`: replay recorded traffic against a policy before applying it.

Each ledger row (gateway/accounting/ledger.py) is one request's metadata: team, key, model,
endpoint, tokens, status and when it was recorded. The rows are replayed in time
order through the gateway's own steps, not a copy of their rules:

- the key (`gateway.auth.usable_key`: disabled, expired) and the model and the team's
  access to it (`gateway.pipeline.resolve_model`);
- admission (`gateway.accounting.limits.Limiter`) on an in-memory state store whose clock is
  the row's time, so rate windows, calendar and rolling budgets, downgrades and
  refusals happen exactly as the gateway would decide them. The prompt admission
  counts is the recorded one and the completion reservation the recorded
  completion, so a reservation equals what the request used;
- pricing (`gateway.accounting.pricing.charge`) on the deployment the new policy would serve
  it from: the recorded one while it is still a route of the model (or of one of
  its fallbacks the team may use), else the model's first route (rerouted);
- settlement of the reservation, so budgets count what requests cost under NEW.

Requests are replayed one at a time at their recorded time: two requests that were
in flight together never hold reservations against each other here, so a limit
that only concurrency reached is not reported. A row without a recorded completion
(a cache hit, an error) reserves the policy's `default_completion_tokens`, as a
request without `max_tokens` does, and is refunded at settlement. A request the
recording refused or failed used nothing, so it costs nothing under NEW either,
though NEW may admit it. A request NEW refuses costs nothing; the cost difference
is the new cost minus the ledger's.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.accounting.budgets import MICROS, ThresholdEvent
from gateway.accounting.ledger import open_ledger
from gateway.accounting.limits import Limiter
from gateway.accounting.pricing import charge
from gateway.auth import usable_key
from gateway.compiled.policy import KeyEntry, Model, Policy, Target
from gateway.errors import ErrorKind, GatewayError
from gateway.pipeline import resolve_model
from gateway.state.memory import MemoryStore
from providers.base import Endpoint, Usage

_COLUMNS = ("ts, team, key_id, endpoint, public_model, provider, upstream_model, status, outcome, prompt_tokens, "
            "completion_tokens, cached_tokens, cache_write_tokens, reasoning_tokens, cost_usd, end_user")
_ENDPOINTS = {endpoint.value: endpoint for endpoint in Endpoint}


@dataclass(slots=True)
class Tally:
    """What NEW does to one team's requests for one model."""

    team: str
    model: str
    requests: int = 0
    rate_limited: int = 0
    over_budget: int = 0
    downgraded: int = 0
    rerouted: int = 0
    no_access: int = 0  # the model is gone or the team may no longer use it
    key_refused: int = 0  # the key is gone, moved to another team, disabled or expired
    cost_before_usd: float = 0.0
    cost_after_usd: float = 0.0
    downgraded_to: set[str] = field(default_factory=set)
    rerouted_to: set[str] = field(default_factory=set)
    # The first refusal of each kind, as the client would have read it.
    examples: dict[str, str] = field(default_factory=dict)

    def refused(self, kind: str, message: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        self.examples.setdefault(kind, message)

    def row(self) -> dict[str, Any]:
        return {
            "team": self.team, "model": self.model, "requests": self.requests,
            "rate_limited": self.rate_limited, "over_budget": self.over_budget,
            "downgraded": self.downgraded, "rerouted": self.rerouted, "no_access": self.no_access,
            "key_refused": self.key_refused,
            "cost_before_usd": round(self.cost_before_usd, 10), "cost_after_usd": round(self.cost_after_usd, 10),
            "cost_delta_usd": round(self.cost_after_usd - self.cost_before_usd, 10),
            "downgraded_to": ",".join(sorted(self.downgraded_to)), "rerouted_to": ",".join(sorted(self.rerouted_to)),
        }


@dataclass(slots=True)
class Simulation:
    """The replay's result: one tally per (team, model), and the budget alerts NEW would have raised."""

    tallies: dict[tuple[str, str], Tally] = field(default_factory=dict)
    alerts: list[ThresholdEvent] = field(default_factory=list)
    first_ts: float | None = None
    last_ts: float | None = None

    @property
    def requests(self) -> int:
        return sum(t.requests for t in self.tallies.values())

    def rows(self) -> list[dict[str, Any]]:
        return [self.tallies[k].row() for k in sorted(self.tallies)]


@dataclass(frozen=True, slots=True)
class _Recorded:
    ts: float
    team: str
    key_id: str
    endpoint: str
    model: str
    provider: str | None
    upstream_model: str | None
    status: int
    outcome: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    cost_usd: float | None
    end_user: str | None = None


def recorded_requests(ledger: str | Path, since: float = 0.0, until: float | None = None,
                      teams: Sequence[str] | None = None) -> Iterator[_Recorded]:
    """The ledger's rows between two unix times (of `teams` only, if given), oldest first, read in batches."""
    if not Path(ledger).is_file():
        raise FileNotFoundError(f"{ledger}: no such ledger file")
    connection = open_ledger(ledger)
    only = f" AND team IN ({', '.join('?' * len(teams))})" if teams is not None else ""
    try:
        cursor = connection.execute(f"SELECT {_COLUMNS} FROM usage WHERE ts >= ? AND ts < ?{only} ORDER BY ts",
                                    (since, until if until is not None else float("inf"), *(teams or ())))
        while batch := cursor.fetchmany(5000):
            for row in batch:
                yield _Recorded(*row)
    except sqlite3.DatabaseError as exc:
        raise FileNotFoundError(f"{ledger}: not a usage ledger ({exc})") from exc
    finally:
        connection.close()


def replay(policy_path: str, ledger: str | Path, since: float = 0.0, until: float | None = None,
           workers: int = 1) -> Simulation:
    """Load the policy and replay the ledger against it, split by team over `workers` processes.

    Every counter a request touches belongs to its team (team, key and team x model limits, team, end-user
    and key budgets) or to its team's organisation, so teams replayed apart, with the teams of one
    organisation together, give exactly what one replay gives.
    """
    if workers <= 1:
        return _replay_teams(policy_path, str(ledger), since, until, None)
    from gateway.compiled.policy import load_policy

    rules = load_policy(policy_path).rules
    organizations = rules.hierarchy.organizations if rules is not None else {}
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    shares = _shares(ledger, since, until, workers, organizations)
    with ProcessPoolExecutor(len(shares), mp_context=get_context("spawn")) as pool:
        parts = list(pool.map(_replay_teams, *zip(*((policy_path, str(ledger), since, until, share)
                                                    for share in shares), strict=True)))
    merged = Simulation()
    for part in parts:
        merged.tallies.update(part.tallies)  # disjoint: each team is in one share
        merged.alerts.extend(part.alerts)
        starts = [t for t in (merged.first_ts, part.first_ts) if t is not None]
        ends = [t for t in (merged.last_ts, part.last_ts) if t is not None]
        merged.first_ts, merged.last_ts = min(starts, default=None), max(ends, default=None)
    merged.alerts.sort(key=_alert_order)
    return merged


def _replay_teams(policy_path: str, ledger: str, since: float, until: float | None,
                  teams: Sequence[str] | None) -> Simulation:
    import asyncio

    from gateway.compiled.policy import load_policy

    result = asyncio.run(simulate(load_policy(policy_path), recorded_requests(ledger, since, until, teams)))
    result.alerts.sort(key=_alert_order)
    return result


def _shares(ledger: str | Path, since: float, until: float | None, workers: int,
            organizations: Mapping[str, str] | None = None) -> list[list[str]]:
    """Teams dealt to at most `workers` shares of about equal rows, busiest first; the teams of one
    organisation (`organizations`: team -> organisation) in one share, as they count against one budget."""
    if not Path(ledger).is_file():
        raise FileNotFoundError(f"{ledger}: no such ledger file")
    connection = open_ledger(ledger)
    try:
        counts = connection.execute("SELECT team, COUNT(*) FROM usage WHERE ts >= ? AND ts < ? GROUP BY team "
                                    "ORDER BY 2 DESC, 1", (since, until if until is not None else float("inf")))
        units: dict[tuple[str, str], list[Any]] = {}  # (kind, name) -> [rows, teams]
        for team, count in counts:
            org = (organizations or {}).get(team)
            unit = units.setdefault(("org", org) if org is not None else ("team", team), [0, []])
            unit[0] += count
            unit[1].append(team)
        rows = [0] * workers
        shares: list[list[str]] = [[] for _ in range(workers)]
        for count, teams in sorted(units.values(), key=lambda unit: (-unit[0], unit[1])):
            lightest = rows.index(min(rows))
            rows[lightest] += count
            shares[lightest].extend(teams)
    finally:
        connection.close()
    return [teams for teams in shares if teams] or [[]]


def _alert_order(event: ThresholdEvent) -> tuple[Any, ...]:
    return (event.period_start, event.team, event.scope, event.owner, event.unit, event.threshold)


class _Clock:
    """The simulated time: the replayed row's."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _RecordedPrompt:
    """Stands in for the token counter: admission counts the prompt the ledger recorded."""

    __slots__ = ("prompt_tokens",)

    def __init__(self) -> None:
        self.prompt_tokens = 0

    def count(self, *_: Any) -> int:
        return self.prompt_tokens

    count_prompt = count_chat_prompt = count_completion_prompt = count_embedding_input = count_text = count


async def simulate(policy: Policy, requests: Iterator[_Recorded]) -> Simulation:
    """Replay `requests` against `policy` (see the module docstring for what is and is not modelled)."""
    result = Simulation()
    clock, prompt = _Clock(), _RecordedPrompt()
    limiter = Limiter(MemoryStore(clock=clock), prompt, clock=clock, on_threshold=result.alerts.append)
    keys = {entry.key_id: entry for entry in policy.keys.values()}
    for row in requests:
        clock.now = row.ts
        if result.first_ts is None:
            result.first_ts = row.ts
        result.last_ts = row.ts
        tally = result.tallies.get((row.team, row.model))
        if tally is None:
            tally = result.tallies[(row.team, row.model)] = Tally(row.team, row.model)
        tally.requests += 1
        tally.cost_before_usd += row.cost_usd or 0.0
        await _replay(policy, limiter, keys, prompt, row, tally)
    await limiter.flush()
    return result


async def _replay(policy: Policy, limiter: Limiter, keys: dict[str, KeyEntry], prompt: _RecordedPrompt,
                  row: _Recorded, tally: Tally) -> None:
    entry = keys.get(row.key_id)
    if entry is None or entry.team.name != row.team:
        tally.refused("key_refused", f"key {row.key_id} is not a key of team {row.team} in this policy")
        return
    try:
        caller = usable_key(entry, row.ts)
        model = resolve_model(policy, caller, row.model)
    except GatewayError as error:
        if error.kind is ErrorKind.AUTHENTICATION:  # the operator may know why; the client is told less
            tally.refused("key_refused", f"key {row.key_id}: " + ("disabled" if entry.disabled else error.message))
        else:
            tally.refused("no_access", error.message)
        return
    prompt.prompt_tokens = row.prompt_tokens
    # The recorded completion as the request's cap: the reservation is what the request used.
    body = {"max_tokens": row.completion_tokens} if row.completion_tokens > 0 else {}
    try:
        admission = await limiter.admit(policy, caller, _ENDPOINTS.get(row.endpoint, Endpoint.CHAT), body, model,
                                        {}, end_user=row.end_user)
    except GatewayError as error:
        tally.refused("over_budget" if error.kind is ErrorKind.BUDGET_EXCEEDED else "rate_limited", error.message)
        return
    served = admission.model if admission is not None else model
    if served is not model:
        tally.downgraded += 1
        tally.downgraded_to.add(served.name)
    target = _serving_target(policy, served, caller, row)
    if target is None:
        target = served.targets[0]
        if served is model and row.provider is not None:
            tally.rerouted += 1
            tally.rerouted_to.add(f"{target.provider.name}/{target.upstream_model}")
    usage = None
    if row.status < 400:
        usage = Usage(row.prompt_tokens, row.completion_tokens, row.cached_tokens, row.cache_write_tokens,
                      row.reasoning_tokens)
    cost, _ = charge(policy.prices, target, usage) if row.outcome != "cache_hit" else (None, None)
    tally.cost_after_usd += cost or 0.0
    limiter.settle(admission, usage, row.status, target, usd_micros=math.ceil(cost * MICROS) if cost else 0)


def _serving_target(policy: Policy, model: Model, caller: KeyEntry, row: _Recorded) -> Target | None:
    """The recorded deployment when NEW still routes the model there, directly or by a fallback the team may use."""
    if row.provider is None:
        return None
    candidates = [model, *(policy.models[name] for name in model.plan.config.fallbacks.default
                           if name in policy.models and caller.team.may_fall_back_to(name))]
    for candidate in candidates:
        for target in candidate.targets:
            if target.provider.name == row.provider and target.upstream_model == row.upstream_model:
                return target
    return None


# --- `switchboard policy simulate` -----------------------------------------------------------


def print_simulation(policy_path: str, ledger: str, since: str | None, until: str | None, fmt: str,
                     workers: int = 1) -> int:
    """Load the policy (refused with the loader's message), replay the ledger, print the report."""
    import sys
    import time

    from gateway.accounting.spend import parse_since, render_report
    from gateway.compiled.policy import PolicyError, load_policy

    try:
        load_policy(policy_path)
    except PolicyError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    try:
        window = (parse_since(since), parse_since(until) if until else None)
    except ValueError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    started = time.perf_counter()
    try:
        result = replay(policy_path, ledger, *window, workers=workers)
    except FileNotFoundError as exc:
        sys.stderr.write(f"{exc.args[0]}\n")
        return 1
    elapsed = time.perf_counter() - started
    rows = result.rows()
    if fmt == "json":
        import orjson

        for row in rows:  # what the client would have read, once per kind of refusal
            row["first_refusals"] = result.tallies[(row["team"], row["model"])].examples
        document = {"policy": policy_path, "ledger": ledger, "requests": result.requests,
                    "from": _iso(result.first_ts), "until": _iso(result.last_ts), "by_team_model": rows,
                    "totals": _totals(rows), "budget_alerts": [_alert(a) for a in result.alerts]}
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    if fmt == "csv":
        sys.stdout.write(render_report(rows, "csv"))
        return 0
    sys.stdout.write(f"Replayed {result.requests} requests recorded from {_iso(result.first_ts)} to "
                     f"{_iso(result.last_ts)} against {policy_path} ({result.requests / max(elapsed, 1e-9):,.0f} "
                     "requests/s).\n")
    if rows:
        sys.stdout.write(render_report([*rows, {"team": "(total)", "model": "", **_totals(rows)}], "table"))
    for alert in result.alerts:
        sys.stdout.write(f"budget alert: {_alert(alert)['text']}\n")
    return 0


_SUMMED = ("requests", "rate_limited", "over_budget", "downgraded", "rerouted", "no_access", "key_refused",
           "cost_before_usd", "cost_after_usd", "cost_delta_usd")


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    totals: dict[str, Any] = {name: sum(row[name] for row in rows) for name in _SUMMED}
    for name in ("cost_before_usd", "cost_after_usd", "cost_delta_usd"):
        totals[name] = round(totals[name], 10)
    return {**totals, "downgraded_to": "", "rerouted_to": ""}


def _alert(event: ThresholdEvent) -> dict[str, Any]:
    who = f"team {event.team}" if event.scope == "team" else f"key {event.owner} (team {event.team})"
    return {"team": event.team, "scope": event.scope, "owner": event.owner, "unit": event.unit,
            "threshold": event.threshold, "period_start": _iso(event.period_start),
            "text": f"{who} would cross {event.threshold:.0%} of its {event.unit} budget in the period from "
                    f"{_iso(event.period_start)}"}


def _iso(timestamp: float | None) -> str | None:
    import datetime as dt

    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
