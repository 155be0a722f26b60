"""The shipped demo policy, made fast and self-contained for a test's temporary directory."""

from __future__ import annotations

from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "policies" / "demo.yaml"
DEMO_KEY = "sk-switchboard-demo"
INTERN_KEY = "sk-switchboard-intern"
ADMIN_KEY = "sk-switchboard-admin-demo"


def demo_text(*, paced: bool = False) -> str:
    """demo.yaml with its ledger and counters beside the test's policy file instead of the checkout's .switchboard/.

    `paced=False` also removes the mock's pacing, so tests do not wait on it.
    """
    text = DEMO.read_text().replace("../.switchboard/", "")
    if not paced:
        text = text.replace("first_token_ms: 20", "first_token_ms: 0").replace("token_interval_ms: 5",
                                                                                "token_interval_ms: 0")
    assert "../.switchboard" not in text and (paced or "token_interval_ms: 5" not in text)
    return text
