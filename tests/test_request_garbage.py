"""A served request leaves no reference cycle behind: its objects are freed by reference counting as it ends.

Objects in a cycle wait for the garbage collector, and under load that is what made the collector run: ~24 such
objects a request (uvicorn's request cycle and the lean `send` closing over it) filled generation 0 every few
hundred requests, and each pass took ~4 ms on the event loop (loadtests/README.md, "The full policy, round
four"). The gateway runs in this process, so the collector's own record of what it found is checked directly.
"""

from __future__ import annotations

import contextlib
import gc
import types
from collections import Counter
from collections.abc import Callable, Iterator

import httpx

from tests.conftest import RunningGateway, standard_policy
from tests.fakes import FakeOpenAIUpstream
from tests.fakes.openai_upstream import Behaviour


def _ours(thing: object) -> str | None:
    """The name of a collected object the gateway or its server made (the fake upstream shares the process)."""
    kind = type(thing)
    if kind is types.FunctionType:
        module = thing.__module__ or ""  # type: ignore[attr-defined]
        name = f"{module}.{thing.__qualname__}"  # type: ignore[attr-defined]
    else:
        module, name = kind.__module__, f"{kind.__module__}.{kind.__qualname__}"
    return name if module.startswith(("gateway", "providers", "uvicorn", "starlette")) else None


@contextlib.contextmanager
def gateway_garbage() -> Iterator[Counter[str]]:
    """Within the block the collector keeps what it would have freed; at its end the gateway's and its server's
    objects among it are counted into the yielded Counter."""
    found: Counter[str] = Counter()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.update(name for name in map(_ours, gc.garbage) if name is not None)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_replies_and_streams_leave_no_cyclic_garbage(upstream: FakeOpenAIUpstream,
                                                      start_gateway: Callable[[str], RunningGateway]) -> None:
    gateway = start_gateway(standard_policy(upstream.base_url))
    chat = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=gateway.v1, headers={"authorization": "Bearer sk-alpha"}, timeout=10) as client:
        def serve(count: int) -> None:
            for _ in range(count):
                assert client.post("/chat/completions", json=chat).status_code == 200
                with client.stream("POST", "/chat/completions", json={**chat, "stream": True}) as reply:
                    assert reply.status_code == 200
                    assert b"[DONE]" in reply.read()

        serve(3)  # warm-up: first-use caches and connections
        with gateway_garbage() as found:
            serve(20)
            serve(1)  # so the 20 before have surely ended on the server
    assert not found, found


def test_a_client_that_leaves_mid_stream_leaves_no_cyclic_garbage(
        upstream: FakeOpenAIUpstream, start_gateway: Callable[[str], RunningGateway]) -> None:
    """The other way a request ends: its response never completes, the connection is lost."""
    gateway = start_gateway(standard_policy(upstream.base_url))
    chat = {"model": "chat-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"authorization": "Bearer sk-alpha"}
    with gateway_garbage() as found:
        for left in range(1, 6):
            upstream.script(Behaviour.slow_stream(chunks=200, chunk_delay_ms=20))
            with httpx.stream("POST", gateway.v1 + "/chat/completions", headers=headers, json=chat) as reply:
                assert next(reply.iter_lines()).startswith("data: ")
            # Settled as a disconnect: the request's task is ending, and with it the last reference to its objects.
            assert gateway.usage.wait_for(left)[-1].outcome == "client_disconnected"
        assert httpx.post(gateway.v1 + "/chat/completions", headers=headers,
                          json={**chat, "stream": False}).status_code == 200  # the loop has moved on since
    assert not found, found
