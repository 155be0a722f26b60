"""`switchboard policy explain`: the route a request would take, from the policy alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli.main import main

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


def test_explain_counts_max_tokens_against_the_context_window_as_the_gateway_does(tmp_path, capsys) -> None:
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"messages": [{"role": "user", "content": "Summarize this."}], "max_tokens": 9000}))
    assert main(["policy", "explain", str(POLICY), "--model", "chat", "--prompt-file", str(request)]) == 0
    out = capsys.readouterr().out
    assert "+ max_tokens 9000 = " in out and "too long -> context_window fallbacks" in out
    request.write_text(json.dumps({"messages": [{"role": "user", "content": "Summarize this."}], "max_tokens": 100}))
    assert main(["policy", "explain", str(POLICY), "--model", "chat", "--prompt-file", str(request)]) == 0
    assert "+ max_tokens 100 = " in (out := capsys.readouterr().out) and ", fits" in out


@pytest.mark.parametrize("model", ["chat", "chat-hosted"])
def test_explain_prints_the_same_order_in_every_process(model) -> None:
    # Different hash seeds: set and dict iteration orders that leak into the output would differ.
    outputs = {subprocess.run([sys.executable, "-m", "gateway", "policy", "explain", str(POLICY), "--model", model,
                               "--team", "product"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(outputs) == 1 and "targets" in outputs.pop()


def test_explain_lists_weighted_targets_by_share(capsys) -> None:
    assert main(["policy", "explain", str(POLICY), "--model", "chat-hosted"]) == 0
    out = capsys.readouterr().out
    assert "by share of traffic" in out and "weight 3, tags region=us, share 75%" in out
