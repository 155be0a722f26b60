"""`switchboard experiments report`: the variants of each experimenting model compared, from the ledger.

Per model and variant (control, canary, shadow) over the ledger rows that
carry one (gateway/routing/experiments.py):

- requests; error rate (status >= 400, or an answer that did not complete)
  with a Wilson score interval;
- latency (`duration_ms`) and, for streams, time to first token: mean, p50
  and p95; tokens in and out and cost per request: means. These are over the
  requests that completed, so a fast failure does not flatter a variant;
  cost over the priced ones.

Each figure has a 95% confidence interval, and each variant other than
control its difference to control (canary - control, shadow - control) with
one: means by the normal approximation (Welch's for a difference), rates by
Wilson (Newcombe's hybrid score interval for a difference), quantiles by a
bootstrap with a fixed seed. The bootstrap draws a resample's order
statistic directly (the k-th smallest of n uniform draws is Beta(k, n-k+1)),
so it costs O(1) per resample whatever the ledger's size, and the same
ledger always gives the same report. Standard library only.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from gateway.accounting.ledger import open_ledger
from gateway.policy.experiment_schema import CONTROL, VARIANTS

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2000
SEED = 20261204
_QUANTILES = (("p50", 0.5), ("p95", 0.95))


@dataclass
class _Sample:
    """One variant's completed requests' figures, and its request and error counts."""

    requests: int = 0
    errors: int = 0
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    input_tokens: list[float] = field(default_factory=list)
    output_tokens: list[float] = field(default_factory=list)
    cost: list[float] = field(default_factory=list)


Interval = tuple[float, float] | None


def experiments_report(path: str | Path, *, model: str | None = None, since: float = 0.0,
                       until: float | None = None, seed: int = SEED) -> dict[str, Any]:
    """The comparison of every experimenting model's variants (or only `model`'s) between two unix times."""
    samples = _read(path, model, since, until)
    models = []
    for name in sorted({m for m, _ in samples}):
        variants = {v: samples[(name, v)] for v in VARIANTS if (name, v) in samples}
        models.append(_compare(name, variants, random.Random(f"{seed}:{name}")))
    return {"since": since, "until": until, "confidence": 0.95, "models": models}


def _read(path: str | Path, model: str | None, since: float, until: float | None) -> dict[tuple[str, str], _Sample]:
    query = ("SELECT public_model, variant, status, outcome, duration_ms, ttft_ms, prompt_tokens, completion_tokens, "
             "cost_usd FROM usage WHERE variant IS NOT NULL AND ts >= ? AND ts < ?")
    params: list[Any] = [since, until if until is not None else float("inf")]
    if model is not None:
        query += " AND public_model = ?"
        params.append(model)
    samples: dict[tuple[str, str], _Sample] = {}
    connection = open_ledger(path)
    try:
        for name, variant, status, outcome, duration, ttft, prompt, completion, cost in connection.execute(
                query, params):
            sample = samples.get((name, variant))
            if sample is None:
                sample = samples[(name, variant)] = _Sample()
            sample.requests += 1
            if status >= 400 or outcome != "completed":
                sample.errors += 1
                continue
            sample.latency.append(duration)
            if ttft is not None:
                sample.ttft.append(ttft)
            sample.input_tokens.append(prompt)
            sample.output_tokens.append(completion)
            if cost is not None:
                sample.cost.append(cost)
    finally:
        connection.close()
    return samples


def _compare(name: str, variants: Mapping[str, _Sample], rng: random.Random) -> dict[str, Any]:
    control = variants.get(CONTROL)
    figures: dict[str, dict[str, Any]] = {}
    for variant, sample in variants.items():
        figures[variant] = {"requests": sample.requests, "error_rate": _rate(sample.errors, sample.requests)}
    for metric, values_of in (("latency_ms", lambda s: s.latency), ("ttft_ms", lambda s: s.ttft)):
        for variant, sample in variants.items():
            values = values_of(sample)
            figures[variant][f"{metric}_mean"] = _mean(values)
        ordered = {v: sorted(values_of(s)) for v, s in variants.items()}
        for label, q in _QUANTILES:
            draws = {v: _quantile_draws(ordered[v], q, rng) for v in variants}
            for variant in variants:
                figures[variant][f"{metric}_{label}"] = _quantile(ordered[variant], q, draws[variant])
            if control is not None:
                for variant in variants:
                    if variant != CONTROL:
                        figures[variant][f"{metric}_{label}_diff"] = _quantile_diff(
                            ordered[variant], ordered[CONTROL], q, draws[variant], draws[CONTROL])
    for metric, values_of in (("input_tokens_per_request", lambda s: s.input_tokens),
                              ("output_tokens_per_request", lambda s: s.output_tokens),
                              ("cost_usd_per_request", lambda s: s.cost)):
        for variant, sample in variants.items():
            figures[variant][metric] = _mean(values_of(sample))
    if control is not None:
        for variant, sample in variants.items():
            if variant == CONTROL:
                continue
            figure = figures[variant]
            figure["error_rate_diff"] = _rate_diff(sample.errors, sample.requests, control.errors, control.requests)
            for metric, values_of in (("latency_ms_mean", lambda s: s.latency), ("ttft_ms_mean", lambda s: s.ttft),
                                      ("input_tokens_per_request", lambda s: s.input_tokens),
                                      ("output_tokens_per_request", lambda s: s.output_tokens),
                                      ("cost_usd_per_request", lambda s: s.cost)):
                figure[f"{metric}_diff"] = _mean_diff(values_of(sample), values_of(control))
    return {"model": name, "variants": figures}


# --- estimates, each {"value": x, "ci": [lo, hi]} (None where there is too little data) ------------------------


def _estimate(value: float | None, interval: Interval) -> dict[str, Any] | None:
    if value is None:
        return None
    return {"value": value, "ci": list(interval) if interval is not None else None}


def wilson(successes: int, n: int, z: float = Z95) -> Interval:
    """Wilson score interval of a proportion."""
    if n == 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # The exact ends where the data sit at a bound: no rounding residue like 3e-17 for zero errors.
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))


def _rate(errors: int, n: int) -> dict[str, Any] | None:
    return _estimate(errors / n if n else None, wilson(errors, n))


def _rate_diff(e1: int, n1: int, e0: int, n0: int) -> dict[str, Any] | None:
    """p1 - p0 with Newcombe's hybrid score interval (method 10), built from the two Wilson intervals."""
    w1, w0 = wilson(e1, n1), wilson(e0, n0)
    if w1 is None or w0 is None:
        return None
    p1, p0 = e1 / n1, e0 / n0
    (l1, u1), (l0, u0) = w1, w0
    lower = p1 - p0 - math.sqrt((p1 - l1) ** 2 + (u0 - p0) ** 2)
    upper = p1 - p0 + math.sqrt((u1 - p1) ** 2 + (p0 - l0) ** 2)
    return _estimate(p1 - p0, (lower, upper))


