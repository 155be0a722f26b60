"""Resources of the operator's upstream account that a Responses request may name by id.

Every team shares the operator's account at OpenAI. Stored prompts
(`prompt.id`), vector stores (`file_search` tools), files (`file_id` in input
parts, code_interpreter `file_ids`) and code_interpreter containers live on that
account, so a team naming one by id could read what another team or the
operator put there. Each is refused unless the team's policy allow-lists that
id (teams.<name>.responses.allowed_*). The refusal is the same whether the id
exists or not: the gateway never asks the upstream.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from gateway.errors import ErrorKind, GatewayError
from gateway.response_store.rules import TeamResponseRules


def refuse_unlisted(request: Mapping[str, Any], rules: TeamResponseRules) -> None:
    """403 for the first account resource the request names that the team may not use."""
    for kind, resource, param in _references(request):
        allowed = {"prompt": rules.prompts, "vector store": rules.vector_stores, "file": rules.files,
                   "container": rules.containers}.get(kind, frozenset())  # stored items: never
        if not isinstance(resource, str) or resource not in allowed:
            raise GatewayError(ErrorKind.PERMISSION, f"This key may not use the {kind} named in `{param}`: "
                               f"account resources need an allow-list entry in the gateway policy.",
                               param=param, code="resource_not_allowed")


def _references(request: Mapping[str, Any]) -> Iterator[tuple[str, Any, str]]:
    prompt = request.get("prompt")
    if isinstance(prompt, Mapping) and "id" in prompt:
        yield "prompt", prompt["id"], "prompt.id"
    elif prompt is not None:
        yield "prompt", prompt, "prompt"
    tools = request.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):  # another type: refused where it is read
        if not isinstance(tool, Mapping):
            continue
        for store_id in tool.get("vector_store_ids") or ():
            yield "vector store", store_id, f"tools[{i}].vector_store_ids"
        container = tool.get("container")
        if isinstance(container, Mapping):
            for file_id in container.get("file_ids") or ():
                yield "file", file_id, f"tools[{i}].container.file_ids"
        elif container is not None:
            yield "container", container, f"tools[{i}].container"
    source = request.get("input")
    for i, item in enumerate(source if isinstance(source, list) else ()):
        if not isinstance(item, Mapping):
            continue
        if item.get("type") == "item_reference":
            yield "stored item", item.get("id"), f"input[{i}].id"
        if "file_id" in item:
            yield "file", item["file_id"], f"input[{i}].file_id"
        content = item.get("content")
        for part in content if isinstance(content, list) else ():
            if isinstance(part, Mapping) and part.get("file_id") is not None:
                yield "file", part["file_id"], f"input[{i}].content.file_id"
