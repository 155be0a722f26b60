"""`switchboard spend` and `switchboard usage`: the ledger's and the state store's reports, printed."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from gateway.accounting.hierarchy import valid_end_user
from gateway.accounting.spend import parse_since, render_report, spend
from gateway.accounting.usage_report import usage_report
from gateway.compiled.policy import PolicyError, load_policy
from gateway.state import StoreUnavailable, open_store


def print_spend(policy_path: str, by: str, since: str | None, until: str | None, fmt: str) -> int:
    """`switchboard spend`: report from the ledger file the policy's `ledger.path` names."""
    try:
        policy = load_policy(policy_path)
    except PolicyError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    if policy.ledger_path is None:
        sys.stderr.write(f"{policy_path}: no usage ledger configured (set ledger.path)\n")
        return 1
    if not policy.ledger_path.exists():
        sys.stderr.write(f"{policy.ledger_path}: no ledger file yet (the gateway creates it when it starts)\n")
        return 1
    try:
        report = spend(policy.ledger_path, by, parse_since(since), parse_since(until) if until else None)
    except ValueError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    sys.stdout.write(render_report(report, fmt))
    return 0


def print_usage(policy_path: str, team: str, period: str = "current", end_user: str | None = None) -> int:
    """`switchboard usage`: read the counters the policy's `state:` block points at and print the report."""
    try:
        policy = load_policy(policy_path)
    except PolicyError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    if team not in policy.teams:
        sys.stderr.write(f"unknown team {team!r}; teams: {', '.join(sorted(policy.teams))}\n")
        return 1
    if end_user is not None and valid_end_user(end_user) is None:
        sys.stderr.write("--end-user must be 1-64 characters of letters, digits and ._@+=/-\n")
        return 1
    needed = bool(policy.rules and policy.rules.any)
    store = open_store(policy.state, policy_path=policy_path, needed=needed, read_only=True)
    if type(store).__name__ == "MemoryStore":
        sys.stderr.write("note: this policy keeps its counters in process memory (state.backend: memory); "
                         "ask the running gateway instead: GET /admin/usage?team=...\n")

    async def read() -> dict[str, Any]:
        await store.start()
        try:
            return await usage_report(store, policy, team, period, time.time(), end_user)
        finally:
            await store.close()

    try:
        report = asyncio.run(read())
    except StoreUnavailable as exc:
        sys.stderr.write(f"cannot read usage: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0