def _mean(values: Sequence[float]) -> dict[str, Any] | None:
    """The mean with a normal-approximation interval (none for fewer than two values)."""
    if not values:
        return None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return _estimate(mean, None)
    half = Z95 * statistics.stdev(values) / math.sqrt(len(values))
    return _estimate(mean, (mean - half, mean + half))


def _mean_diff(values: Sequence[float], control: Sequence[float]) -> dict[str, Any] | None:
    """Difference of two means with Welch's normal-approximation interval."""
    if not values or not control:
        return None
    diff = statistics.fmean(values) - statistics.fmean(control)
    if len(values) < 2 or len(control) < 2:
        return _estimate(diff, None)
    half = Z95 * math.sqrt(statistics.variance(values) / len(values) + statistics.variance(control) / len(control))
    return _estimate(diff, (diff - half, diff + half))


def _rank(n: int, q: float) -> int:
    """The nearest-rank quantile's 1-based rank."""
    return min(n, max(1, math.ceil(q * n)))


def _quantile_draws(ordered: Sequence[float], q: float, rng: random.Random) -> list[float]:
    """Bootstrap replicates of the q-quantile: each the k-th smallest of n draws with replacement from `ordered`."""
    n = len(ordered)
    if n < 2:
        return []
    k = _rank(n, q)
    return [ordered[min(n - 1, int(rng.betavariate(k, n - k + 1) * n))] for _ in range(BOOTSTRAP_RESAMPLES)]


