"""Folding OpenAI chat stream chunks into the message a non-streamed reply would carry.

Used by the provider tests to check stream/non-stream parity: tool-call
fragments are joined by their `index`, as the openai SDK does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson


def accumulate(chunks: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """{content, tool_calls: [{id, name, arguments}], finish_reason, usage} of a chunk sequence."""
    content: str = ""
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    usage = None
    for chunk in chunks:
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            content += delta.get("content") or ""
            for call in delta.get("tool_calls") or ():
                entry = calls.setdefault(call["index"], {"id": None, "name": None, "arguments": ""})
                function = call.get("function") or {}
                entry["id"] = call.get("id") or entry["id"]
                entry["name"] = function.get("name") or entry["name"]
                entry["arguments"] += function.get("arguments") or ""
            finish = choice.get("finish_reason") or finish
    return {"content": content or None, "tool_calls": [calls[i] for i in sorted(calls)],
            "finish_reason": finish, "usage": usage}


def from_completion(body: Mapping[str, Any]) -> dict[str, Any]:
    """The same summary for a non-streamed chat.completion body (first choice)."""
    choice = body["choices"][0]
    message = choice["message"]
    calls = [{"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
             for c in message.get("tool_calls") or ()]
    return {"content": message.get("content") or None, "tool_calls": calls,
            "finish_reason": choice["finish_reason"], "usage": body.get("usage")}


def same_message(streamed: Mapping[str, Any], whole: Mapping[str, Any]) -> bool:
    """Equal, comparing tool arguments as JSON values (streams keep the upstream's spacing)."""
    def normal(summary: Mapping[str, Any]) -> dict[str, Any]:
        calls = [{**c, "arguments": orjson.loads(c["arguments"] or "{}")} for c in summary["tool_calls"]]
        return {**summary, "tool_calls": calls}

    return normal(streamed) == normal(whole)
