"""`GET` and `DELETE /v1/responses/{id}` and `GET /v1/responses/{id}/input_items`, from the response store.

Each answers only the owner of the response (its team, or its key, by policy);
for anyone else, and for an id that is unknown, expired, deleted or not even
shaped like one, the answer is the same 404.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import orjson

from gateway.auth import authenticate
from gateway.errors import ErrorKind, GatewayError, render
from gateway.exchange import Reply, Services
from gateway.front_doors.conversation import not_found, rules_for, unavailable
from gateway.http.asgi import request_headers, send_json, send_reply
from gateway.response_store import ResponseStore, ResponseStoreUnavailable, StoredResponse, is_response_id

_MAX_PAGE = 100
_DEFAULT_PAGE = 20


class ResponseObjectRoute:
    """GET /v1/responses/{id} (the stored Response) and DELETE /v1/responses/{id}."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            store, team, owner, response_id = _locate(scope)
            if scope["method"] == "DELETE":
                if not is_response_id(response_id) or not await _guarded(store.delete(team, owner, response_id)):
                    raise not_found()
                await send_json(send, 200, {"id": response_id, "object": "response", "deleted": True})
                return
            record = await _found(store, team, owner, response_id)
        except GatewayError as error:
            await send_reply(send, Reply(*render(error)))
            return
        await send_reply(send, Reply(200, record.response, {}))


class InputItemsRoute:
    """GET /v1/responses/{id}/input_items: the items the model was given, in pages (`after`, `limit`, `order`)."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            store, team, owner, response_id = _locate(scope)
            after, limit, order = _page_params(scope)
            record = await _found(store, team, owner, response_id)
            items: list[dict[str, Any]] = orjson.loads(record.context)
            if order == "desc":
                items.reverse()
            start = 0
            if after is not None:
                ids = [item.get("id") for item in items]
                if after not in ids:
                    raise GatewayError(ErrorKind.BAD_REQUEST, "`after` is not the id of an item of this response.",
                                       param="after", code="invalid_value")
                start = ids.index(after) + 1
        except GatewayError as error:
            await send_reply(send, Reply(*render(error)))
            return
        page = items[start:start + limit]
        await send_json(send, 200, {"object": "list", "data": page,
                                    "first_id": page[0].get("id") if page else None,
                                    "last_id": page[-1].get("id") if page else None,
                                    "has_more": start + limit < len(items)})


def _locate(scope: dict[str, Any]) -> tuple[ResponseStore, str, str, str]:
    """The store, and the caller's team and owner name for the response id in the path (401 first)."""
    services: Services = scope["app"].state.services
    policy = services.policy()
    caller = authenticate(policy, request_headers(scope))
    rules = rules_for(policy.responses, caller)
    return (scope["app"].state.response_store, caller.team.name, rules.owner(caller.key_id),
            scope["path_params"]["response_id"])


async def _found(store: ResponseStore, team: str, owner: str, response_id: str) -> StoredResponse:
    record = await _guarded(store.get(team, owner, response_id)) if is_response_id(response_id) else None
    if record is None:
        raise not_found()
    return record


async def _guarded(operation: Any) -> Any:
    try:
        return await operation
    except ResponseStoreUnavailable as exc:
        raise unavailable(exc) from exc


def _page_params(scope: dict[str, Any]) -> tuple[str | None, int, str]:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    after = query.get("after", [None])[-1]
    order = query.get("order", ["desc"])[-1]
    if order not in ("asc", "desc"):
        raise GatewayError(ErrorKind.BAD_REQUEST, "`order` must be asc or desc.", param="order", code="invalid_value")
    raw_limit = query.get("limit", [str(_DEFAULT_PAGE)])[-1]
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= _MAX_PAGE:
        raise GatewayError(ErrorKind.BAD_REQUEST, f"`limit` must be an integer from 1 to {_MAX_PAGE}.",
                           param="limit", code="invalid_value")
    return after, int(raw_limit), order
