"""`switchboard keys list|new|revoke|rotate` against a running gateway that reloads what they write."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from gateway.cli.main import main
from gateway.compiled.policy import PolicyError, load_policy
from tests.conftest import RunningGateway
from tests.demo_policy import ADMIN_KEY, DEMO_KEY, INTERN_KEY, demo_text

FAST_RELOAD = "server:\n  reload: {poll_interval_s: 0.05}\n"


@pytest.fixture
def demo(start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    return start_gateway(demo_text() + FAST_RELOAD)


def _keys(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["keys", *args]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def _status(gateway: RunningGateway, key: str) -> int:
    return httpx.get(gateway.v1 + "/models", headers={"authorization": f"Bearer {key}"}).status_code


def _becomes(gateway: RunningGateway, key: str, status: int) -> None:
    deadline = time.monotonic() + 10
    while _status(gateway, key) != status:
        assert time.monotonic() < deadline, f"{key[:12]}... never answered {status}"
        threading.Event().wait(0.05)


def test_a_new_key_is_shown_once_and_works_after_the_reload(demo: RunningGateway,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = _keys(capsys, "new", "--policy", str(demo.policy_path), "--team", "interns", "--id", "ci-bot")
    key = re.search(r"^  (sk-sb-\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
    _becomes(demo, key, 200)
    keys_file = demo.policy_path.parent / (demo.policy_path.stem + ".keys.yaml")
    assert key not in keys_file.read_text() and key not in demo.policy_path.read_text()
    assert demo.policy_path.read_text().rstrip().endswith("keys_file: policy-0.keys.yaml  # `switchboard keys`")
    assert demo.store.last_reload.result == "applied"
    listing = _keys(capsys, "list", "--policy", str(demo.policy_path), "--team", "interns")
    assert re.search(r"^interns\s+ci-bot\s+keys file\s+active$", listing, re.M)


def test_revocation_applies_on_reload_wherever_the_key_lives(demo: RunningGateway,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = _keys(capsys, "new", "--policy", str(demo.policy_path), "--team", "demo")
    key = re.search(r"^  (sk-sb-\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
    key_id = re.search(r"New key (\S+) for team demo", out).group(1)  # type: ignore[union-attr]
    _becomes(demo, key, 200)
    _keys(capsys, "revoke", "--policy", str(demo.policy_path), "--id", key_id)  # in the keys file
    _becomes(demo, key, 401)
    assert _status(demo, DEMO_KEY) == 200 and _status(demo, INTERN_KEY) == 200
    before = demo.policy_path.read_text()
    _keys(capsys, "revoke", "--policy", str(demo.policy_path), "--id", "intern")  # inline in the policy
    _becomes(demo, INTERN_KEY, 401)
    after = demo.policy_path.read_text()
    # One line added, every comment kept.
    assert len(after.splitlines()) == len(before.splitlines()) + 1 and "# sha256 of \"sk-switchboard-intern\"" in after
    listing = _keys(capsys, "list", "--policy", str(demo.policy_path))
    assert re.search(r"^interns\s+intern\s+policy\s+revoked$", listing, re.M)
    assert re.search(rf"^demo\s+{key_id}\s+keys file\s+revoked$", listing, re.M)


def test_rotation_keeps_the_old_key_working_until_the_overlap_ends(demo: RunningGateway,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = _keys(capsys, "rotate", "--policy", str(demo.policy_path), "--id", "demo", "--overlap", "2h")
    new = re.search(r"^  (sk-sb-\S+)$", out, re.M).group(1)  # type: ignore[union-attr]
    until = re.search(r"keeps working until (\S+)\.", out).group(1)  # type: ignore[union-attr]
    _becomes(demo, new, 200)
    assert _status(demo, DEMO_KEY) == 200  # both work during the overlap
    listing = _keys(capsys, "list", "--policy", str(demo.policy_path), "--team", "demo")
    assert re.search(rf"^demo\s+demo\s+policy\s+expires {until}$", listing, re.M)
    expiry = time.time() + 7200
    entry = next(e for e in demo.store.current.keys.values() if e.key_id == "demo")
    assert entry.expires_at == pytest.approx(expiry, abs=5)
    # The end of the overlap, brought forward: the old key is refused, the new one is not.
    text = demo.policy_path.read_text()
    demo.policy_path.write_text(text.replace(f'expires_at: "{until}"', 'expires_at: "2020-01-01T00:00:00Z"'))
    _becomes(demo, DEMO_KEY, 401)
    refused = httpx.get(demo.v1 + "/models", headers={"authorization": f"Bearer {DEMO_KEY}"}).json()
    assert refused["error"]["message"] == "This API key has expired."
    assert refused["error"]["code"] == "invalid_api_key"
    assert _status(demo, new) == 200


def test_the_admin_key_is_never_printed_back(demo: RunningGateway, capsys: pytest.CaptureFixture[str]) -> None:
    listing = _keys(capsys, "list", "--policy", str(demo.policy_path))
    admin_hash = "c7478f354a48609314eb96042fe3ee58c310515eafca8cb7b77284fefa5996dd"
    assert "(admin)  demo-admin" in listing and ADMIN_KEY not in listing and admin_hash not in listing
    assert "sha256" not in listing
    assert main(["keys", "rotate", "--policy", str(demo.policy_path), "--id", "demo-admin"]) == 1
    captured = capsys.readouterr()
    assert "admin keys are not rotated here" in captured.err and "sk-" not in captured.out + captured.err


def test_keys_file_problems_are_reported_with_the_policy(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(demo_text() + "keys_file: keys.yaml\n")
    (tmp_path / "keys.yaml").write_text("version: 1\nteams:\n  ghosts:\n    - {id: boo, hash: \"sha256:"
                                        + "0" * 64 + "\"}\n")
    with pytest.raises(PolicyError) as refused:
        load_policy(policy)
    assert "teams.ghosts: no team 'ghosts' in the policy" in refused.value.problems[0]
    (tmp_path / "keys.yaml").write_text("version: 1\nteams:\n  demo:\n    - id: x\n      hash: nope\n")
    with pytest.raises(PolicyError) as refused:
        load_policy(policy)
    assert re.search(r"keys\.yaml: teams\.demo\.0\.hash: String should match pattern .* \(line 5\)",
                     refused.value.problems[0])
    (tmp_path / "keys.yaml").write_text("version: 1\nteams:\n  demo:\n    - {id: demo, hash: \"sha256:" + "1" * 64
                                        + "\"}\n")
    with pytest.raises(PolicyError) as refused:
        load_policy(policy)
    assert any("duplicate key id" in p for p in refused.value.problems)


def test_admin_keys_may_not_expire(tmp_path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(demo_text().replace("    - id: demo-admin\n",
                                          '    - id: demo-admin\n      expires_at: "2030-01-01T00:00:00Z"\n'))
    with pytest.raises(PolicyError) as refused:
        load_policy(policy)
    assert refused.value.problems[0].startswith("admin.keys.0.expires_at: admin keys do not expire")
