"""Fake upstream servers that tests and load tests point the gateway at."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fakes.openai_upstream import (
        DEFAULT_MODELS,
        TOOL_CALL_ID,
        Behaviour,
        ClientDisconnect,
        FakeOpenAIUpstream,
        RecordedRequest,
        count_tokens,
        error_body,
        minimal_instance,
    )

__all__ = [
    "DEFAULT_MODELS",
    "TOOL_CALL_ID",
    "Behaviour",
    "ClientDisconnect",
    "FakeOpenAIUpstream",
    "RecordedRequest",
    "count_tokens",
    "error_body",
    "minimal_instance",
]


def __getattr__(name: str) -> Any:
    # Imported lazily so `python -m tests.fakes.openai_upstream` does not find the module already
    # imported by its package (runpy warns about that, and the module would exist twice).
    if name in __all__:
        return getattr(importlib.import_module("tests.fakes.openai_upstream"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
