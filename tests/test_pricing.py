"""Cost attribution: the price table, policy overrides, and the cost a client sees for each request."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from gateway.accounting.pricing import SHIPPED_TABLE, Price, format_usd, load_price_table, with_cost
from gateway.compiled.policy import PolicyError, parse_policy
from providers.base import Usage
from tests.conftest import RunningGateway, standard_policy
from tests.fakes import Behaviour, FakeOpenAIUpstream

# upstream-chat is priced per target in the test policy: these are its prices per 1M tokens.
INPUT, CACHED, OUTPUT = Decimal("2.50"), Decimal("1.25"), Decimal("10.00")
PRICES = """
prices:
  version: test-prices-1
  targets:
    upstream:
      upstream-chat: {input: 2.50, cached_input: 1.25, output: 10.00, effective_date: 2026-11-01}
"""


def expected_cost(prompt: int, completion: int, cached: int = 0) -> Decimal:
    """The bill computed independently, in exact decimals."""
    return ((prompt - cached) * INPUT + cached * CACHED + completion * OUTPUT) / Decimal(1_000_000)


def chat_completion(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-cached", "object": "chat.completion", "created": 1, "model": "upstream-chat",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                  "prompt_tokens_details": {"cached_tokens": cached}},
    }


def sse_with_usage(prompt: int, completion: int, cached: int) -> bytes:
    head = {"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": "upstream-chat"}
    events = [
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}],
         "usage": None},
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None},
        {**head, "choices": [], "usage": chat_completion(prompt, completion, cached)["usage"]},
    ]
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"


# --- the table and the arithmetic ----------------------------------------------------------------


def test_cached_tokens_are_billed_at_the_cached_price() -> None:
    price = Price(input=2.5, output=10.0, cached_input=1.25, cache_write=2.5, effective_date=dt.date(2026, 1, 1),
                  version="v")
    usage = Usage(prompt_tokens=1000, completion_tokens=200, cached_tokens=400)
    assert price.cost(usage) == pytest.approx(float(expected_cost(1000, 200, 400)), abs=1e-12)
    assert price.cost(Usage()) == 0


def test_cache_writes_are_billed_at_the_cache_write_price() -> None:
    price = Price(input=3.0, output=15.0, cached_input=0.3, cache_write=3.75, effective_date=dt.date(2026, 1, 1),
                  version="v")
    usage = Usage(prompt_tokens=10_000, completion_tokens=100, cached_tokens=6000, cache_write_tokens=2000)
    assert price.cost(usage) == pytest.approx((2000 * 3.0 + 6000 * 0.3 + 2000 * 3.75 + 100 * 15.0) / 1e6)


def test_shipped_table_has_a_dated_versioned_price_for_the_major_models() -> None:
    table = load_price_table(SHIPPED_TABLE)
    for family, model in [("openai", "gpt-4o"), ("openai", "gpt-5-mini"), ("anthropic", "claude-sonnet-4-5"),
                          ("gemini", "gemini-2.5-flash"), ("mistral", "mistral-large-latest")]:
        price = table[family][model]
        assert price.version and price.effective_date <= dt.date.today() and price.source
    assert table["openai"]["gpt-4o"].cached_input == 1.25
    assert table["anthropic"]["claude-haiku-4-5"].cache_write == 1.25
    # Embeddings are priced too (input tokens only), so an embeddings call is billed, not free.
    million = Usage(prompt_tokens=1_000_000, completion_tokens=0)
    for family, model, usd in [("openai", "text-embedding-3-small", 0.02), ("openai", "text-embedding-3-large", 0.13),
                               ("mistral", "mistral-embed", 0.10), ("gemini", "gemini-embedding-001", 0.15)]:
        assert table[family][model].cost(million) == pytest.approx(usd)
    # Every entry of the raw file is a mapping with input and output.
    raw = yaml.safe_load(SHIPPED_TABLE.read_text())
    assert all({"input", "output"} <= set(entry) for models in raw["families"].values() for entry in models.values())


HOSTED = """
version: 1
providers:
  openai: {kind: openai, api_key: sk-x}
  proxy: {kind: openai_compatible, base_url: "http://proxy:1/v1"}
  local: {kind: vllm, base_url: "http://gpu:8000/v1"}
