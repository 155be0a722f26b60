"""Load a policy's prices into Arize Phoenix's model table, so Phoenix prices spans as the ledger does.

Phoenix computes a span's cost itself, from `llm.model_name` (matched against each model's name
pattern, preferring one whose provider equals `llm.provider`) and `llm.token_count.*`, with its own
price table; a model it does not know costs nothing, one it knows at a different price costs
something else. This writes every priced target of the policy into that table through Phoenix's
GraphQL API: input, cached input (Phoenix's `cache_read`), cache writes and output, per 1M tokens.

    python deploy/stack/phoenix_prices.py http://127.0.0.1:6006 policy.yaml
"""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from typing import Any

from gateway.compiled.policy import Policy, load_policy

_CREATE = """mutation($input: CreateModelMutationInput!) { createModel(input: $input) { model { id name } } }"""


def phoenix_models(policy: Policy) -> list[dict[str, Any]]:
    """Phoenix `CreateModelMutationInput`s for every priced (provider, upstream model) of the policy."""
    models: dict[tuple[str, str], dict[str, Any]] = {}
    for model in policy.models.values():
        for target in model.targets:
            provider, name = target.provider.name, target.upstream_model
            price = policy.prices.price_for(provider, name)
            if price is None or (provider, name) in models:
                continue
            models[(provider, name)] = {
                "name": f"switchboard {provider}/{name} ({price.version})",
                "provider": provider,
                "namePattern": f"^{re.escape(name)}$",
                "costs": [
                    {"tokenType": "input", "kind": "PROMPT", "costPerMillionTokens": price.input},
                    {"tokenType": "cache_read", "kind": "PROMPT", "costPerMillionTokens": price.cached_input},
                    {"tokenType": "cache_write", "kind": "PROMPT", "costPerMillionTokens": price.cache_write},
                    {"tokenType": "output", "kind": "COMPLETION", "costPerMillionTokens": price.output},
                ],
            }
    return list(models.values())


def graphql(url: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url.rstrip("/") + "/graphql", method="POST",
                                     data=json.dumps({"query": query, "variables": variables}).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        reply: dict[str, Any] = json.loads(response.read())
    if reply.get("errors"):
        raise RuntimeError(f"Phoenix refused {variables}: {reply['errors']}")
    return reply


def load_prices(url: str, policy: Policy) -> int:
    models = phoenix_models(policy)
    for model in models:
        graphql(url, _CREATE, {"input": model})
    return len(models)


if __name__ == "__main__":
    count = load_prices(sys.argv[1], load_policy(sys.argv[2]))
    sys.stdout.write(f"phoenix: {count} model prices loaded\n")
