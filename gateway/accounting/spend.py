"""Spend reports from the ledger: grouped by team, model, key, day, organisation, end user or tag.

Read-only SQL over the ledger file (gateway/accounting/ledger.py writes it), for
`switchboard spend` and `GET /admin/spend`.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from gateway.accounting.ledger import open_ledger

_GROUPS = {"team": ("team",), "model": ("public_model",), "key": ("team", "key_id"), "day": ("day",),
           "organization": ("organization",), "end_user": ("team", "end_user")}
_TAG_GROUP = re.compile(r"^tag:([A-Za-z0-9_]{1,64})$")
GROUPINGS = "team, model, key, day, organization, end_user or tag:<key>"


def is_grouping(by: str) -> bool:
    """Whether `by` names a way `spend` can group the ledger."""
    return by in _GROUPS or _TAG_GROUP.match(by) is not None

_RELATIVE = re.compile(r"^(\d+)([hdw])$")


def parse_since(text: str | None, now: float | None = None) -> float:
    """A start time: an ISO date or datetime (UTC unless it has an offset), or relative like 24h, 7d, 4w."""
    now = time.time() if now is None else now
    if not text:
        return 0.0
    relative = _RELATIVE.match(text.strip())
    if relative:
        amount, unit = int(relative.group(1)), relative.group(2)
        return now - amount * {"h": 3600, "d": 86400, "w": 604800}[unit]
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a time: use 2026-11-01, 2026-11-01T12:00, 24h, 7d or 4w") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def spend(path: str | Path, by: str, since: float = 0.0, until: float | None = None) -> list[dict[str, Any]]:
    """Spend per group (`team`, `model`, `key`, `day` or `tag:<key>`) between two unix times, most expensive first.

    By tag, requests without that tag form the group `(untagged)`."""
    groups, columns, bound = _grouping(by)
    query = (f"SELECT {columns}, COUNT(*), SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens), "
             f"SUM(COALESCE(cost_usd, 0)), SUM(cost_usd IS NULL AND status < 400), "
             f"COUNT(CASE WHEN cache = 'hit' THEN 1 END), SUM(cache_tokens), SUM(COALESCE(cost_saved_usd, 0)), "
             f"SUM(cache_overhead_tokens), SUM(COALESCE(cache_overhead_cost_usd, 0)) "
             f"FROM usage WHERE ts >= ? AND ts < ? GROUP BY {', '.join(f'g{i}' for i in range(len(groups)))} "
             f"ORDER BY {5 + len(groups)} DESC")
    connection = open_ledger(path)
    try:
        rows = connection.execute(query, (*bound, since, until if until is not None else float("inf"))).fetchall()
    finally:
        connection.close()
    keys = [*groups, "requests", "input_tokens", "cached_input_tokens",
            "output_tokens", "cost_usd", "unpriced_requests", "cache_hits", "cache_tokens", "cost_saved_usd",
            "cache_overhead_tokens", "cache_overhead_cost_usd"]
    report = [dict(zip(keys, row, strict=True)) for row in rows]
    for entry in report:
        for money in ("cost_usd", "cost_saved_usd", "cache_overhead_cost_usd"):
            entry[money] = round(entry[money], 10)
    return report


def _grouping(by: str) -> tuple[list[str], str, tuple[str, ...]]:
    """The report's group names, their SELECT expressions (aliased g0, g1, ...) and the values they bind."""
    columns = _GROUPS.get(by)
    if columns is not None:
        return ([c.replace("public_model", "model") for c in columns],
                ", ".join(f"{c} AS g{i}" for i, c in enumerate(columns)), ())
    tag = _TAG_GROUP.match(by)
    if tag is None:
        raise ValueError(f"--by must be one of {GROUPINGS}")
    return [by], "COALESCE(json_extract(tags, ?), '(untagged)') AS g0", (f"$.{tag.group(1)}",)


def render_report(report: Sequence[Mapping[str, Any]], fmt: str) -> str:
    """A report as `json`, `csv` or an aligned `table`."""
    if fmt == "json":
        return orjson.dumps(list(report), option=orjson.OPT_INDENT_2).decode() + "\n"
    if not report:
        return "" if fmt == "csv" else "(no usage in this period)\n"
    columns = list(report[0])
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(report)
        return out.getvalue()
    cells = [[str(entry[c]) for c in columns] for entry in report]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines) + "\n"
