"""Chaining Responses API turns through the gateway's own response store.

A turn with `previous_response_id` is rebuilt here: the stored context of the
previous response (every input item of the earlier turns), its output items
(messages, tool calls, reasoning) and the new input, in order. The whole
conversation is then sent to whichever deployment routing picks, natively or
translated to chat, so a conversation continues on another provider after a
fallback. The upstream never sees `previous_response_id`: the gateway's store,
not any upstream's, is the state.

Keeping a turn happens before the client sees its end (the Response, or the
stream's terminal event), so the next turn can always find it; if the store
fails then, the client gets a 503 (or an `error` event) instead of the end, and
nothing is kept.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from gateway.compiled.policy import KeyEntry
from gateway.errors import ErrorKind, GatewayError
from gateway.response_store import (
    ResponseStore,
    ResponseStoreUnavailable,
    StoredResponse,
    is_response_id,
    new_response_id,
)
from gateway.response_store.rules import DEFAULT_RULES, TeamResponseRules

# Items every path can replay: chat has an equivalent for each (reasoning is dropped there).
_PORTABLE = frozenset({"message", "function_call", "function_call_output", "reasoning"})
_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
_TEXT_PART = {"assistant": "output_text"}  # other roles' string content becomes input_text
# Larger JSON is (de)serialized on a worker thread: a long conversation takes milliseconds the loop must not wait.
_OFF_LOOP_BYTES = 256 * 1024


def unavailable(exc: ResponseStoreUnavailable | None = None) -> GatewayError:
    """The 503 a client gets when the response store cannot be used; nothing was kept."""
    return GatewayError(ErrorKind.UNAVAILABLE, "The response store is unavailable, so nothing was stored and no "
                        "stored response can be read; retry shortly.", code="response_store_unavailable",
                        retry_after=1.0)


def not_found(param: str | None = None) -> GatewayError:
    """The one answer for an unknown, expired, deleted or someone else's response id."""
    return GatewayError(ErrorKind.NOT_FOUND, "No response with this id was found.", param=param,
                        code="previous_response_not_found" if param else "response_not_found")


@dataclass(slots=True)
class Turn:
    """One Responses request's place in its conversation."""

    response_id: str
    team: str
    owner: str
    rules: TeamResponseRules
    keep: bool
    previous_id: str | None = None
    # Input items of this turn, earlier turns first; `stored` of them came from the store, and the
    # first `sent_before` of those were the previous turn's prompt (the rest is its output).
    items: list[dict[str, Any]] = field(default_factory=list)
    stored: int = 0
    sent_before: int = 0
    stored_bytes: int = 0  # the JSON size of what came from the store

    @property
    def stateful(self) -> bool:
        return self.keep or self.previous_id is not None

    def identity(self) -> dict[str, Any]:
        """The fields of the Response object the gateway decides, whichever upstream answered."""
        return {"id": self.response_id, "store": self.keep, "previous_response_id": self.previous_id}

    def cache_key(self) -> str:
        """A prompt-cache key shared by every turn of one conversation: its first item decides it."""
        first = orjson.dumps(_without_id(self.items[0])) if self.items else b""
        return "sb-" + hashlib.sha256(self.team.encode() + b"\0" + first).hexdigest()[:32]


def rules_for(policy_rules: Mapping[str, TeamResponseRules], caller: KeyEntry) -> TeamResponseRules:
    return policy_rules.get(caller.team.name, DEFAULT_RULES)


async def open_turn(store: ResponseStore, rules: TeamResponseRules, caller: KeyEntry,
                    request: Mapping[str, Any]) -> Turn:
    """The turn for `request`: the previous response loaded (404, 503) and the conversation rebuilt."""
    wanted = request.get("store", True)
    if wanted is not None and not isinstance(wanted, bool):
        raise GatewayError(ErrorKind.BAD_REQUEST, "'store' must be a boolean.", param="store", code="invalid_type")
    previous_id = request.get("previous_response_id")
    if previous_id is not None and not isinstance(previous_id, str):
        raise GatewayError(ErrorKind.BAD_REQUEST, "'previous_response_id' must be a string.",
                           param="previous_response_id", code="invalid_type")
    turn = Turn(new_response_id(), caller.team.name, rules.owner(caller.key_id), rules,
                keep=rules.store and wanted is not False, previous_id=previous_id or None)
    if not turn.stateful:
        return turn
    if previous_id and not rules.store:
        raise GatewayError(ErrorKind.BAD_REQUEST, "'previous_response_id' needs stored responses, which this "
                           "team's policy turns off (teams.<name>.responses.store).", param="previous_response_id",
                           code="unsupported_parameter")
    if not store.healthy:  # refused before any upstream call: nothing is billed that cannot be kept
        raise unavailable()
    if previous_id:
        previous = await _load(store, turn, previous_id)
        context = await _loads(previous.context)
        turn.items = [*context, *(await _loads(previous.response)).get("output", ())]
        turn.stored, turn.sent_before = len(turn.items), len(context)
        turn.stored_bytes = len(previous.context) + len(previous.response)
    turn.items.extend(_normalized(request.get("input")))
    _unique_ids(turn.items)
    return turn