models:
  m: {targets: [{provider: openai, model: gpt-4o-2024-08-06}, {provider: proxy, model: gpt-4o-mini},
                {provider: local, model: llama-70b}]}
teams:
  t: {models: ["*"]}
"""


def test_policy_resolves_snapshots_families_and_gpu_priced_targets() -> None:
    policy = parse_policy(HOSTED + """
prices:
  version: acme-2026-q4
  families: {proxy: openai}
  models:
    openai:
      gpt-4o-mini: {input: 0.10, output: 0.50, source: "negotiated"}
  targets:
    local:
      "*":
        gpu: {hourly_usd: 2.00, count: 4, input_tokens_per_s: 20000, output_tokens_per_s: 2000}
""")
    dated = policy.prices.price_for("openai", "gpt-4o-2024-08-06")
    assert dated is not None and (dated.input, dated.output) == (2.5, 10.0)
    assert dated.version == "switchboard-2026-11-28"
    mini = policy.prices.price_for("proxy", "gpt-4o-mini")
    assert mini is not None and (mini.input, mini.output, mini.cached_input) == (0.10, 0.50, 0.10)
    assert (mini.version, mini.source) == ("acme-2026-q4", "negotiated")
    gpu = policy.prices.price_for("local", "llama-70b")
    assert gpu is not None
    # 4 GPUs x $2/h = $8/h; 20k input tok/s = 72M tokens/h -> $0.111.../1M; 2k output tok/s -> $1.111.../1M.
    assert gpu.input == pytest.approx(8 / 72)
    assert gpu.output == pytest.approx(8 / 7.2)
    assert policy.prices.price_for("local", "any-other-model") is gpu
    assert policy.prices.price_for("openai", "unknown-model") is None


def test_unpriced_self_hosted_model_has_no_price() -> None:
    policy = parse_policy(HOSTED)
    assert policy.prices.price_for("local", "llama-70b") is None
    assert policy.prices.price_for("proxy", "gpt-4o-mini") is None  # openai_compatible is not a price family


@pytest.mark.parametrize(("extra", "expected"), [
    ("prices: {targets: {nope: {x: {input: 1, output: 1}}}}", "prices.targets.nope: unknown provider 'nope'"),
    ("prices: {families: {nope: openai}}", "prices.families.nope: unknown provider 'nope'"),
    ("prices: {targets: {local: {x: {input: 1}}}}", "prices.targets.local.x: give `input` and `output`"),
    ("prices: {targets: {local: {x: {input: 1, output: 2, gpu: {hourly_usd: 1, input_tokens_per_s: 1, "
     "output_tokens_per_s: 1}}}}}", "prices.targets.local.x: give either"),
    ("prices: {table: missing.yaml}", "prices.table: cannot read price table"),
    # A provider's name where a price family belongs: its requests would silently go unpriced.
    ("prices: {models: {proxy: {gpt-4o-mini: {input: 1, output: 1}}}}",
     "prices.models.proxy: 'proxy' is a provider, billed under the price family 'openai_compatible'"),
])
def test_invalid_prices_are_refused_with_their_path(extra: str, expected: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(HOSTED + extra)
    assert any(problem.startswith(expected) for problem in caught.value.problems), caught.value.problems


def test_stream_extension_field_is_added_next_to_usage() -> None:
    data = b'{"id":"x","choices":[],"usage":{"prompt_tokens":3}}'
    stamped = orjson.loads(with_cost(data, 0.0000125, "v1"))
    assert stamped["usage"] == {"prompt_tokens": 3}
    assert stamped["switchboard"] == {"cost_usd": 0.0000125, "price_version": "v1"}
    assert format_usd(0.1 + 0.2) == "0.3" and format_usd(0) == "0.0"


# --- through a running gateway --------------------------------------------------------------------


@pytest.fixture
def priced(upstream: FakeOpenAIUpstream, start_gateway: Callable[[str], RunningGateway]) -> RunningGateway:
    return start_gateway(standard_policy(upstream.base_url, extra=PRICES))


def test_non_streamed_reply_carries_its_cost_header(priced: RunningGateway) -> None:
    raw = priced.client().chat.completions.with_raw_response.create(
        model="chat-model", messages=[{"role": "user", "content": "one two three four"}])
    completion = raw.parse()
    assert completion.usage is not None
    cost = Decimal(raw.headers["x-switchboard-cost-usd"])
    assert cost == pytest.approx(expected_cost(completion.usage.prompt_tokens, completion.usage.completion_tokens))
    record = priced.usage.wait_for(1)[0]
    assert record.cost_usd == pytest.approx(float(cost), abs=1e-9)
    assert record.price_version == "test-prices-1"


def test_cached_prompt_tokens_cost_less_to_the_cent(priced: RunningGateway, upstream: FakeOpenAIUpstream) -> None:
    upstream.script(Behaviour(status=200, body=chat_completion(prompt=200_000, completion=3000, cached=150_000)))
    raw = priced.client().chat.completions.with_raw_response.create(
        model="chat-model", messages=[{"role": "user", "content": "long prompt"}])
    cost = Decimal(raw.headers["x-switchboard-cost-usd"])
    # 50k x 2.50 + 150k x 1.25 + 3k x 10 per 1M = 0.125 + 0.1875 + 0.03
    assert expected_cost(200_000, 3000, 150_000) == Decimal("0.3425")
    assert round(cost, 2) == round(Decimal("0.3425"), 2) and cost == pytest.approx(Decimal("0.3425"))


def test_stream_reports_the_same_cost_in_its_final_chunk(priced: RunningGateway,
                                                         upstream: FakeOpenAIUpstream) -> None:
    upstream.script(Behaviour(status=200, body=sse_with_usage(prompt=120_000, completion=2000, cached=100_000),
                              headers={"Content-Type": "text/event-stream"}))
    chunks = list(priced.client().chat.completions.create(
        model="chat-model", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    final = chunks[-1]
    assert final.usage is not None and final.usage.prompt_tokens == 120_000
    extension = (final.model_extra or {})["switchboard"]
    assert Decimal(str(extension["cost_usd"])) == pytest.approx(expected_cost(120_000, 2000, 100_000))
    assert extension["price_version"] == "test-prices-1"
    record = priced.usage.wait_for(1)[0]
    assert record.cost_usd == pytest.approx(extension["cost_usd"], abs=1e-9)


def test_stream_without_usage_requested_has_no_extension(priced: RunningGateway) -> None:
    chunks = list(priced.client().chat.completions.create(
        model="chat-model", messages=[{"role": "user", "content": "hi there"}], stream=True))
    assert all("switchboard" not in (c.model_extra or {}) for c in chunks)
    record = priced.usage.wait_for(1)[0]
    assert record.cost_usd is not None and record.cost_usd > 0  # still billed and recorded


def test_unpriced_model_has_no_cost_header(gateway: RunningGateway) -> None:
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="chat-model", messages=[{"role": "user", "content": "hi"}])
    assert "x-switchboard-cost-usd" not in raw.headers
    assert gateway.usage.wait_for(1)[0].cost_usd is None


def test_shipped_example_policies_price_their_models(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "policies" / "examples" / "telemetry.yaml"
    from gateway.compiled.policy import load_policy

    policy = load_policy(example, environ={})
    assert any(policy.prices.price_for(t.provider.name, t.upstream_model) is not None
               for m in policy.models.values() for t in m.targets)