def _percentile_interval(draws: Sequence[float]) -> Interval:
    if not draws:
        return None
    ordered = sorted(draws)
    return ordered[int(0.025 * (len(ordered) - 1))], ordered[math.ceil(0.975 * (len(ordered) - 1))]


def _quantile(ordered: Sequence[float], q: float, draws: Sequence[float]) -> dict[str, Any] | None:
    if not ordered:
        return None
    return _estimate(ordered[_rank(len(ordered), q) - 1], _percentile_interval(draws))


def _quantile_diff(ordered: Sequence[float], control: Sequence[float], q: float, draws: Sequence[float],
                   control_draws: Sequence[float]) -> dict[str, Any] | None:
    """The difference of two quantiles; its interval from the differences of independent bootstrap replicates."""
    if not ordered or not control:
        return None
    value = ordered[_rank(len(ordered), q) - 1] - control[_rank(len(control), q) - 1]
    if not draws or not control_draws:
        return _estimate(value, None)
    diffs = [a - b for a, b in zip(draws, control_draws, strict=True)]
    return _estimate(value, _percentile_interval(diffs))


# --- rendering -------------------------------------------------------------------------------------------------

_ROWS = ("requests", "error_rate", "latency_ms_mean", "latency_ms_p50", "latency_ms_p95", "ttft_ms_mean",
         "ttft_ms_p50", "ttft_ms_p95", "input_tokens_per_request", "output_tokens_per_request",
         "cost_usd_per_request")


def render_experiments(report: Mapping[str, Any], fmt: str) -> str:
    """The report as `json`, or a `table` per model: a row per figure, a column per variant and difference."""
    if fmt == "json":
        return orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n"
    if not report["models"]:
        return "(no requests to models with experiments in this period)\n"
    out: list[str] = []
    for entry in report["models"]:
        variants = entry["variants"]
        columns = [*variants, *(f"{v} - control" for v in variants if v != CONTROL and CONTROL in variants)]
        cells = [["", *columns]]
        for row in _ROWS:
            line = [row]
            for variant in variants:
                line.append(_cell(variants[variant].get(row)))
            for variant in variants:
                if variant != CONTROL and CONTROL in variants:
                    line.append(_cell(variants[variant].get(f"{row}_diff")) if row != "requests" else "")
            cells.append(line)
        widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
        out.append(f"model {entry['model']} (95% confidence intervals in brackets)")
        out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
        out.append("")
    return "\n".join(out)


def _cell(figure: Any) -> str:
    if figure is None:
        return "-"
    if isinstance(figure, int):
        return str(figure)
    text = _number(figure["value"])
    if figure["ci"] is not None:
        text += f" [{_number(figure['ci'][0])}, {_number(figure['ci'][1])}]"
    return text


def _number(value: float) -> str:
    if value == 0 or abs(value) >= 0.01:
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:.0f}"
    return f"{value:.3g}"


def print_experiments(ledger: str, model: str | None, since: str | None, until: str | None, fmt: str) -> int:
    """`switchboard experiments report`: the comparison from a ledger file."""
    import sys

    from gateway.accounting.spend import parse_since

    if not Path(ledger).exists():
        sys.stderr.write(f"{ledger}: no such ledger file\n")
        return 1
    try:
        report = experiments_report(ledger, model=model, since=parse_since(since),
                                    until=parse_since(until) if until else None)
    except ValueError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    sys.stdout.write(render_experiments(report, fmt))
    return 0
