"""Bare pass-through proxy: the cheapest honest Starlette relay, used as the gateway's CPU floor.

    python loadtests/baseline_passthrough.py --upstream http://127.0.0.1:9100/v1 --port 9200 [--client httpx]

One pooled upstream client, created in the lifespan. The chat route is a pure ASGI callable (Starlette
still routes it): StreamingResponse was not used because under uvicorn (ASGI spec 2.3) it starts an
anyio task group plus a disconnect listener per response. The one shortcut this takes: a client that
disconnects mid-stream is not noticed, the relay keeps draining the upstream (uvicorn drops the sends).
"""

# ruff: noqa: TID251 - a benchmark baseline, not gateway code: the single-upstream-client rule does not apply.
from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.http.heap import settle_for_serving

# Both clients get the same large pool so the comparison is about the client, not pool sizing
# (httpx's default keeps only 20 idle connections, which would reconnect under c=32).
POOL = 1000
# What a gateway does: swap the caller's key for the provider's key.
UPSTREAM_HEADERS = {"authorization": "Bearer sk-upstream-secret", "content-type": "application/json"}
Relay = Callable[[bytes, Send], Any]


async def _receive_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _start(status: int, content_type: str) -> dict[str, Any]:
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", content_type.encode())],
    }


def aiohttp_relay(session: aiohttp.ClientSession, url: str) -> Relay:
    async def relay(body: bytes, send: Send) -> None:
        async with session.post(url, data=body, headers=UPSTREAM_HEADERS) as resp:
            await send(_start(resp.status, resp.headers.get("content-type", "application/json")))
            async for chunk in resp.content.iter_any():  # as the bytes arrive, not per line
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return relay


def httpx_relay(client: httpx.AsyncClient, url: str) -> Relay:
    async def relay(body: bytes, send: Send) -> None:
        request = client.build_request("POST", url, content=body, headers=UPSTREAM_HEADERS)
        resp = await client.send(request, stream=True)
        try:
            await send(_start(resp.status_code, resp.headers.get("content-type", "application/json")))
            async for chunk in resp.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            await resp.aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return relay


class ChatRoute:
    """POST /v1/chat/completions: read the body, forward it, relay the bytes (stream or not)."""

    def __init__(self) -> None:
        self.relay: Relay | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _receive_body(receive)
        orjson.loads(body)  # a gateway must parse the request; keep that cost in the floor
        assert self.relay is not None, "lifespan did not run"
        await self.relay(body, send)


def build_app(upstream: str, client: str, tune_gc: bool) -> Starlette:
    chat = ChatRoute()
    url = upstream.rstrip("/") + "/chat/completions"

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if client == "httpx":
            limits = httpx.Limits(max_connections=POOL, max_keepalive_connections=POOL)
            async with httpx.AsyncClient(limits=limits, timeout=60) as http:
                chat.relay = httpx_relay(http, url)
                if tune_gc:
                    settle_for_serving()
                yield
        else:
            connector = aiohttp.TCPConnector(limit=POOL)
            async with aiohttp.ClientSession(connector=connector) as session:
                chat.relay = aiohttp_relay(session, url)
                if tune_gc:
                    settle_for_serving()
                yield

    async def health(_request: Any) -> Response:
        return Response(b"ok")

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)]
    return Starlette(routes=routes, lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="upstream base URL including /v1")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp")
    parser.add_argument("--gc", choices=["default", "serving"], default="serving",
                        help="'serving': the garbage-collector settings the gateway's server process uses")
    args = parser.parse_args()
    app = build_app(args.upstream, args.client, args.gc == "serving")
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
