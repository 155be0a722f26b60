"""The gate: what happens to an inference request between its headers and its body.

The caller is authenticated from the headers alone, and its key's and team's
concurrency limits are taken, before a single byte of the body is read: an
unauthenticated or over-limit request never gets its body buffered, and its
refusal closes the connection (`connection: close`) so the unread body is not
waited for either. The pipeline starts from the gate's policy snapshot and
caller (`AUTHENTICATED` in the scope) instead of authenticating again.

Once the body is in, and before the route sees its last chunk, a body long
enough to hold a long prompt has its long strings counted in a worker thread
(`TokenCounter.count_large_texts`) for the targets the request will use, so
the pipeline's token counts (admission, the context-window check, usage
estimates) find the figures remembered instead of tokenizing megabytes on the
event loop, where they would stall every other tenant's requests.

Slow or endless request heads and bodies are the server protocol's business
(gateway/http/connections.py); this module needs a decoded head.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from gateway.auth import authenticate
from gateway.errors import ErrorKind, GatewayError, render
from gateway.exchange import Exchange, Reply
from gateway.http.asgi import AUTHENTICATED, request_headers, send_reply
from gateway.tokens.counter import LARGE_TEXT_CHARS, TokenCounter

if TYPE_CHECKING:
    from gateway.compiled.policy import KeyEntry, Policy
    from gateway.telemetry.metrics import Metrics
    from gateway.telemetry.traces import Telemetry

# Renders a gateway error in the endpoint's own error shape (e.g. Anthropic's under /v1/messages).
ErrorShape = Callable[[GatewayError], Reply]
Route = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
log = logging.getLogger("switchboard.server")
# The operation a refused request's trace is named after, by path (as the pipeline would have named it).
_OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings",
               "/v1/responses": "responses", "/v1/messages": "chat"}


def _openai_shape(error: GatewayError) -> Reply:
    return Reply(*render(error))


class ConcurrencySlots:
    """In-flight requests per key and per team, against `max_concurrent` in the policy (per process).

    Counters exist only while a request holds them, so the table is bounded by
    the requests in flight, never by the keys a client tries.
    """

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], int] = {}

    def take(self, caller: KeyEntry) -> tuple[tuple[str, str], ...]:
        """Hold a slot of the key and of its team, or raise 429 holding neither."""
        wanted = []
        if caller.max_concurrent is not None:
            wanted.append((("key", f"{caller.team.name}/{caller.key_id}"), caller.max_concurrent, "key"))
        if caller.team.max_concurrent is not None:
            wanted.append((("team", caller.team.name), caller.team.max_concurrent, "team"))
        for slot, limit, scope in wanted:
            if self._held.get(slot, 0) >= limit:
                raise GatewayError(ErrorKind.RATE_LIMITED, f"Too many concurrent requests for this {scope} "
                                   f"(limit {limit}); retry when one finishes.",
                                   code="concurrency_limit_exceeded", retry_after=1)
        for slot, _, _ in wanted:
            self._held[slot] = self._held.get(slot, 0) + 1
        return tuple(slot for slot, _, _ in wanted)

    def give_back(self, slots: tuple[tuple[str, str], ...]) -> None:
        for slot in slots:
            left = self._held[slot] - 1
            if left:
                self._held[slot] = left
            else:
                del self._held[slot]

    def held(self, slot: tuple[str, str]) -> int:
        return self._held.get(slot, 0)


def _may_hold_long_prompts(headers: Mapping[str, str]) -> bool:
    """Whether the body may be long enough to hold a long prompt (unknown length: it may)."""
    declared = headers.get("content-length")
    return declared is None or not declared.isdigit() or int(declared) >= LARGE_TEXT_CHARS


class Gate:
    """Admits an inference request to its route once its headers show a valid key with a free slot."""

    def __init__(self, policy: Callable[[], Policy], telemetry: Telemetry, counter: TokenCounter,
                 metrics: Metrics | None = None, error_shapes: Mapping[str, ErrorShape] | None = None) -> None:
        self._policy = policy
        self._counter = counter
        self._telemetry = telemetry
        self._metrics = metrics
        self._shapes = dict(error_shapes or {})
        self.slots = ConcurrencySlots()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any, route: Route) -> None:
        headers = request_headers(scope)
        policy = self._policy()
        try:
            caller = authenticate(policy, headers)
        except GatewayError as error:
            if self._metrics is not None:
                self._metrics.unauthenticated(error.code or "invalid_api_key")
            # The refusal is traced like any failed request (an error span, no usage record).
            exchange = Exchange(scope["switchboard.request_id"], scope["switchboard.started"])
            self._telemetry.start(_OPERATIONS.get(scope["path"], "chat"), headers, exchange).failed(
                error, settled=False)
            await self._refuse(scope, send, error)
            return
        slots: tuple[tuple[str, str], ...] = ()
        if policy.steps.concurrency_slots:  # else no key or team of the policy has a slot to take
            try:
                slots = self.slots.take(caller)
            except GatewayError as error:
                await self._refuse(scope, send, error)
                return
        scope[AUTHENTICATED] = (policy, caller)  # the pipeline starts from this policy snapshot and caller
        long_body = _may_hold_long_prompts(headers)
        receive_body = self._counting_long_prompts(receive, caller) if long_body else receive
        try:
            await route(scope, receive_body, send)
        finally:
            if slots:
                self.slots.give_back(slots)

    def _counting_long_prompts(self, receive: Any, caller: KeyEntry) -> Callable[[], Awaitable[dict[str, Any]]]:
        """`receive`, which counts a long body's long strings in a thread before handing over its last chunk."""
        chunks: list[bytes] = []

        async def receive_body() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body = b"".join(chunks)
                    chunks.clear()
                    if len(body) >= LARGE_TEXT_CHARS:
                        await self._count_off_loop(body, caller)
            return message

        return receive_body

    async def _count_off_loop(self, body: bytes, caller: KeyEntry) -> None:
        policy = self._policy()

        def count() -> None:
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError:
                return  # the pipeline answers it with a 400
            name = payload.get("model") if isinstance(payload, dict) else None
            model = policy.models.get(name) if isinstance(name, str) and caller.team.may_use(name) else None
            if model is not None:
                self._counter.count_large_texts(payload, [
                    (t.upstream_model, t.provider.adapter.capabilities.tokenizer) for t in model.targets])

        try:
            await asyncio.to_thread(count)
        except Exception:  # an optimisation: the pipeline counts on the loop if this failed
            log.exception("counting a long prompt off the event loop failed")

    async def _refuse(self, scope: dict[str, Any], send: Any, error: GatewayError) -> None:
        reply = self._shapes.get(scope["path"], _openai_shape)(error)
        # The body was never read: close the connection rather than wait for (and discard) it.
        await send_reply(send, Reply(reply.status, reply.body, {**reply.headers, "connection": "close"}))
