"""A fake vLLM replica with a simulated prefix cache: a real aiohttp server on loopback.

Each chat request's prompt is checked against the replica's cache of
conversation prefixes it has served: a request extending a cached prefix is a
hit and answers after ``hit_ms``, a miss after ``miss_ms`` (the prefill it
would have to redo). Replies report ``usage.prompt_tokens_details.cached_tokens``
and ``/metrics`` reports vLLM's gauges and prefix-cache counters, so the
gateway's scraper and the load test can read them::

    with FakeVLLMReplica("r1") as replica:
        ...                              # point a vllm provider at replica.base_url
        replica.hold()                   # later requests wait until release()
        assert replica.hits / replica.queries > 0.9

With ``kv_events=True`` it also publishes KV-cache events as vLLM 0.11 does
(``--kv-events-config`` with the zmq publisher): a PUB socket sending
``[topic, 8-byte seq, msgpack KVEventBatch]``, encoded by msgspec from the same
struct definitions as ``vllm/distributed/kv_events.py``, and a ROUTER replay
socket. Prompts are tokenized with tiktoken and cut into ``block_size`` token
blocks, hashed by sha256 of the parent hash and the tokens (one of vLLM's
``prefix_caching_hash_algo`` choices); blocks are evicted LRU past
``kv_blocks``. It renders chat prompts as gateway/kv_events.render_prompt does:
it plays an engine whose chat template the gateway reproduces.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import threading
import time
from types import TracebackType
from typing import Any, Self

import msgspec
import orjson
import tiktoken
import zmq
from aiohttp import web

from gateway.routing.kv_events import render_prompt


# vLLM 0.11's event types (vllm/distributed/kv_events.py): array-like, tagged msgspec structs.
class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base class of the KV-cache events."""


class BlockStored(KVCacheEvent):
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[bytes]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]  # type: ignore[assignment]


