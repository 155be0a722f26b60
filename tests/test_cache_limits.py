"""Cache hits against rate limits and budgets: always a request, tokens only with `hits_count_tokens`, never USD."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from gateway.cache import ResponseCache
from tests.conftest import RunningGateway, key_hash
from tests.fakes import FakeOpenAIUpstream

Start = Callable[..., RunningGateway]
ADMIN_KEY = "sk-admin-cache"


def limited_cache_policy(base_url: str, hits_count_tokens: bool) -> str:
    return f"""
version: 1
admin:
  keys: [{{id: ops, hash: "{key_hash(ADMIN_KEY)}"}}]
providers:
  upstream:
    kind: openai_compatible
    base_url: {base_url}
prices:
  targets:
    upstream:
      "*": {{input: 1.0, output: 2.0}}
models:
  chat-model:
    targets: [{{provider: upstream, model: upstream-chat}}]
    cache: {{mode: exact, hits_count_tokens: {str(hits_count_tokens).lower()}}}
teams:
  alpha:
    keys: [{{id: alpha-key, hash: "{key_hash('sk-alpha')}"}}]
    models: [chat-model]
    limits: {{rpd: 1000, tpd: 100000}}  # daily, not per minute: a window that rolls over mid-test reads 0
    budget: {{tokens: 100000, usd: 100}}
"""


def usage_rows(gateway: RunningGateway) -> dict[str, int | float]:
    response = httpx.get(gateway.base_url + "/admin/usage", params={"team": "alpha"},
                         headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    return {f"{r['limit_type']} ({r['unit']})": r["used"] for r in response.json()["usage"]}


@pytest.mark.parametrize("hits_count_tokens", [False, True])
def test_a_hit_counts_as_a_request_and_its_tokens_only_when_configured(
        upstream: FakeOpenAIUpstream, start_gateway: Start, hits_count_tokens: bool) -> None:
    gateway = start_gateway(limited_cache_policy(upstream.base_url, hits_count_tokens), cache=ResponseCache())
    client = gateway.client("sk-alpha")

    def ask() -> tuple[int, str]:
        raw = client.chat.completions.with_raw_response.create(
            model="chat-model", messages=[{"role": "user", "content": "what is the capital of France"}],
            max_tokens=50)
        usage = raw.parse().usage
        return (usage.total_tokens if usage else 0), raw.headers["x-switchboard-cache"]

    tokens, status = ask()
    assert status == "miss" and tokens > 0
    gateway.usage.wait_for(1)
    after_miss = usage_rows(gateway)
    assert after_miss["requests per day (requests)"] == 1
    assert after_miss["tokens per day (tokens)"] == after_miss["monthly budget (tokens)"] == tokens
    assert after_miss["monthly budget (usd)"] > 0

    for _ in range(3):
        assert ask()[1] == "hit"
    gateway.usage.wait_for(4)
    after_hits = usage_rows(gateway)
    assert after_hits["requests per day (requests)"] == 4
    counted = tokens * 4 if hits_count_tokens else tokens
    assert after_hits["tokens per day (tokens)"] == after_hits["monthly budget (tokens)"] == counted
    assert after_hits["monthly budget (usd)"] == after_miss["monthly budget (usd)"]  # hits never cost USD
    assert upstream.request_count == 1
