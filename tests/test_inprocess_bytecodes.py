"""loadtests/inprocess.py --bytecodes: each function's bytecodes, counted exactly and reported per request."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loadtests"))
import inprocess


def _three_rounds() -> int:
    total = 0
    for step in range(3):
        total += _double(step)
    return total


def _double(value: int) -> int:
    return value * 2


def test_counts_are_per_function_and_the_same_for_the_same_work() -> None:
    tracer = sys.gettrace()
    once: Counter[tuple[str, int, str]] = Counter()
    with inprocess.counting_bytecodes(once):
        _three_rounds()
    twice: Counter[tuple[str, int, str]] = Counter()
    with inprocess.counting_bytecodes(twice):
        _three_rounds()
        _three_rounds()

    outer = (__file__, _three_rounds.__code__.co_firstlineno, "_three_rounds")
    inner = (__file__, _double.__code__.co_firstlineno, "_double")
    assert once[outer] > 0 and once[inner] > 0
    assert twice[outer] == 2 * once[outer]  # repeatable: the same work counts the same
    assert twice[inner] == 2 * once[inner]
    # The callee's bytecodes are its own, not its caller's: three calls of the same few instructions.
    assert once[inner] % 3 == 0 and once[inner] < once[outer]
    assert sys.gettrace() is tracer  # counting stops with the block, and whatever traced before traces again


def test_the_report_gives_bytecodes_per_request_by_file_and_by_function() -> None:
    root = Path(inprocess.__file__).resolve().parent.parent
    counts = Counter({(str(root / "gateway" / "pipeline.py"), 57, "handle_inference"): 3000,
                      (str(root / "gateway" / "pipeline.py"), 113, "parse_request"): 600,
                      (str(root / "providers" / "mock.py"), 57, "MockEngine.respond"): 1200})
    report = inprocess.bytecode_report(counts, requests=3, top=2).splitlines()

    assert report[0] == "1,600 bytecodes per request on the event loop's thread (3 requests)"
    by_file = report[report.index("by file:") + 1:report.index("by function:") - 1]
    assert [line.split() for line in by_file] == [["1,200", "gateway/pipeline.py"], ["400", "providers/mock.py"]]
    by_function = report[report.index("by function:") + 1:]
    assert [line.split() for line in by_function] == [
        ["1,000", "gateway/pipeline.py:57", "handle_inference"], ["400", "providers/mock.py:57", "MockEngine.respond"]]


def test_with_a_phase_what_runs_once_a_request_is_answered_is_counted_apart() -> None:
    phase = inprocess.Phase()
    before: Counter[tuple[str, int, str]] = Counter()
    after: Counter[tuple[str, int, str]] = Counter()
    with inprocess.counting_bytecodes(before, after, phase):
        _three_rounds()
        phase.answered = True
        _double(1)
        _double(2)

    inner = (__file__, _double.__code__.co_firstlineno, "_double")
    outer = (__file__, _three_rounds.__code__.co_firstlineno, "_three_rounds")
    assert before[outer] > 0 and after[outer] == 0
    # Three calls before the answer, two after: each call counts on its side of it.
    assert before[inner] % 3 == 0 and after[inner] == 2 * (before[inner] // 3)