async def _load(store: ResponseStore, turn: Turn, response_id: str) -> StoredResponse:
    if not is_response_id(response_id):
        raise not_found("previous_response_id")
    try:
        previous = await store.get(turn.team, turn.owner, response_id)
    except ResponseStoreUnavailable as exc:
        raise unavailable(exc) from exc
    if previous is None:
        raise not_found("previous_response_id")
    return previous


def upstream_input(turn: Turn, native: bool) -> tuple[list[dict[str, Any]], int]:
    """The conversation as input items for the upstream, and how many of them were the previous turn's prompt
    (the prefix an upstream may still have in its prompt cache).

    Item ids are the gateway's bookkeeping and are left out (an upstream that
    keeps nothing could not resolve them), except on reasoning items, which a
    native upstream replays only with their id and `encrypted_content`. Stored
    items with no chat equivalent (built-in tool calls) are replayed only to
    native upstreams.
    """
    out: list[dict[str, Any]] = []
    sent_before = 0
    for index, item in enumerate(turn.items):
        kind = item.get("type", "message")
        if kind == "reasoning":
            if not (native and item.get("encrypted_content")):
                continue  # without its encrypted content no upstream can use it
        elif index < turn.stored and kind not in _PORTABLE and not native:
            continue
        out.append(_without_id(item) if kind in _PORTABLE and kind != "reasoning" else item)
        sent_before += index < turn.sent_before
    return out, sent_before


async def keep(store: ResponseStore, turn: Turn, response: dict[str, Any]) -> None:
    """Put the finished `response` (its identity already applied) in the store; 503 if that fails."""
    context = orjson.dumps(turn.items) if turn.stored_bytes < _OFF_LOOP_BYTES else \
        await asyncio.to_thread(orjson.dumps, turn.items)
    record = StoredResponse(turn.response_id, turn.team, turn.owner, float(response.get("created_at") or time.time()),
                            orjson.dumps(response), context)
    try:
        kept = await store.put(record, turn.rules.ttl_s, turn.rules.max_bytes)
    except ResponseStoreUnavailable as exc:
        raise unavailable(exc) from exc
    if not kept:  # larger than the team's whole share of the store: answered, but honestly not stored
        response["store"] = False


def with_identity(response: dict[str, Any], turn: Turn) -> dict[str, Any]:
    response.update(turn.identity())
    return response


class FinishingStream(Protocol):
    """A Responses event stream whose terminal event waits until the response is kept."""

    final: dict[str, Any] | None

    def terminal(self) -> bytes: ...

    def failure(self, error: GatewayError) -> bytes: ...


async def kept_events(events: AsyncIterator[bytes], stream: FinishingStream,
                      keeper: Callable[[dict[str, Any]], Awaitable[None]] | None) -> AsyncIterator[bytes]:
    """`events`, then the terminal event once `keeper` has kept the final response (an `error` event if not)."""
    try:
        async for batch in events:
            yield batch
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    if stream.final is None:  # failed or cut: the stream already ended with its error
        return
    if keeper is not None:
        try:
            await keeper(stream.final)
        except GatewayError as error:
            yield stream.failure(error)
            return
    yield stream.terminal()


async def _loads(data: bytes) -> Any:
    return orjson.loads(data) if len(data) < _OFF_LOOP_BYTES else await asyncio.to_thread(orjson.loads, data)


def _normalized(source: Any) -> list[dict[str, Any]]:
    """The request's `input` as a list of items, each message with its content as a list of parts."""
    if isinstance(source, str):
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": source}]}]
    if source is not None and not isinstance(source, list):
        raise GatewayError(ErrorKind.BAD_REQUEST, "'input' must be a string or a list of items.", param="input",
                           code="invalid_type")
    items: list[dict[str, Any]] = []
    for item in source or ():
        if not isinstance(item, dict):
            raise GatewayError(ErrorKind.BAD_REQUEST, "Each input item must be an object.", param="input")
        item = dict(item)
        if item.get("type", "message") == "message":
            item["type"] = "message"
            if isinstance(item.get("content"), str):
                part = _TEXT_PART.get(item.get("role"), "input_text")
                item["content"] = [{"type": part, "text": item["content"]}]
        items.append(item)
    return items


def _unique_ids(items: list[dict[str, Any]]) -> None:
    """Give every item an id unique in its conversation (input_items pages by id)."""
    seen: set[str] = set()
    for item in items:
        current = item.get("id")
        if not isinstance(current, str) or current in seen:
            prefix = _ID_PREFIXES.get(item.get("type", "message"), "item")
            current = item["id"] = f"{prefix}_{secrets.token_hex(16)}"
        seen.add(current)


def _without_id(item: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != "id"}