class KVEventPublisher:
    """vLLM's ZMQ publisher: PUB [topic, seq, payload]; a ROUTER answering replays of buffered batches."""

    def __init__(self, block_size: int, kv_blocks: int, encoding: str) -> None:
        self.block_size, self.kv_blocks = block_size, kv_blocks
        self._encoding = tiktoken.get_encoding(encoding)
        self._context = zmq.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind("tcp://127.0.0.1:*")
        self._replay = self._context.socket(zmq.ROUTER)
        self._replay.setsockopt(zmq.LINGER, 0)
        self._replay.bind("tcp://127.0.0.1:*")
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self._lock = threading.Lock()
        self._blocks: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._buffer: list[tuple[int, bytes]] = []
        self._seq = 0
        self.dropping = 0  # batches still to leave out of the PUB stream (they stay replayable)
        self.paused = False  # a dead publisher: nothing is sent nor buffered
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_replay, name="fake-vllm-replay", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pub.close(0)
        self._context.term()

    def store(self, messages: list[Any]) -> None:
        """The engine computed this prompt: its full blocks are cached, new ones announced."""
        tokens = self._encoding.encode_ordinary(render_prompt({"messages": messages}))
        size = self.block_size
        digests, parent = [], b""
        for start in range(0, len(tokens) - size + 1, size):
            parent = hashlib.sha256(parent + orjson.dumps(tokens[start:start + size])).digest()
            digests.append(parent)
        removed: list[bytes] = []
        with self._lock:
            first = next((i for i, d in enumerate(digests) if d not in self._blocks), len(digests))
            for digest in digests:
                self._blocks[digest] = None
                self._blocks.move_to_end(digest)
            while len(self._blocks) > self.kv_blocks:
                removed.append(self._blocks.popitem(last=False)[0])
        events: list[Any] = []
        if first < len(digests):
            events.append(BlockStored(digests[first:], digests[first - 1] if first else None,
                                      tokens[first * size:len(digests) * size], size, None, "GPU"))
        if removed:
            events.append(BlockRemoved(removed, "GPU"))
        if events:
            self.publish(events)

    @property
    def held(self) -> int:
        """Blocks in the engine's cache now."""
        with self._lock:
            return len(self._blocks)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
        self.publish([AllBlocksCleared()])

    def publish(self, events: list[Any]) -> None:
        if self.paused:
            return
        payload = msgspec.msgpack.encode(KVEventBatch(ts=time.time(), events=events))
        with self._lock:
            seq, self._seq = self._seq, self._seq + 1
            self._buffer.append((seq, payload))
            dropped = self.dropping > 0
            self.dropping -= dropped
        if not dropped:
            self._pub.send_multipart((b"", seq.to_bytes(8, "big"), payload))

    def _serve_replay(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._replay.poll(20):
                    continue
                client, _, start = self._replay.recv_multipart()
                first = int.from_bytes(start, "big")
                with self._lock:
                    batches = [(seq, payload) for seq, payload in self._buffer if seq >= first]
                for seq, payload in batches:
                    self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
                self._replay.send_multipart((client, b"", (-1).to_bytes(8, "big", signed=True), b""))
        finally:
            self._replay.close(0)


def _digest(messages: list[Any]) -> bytes:
    return hashlib.blake2b(orjson.dumps(messages, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


class FakeVLLMReplica:
    """One replica; thread-safe counters, sync lifecycle for tests and load tests."""

    def __init__(self, name: str, *, hit_ms: float = 2.0, miss_ms: float = 20.0, cache_size: int = 10_000,
                 stream_chunks: int = 4, kv_events: bool = False, block_size: int = 16, kv_blocks: int = 10_000,
                 encoding: str = "o200k_base") -> None:
        self.name = name
        self.hit_ms, self.miss_ms = hit_ms, miss_ms
        self.cache_size = cache_size
        self.stream_chunks = stream_chunks
        self._cache: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.requests = 0
        self.queries = 0  # requests that continue a conversation (more than one user turn)
        self.hits = 0
        self.running = 0
        self.reported_waiting = 0  # extra queue reported on /metrics (load from "other gateways")
        self.reported_kv_usage: float | None = None  # KV-cache usage on /metrics instead of the cache's fill
        self.events = KVEventPublisher(block_size, kv_blocks, encoding) if kv_events else None
        self._held = False
        self._release: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle --

    def start(self) -> Self:
        loop = asyncio.new_event_loop()
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:
                ready.set_exception(exc)
                return
            ready.set_result(None)
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name=f"fake-vllm-{self.name}", daemon=True)
        self._thread.start()
        ready.result(timeout=10)
        return self

    async def _serve(self) -> None:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self.release()

        async def shutdown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop = self._thread = None
        if self.events is not None:
            self.events.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- control --

    def hold(self) -> None:
        """Make requests that arrive from now on wait (counted as running) until `release()`."""
        with self._lock:
            self._held = True

    def release(self) -> None:
        with self._lock:
            self._held = False
        if self._loop is not None and self._release is not None:
            self._loop.call_soon_threadsafe(self._release_all)

    def _release_all(self) -> None:
        assert self._release is not None
        released, self._release = self._release, asyncio.Event()
        released.set()

    def preload(self, messages: list[Any]) -> None:
        """Cache a prompt as if another gateway had sent it here (announced by KV events when enabled)."""
        with self._lock:
            self._cache[_digest(messages)] = None
        if self.events is not None:
            self.events.store(messages)

    def clear_kv(self) -> None:
        """Drop every cached prefix (vLLM's reset_prefix_cache): AllBlocksCleared when events are on."""
        with self._lock:
            self._cache.clear()
        if self.events is not None:
            self.events.clear()

    def reset_counters(self) -> None:
        with self._lock:
            self.requests = self.queries = self.hits = 0

    def wait_for_running(self, count: int, timeout: float = 5.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.running >= count, timeout)

    # -- handlers --

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        messages = body.get("messages") or []
        user_turns = sum(1 for m in messages if m.get("role") == "user")
        with self._changed:
            self.requests += 1
            self.running += 1
            held = self._held
            # The previous turn's prompt plus its reply is everything but the new user message.
            hit = len(messages) > 1 and _digest(messages[:-1]) in self._cache
            if user_turns > 1:
                self.queries += 1
                self.hits += hit
            self._changed.notify_all()
        try:
            if held:
                assert self._release is not None
                await self._release.wait()
            await asyncio.sleep((self.hit_ms if hit else self.miss_ms) / 1000)
            text = f"reply {user_turns} from {self.name}"
            reply = [*messages, {"role": "assistant", "content": text}]
            with self._lock:
                for key in (_digest(messages), _digest(reply)):
                    self._cache[key] = None
                    self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            if self.events is not None:
                self.events.store(reply)
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 4, "total_tokens": prompt_tokens + 4,
                     "prompt_tokens_details": {"cached_tokens": prompt_tokens if hit else 0}}
            model = body.get("model", "fake")
            if body.get("stream"):
                return await self._stream(request, model, text, usage)
            return web.json_response({
                "id": "chatcmpl-vllm", "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
                "usage": usage,
            }, headers={"x-replica": self.name})
        finally:
            with self._changed:
                self.running -= 1
                self._changed.notify_all()

    async def _stream(self, request: web.Request, model: str, text: str, usage: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-replica": self.name})
        await response.prepare(request)
        head = {"id": "chatcmpl-vllm", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        deltas = [{"role": "assistant", "content": ""}, *({"content": w + " "} for w in text.split())]
        for index, delta in enumerate(deltas):
            finish = "stop" if index == len(deltas) - 1 else None
            chunk = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await response.write(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        with self._lock:
            running, waiting = self.running, self.reported_waiting
            queries, hits, used = self.queries, self.hits, len(self._cache) / self.cache_size
            if self.reported_kv_usage is not None:
                used = self.reported_kv_usage
        label = '{model_name="fake"}'
        text = (
            f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{label} {running}\n"
            f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{label} {waiting}\n"
            f"# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{label} {used}\n"
            f"# TYPE vllm:prefix_cache_queries counter\nvllm:prefix_cache_queries_total{label} {queries}\n"
            f"# TYPE vllm:prefix_cache_hits counter\nvllm:prefix_cache_hits_total{label} {hits}\n"
        )
        return web.Response(text=text, content_type="text/plain")
