"""Completion tokens of a stream cut before the upstream reported its usage."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import orjson

from gateway.tokens.framing import TOOL_CALL_OVERHEAD, call_strings


class TextCounter(Protocol):
    """Counts plain text for a model and tokenizer family (the gateway's TokenCounter)."""

    def count_text(self, text: str, model: str, family: str = "openai") -> int: ...


class StreamUsageEstimator:
    """Accumulates one streamed response so its usage can be estimated if it is cut.

    Feed it each ``data:`` payload of a chat or legacy completions stream (JSON bytes/str
    or the parsed dict); anything malformed is ignored. Only generated text is kept, and
    it is encoded once per choice at the end since chunk boundaries split tokens.
    """

    __slots__ = ("_counter", "_family", "_model", "_reported", "_text", "_tools")

    def __init__(self, counter: TextCounter, model: str, family: str = "openai") -> None:
        self._counter, self._model, self._family = counter, model, family
        self._text: dict[int, list[str]] = {}
        self._tools: dict[tuple[int, int], list[str]] = {}
        self._reported: int | None = None

    def feed(self, chunk: bytes | str | Mapping[str, Any]) -> None:
        """Record one chunk. Never raises."""
        if isinstance(chunk, bytes | str):
            data = chunk.strip()
            if data[:5] in (b"data:", "data:"):
                data = data[5:].lstrip()
            if not data or data in (b"[DONE]", "[DONE]"):
                return
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                return
        if not isinstance(chunk, Mapping):
            return
        usage = chunk.get("usage")
        if isinstance(usage, Mapping) and isinstance(usage.get("completion_tokens"), int):
            self._reported = usage["completion_tokens"]
        if isinstance(kind := chunk.get("type"), str):  # a Responses API stream event
            self._feed_event(kind, chunk)
            return
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, Mapping):
                self._feed_choice(choice)

    def _feed_event(self, kind: str, event: Mapping[str, Any]) -> None:
        if kind in ("response.output_text.delta", "response.refusal.delta", "response.function_call_arguments.delta",
                    "response.reasoning_summary_text.delta") and isinstance(event.get("delta"), str):
            index = event.get("output_index")
            self._text.setdefault(index if isinstance(index, int) else 0, []).append(event["delta"])
        elif kind in ("response.completed", "response.incomplete") and isinstance(event.get("response"), Mapping):
            usage = event["response"].get("usage")
            if isinstance(usage, Mapping) and isinstance(usage.get("output_tokens"), int):
                self._reported = usage["output_tokens"]

    def _feed_choice(self, choice: Mapping[str, Any]) -> None:
        index = choice.get("index")
        index = index if isinstance(index, int) else 0
        pieces = self._text.setdefault(index, [])
        if isinstance(choice.get("text"), str):  # legacy /v1/completions
            pieces.append(choice["text"])
        delta = choice.get("delta")
        if not isinstance(delta, Mapping):
            return
        # reasoning_content/reasoning: vLLM, SGLang, DeepSeek; billed as completion tokens.
        for key in ("content", "refusal", "reasoning_content", "reasoning"):
            if isinstance(value := delta.get(key), str):
                pieces.append(value)
        calls = delta.get("tool_calls")
        calls = list(calls) if isinstance(calls, list) else []
        if "function_call" in delta:  # legacy functions API
            calls.append({"index": -1, "function": delta["function_call"]})
        for call in calls:
            if isinstance(call, Mapping) and isinstance(fn := call.get("function"), Mapping):
                slot = call.get("index")
                key = (index, slot if isinstance(slot, int) else 0)
                self._tools.setdefault(key, []).extend(call_strings(fn))

    def completion_tokens(self) -> int:
        """The upstream-reported completion tokens if a usage chunk was seen, else the estimate."""
        if self._reported is not None:
            return self._reported
        count, model, family = self._counter.count_text, self._model, self._family
        total = sum(count("".join(pieces), model, family) for pieces in self._text.values() if pieces)
        return total + sum(TOOL_CALL_OVERHEAD + count("".join(p), model, family) for p in self._tools.values())
