"""uvicorn's server with a drain: on SIGTERM it first reports not ready, then stops as uvicorn does.

A load balancer learns that a replica is going away from its health check, which runs every so often. If
the replica closed its listener at SIGTERM, as uvicorn does, a request the balancer routed to it in the
meantime would be refused, or worse, reset after it was written (a POST the balancer may not retry: it could
be billed twice). So for `server.drain_s` after SIGTERM the gateway keeps serving while `/readyz` answers 503
(`draining`) and every response closes its connection (a keep-alive client reconnects, through the balancer, to
another replica); the balancer takes it out of rotation, and only then does uvicorn's own shutdown
begin: close the listener, wait up to `server.shutdown_grace_s` for in-flight requests, run the lifespan's
shutdown. SIGINT (Ctrl-C) skips the drain, and a SIGINT during one ends it at once; a repeated SIGTERM does
not (a supervisor that signals a whole process group sends it twice).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn

log = logging.getLogger("switchboard")


class DrainingServer(uvicorn.Server):
    """`uvicorn.Server` that drains for `drain_s()` seconds after SIGTERM, with `on_drain()` called as it begins.

    `drain_s` is read when the signal arrives, so a policy reload changes it; `on_drain` runs in the signal
    handler and must only set flags (`GatewayApp.begin_draining`).
    """

    def __init__(self, config: uvicorn.Config, drain_s: Callable[[], float], on_drain: Callable[[], None]) -> None:
        super().__init__(config)
        self._drain_s = drain_s
        self._on_drain = on_drain
        self._drain_ends: float | None = None
        self._drain_logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self.should_exit:
            if self._drain_ends is not None:
                return  # already draining
            seconds = self._drain_s()
            if seconds > 0:
                self._drain_ends = time.monotonic() + seconds
                self._on_drain()
                return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        # uvicorn's main loop ticks every 0.1 s; logging waits for it (a signal handler may not take the
        # logging lock), and so does the end of the drain.
        if self._drain_ends is not None and not self.should_exit:
            if not self._drain_logged:
                self._drain_logged = True
                left = max(0.0, self._drain_ends - time.monotonic())
                log.info("SIGTERM: draining for %.1f s (/readyz answers 503, requests are still served), then "
                         "closing the listener", left)
            if time.monotonic() >= self._drain_ends:
                # As if SIGTERM came now: uvicorn stops, and raises the signal again once it has (exit status 143).
                super().handle_exit(signal.SIGTERM, None)
        return await super().on_tick(counter)


class FollowingServer(uvicorn.Server):
    """`uvicorn.Server` that leaves the process's signals alone: another server in the same loop takes them and
    stops this one when it stops (the admin listener beside the tenant's `DrainingServer`, gateway/cli/main.py).

    Each uvicorn server installs its own handlers as it starts, and the last one installed gets every signal:
    the admin listener, started second, would close at SIGTERM while the tenant port drained."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
