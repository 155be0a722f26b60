"""Token counting per provider family: each adapter declares its tokenizer, limits count with it."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
import tiktoken

from gateway.accounting.limits import Limiter
from gateway.compiled.policy import parse_policy
from gateway.state.memory import MemoryStore
from gateway.tokens.counter import FAMILIES, TokenCounter
from providers import ADAPTERS
from providers.base import Endpoint
from tests.conftest import key_hash

COUNTER = TokenCounter()
PROSE = "The quick brown fox jumps over the lazy dog, and then it writes a gateway in Python."
CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROSE}]}


def test_every_adapter_declares_a_known_family() -> None:
    families = {kind: adapter.capabilities.tokenizer for kind, adapter in ADAPTERS.items()}
    assert set(families.values()) <= set(FAMILIES)
    assert families["openai"] == families["azure_openai"] == "openai"
    assert families["anthropic"] == "anthropic" and families["gemini"] == "gemini"
    assert families["vllm"] == families["mistral"] == families["groq"] == "open_weights"


def test_openai_family_counts_exactly_by_the_models_own_encoding() -> None:
    # gpt-4 is cl100k_base, gpt-4o o200k_base: different counts for the same text.
    cl100k, o200k = tiktoken.get_encoding("cl100k_base"), tiktoken.get_encoding("o200k_base")
    assert COUNTER.count_text(PROSE, "gpt-4", "openai") == len(cl100k.encode_ordinary(PROSE))
    assert COUNTER.count_text(PROSE, "gpt-4o", "openai") == len(o200k.encode_ordinary(PROSE))
    assert COUNTER.count_text(PROSE, "gpt-4") == COUNTER.count_text(PROSE, "gpt-4", "openai")  # the default


def test_estimated_families_use_o200k_whatever_the_model_name() -> None:
    o200k = COUNTER.count_text(PROSE, "gpt-4o")
    # A name tiktoken maps to cl100k does not change the method of a family without a public tokenizer.
    assert COUNTER.count_text(PROSE, "gpt-4", "open_weights") == o200k
    assert COUNTER.count_text(PROSE, "gemini-2.5-flash", "gemini") == o200k
    assert COUNTER.count_text(PROSE, "meta-llama/Llama-3.1-8B-Instruct", "open_weights") == o200k


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_count_applies_the_familys_factor(family: str) -> None:
    factor, model = FAMILIES[family].factor, "some-model"
    plain = {
        "text": COUNTER.count_text(PROSE, model),
        "chat": COUNTER.count_chat_prompt(CHAT, model),
        "completion": COUNTER.count_completion_prompt({"prompt": PROSE}, model),
        "embedding": COUNTER.count_embedding_input({"input": [PROSE, PROSE]}, model),
        "responses": COUNTER.count_responses_input({"instructions": "Be brief.", "input": PROSE}, model),
    }
    scaled = {
        "text": COUNTER.count_text(PROSE, model, family),
        "chat": COUNTER.count_chat_prompt(CHAT, model, family),
        "completion": COUNTER.count_completion_prompt({"prompt": PROSE}, model, family),
        "embedding": COUNTER.count_embedding_input({"input": [PROSE, PROSE]}, model, family),
        "responses": COUNTER.count_responses_input({"instructions": "Be brief.", "input": PROSE}, model, family),
    }
    assert scaled == {name: math.ceil(count * factor) for name, count in plain.items()}


def test_anthropic_estimate_is_documented_and_above_o200k() -> None:
    family = FAMILIES["anthropic"]
    assert family.encoding == "o200k_base" and 1.15 <= family.factor <= 1.3 and "estimate" in family.note
    assert COUNTER.count_chat_prompt(CHAT, "claude-sonnet-4-6", "anthropic") > COUNTER.count_chat_prompt(
        CHAT, "claude-sonnet-4-6")
    assert FAMILIES["gemini"].factor == 1.0 and "o200k" in FAMILIES["gemini"].note


def test_unknown_family_counts_like_open_weights() -> None:
    assert COUNTER.count_text(PROSE, "gpt-4", "someday") == COUNTER.count_text(PROSE, "gpt-4", "open_weights")


def test_responses_input_counts_like_the_equivalent_chat() -> None:
    responses = {"instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": PROSE}]}]}
    assert COUNTER.count_responses_input(responses, "gpt-4o") == COUNTER.count_chat_prompt(CHAT, "gpt-4o")
    with_image = {"input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "low"}]}]}
    assert COUNTER.count_responses_input(with_image, "gpt-4o") > 85


def test_stream_estimate_reads_responses_events() -> None:
    events = [b'{"type":"response.output_text.delta","output_index":0,"delta":"hello "}',
              b'{"type":"response.output_text.delta","output_index":0,"delta":"world"}']
    assert COUNTER.count_stream_output(events, "gpt-4o") == COUNTER.count_text("hello world", "gpt-4o")
    done = b'{"type":"response.completed","response":{"usage":{"output_tokens":7}}}'
    assert COUNTER.count_stream_output([*events, done], "gpt-4o") == 7


def _reserved(kind: str, model: str) -> int:
    policy = parse_policy(f"""
version: 1
providers:
  up: {{kind: {kind}, base_url: "http://127.0.0.1:9/v1", api_key: k}}
models:
  m: {{targets: [{{provider: up, model: {model}}}]}}
teams:
  alpha:
    models: [m]
    limits: {{tpm: 1000000}}
    keys: [{{id: alpha-key, hash: "{key_hash('sk-alpha')}"}}]
""")
    body: dict[str, Any] = {"model": "m", "max_tokens": 10, **CHAT}
    caller = next(iter(policy.keys.values()))

    async def admit() -> int:
        store = MemoryStore()
        await store.start()
        try:
            admission = await Limiter(store, COUNTER).admit(policy, caller, Endpoint.CHAT, body, policy.models["m"],
                                                            {})
            assert admission is not None
            return admission.reserved_tokens
        finally:
            await store.close()

    return asyncio.run(admit())


def test_limits_reserve_with_the_providers_family() -> None:
    claude = _reserved("anthropic", "claude-sonnet-4-6")
    openai_count = _reserved("openai", "gpt-4o")
    assert openai_count == COUNTER.count_chat_prompt(CHAT, "gpt-4o") + 10
    assert claude == COUNTER.count_chat_prompt(CHAT, "claude-sonnet-4-6", "anthropic") + 10
    assert claude > openai_count
