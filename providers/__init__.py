"""Provider adapters and the registry that maps a policy's `kind` to one.

Adding a provider means adding its module and one entry in `ADAPTERS`; the
policy loader refuses any kind not listed here.
"""

from __future__ import annotations

from providers.anthropic import AnthropicAdapter
from providers.azure import AzureOpenAIAdapter
from providers.base import Adapter
from providers.gemini import GeminiAdapter
from providers.mock import MockAdapter
from providers.openai_compat import SPECS, OpenAICompatAdapter

ADAPTERS: dict[str, Adapter] = {
    **{spec.kind: OpenAICompatAdapter(spec) for spec in SPECS},
    "mock": MockAdapter(),
    "anthropic": AnthropicAdapter(),
    "gemini": GeminiAdapter(),
    "azure_openai": AzureOpenAIAdapter(),
}


def adapter_for(kind: str) -> Adapter:
    """The adapter registered for `kind` (a KeyError here is a policy-loader bug)."""
    return ADAPTERS[kind]
