"""Turn bench.py cells into ratios and markdown/JSON (stdout + loadtests/results/<date>_<time>.{md,json})."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

REFERENCE = "baseline-aiohttp"  # CPU ratios are against the bare aiohttp relay
NOISY = 0.25  # other load (cores) above which a row is starred as noisy
_notes: list[str] = []


def note(message: str) -> None:
    """A caveat that belongs in the report (e.g. a skipped system); echoed to stderr at once."""
    _notes.append(message)
    sys.stderr.write(f"note: {message}\n")


def progress(message: str) -> None:
    sys.stderr.write(message)
    sys.stderr.flush()


def machine_facts(args: argparse.Namespace) -> dict[str, Any]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "-"

    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        # Which build: the same version runs several percent apart with and without PGO and LTO (README, round
        # sixteen), and `python_version` does not tell them apart.
        "interpreter": os.path.realpath(sys.executable),
        "loadavg_at_start": os.getloadavg(),
        "packages": {d: version(d) for d in ("aiohttp", "httpx", "uvicorn", "uvloop", "httptools", "starlette")},
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.concurrency,
            "rate": args.rate,
            "open_latency_ms": args.open_latency_ms,
            "paired_direct": getattr(args, "paired_direct", False),
            "stream_chunks": args.stream_chunks,
            "gateway_workers": args.gateway_workers,
            "gateway_args": args.gateway_args,
            "repeat": args.repeat,
        },
    }


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Collapse --repeat rounds to one row per (system, mode): medians, summed errors, min/max ranges."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["system"], row["mode"]), []).append(row)
    merged = []
    for cells in groups.values():
        row = dict(cells[0], rounds=len(cells), errors=sum(c["errors"] for c in cells))
        for key, value in cells[0].items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key not in ("errors", "round"):
                values = [c[key] for c in cells if c.get(key) is not None]
                row[key] = statistics.median(values) if values else None
                row[f"{key}_range"] = (min(values), max(values)) if values else None
        merged.append(row)
    return merged


def paired_cpu_ratios(rounds: list[dict[str, Any]]) -> dict[tuple[str, str], list[float]]:
    """Each cell's CPU per request over the reference's in the same round and mode, by (system, mode).

    Paired by round, so a machine that drifts between rounds (another VM's load, a slower phase) moves both
    sides of a ratio together; the table's "CPU x aiohttp" divides the two systems' medians instead."""
    reference = {(r["mode"], r.get("round")): r.get("sut_cpu_us") for r in rounds if r["system"] == REFERENCE}
    ratios: dict[tuple[str, str], list[float]] = {}
    for r in rounds:
        ratio = _div(r.get("sut_cpu_us"), reference.get((r["mode"], r.get("round"))))
        if ratio is not None:
            ratios.setdefault((r["system"], r["mode"]), []).append(ratio)
    return ratios


def derive(rows: list[dict[str, Any]], rounds: list[dict[str, Any]] | None = None) -> None:
    """Add ratios vs the aiohttp baseline (of the medians, and per round when `rounds` are given) and latency
    added over direct, matched by mode."""
    by = {(r["system"], r["mode"]): r for r in rows}
    paired = paired_cpu_ratios(rounds) if rounds else {}
    for row in rows:
        direct = by.get(("direct", row["mode"]), {})
        ref = by.get((REFERENCE, row["mode"]), {})
        row["cpu_vs_ref"] = _div(row.get("sut_cpu_us"), ref.get("sut_cpu_us"))
        ratios = paired.get((row["system"], row["mode"]))
        row["cpu_vs_ref_per_round"] = statistics.median(ratios) if ratios else None
        row["cpu_vs_ref_per_round_range"] = (min(ratios), max(ratios)) if ratios else None
        row["rps_vs_direct"] = _div(row["rps"], direct.get("rps"))
        for key in ("p50_ms", "p99_ms", "ttfb_p50_ms", "ttfb_p99_ms"):
            row[f"added_{key}"] = _sub(row.get(key), direct.get(key)) if row["system"] != "direct" else None


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{suffix}"


def spread(row: dict[str, Any], key: str, digits: int = 0) -> str:
    """The median, plus the min-max over rounds when there was more than one."""
    text = fmt(row.get(key), digits)
    lo_hi = row.get(f"{key}_range")
    if row["rounds"] > 1 and lo_hi:
        text += f" ({fmt(lo_hi[0], digits)}-{fmt(lo_hi[1], digits)})"
    return text


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines])


def label(row: dict[str, Any]) -> str:
    """System name, starred when unrelated processes used over NOISY of a core during the cell."""
    return row["system"] + (" *" if (row.get("foreign_busy") or 0) > NOISY else "")


def closed_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "system",
        "mode",
        "req/s",
        "x direct req/s",
        "SUT CPU µs/req",
        "CPU x aiohttp",
        "per round",
        "SUT req/s per core",
        "SUT core busy",
        "core 0 / core 1 busy",
        "other load (% of a core)",
        "p50 ms",
        "p99 ms",
        "errors",
    ]
    lines = [
        [
            label(r),
            r["mode"],
            spread(r, "rps"),
            fmt(r["rps_vs_direct"], 2),
            spread(r, "sut_cpu_us"),
            fmt(r["cpu_vs_ref"], 2),
            spread(r, "cpu_vs_ref_per_round", 2),
            fmt(_div(1e6, r.get("sut_cpu_us")), 0),
            pct(r.get("sut_busy")),
            f"{pct(r.get('core0_busy'))} / {pct(r.get('core1_busy'))}",
            pct(r.get("foreign_busy")),
            fmt(r["p50_ms"]),
            fmt(r["p99_ms"]),
            str(r["errors"]),
        ]
        for r in rows
        if r["loop"] == "closed"
    ]
    return table(header, lines)


OWN_OVERHEAD = "its own overhead p50 / p99 ms"


def open_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "system",
        "mode",
        "req/s",
        "SUT CPU µs/req",
        "CPU x aiohttp",
        "per round",
        "p50 / p99 ms",
        "added p50 / p99 ms",
        "TTFB p50 / p99 ms",
        "added TTFB p50 / p99 ms",
        "errors",
        "max sched lag ms",
    ]
    paired = any(r.get("same_window_added_p50_ms") is not None for r in rows)
    at = header.index("errors")  # the same-window columns go after the other latencies
    if paired:
        header[at:at] = ["same window: added p50 / p99 ms", "same window: added TTFB p50 / p99 ms"]
    reported = any(r.get("reported_overhead_p50_ms") is not None for r in rows)
    if reported:  # after the latencies, the same window's included
        header.insert(header.index("errors"), OWN_OVERHEAD)
    lines = []
    for r in (r for r in rows if r["loop"] == "open"):
        lines.append(
            [
                label(r),
                r["mode"],
                fmt(r["rps"], 0),
                spread(r, "sut_cpu_us"),
                fmt(r["cpu_vs_ref"], 2),
                spread(r, "cpu_vs_ref_per_round", 2),
                f"{fmt(r['p50_ms'])} / {fmt(r['p99_ms'])}",
                f"{fmt(r['added_p50_ms'], 2)} / {fmt(r['added_p99_ms'], 2)}",
                f"{fmt(r['ttfb_p50_ms'])} / {fmt(r['ttfb_p99_ms'])}" if r["stream"] else "-",
                f"{fmt(r['added_ttfb_p50_ms'], 2)} / {fmt(r['added_ttfb_p99_ms'], 2)}" if r["stream"] else "-",
                str(r["errors"]),
                fmt(r["max_schedule_lag_ms"]),
            ]
        )
        if paired:
            lines[-1][at:at] = [_p50_p99(r, "same_window_added_"),
                                _p50_p99(r, "same_window_added_ttfb_") if r["stream"] else "-"]
        if reported:
            lines[-1].insert(header.index(OWN_OVERHEAD), _p50_p99(r, "reported_overhead_"))
    return table(header, lines)


def _p50_p99(row: dict[str, Any], prefix: str) -> str:
    """`{prefix}p50_ms / {prefix}p99_ms` as the median over rounds with the rounds' range, or "-" where the system
    did not give it: the same-window latencies (`same_window_added_`, `--paired-direct`: the system's latency over
    the upstream's own, both in one window) and the overhead the gateway reported (`reported_overhead_`: its
    x-switchboard-overhead-ms, its time outside the upstream's; for a stream, up to the response's headers)."""
    if row.get(f"{prefix}p50_ms") is None:
        return "-"
    return f"{spread(row, f'{prefix}p50_ms', 2)} / {spread(row, f'{prefix}p99_ms', 2)}"


def markdown(rows: list[dict[str, Any]], facts: dict[str, Any]) -> str:
    s = facts["settings"]
    pkgs = ", ".join(f"{k} {v}" for k, v in facts["packages"].items())
    parts = [
        f"# Switchboard benchmark {facts['date']}",
        f"nproc {facts['nproc']} ({facts['cpu']}), kernel {facts['kernel']}, Python {facts['python']}"
        f"{' (' + facts['interpreter'] + ')' if facts.get('interpreter') else ''}, "
        f"loadavg at start {facts['loadavg_at_start'][0]:.2f}; {pkgs}. "
        f"{s['duration_s']:g} s measured + {s['warmup_s']:g} s warm-up per cell; "
        f"wall {facts['wall_seconds']} s.",
        "SUT pinned to core 0; fake upstreams + load generator pinned to core 1. "
        "CPU µs/req = Δ(utime+stime) of the SUT process tree / requests completed in the window. "
        "'SUT core busy' is the SUT's own CPU seconds per wall second; 'core 0 / core 1 busy' is all "
        "non-idle time of each core from /proc/stat (kernel softirq and other processes included); "
        "'other load' is user+system time of everything "
        "else on the machine (this script, unrelated processes; 100% = one core): high values mean noise. "
        "'SUT req/s per core' = 1e6 / CPU µs per request: the throughput the SUT would reach with a whole "
        "core to itself; when core 1 is near 100% the measured req/s is capped by the harness, not the SUT.",
        f"## Closed loop: {s['concurrency']} in flight, upstream latency 0, {s['stream_chunks']}-chunk streams",
        closed_table(rows),
        f"## Open loop: {s['rate']:g} req/s scheduled, upstream latency {s['open_latency_ms']:g} ms",
        "Latency is measured from each request's scheduled send time; added = system - direct at the same "
        "percentile (different time windows, so small negative values are noise)"
        + ("; same window = system - the upstream called directly by the same load generator, each arrival's "
           "twin half an interval later, in the same window (`--paired-direct`)." if s.get("paired_direct")
           else "."),
        open_table(rows),
    ]
    if any((r.get("foreign_busy") or 0) > NOISY for r in rows):
        _notes.append(f"* = other processes used more than {NOISY:.0%} of a core during that cell (median).")
    if _notes:
        parts.append("Notes:\n" + "\n".join(f"- {n}" for n in _notes))
    return "\n\n".join(parts) + "\n"


def write(rounds: list[dict[str, Any]], facts: dict[str, Any], out_dir: Path) -> None:
    rows = aggregate(rounds)
    derive(rows, rounds)
    text = markdown(rows, facts)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    (out_dir / f"{stem}.md").write_text(text)
    payload = {"facts": facts, "notes": _notes, "rows": rows, "rounds": rounds}
    (out_dir / f"{stem}.json").write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
    sys.stdout.write(text)
    sys.stdout.write(f"\nwritten: {out_dir / stem}.md and .json\n")


def main() -> None:
    """Re-render a saved run with the current report code: python loadtests/report.py results/X.json"""
    saved = orjson.loads(Path(sys.argv[1]).read_bytes())
    _notes.extend(n for n in saved["notes"] if not n.startswith("* ="))
    rows = aggregate(saved.get("rounds") or saved["rows"])  # early files had no rounds
    derive(rows, saved.get("rounds"))
    sys.stdout.write(markdown(rows, saved["facts"]))


if __name__ == "__main__":
    main()
