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

import orjson
from aiohttp import web


def _digest(messages: list[Any]) -> bytes:
    return hashlib.blake2b(orjson.dumps(messages, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


class FakeVLLMReplica:
    """One replica; thread-safe counters, sync lifecycle for tests and load tests."""

    def __init__(self, name: str, *, hit_ms: float = 2.0, miss_ms: float = 20.0, cache_size: int = 10_000,
                 stream_chunks: int = 4) -> None:
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
            with self._lock:
                for key in (_digest(messages), _digest([*messages, {"role": "assistant", "content": text}])):
                    self._cache[key] = None
                    self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
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
        label = '{model_name="fake"}'
        text = (
            f"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{label} {running}\n"
            f"# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{label} {waiting}\n"
            f"# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{label} {used}\n"
            f"# TYPE vllm:prefix_cache_queries counter\nvllm:prefix_cache_queries_total{label} {queries}\n"
            f"# TYPE vllm:prefix_cache_hits counter\nvllm:prefix_cache_hits_total{label} {hits}\n"
        )
        return web.Response(text=text, content_type="text/plain")
