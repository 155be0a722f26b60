"""Collects the conformance matrix from test outcomes; `--conformance-report[=PATH]` writes it.

A test claims cells with a marker::

    @pytest.mark.conformance(provider="anthropic", endpoint="chat", feature="tools", stream=False)

- `feature` may be a tuple (one test proving several features).
- `stream` omitted means "read the test's `stream` parameter"; `stream="both"` claims both.
- Any argument may be a dict keyed by the value of the test's `model` parameter (or the
  parameter named by `by=`): `provider={"claude": "anthropic", "local": "vllm"}`. A
  parameter value missing from the dict claims nothing for that case.
- `"$name"` takes the value of the test's parameter `name`: `feature="$feature"`.

The cells of each test are attached to its reports as `user_properties`, so under
xdist the controller sees them in `pytest_runtest_logreport` without re-collecting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import conformance_report

_PROPERTY = "conformance"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--conformance-report", nargs="?", const=str(conformance_report.DEFAULT_PATH), default=None,
                     metavar="PATH", help="write the conformance matrix (default docs/conformance.md) at the end")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "conformance(provider, endpoint, feature, stream=None, by='model'): "
                                       "the conformance-matrix cells this test proves (tests/conformance_plugin.py)")
    config.pluginmanager.register(_Collector(config), "conformance-collector")


def cells_of(item: pytest.Item) -> list[conformance_report.Cell]:
    """The cells an item claims through its conformance markers."""
    params: dict[str, Any] = getattr(getattr(item, "callspec", None), "params", {})
    cells: list[conformance_report.Cell] = []
    for mark in item.iter_markers("conformance"):
        kwargs = dict(mark.kwargs)
        by = kwargs.pop("by", "model")
        resolved: dict[str, Any] = {}
        for name, value in kwargs.items():
            if isinstance(value, dict):
                if params.get(by) not in value:
                    break
                value = value[params[by]]
            elif isinstance(value, str) and value.startswith("$"):
                value = params[value[1:]]
            resolved[name] = value
        else:
            stream = resolved.get("stream", params.get("stream"))
            if stream is None:
                raise pytest.UsageError(f"{item.nodeid}: conformance marker needs stream= or a `stream` parameter")
            features = resolved["feature"]
            for feature in (features,) if isinstance(features, str) else features:
                for flag in (False, True) if stream == "both" else (bool(stream),):
                    cell = (resolved["provider"], resolved["endpoint"], feature, flag)
                    try:
                        conformance_report.validate(cell)
                    except ValueError as exc:
                        raise pytest.UsageError(f"{item.nodeid}: {exc}") from exc
                    if conformance_report.applies(*cell):  # an n.a. case of a parametrized test claims nothing
                        cells.append(cell)
    return cells


class _Collector:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.outcomes: dict[str, tuple[list[conformance_report.Cell], str]] = {}

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            cells = cells_of(item)
            if cells:
                item.user_properties.append((_PROPERTY, [list(cell) for cell in cells]))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        cells = next((value for name, value in report.user_properties if name == _PROPERTY), None)
        if cells is None:
            return
        previous = self.outcomes.get(report.nodeid, (None, "passed"))[1]
        if report.failed:
            outcome = "failed"  # in setup, call or teardown
        elif report.skipped and previous != "failed":
            outcome = "skipped"
        else:
            outcome = previous
        self.outcomes[report.nodeid] = ([(p, e, f, bool(s)) for p, e, f, s in cells], outcome)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        path = self.config.getoption("--conformance-report")
        if path is None or hasattr(self.config, "workerinput"):  # only the controller writes
            return
        results: dict[conformance_report.Cell, list[str]] = {}
        for cells, outcome in self.outcomes.values():
            for cell in cells:
                results.setdefault(cell, []).append(outcome)
        command = "python -m pytest " + " ".join(self.config.invocation_params.args)
        conformance_report.write(Path(path), results, command)
