"""Shared helpers for the routing and resilience tests: multi-provider policies."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

ADMIN_KEY = "sk-admin-routing"


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def multi_policy(providers: Mapping[str, str], models: str, *, kind: str = "openai_compatible",
                 provider_extra: str = "") -> str:
    """A policy with one provider per base URL (named as given), the `models:` YAML block, and one team.

    `models` is the YAML under `models:`, indented by two spaces. Team `alpha` (key sk-alpha)
    may use every model; ADMIN_KEY is an admin key.
    """
    provider_yaml = "".join(
        f"  {name}:\n    kind: {kind}\n    base_url: {url}\n    api_key: sk-upstream-secret\n"
        f"    timeouts: {{connect_s: 2, first_byte_s: 5, total_s: 10}}\n{provider_extra}"
        for name, url in providers.items()
    )
    return f"""
version: 1
server:
  reload: {{watch: false}}
providers:
{provider_yaml}models:
{models}
teams:
  alpha:
    keys:
      - id: alpha-key
        hash: "{key_hash('sk-alpha')}"
    models: ["*"]
admin:
  keys:
    - id: ops
      hash: "{key_hash(ADMIN_KEY)}"
"""


def chat(text: str = "hi") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]
