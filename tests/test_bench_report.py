"""loadtests/report.py: per-round CPU ratios pair each cell with the relay's of the same round; the header names the
interpreter."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loadtests"))
import report


def _cell(system: str, mode: str, round_: int, cpu_us: float) -> dict[str, Any]:
    return {"system": system, "mode": mode, "loop": "closed", "stream": False, "round": round_, "rps": 1000.0,
            "errors": 0, "sut_cpu_us": cpu_us, "p50_ms": 1.0, "p99_ms": 2.0}


def test_each_rounds_ratio_is_to_the_relay_of_the_same_round_and_mode() -> None:
    # The machine slows down round by round for both systems. Paired by round the gateway is 2.1x, 1.9x and 2.1x
    # the relay; the ratio of the two medians (380 / 200) is 1.9x, round 1's alone.
    rounds = [_cell("baseline-aiohttp", "chat", 0, 100), _cell("gateway", "chat", 0, 210),
              _cell("baseline-aiohttp", "chat", 1, 200), _cell("gateway", "chat", 1, 380),
              _cell("baseline-aiohttp", "chat", 2, 300), _cell("gateway", "chat", 2, 630),
              _cell("baseline-aiohttp", "stream", 0, 400), _cell("gateway", "stream", 0, 500)]
    assert report.paired_cpu_ratios(rounds)[("gateway", "chat")] == pytest.approx([2.1, 1.9, 2.1])
    assert report.paired_cpu_ratios(rounds)[("gateway", "stream")] == [1.25]

    rows = report.aggregate(rounds)
    report.derive(rows, rounds)
    gateway = next(r for r in rows if r["system"] == "gateway" and r["mode"] == "chat")
    assert gateway["cpu_vs_ref"] == pytest.approx(1.9)
    assert gateway["cpu_vs_ref_per_round"] == pytest.approx(2.1)
    assert gateway["cpu_vs_ref_per_round_range"] == pytest.approx((1.9, 2.1))
    assert "| 1.90 | 2.10 (1.90-2.10) |" in report.closed_table(rows)


def test_a_round_whose_relay_cell_is_missing_gives_no_ratio() -> None:
    rounds = [_cell("baseline-aiohttp", "chat", 0, 100), _cell("gateway", "chat", 0, 150),
              _cell("gateway", "chat", 1, 900)]  # the relay's cell of round 1 failed to run
    assert report.paired_cpu_ratios(rounds)[("gateway", "chat")] == [1.5]


def test_the_header_names_the_interpreter_that_ran_the_systems() -> None:
    # Two builds of one Python version differ by several percent (profile-guided and link-time optimization):
    # a results file says which one ran, as its path.
    args = argparse.Namespace(duration=5.0, warmup=2.0, concurrency=32, rate=500.0, open_latency_ms=50.0,
                              stream_chunks=20, gateway_workers=1, gateway_args="", repeat=1)
    facts = {**report.machine_facts(args), "wall_seconds": 1.0}
    assert facts["interpreter"] == os.path.realpath(sys.executable)
    rows = report.aggregate([_cell("baseline-aiohttp", "chat", 0, 100)])
    report.derive(rows)
    assert f"Python {facts['python']} ({os.path.realpath(sys.executable)})," in report.markdown(rows, facts)
    # Results written before the field existed still render.
    assert f"Python {facts['python']}, " in report.markdown(rows, {k: v for k, v in facts.items()
                                                                    if k != "interpreter"})


def test_the_open_table_gives_the_latency_added_in_the_same_window_when_it_was_measured() -> None:
    def open_cell(system: str, round_: int, p50: float, same_window: float | None) -> dict[str, Any]:
        cell = {**_cell(system, "open 500/s chat", round_, 300), "loop": "open", "p50_ms": p50,
                "max_schedule_lag_ms": 1.0, "ttfb_p50_ms": None, "ttfb_p99_ms": None}
        if same_window is not None:
            cell |= {"same_window_added_p50_ms": same_window, "same_window_added_p99_ms": 2 * same_window,
                     "same_window_added_ttfb_p50_ms": None, "same_window_added_ttfb_p99_ms": None}
        return cell

    rounds = [open_cell("direct", 0, 50.6, None), open_cell("gateway", 0, 51.4, 0.5),
              open_cell("direct", 1, 50.9, None), open_cell("gateway", 1, 51.5, 0.7),
              open_cell("direct", 2, 50.7, None), open_cell("gateway", 2, 51.3, 0.4)]
    rows = report.aggregate(rounds)
    report.derive(rows, rounds)
    table = report.open_table(rows)
    assert "| same window: added p50 / p99 ms |" in table
    assert "| 0.50 (0.40-0.70) / 1.00 (0.80-1.40) |" in table  # the medians of the rounds, and their ranges
    assert "| direct | open 500/s chat |" in table
    # Without the paired stream (older results, or a run without --paired-direct) there is no such column.
    plain = [{k: v for k, v in r.items() if not k.startswith("same_window")} for r in rounds]
    rows = report.aggregate(plain)
    report.derive(rows, plain)
    assert "same window" not in report.open_table(rows)


def test_the_open_table_gives_the_overhead_the_gateway_reported_beside_its_added_latency() -> None:
    def open_cell(system: str, round_: int, overhead: float | None) -> dict[str, Any]:
        return {**_cell(system, "open 500/s chat", round_, 300), "loop": "open", "p50_ms": 51.0,
                "max_schedule_lag_ms": 1.0, "ttfb_p50_ms": None, "ttfb_p99_ms": None,
                "reported_overhead_p50_ms": overhead, "reported_overhead_p99_ms": None if overhead is None
                else 3 * overhead}

    rounds = [open_cell("direct", 0, None), open_cell("gateway", 0, 0.2),
              open_cell("direct", 1, None), open_cell("gateway", 1, 0.3)]
    rows = report.aggregate(rounds)
    report.derive(rows, rounds)
    lines = report.open_table(rows).splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    column = header.index("its own overhead p50 / p99 ms")
    assert header[column + 1] == "errors"
    by_system = {cells[0]: cells[column] for cells in
                 ([cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:])}
    assert by_system == {"direct": "-", "gateway": "0.25 (0.20-0.30) / 0.75 (0.60-0.90)"}
    # A system that reports nothing (the relays, or results from before the column) has no such column at all.
    plain = [{k: v for k, v in r.items() if not k.startswith("reported_overhead")} for r in rounds]
    rows = report.aggregate(plain)
    report.derive(rows, plain)
    assert "overhead" not in report.open_table(rows)
