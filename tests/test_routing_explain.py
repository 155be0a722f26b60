"""`switchboard policy explain`: the route a request would take, from the policy alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main

POLICY = Path(__file__).resolve().parents[1] / "policies" / "examples" / "routing.yaml"


def test_explain_lists_targets_strategy_and_fallbacks(capsys) -> None:
    assert main(["policy", "explain", str(POLICY), "--model", "chat-hosted", "--team", "product"]) == 0
    out = capsys.readouterr().out
    assert "model chat-hosted: strategy weighted, retries 1" in out
    assert "1. openai (openai) model gpt-4o-mini; weight 3, tags region=us" in out
    assert "team product: may use chat-hosted" in out


def test_explain_with_a_long_prompt_shows_the_context_window_fallback(tmp_path, capsys) -> None:
    prompt = tmp_path / "request.json"
    prompt.write_text(json.dumps({"messages": [{"role": "user", "content": "word " * 9000}]}))
    assert main(["policy", "explain", str(POLICY), "--model", "chat", "--prompt-file", str(prompt)]) == 0
    out = capsys.readouterr().out
    assert "too long -> context_window fallbacks" in out
    assert "fallbacks (context_window): chat-long" in out
    assert "model chat-long: strategy cost" in out


@pytest.mark.parametrize("model", ["nope"])
def test_explain_an_unknown_model_fails(model, capsys) -> None:
    assert main(["policy", "explain", str(POLICY), "--model", model]) == 1
    assert "unknown model 'nope'" in capsys.readouterr().err
