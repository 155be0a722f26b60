"""The live policy: atomic swaps on reload, watching the file, SIGHUP.

A request reads `current` once and keeps that object, so in-flight requests
finish on the policy they started with while new ones see the new policy.
A policy that fails to load is refused and logged; the old one keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from gateway.policy import Policy, PolicyError, load_policy

log = logging.getLogger("switchboard.policy")


class PolicyStore:
    def __init__(self, path: str | Path, initial: Policy | None = None) -> None:
        self.path = Path(path)
        self._current = initial if initial is not None else load_policy(self.path)
        self._stamp = _stamp(self.path)
        self._listeners: list[Callable[[Policy], None]] = []
        self._refusal_listeners: list[Callable[[PolicyError], None]] = []
        self._lock = asyncio.Lock()

    @property
    def current(self) -> Policy:
        return self._current

    def on_change(self, listener: Callable[[Policy], None]) -> None:
        """Call `listener` with each newly applied policy."""
        self._listeners.append(listener)

    def on_refusal(self, listener: Callable[[PolicyError], None]) -> None:
        """Call `listener` with the errors of each policy refused on reload."""
        self._refusal_listeners.append(listener)

    async def reload(self) -> bool:
        """Load the file again; swap it in if valid. Returns whether it was applied."""
        async with self._lock:
            stamp = await asyncio.to_thread(_stamp, self.path)
            try:
                policy = await asyncio.to_thread(load_policy, self.path)
            except PolicyError as exc:
                self._stamp = stamp
                log.error("policy reload refused, still serving %s:\n%s", self._current.fingerprint, exc)
                for refusal_listener in self._refusal_listeners:
                    refusal_listener(exc)
                return False
            self._stamp = stamp
            if policy.fingerprint == self._current.fingerprint:
                return False
            previous, self._current = self._current, policy
            log.info("policy reloaded from %s: %s -> %s", self.path, previous.fingerprint, policy.fingerprint)
            for listener in self._listeners:
                listener(policy)
            return True

    async def watch(self) -> None:
        """Reload whenever the file's stamp changes (an edit, a rename over it, a ConfigMap swap); until cancelled."""
        while True:
            await asyncio.sleep(self._current.server.reload.poll_interval_s)
            if not self._current.server.reload.watch:
                continue
            stamp = await asyncio.to_thread(_stamp, self.path)
            if stamp != self._stamp:
                await self.reload()

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Reload on SIGHUP; only possible from the main thread."""
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
            return True
        return False


def _stamp(path: Path) -> tuple[str, int, int, int] | None:
    """What changes when the policy does: the file's target, modification time, size and inode.

    A Kubernetes ConfigMap volume never rewrites the file: kubelet writes a new timestamped
    directory and swaps the `..data` symlink the file's own symlink goes through. The resolved
    path changes with every swap, so the swap is seen even when the new file happens to match
    the old one's size and time and reuses a freed inode.
    """
    try:
        stat = os.stat(path)
        target = os.path.realpath(path)
    except OSError:
        return None
    return (target, stat.st_mtime_ns, stat.st_size, stat.st_ino)
