"""The response cache the pipeline consults: lookup before routing, store after a good answer.

    ticket = await cache.lookup(...)        # None: caching is off for this request
    ticket.hit                              # answer with ticket.reply(...), no upstream call
    remember(ticket, parsed)                # a whole response arrived: store it, release followers
    recording_stream(ticket).observe(chunk) # a stream is relayed: fan it out chunk by chunk
    ticket.settled(completed)               # the request settled: store a whole stream, drop anything else

A request that misses leads a flight; identical requests that arrive while it
runs follow it instead of calling the upstream. A leader's flight is always
ended: by its answer, or by a done-callback on the task serving it, so a
cancelled or crashed leader never strands its followers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from gateway.accounting.pricing import charge
from gateway.cache.backends import Backend, RedisBackend, open_backend
from gateway.cache.entry import Entry, from_response, from_stream
from gateway.cache.flight import COMPLETED, RUNNING, Flight
from gateway.cache.keys import CACHEABLE_FINISH, cacheable, exact_key, scope_id, semantic_parts
from gateway.cache.plan import CachePlan, CacheRule, StoreSpec
from gateway.cache.semantic import Embedded, embed
from gateway.cache.shared_index import SharedSemanticIndex
from gateway.errors import ErrorKind, GatewayError, render_stream_error
from gateway.exchange import Reply, StreamReply
from gateway.telemetry.decisions import cache_event
from providers.base import Endpoint, ParsedResponse, StreamChunk, Usage
from providers.sse import DONE_EVENT, encode_event

if TYPE_CHECKING:
    from gateway.accounting.pricing import PriceBook
    from gateway.accounting.settlement import Settlement
    from gateway.cache.vector_index import SemanticIndex
    from gateway.compiled.policy import KeyEntry, Model, Policy, Target
    from gateway.exchange import Exchange, InferenceRequest, Services
    from gateway.routing.resilience import Attempt

CACHE_HEADER = "x-switchboard-cache"
SIMILARITY_HEADER = "x-switchboard-cache-similarity"
_DIRECTIVES = frozenset({"bypass", "no-store", "refresh"})
_SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
                "x-accel-buffering": "no"}

log = logging.getLogger("switchboard.cache")


class ResponseCache:
    """The app's caches: stores, semantic indexes and flights, kept across policy reloads.

    `clock` is wall-clock seconds; tests inject one to expire entries.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._plan: CachePlan | None = None
        self._stores: dict[StoreSpec, Backend] = {}
        self._indexes: dict[tuple[StoreSpec, int], SemanticIndex | SharedSemanticIndex] = {}
        self._flights: dict[bytes, Flight] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def lookup(self, services: Services, policy: Policy, caller: KeyEntry, model: Model,
                     request: InferenceRequest, headers: Mapping[str, str], exchange: Exchange,
                     attempt: Attempt) -> Ticket | None:
        """This request's ticket: a hit to answer with, or a miss to record; None when caching does not apply."""
        team_rules = policy.cache.rules.get(caller.team.name)
        rule = team_rules.get(model.name) if team_rules is not None else None
        if rule is None:
            return None
        directive = headers.get(CACHE_HEADER)
        if directive is not None:
            directive = directive.strip().lower()
            if directive not in _DIRECTIVES:
                raise GatewayError(ErrorKind.BAD_REQUEST, f"The {CACHE_HEADER} header must be one of bypass, "
                                   "no-store or refresh.", code="invalid_cache_directive")
        endpoint, body = request.endpoint, request.body
        key = None
        if directive != "no-store" and cacheable(rule, endpoint, body):
            scope = scope_id(rule, caller.team.name, caller.key_id)
            key = exact_key(scope, endpoint, body, model.name)
        if key is None:
            exchange.response_headers[CACHE_HEADER] = "bypass"
            if exchange.trace.recording:
                exchange.trace.decision("switchboard.cache", cache_event(None, reason=directive or "not cacheable"))
            return None
        if policy.cache is not self._plan:
            self._adopt(policy.cache)
        ticket = Ticket(self, rule, self._store(rule.store), key, request, model.name, policy.prices,
                        model.targets[0], (caller.team.name, caller.key_id), team_rules)
        if directive is not None:  # bypass or refresh: don't read, do write
            ticket.record(exchange, "bypass", replace=directive == "refresh", shared=False)
        else:
            await self._read(ticket, services, policy, scope, exchange, attempt)
        if exchange.trace.recording:
            exchange.trace.decision("switchboard.cache", cache_event(
                ticket, directive=directive, similarity=exchange.response_headers.get(SIMILARITY_HEADER)))
        return ticket

    async def _read(self, ticket: Ticket, services: Services, policy: Policy, scope: bytes, exchange: Exchange,
                    attempt: Attempt) -> Ticket:
        rule, key, request = ticket.rule, ticket.key, ticket.request
        for _ in range(2):
            entry = await ticket.store.get(key)
            if entry is not None and self.clock() - entry.created < rule.ttl_s:
                return ticket.answer(entry, exchange)
            flight = self._flights.get(key) if rule.coalesce else None
            if flight is None:
                break
            await (flight.started() if request.stream else flight.finished())
            if flight.state == COMPLETED and flight.entry is not None:
                return ticket.answer(flight.entry, exchange)
            if flight.state == RUNNING:
                return ticket.follow(flight, exchange)
            # The leader failed before answering: call the upstream ourselves (leading a new flight).
        ticket.record(exchange, "miss", replace=True, shared=rule.coalesce)
        if rule.semantic is not None:
            await self._read_semantic(ticket, services, policy, scope, exchange, attempt)
        return ticket

    async def _read_semantic(self, ticket: Ticket, services: Services, policy: Policy, scope: bytes,
                             exchange: Exchange, attempt: Attempt) -> None:
        rule = ticket.rule
        assert rule.semantic is not None
        parts = semantic_parts(scope, ticket.request.endpoint, ticket.request.body, ticket.model_name)
        if parts is None:
            return
        partition, text = parts
        embedded = await embed(services, policy, rule.semantic.embedding_model, text, exchange, attempt)
        if embedded.usage is not None:  # billed to this request, whatever the lookup finds
            ticket.overhead = embedded
        vector = embedded.vector
        if vector is None:
            return
        index = self._index(rule)
        ticket.vector, ticket.partition, ticket.index = vector, partition, index
        match = await index.find(partition, vector, rule.semantic.threshold, self.clock())
        if match is None:
            return
        entry = await ticket.store.get(match[0])
        if entry is None or self.clock() - entry.created >= rule.ttl_s:
            index.discard(match[0])
            return
        # Followers of this request's flight get the same answer; nothing new is stored.
        ticket.vector = None
        ticket.finish(entry, store=False)
        ticket.answer(entry, exchange)
        exchange.response_headers[SIMILARITY_HEADER] = f"{match[1]:.4f}"

    def _store(self, spec: StoreSpec) -> Backend:
        store = self._stores.get(spec)
        if store is None:
            store = self._stores[spec] = open_backend(spec, self.clock)
        return store

    def _index(self, rule: CacheRule) -> SemanticIndex | SharedSemanticIndex:
        """In Redis when the entries are (replicas share it), else in this process."""
        assert rule.semantic is not None
        store = self._store(rule.store)
        shared = isinstance(store, RedisBackend)
        slot = (rule.store, rule.semantic.candidates if shared else rule.semantic.max_entries)
        index = self._indexes.get(slot)
        if index is None:
            if isinstance(store, RedisBackend):
                index = SharedSemanticIndex(store.client, rule.store.key_prefix, rule.semantic.candidates,
                                            rule.store.timeout_s, self.clock)
            else:
                # Imported here, the one place that needs it: numpy comes with it (gateway/cache/vector_index.py).
                from gateway.cache.vector_index import SemanticIndex

                index = SemanticIndex(rule.semantic.max_entries)
            self._indexes[slot] = index
        return index

    def _adopt(self, plan: CachePlan) -> None:
        """A new policy: drop the stores and indexes no rule uses any more."""
        self._plan = plan
        live = plan.stores
        for spec in [s for s in self._stores if s not in live]:
            task = asyncio.get_running_loop().create_task(self._stores.pop(spec).close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        for slot in [s for s in self._indexes if s[0] not in live]:
            del self._indexes[slot]

    def followers(self) -> int:
        """Requests waiting on another's upstream call right now (for tests and diagnostics)."""
        return sum(flight.waiting for flight in list(self._flights.values()))

    async def close(self) -> None:
        """Release every store (Redis connections); pending Redis writes get a moment to land."""
        indexes, self._indexes = list(self._indexes.values()), {}
        for index in indexes:
            await index.close()
        stores, self._stores = list(self._stores.values()), {}
        for store in stores:
            await store.close()
        if self._closing:
            await asyncio.wait(self._closing, timeout=1.0)


class Ticket:
    """One request's dealings with the cache."""

    __slots__ = ("cache", "entry", "finishes", "flight", "hit", "index", "key", "model_name", "overhead", "partition",
                 "prices", "recording", "replace", "request", "rule", "scope", "status", "store", "store_key",
                 "target", "team_rules", "usage", "usage_data", "vector")

    def __init__(self, cache: ResponseCache, rule: CacheRule, store: Backend, key: bytes, request: InferenceRequest,
                 model_name: str, prices: PriceBook, target: Target, scope: tuple[str, str],
                 team_rules: Mapping[str, CacheRule]) -> None:
        self.cache, self.rule, self.store, self.key, self.request = cache, rule, store, key, request
        # Where the answer is stored: the requested model's key, unless another model (a fallback) served it;
        # None when that model caches nothing for this team.
        self.store_key: bytes | None = key
        self.scope, self.team_rules = scope, team_rules
        self.model_name = model_name
        self.prices, self.target = prices, target
        self.status = "miss"
        self.hit = False
        self.entry: Entry | None = None  # the answer a hit replays
        self.flight: Flight | None = None  # led (recording) or followed
        self.replace = True
        self.vector: list[float] | None = None
        self.partition = b""
        self.index: SemanticIndex | SharedSemanticIndex | None = None
        # A stream this request leads, as the relay observes it (`observe`), stored at settlement if whole.
        self.recording = False
        self.usage: Usage | None = None
        self.usage_data: bytes | None = None
        self.finishes: list[str] = []
        # The semantic lookup's embedding call when an upstream billed it: this request pays for it.
        self.overhead: Embedded | None = None

    def counted_hit_usage(self) -> Usage | None:
        """The usage of a hit that counts against token limits (`hits_count_tokens`), else None."""
        if not self.hit or not self.rule.hits_count_tokens:
            return None
        return self.entry.usage if self.entry is not None else None

    # -- outcomes of the lookup --

    def answer(self, entry: Entry, exchange: Exchange) -> Ticket:
        self.hit, self.status, self.entry = True, "hit", entry
        headers = exchange.response_headers
        headers[CACHE_HEADER] = "hit"
        headers["age"] = str(max(0, int(self.cache.clock() - entry.created)))
        return self

    def follow(self, flight: Flight, exchange: Exchange) -> Ticket:
        self.hit, self.status, self.flight = True, "hit", flight
        exchange.response_headers[CACHE_HEADER] = "hit"
        exchange.response_headers["age"] = "0"
        return self

    def record(self, exchange: Exchange, status: str, *, replace: bool, shared: bool) -> Ticket:
        """Go to the upstream and record the answer; `shared` lets identical requests follow this one."""
        self.status, self.replace, self.flight = status, replace, Flight()
        exchange.response_headers[CACHE_HEADER] = status
        if shared and self.key not in self.cache._flights:
            self.cache._flights[self.key] = self.flight
        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(self._served)
        return self

    # -- replies for hits --

    def reply(self, headers: dict[str, str], settlement: Settlement) -> Reply | StreamReply:
        """The answer to a hit; a follower's stream that fails is marked on `settlement`."""
        entry = self.entry
        if not self.request.stream:
            assert entry is not None
            return Reply(200, entry.body, headers)
        headers.update(_SSE_HEADERS)
        if entry is not None:
            return StreamReply(headers, _once(entry.stream_bytes(self.request.client_wants_usage)))
        return StreamReply(headers, self._follow(settlement))

    async def _follow(self, settlement: Settlement) -> AsyncIterator[bytes]:
        flight = self.flight
        assert flight is not None
        async for events in flight.replay():
            yield events
        if flight.state == COMPLETED:
            self.entry = flight.entry
            yield (flight.tail if self.request.client_wants_usage else b"") + DONE_EVENT
        else:
            error = GatewayError(ErrorKind.UPSTREAM_ERROR, "The upstream stream this request was sharing "
                                 "ended before completing.", code="upstream_stream_failed")
            settlement.error, settlement.outcome = error, "upstream_error"
            yield encode_event(render_stream_error(error))

    # -- recording a miss --

    def remember(self, parsed: ParsedResponse) -> None:
        endpoint = self.request.endpoint
        good = endpoint is Endpoint.EMBEDDINGS or _finished_well(parsed.finish_reasons)
        try:
            entry = from_response(endpoint, parsed.body, parsed.usage, self.cache.clock())
        except Exception:  # an odd body is the upstream's business, never a failed request
            log.warning("response cache: could not record a response", exc_info=True)
            self.abandon()
            return
        self.finish(entry, store=good)

    def observe(self, chunk: StreamChunk) -> None:
        """One canonical chunk of the stream this request leads: published to followers, kept for the entry."""
        if chunk.usage is not None:
            self.usage = chunk.usage
            if chunk.usage_only:
                self.usage_data = chunk.data
        if not chunk.usage_only:
            self.flight.publish(chunk.data)  # type: ignore[union-attr]
        if chunk.finish_reason is not None:
            self.finishes.append(chunk.finish_reason)

    def settled(self, completed: bool) -> None:
        """The request's settlement: a recorded stream that completed is stored; anything unfinished is dropped.

        A stream is stored only when its terminal event was seen, never because a loop over it ended.
        """
        if self.hit or self.flight is None or self.flight.state != RUNNING:
            return
        if not (completed and self.recording):
            self.abandon()  # truncated, failed or abandoned by the client: never stored
            return
        try:
            entry = from_stream(self.request.endpoint, self.flight.chunks, self.usage, self.usage_data,
                                self.cache.clock())
        except Exception:
            log.warning("response cache: could not assemble a stream", exc_info=True)
            self.abandon()
        else:
            self.finish(entry, store=_finished_well(self.finishes))

    def served_by(self, model_name: str, target: Target) -> None:
        """The deployment routing chose. A fallback model's answer is stored as that model's, never as the
        requested one's: once the requested model recovers, its askers must get its own answers."""
        self.target = target
        if model_name == self.model_name:
            return
        self.vector = None  # the semantic index holds the requested model's questions only
        rule = self.team_rules.get(model_name)
        if rule is None or not cacheable(rule, self.request.endpoint, self.request.body):
            self.store_key = None
            return
        scope = scope_id(rule, *self.scope)
        self.store_key = exact_key(scope, self.request.endpoint, self.request.body, model_name)
        self.rule, self.store = rule, self.cache._store(rule.store)

    def finish(self, entry: Entry, *, store: bool) -> None:
        """The answer is known: release the followers, and store it if it may be."""
        flight = self.flight
        assert flight is not None
        entry = dataclasses.replace(entry, served_by=(self.target.provider.name, self.target.upstream_model))
        flight.complete(entry)
        if not store or self.store_key is None:
            self._release()
            return
        ttl = self.rule.ttl_s
        if self.vector is not None and self.index is not None:
            self.index.add(self.partition, self.store_key, self.vector, entry.created + ttl)
        # The flight stays findable until the entry can be read back from the store.
        self.store.put(self.store_key, entry, ttl, self.replace, self._release)

    def abandon(self) -> None:
        if self.flight is not None and self.flight.state == RUNNING:
            self.flight.fail()
        self._release()

    def _release(self) -> None:
        flights = self.cache._flights
        if flights.get(self.key) is self.flight:
            del flights[self.key]

    def _served(self, task: asyncio.Task[Any]) -> None:
        if self.flight is not None and self.flight.state == RUNNING:
            self.abandon()

    # -- accounting --

    def usage_fields(self) -> dict[str, Any]:
        """The cache's part of the usage record: what was served from it, what that saved, what the lookup cost."""
        fields = self._served_fields()
        overhead = self.overhead
        if overhead is not None and overhead.usage is not None:
            fields["cache_overhead_tokens"] = overhead.usage.prompt_tokens
            fields["cache_overhead_cost_usd"] = overhead.cost_usd
        return fields

    def _served_fields(self) -> dict[str, Any]:
        if not self.hit:
            return {"cache": self.status}
        entry = self.entry
        usage = entry.usage if entry is not None else None
        if usage is None:
            return {"cache": "hit"}
        if entry is not None and entry.served_by is not None:  # priced at the deployment that produced it
            price = self.prices.price_for(*entry.served_by)
            saved = price.cost(usage) if price is not None else None
        else:
            saved, _ = charge(self.prices, self.target, usage)
        return {"cache": "hit", "cache_tokens": usage.total_tokens, "cost_saved_usd": saved}


def _finished_well(reasons: tuple[str, ...] | list[str]) -> bool:
    return bool(reasons) and all(reason in CACHEABLE_FINISH for reason in reasons)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data




def remember(ticket: Ticket | None, parsed: ParsedResponse) -> None:
    """Pipeline hook: a whole response was received for this request."""
    if ticket is not None and ticket.flight is not None and not ticket.hit:
        ticket.remember(parsed)


def recording_stream(ticket: Ticket | None) -> Ticket | None:
    """Pipeline hook: the ticket to `observe` each relayed chunk with, when this request leads a cacheable stream."""
    if ticket is None or ticket.flight is None or ticket.hit:
        return None
    ticket.recording = True
    return ticket
