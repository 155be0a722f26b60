"""Settings per public model: a price, and Anthropic's automatic cache breakpoints.

Two public models served by one deployment used to need an alias provider each to be billed differently;
`models.<name>.price` and `models.<name>.prompt_caching` set them where operators think of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.compiled.policy import PolicyError, parse_policy
from tests.conftest import RunningGateway, serving
from tests.fakes import FakeOpenAIUpstream
from tests.fakes.anthropic_upstream import FakeAnthropicUpstream


def _cost(gateway: RunningGateway, model: str) -> tuple[Decimal, int, int]:
    raw = gateway.client().chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "one two three"}])
    usage = raw.parse().usage
    assert usage is not None
    return Decimal(raw.headers["x-switchboard-cost-usd"]), usage.prompt_tokens, usage.completion_tokens


def test_two_public_models_on_one_deployment_are_billed_at_their_own_prices(upstream: FakeOpenAIUpstream,
                                                                            tmp_path: Path) -> None:
    policy = f"""
providers:
  shared: {{kind: openai_compatible, base_url: {upstream.base_url}}}
models:
  internal: {{targets: [{{provider: shared, model: llama-70b}}], price: {{input: 1, output: 2}}}}
  customer: {{targets: [{{provider: shared, model: llama-70b}}], price: {{input: 10, output: 40}}}}
  plain: {{targets: [{{provider: shared, model: llama-70b}}]}}
prices:
  targets: {{shared: {{llama-70b: {{input: 3, output: 3}}}}}}
"""
    with serving(tmp_path / "policy.yaml", policy) as gateway:
        for model, (input_price, output_price) in {"internal": (1, 2), "customer": (10, 40), "plain": (3, 3)}.items():
            cost, prompt, completion = _cost(gateway, model)
            expected = (Decimal(prompt) * input_price + Decimal(completion) * output_price) / 1_000_000
            assert abs(cost - expected) < Decimal("1e-10"), model
        records = gateway.usage.wait_for(3)
        assert [r.price_version for r in records] == ["policy"] * 3


@pytest.fixture
def claude(tmp_path: Path) -> Iterator[tuple[RunningGateway, FakeAnthropicUpstream]]:
    with FakeAnthropicUpstream() as fake:
        policy = f"""
providers:
  claude: {{kind: anthropic, base_url: {fake.base_url}, api_key: sk-ant-upstream}}
models:
  claude-cached:
    targets: [{{provider: claude, model: claude-sonnet-4-6}}]
    prompt_caching: {{system_and_tools: true, last_turns: 0, ttl: 1h}}
  claude: {{targets: [{{provider: claude, model: claude-sonnet-4-6}}]}}
"""
        with serving(tmp_path / "policy.yaml", policy) as gateway:
            yield gateway, fake


def test_anthropic_cache_breakpoints_are_set_per_public_model(
        claude: tuple[RunningGateway, FakeAnthropicUpstream]) -> None:
    gateway, fake = claude
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]
    gateway.client().chat.completions.create(model="claude-cached", messages=messages)  # type: ignore[arg-type]
    assert fake.last_request is not None
    assert fake.last_request.json["system"][-1]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    gateway.client().chat.completions.create(model="claude", messages=messages)  # type: ignore[arg-type]
    assert "cache_control" not in str(fake.last_request.json)


def test_prompt_caching_on_a_model_without_anthropic_targets_is_refused() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy("""
providers: {local: {kind: vllm, base_url: "http://127.0.0.1:9/v1"}}
models:
  m: {targets: [{provider: local, model: x}], prompt_caching: {last_turns: 1}}
teams: {a: {models: ["*"]}}
""")
    assert any(p.startswith("models.m.prompt_caching: applies to kind anthropic targets only")
               for p in caught.value.problems)
