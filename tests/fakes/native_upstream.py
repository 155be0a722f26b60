"""What the fakes of non-OpenAI upstreams (Anthropic, Gemini) share with FakeOpenAIUpstream.

They reuse its server plumbing unchanged: lifecycle (start/stop, a thread and
loop of their own), request recording, scripted `Behaviour`s (errors, hangs,
slow first bytes, abrupt closes, cut streams) and disconnect tracking. A
subclass adds its routes in `routes()` and says how its wire format reports an
error in the middle of a stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from tests.fakes.openai_upstream import Behaviour, FakeOpenAIUpstream, _close, _Endpoint, _Exchange


class NativeFakeUpstream(FakeOpenAIUpstream):
    """Base for fakes whose inference paths and stream error frames differ from OpenAI's."""

    def __init__(self, *, require_api_key: str | None = None, **kwargs: Any) -> None:
        # The OpenAI fake checks `Authorization: Bearer`; native APIs use their own header,
        # which each subclass checks itself.
        super().__init__(**kwargs)
        self.api_key = require_api_key
        self.cache_read_tokens = 0
        self.cache_write_tokens = 0

    def routes(self) -> list[tuple[str, str, str, _Endpoint]]:
        """(method, route, behaviour path, endpoint) for each inference route."""
        raise NotImplementedError

    def stream_error_frame(self, error: dict[str, Any]) -> bytes:
        raise NotImplementedError

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self._inference_paths = set()
        for method, route, path, endpoint in self.routes():
            app.router.add_route(method, route, self._wrap(path, endpoint))
            self._inference_paths.add(path)
        app.router.add_route("*", "/{tail:.*}", self._wrap(None, self._not_found))
        return app

    def reset(self) -> None:
        super().reset()
        self.cache_read_tokens = 0
        self.cache_write_tokens = 0

    def _next_behaviour(self, path: str) -> Behaviour:
        with self._lock:
            for i, behaviour in enumerate(self._script):
                if behaviour.path == path or (behaviour.path is None and path in self._inference_paths):
                    del self._script[i]
                    return behaviour
        return Behaviour()

    async def _stream(
        self, request: web.Request, exchange: _Exchange, frames: Iterator[bytes], behaviour: Behaviour
    ) -> web.StreamResponse:
        exchange.streaming = True
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "Cache-Control": "no-cache", "request-id": self._new_id("req")})
        await response.prepare(request)
        delay_ms = self.chunk_delay_ms if behaviour.chunk_delay_ms is None else behaviour.chunk_delay_ms
        drop_after = behaviour.drop_after_chunks
        for frame in frames:
            if drop_after is not None and exchange.chunks_sent >= drop_after:
                if behaviour.stream_error is not None:
                    await response.write(self.stream_error_frame(dict(behaviour.stream_error)))
                _close(request)
                return response
            if delay_ms > 0 and exchange.chunks_sent:
                await asyncio.sleep(delay_ms / 1000)
            await response.write(frame)
            exchange.chunks_sent += 1
        return response
