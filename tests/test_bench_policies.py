"""loadtests/bench.py's full policy and its ablations (`--ablate`): each is a valid policy, and each variant turns
off exactly the part it is named for, so a benchmark of it measures what its name says."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gateway.compiled.policy import Policy, parse_policy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loadtests"))
import bench


def _parts_on(policy: Policy) -> set[str]:
    on = set()
    if policy.telemetry.traces.exporter != "none":
        on.add("traces")
    if policy.steps.admission:
        on.add("limits")
    if policy.ledger.path is not None:
        on.add("ledger")
    if policy.telemetry.metrics.enabled:
        on.add("metrics")
    return on


def _full(tmp_path: Path, without: str | None = None) -> Policy:
    return parse_policy(bench.full_policy_yaml("http://127.0.0.1:9/v1", 6390, 4318, tmp_path / "ledger.sqlite",
                                               without=without))


def test_the_full_policy_has_every_part(tmp_path: Path) -> None:
    policy = _full(tmp_path)
    assert _parts_on(policy) == set(bench.FULL_POLICY_PARTS) == {"traces", "limits", "ledger", "metrics"}
    assert policy.telemetry.traces.sample_ratio == 1.0 and policy.state.url.startswith("redis://")


@pytest.mark.parametrize("part", sorted(bench.FULL_POLICY_PARTS))
def test_each_ablation_turns_off_its_part_only(tmp_path: Path, part: str) -> None:
    policy = _full(tmp_path, without=part)
    assert _parts_on(policy) == set(bench.FULL_POLICY_PARTS) - {part}
    assert policy.state.url.startswith("redis://")  # the store stays configured: only its use goes


def test_the_leased_variant_is_the_full_policy_with_leases_only(tmp_path: Path) -> None:
    plain = _full(tmp_path)
    leased = parse_policy(bench.full_policy_yaml("http://127.0.0.1:9/v1", 6390, 4318, tmp_path / "ledger.sqlite",
                                                 state_extra=bench.LEASES))
    assert _parts_on(leased) == _parts_on(plain)
    assert plain.state.leases is None
    assert leased.state.leases is not None and leased.state.model_copy(update={"leases": None}) == plain.state
