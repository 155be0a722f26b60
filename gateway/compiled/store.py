"""The live policy: atomic swaps on reload, watching the file, SIGHUP.

A request reads `current` once and keeps that object, so in-flight requests
finish on the policy they started with while new ones see the new policy.
A policy that fails to load is refused and logged; the old one keeps serving.
So is one that changes a setting read only at startup (`RESTART_ONLY`): its
refusal says which setting needs a restart, rather than the edit being
silently half-applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.compiled.policy import Policy, PolicyError, load_policy
from gateway.policy.key_files import Stamp, file_stamp

log = logging.getLogger("switchboard.policy")

# Settings read once when the process starts (listeners, the state store, the ledger, the response
# store, the metrics registry, uvicorn's shutdown grace). Every other field is read from the live policy or
# re-applied by an `on_change` listener. tests/test_policy_reload.py holds every schema field to one of the two.
RESTART_ONLY: dict[str, Callable[[Policy], object]] = {
    "server.admin": lambda policy: policy.server.admin,
    "server.shutdown_grace_s": lambda policy: policy.server.shutdown_grace_s,
    "state": lambda policy: policy.state,
    "ledger.path": lambda policy: policy.ledger_path,
    "ledger.flush_interval_s": lambda policy: policy.ledger.flush_interval_s,
    "response_store": lambda policy: policy.response_store,
    "telemetry.metrics.enabled": lambda policy: policy.telemetry.metrics.enabled,
    # The alert dispatcher's queue and workers are made once (accounting/webhooks.py); the webhooks themselves reload.
    "alerts.queue_size": lambda policy: policy.alerts.queue_size,
    "alerts.concurrent_deliveries": lambda policy: policy.alerts.concurrent_deliveries,
    "alerts.history": lambda policy: policy.alerts.history,
}


def restart_needed(running: Policy, edited: Policy) -> list[str]:
    """The restart-only settings `edited` changes, as refusal messages."""
    return [f"{path}: changed, but it is read only at startup; restart the gateway to apply it (the running "
            "policy keeps serving)" for path, read in RESTART_ONLY.items() if read(running) != read(edited)]


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """What the last load of the policy file did, for the admin console."""

    at: float  # unix time
    result: str  # "loaded" (at start), "applied", "unchanged" or "refused"
    fingerprint: str  # the policy serving afterwards
    problems: tuple[str, ...] = ()  # why a refused file was refused


class PolicyStore:
    def __init__(self, path: str | Path, initial: Policy | None = None) -> None:
        self.path = Path(path)
        self._current = initial if initial is not None else load_policy(self.path)
        self.last_reload = ReloadOutcome(time.time(), "loaded", self._current.fingerprint)
        self._stamp = self._loaded_stamps(file_stamp(self.path), self._current)
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
            stamp = await asyncio.to_thread(self._stamps)
            try:
                policy = await asyncio.to_thread(load_policy, self.path)
                needs_restart = restart_needed(self._current, policy)
                if needs_restart:
                    raise PolicyError(str(self.path), needs_restart)
            except PolicyError as exc:
                self._stamp = stamp
                self.last_reload = ReloadOutcome(time.time(), "refused", self._current.fingerprint,
                                                 tuple(exc.problems))
                log.error("policy reload refused, still serving %s:\n%s", self._current.fingerprint, exc)
                for refusal_listener in self._refusal_listeners:
                    refusal_listener(exc)
                return False
            self._stamp = self._loaded_stamps(stamp[0], policy)
            if policy.fingerprint == self._current.fingerprint:
                self.last_reload = ReloadOutcome(time.time(), "unchanged", policy.fingerprint)
                log.info("policy %s reloaded: unchanged, still serving %s", self.path, policy.fingerprint)
                return False
            previous, self._current = self._current, policy
            self.last_reload = ReloadOutcome(time.time(), "applied", policy.fingerprint)
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
            stamp = await asyncio.to_thread(self._stamps)
            if stamp != self._stamp:
                await self.reload()

    def _stamps(self) -> tuple[Stamp, ...]:
        """The policy file's stamp, and its keys file's: a revoked key applies when either changes."""
        keys = self._current.keys_path
        return (file_stamp(self.path), *((file_stamp(keys),) if keys is not None else ()))

    def _loaded_stamps(self, policy_stamp: Stamp, policy: Policy) -> tuple[Stamp, ...]:
        # The keys file as the loader read it, so a write that raced the load still counts as a change.
        return (policy_stamp, *((policy.keys_stamp,) if policy.keys_path is not None else ()))

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Reload on SIGHUP; only possible from the main thread."""
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
            return True
        return False
