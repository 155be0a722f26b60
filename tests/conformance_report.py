"""The conformance matrix: which provider x endpoint x stream x feature cells the test suite proves.

Tests claim cells with `@pytest.mark.conformance(...)` (see tests/conformance_plugin.py);
the plugin collects their outcomes and `render` writes docs/conformance.md. A cell
is `pass` only if at least one test claims it and every test claiming it passed;
a cell nobody claims is `not tested`, never `pass`. Cells that cannot exist
(embeddings on a provider without them, a streamed embedding, cached tokens
from an engine with no prompt cache) are `n.a.`, decided from the adapters'
declared capabilities.

    python -m tests.conformance_report        # run the claiming tests, write docs/conformance.md
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from providers import ADAPTERS
from providers.base import Endpoint

PROVIDERS = ("openai-compatible", "vllm", "anthropic", "gemini", "azure_openai", "mock",
             # Real servers, not fakes (tests/test_selfhosted_servers.py), serving a tiny generated model.
             "llama-server", "llama-cpp-python")
ENDPOINTS = ("chat", "responses", "messages", "embeddings")
FEATURES = ("text", "tools", "json_schema", "images", "cached_usage")
STREAMS = (False, True)
# The policy `kind` each matrix row stands for.
KINDS = {"openai-compatible": "openai_compatible", "vllm": "vllm", "anthropic": "anthropic", "gemini": "gemini",
         "azure_openai": "azure_openai", "mock": "mock", "llama-server": "llamacpp", "llama-cpp-python": "llamacpp"}
REAL_SERVERS = frozenset({"llama-server", "llama-cpp-python"})
# Providers that never report cached prompt tokens (the in-process mock has no prompt cache).
NO_PROMPT_CACHE = frozenset({"mock"})
DEFAULT_PATH = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"

Cell = tuple[str, str, str, bool]  # provider, endpoint, feature, stream


def applies(provider: str, endpoint: str, feature: str, stream: bool) -> bool:
    """Whether a cell can exist at all."""
    if endpoint == "embeddings":
        endpoints = ADAPTERS[KINDS[provider]].capabilities.endpoints
        return feature == "text" and not stream and Endpoint.EMBEDDINGS in endpoints
    # Chat everywhere; /v1/responses and /v1/messages are served for every chat provider.
    if provider in REAL_SERVERS and feature == "images":
        return False  # the generated model is text-only
    return not (feature == "cached_usage" and provider in NO_PROMPT_CACHE)


def validate(cell: Cell) -> None:
    """Refuse a marker naming a cell outside the matrix, so a typo cannot hide a claim."""
    provider, endpoint, feature, stream = cell
    for value, allowed in ((provider, PROVIDERS), (endpoint, ENDPOINTS), (feature, FEATURES), (stream, STREAMS)):
        if value not in allowed:
            raise ValueError(f"conformance marker: {value!r} is not one of {allowed}")


def verdict(outcomes: Sequence[str]) -> str:
    """One cell's verdict from the outcomes of the tests that claim it."""
    ran = [o for o in outcomes if o != "skipped"]
    if not ran:
        return "skipped" if outcomes else "not tested"
    return "**FAIL**" if "failed" in ran else "pass"


def render(results: Mapping[Cell, Sequence[str]], *, command: str, when: dt.datetime | None = None) -> str:
    """docs/conformance.md for `results` (cell -> outcomes of the tests claiming it)."""
    when = when or dt.datetime.now(dt.UTC)
    counts = {"pass": 0, "**FAIL**": 0, "not tested": 0, "skipped": 0, "n.a.": 0}
    tables = []
    for provider in PROVIDERS:
        rows = [f"### {provider} (`kind: {KINDS[provider]}`)", "",
                "| endpoint | feature | non-stream | stream |", "|---|---|---|---|"]
        for endpoint in ENDPOINTS:
            for feature in FEATURES:
                cells = []
                for stream in STREAMS:
                    if not applies(provider, endpoint, feature, stream):
                        value = "n.a."
                    else:
                        outcomes = results.get((provider, endpoint, feature, stream), ())
                        value = verdict(outcomes)
                        if outcomes and value != "not tested":
                            value += f" ({len(outcomes)})"
                    counts[value.split(" (")[0]] += 1
                    cells.append(value)
                if cells != ["n.a.", "n.a."]:
                    rows.append(f"| {endpoint} | {feature} | {cells[0]} | {cells[1]} |")
        tables.append("\n".join(rows))
    summary = ", ".join(f"{n} {name.strip('*').lower().rstrip('.')}" for name, n in counts.items())
    return "\n".join([
        "# Conformance matrix",
        "",
        "Generated from the test suite by `tests/conformance_plugin.py`; do not edit by hand.",
        f"Last run: {when:%Y-%m-%d %H:%M} UTC, `{command}`.",
        "",
        "Every cell is what an application using only the `openai` SDK (or the `anthropic` SDK for",
        "`messages`) sees through the gateway, against a fake upstream on loopback that speaks the",
        "provider's wire format, or, for `llama-server` (llama.cpp's own server, from the xllamacpp wheel)",
        "and `llama-cpp-python` (its FastAPI server), the real server serving a tiny random-weight model the",
        "tests generate (tests/real_servers.py): `text` a plain reply, `tools` a tool-call round trip, `json_schema`",
        "structured output parsed by the SDK, `images` an image part delivered in the provider's",
        "format, `cached_usage` cached prompt tokens reaching the client's usage and the usage record.",
        "",
        "- **pass (n)**: n tests claim the cell and all of them passed in the last run.",
        "- **FAIL (n)**: at least one of the n tests claiming the cell failed.",
        "- **not tested**: no test claims the cell; nothing is known about it.",
        "- **skipped**: every test claiming it was skipped in the last run.",
        "- **n.a.**: the cell cannot exist (the provider has no such endpoint, embeddings do not",
        "  stream, the mock has no prompt cache, the real servers' generated model is text-only). Rows with no",
        "  applicable cell are left out.",
        "",
        f"Totals: {summary}.",
        "",
        *[table + "\n" for table in tables],
    ])


def write(path: Path, results: Mapping[Cell, Sequence[str]], command: str) -> None:
    """Write the rendered matrix to `path` (its directory is created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(results, command=command))


def main(argv: Iterable[str] = ()) -> int:
    """Run every test that claims a cell (two xdist workers) and write docs/conformance.md."""
    import pytest

    args = ["-n", "2", "-m", "conformance", f"--conformance-report={DEFAULT_PATH}", "tests", *argv]
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
