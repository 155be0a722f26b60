"""Attempt deadlines: one event-loop timer for every upstream attempt in flight.

Every attempt runs under its request's deadline (`deadline_s`, 300 s by default) or a stream's
`ttft_timeout_s`, and nearly every attempt ends long before it. A timer per attempt (`loop.call_at`, then
`cancel`) was the route step's largest single cost on asyncio's own event loop: a handle, a context copy and
a heap push whose comparisons run in Python, then a cancellation the loop sweeps up later. Here an attempt
is registered in a dict and forgotten when it ends; one timer stays armed at the earliest deadline of the
attempts in flight, so the common attempt costs a dict insert and a pop and arms nothing.

The timer can outlive the attempt it was armed for: it then wakes, finds nothing due, and re-arms for the
earliest deadline still in flight. Deadlines are exact (the loop's clock, as `asyncio.timeout` uses), and an
attempt past its deadline is cancelled by the timer's callback as `asyncio.timeout` would cancel it
(`Expiry` turns that cancellation into `TimeoutError`).
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Callable
from typing import Any

# The task a loop is running, as `asyncio.current_task(loop)` finds it: on 3.11 that is a Python function reading
# this dict (asyncio's C module has it from 3.12), a frame of its own for every attempt and every request.
running_task: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None]
if sys.version_info < (3, 12):
    from asyncio.tasks import _current_tasks  # type: ignore[attr-defined]

    running_task = _current_tasks.get
else:
    running_task = asyncio.current_task


class Expiry:
    """One attempt's deadline, as a context manager: the task running the attempt is cancelled at `at`
    (the loop's clock), and that cancellation leaves the block as `TimeoutError`.

    Same semantics as `asyncio.timeout`: only the expiry's own cancellation becomes `TimeoutError`; a
    client's disconnect cancelling the task too is left to propagate.
    """

    __slots__ = ("_cancelling", "_deadlines", "at", "expired", "loop", "task")

    def __init__(self, deadlines: AttemptDeadlines, seconds: float) -> None:
        loop = self.loop = asyncio.get_running_loop()
        task = running_task(loop)
        assert task is not None
        self.task = task
        self._cancelling = task.cancelling()
        self._deadlines = deadlines
        self.at = loop.time() + seconds
        self.expired = False

    # Registering with the `AttemptDeadlines` and leaving them are written out here rather than as methods of theirs:
    # every upstream attempt enters and leaves one.
    def __enter__(self) -> Expiry:
        deadlines = self._deadlines
        deadlines._watched[self] = at = self.at
        # Rare: a deadline earlier than the armed one (the first attempt, a short ttft_timeout_s) or a new loop.
        if at < deadlines._armed_at or self.loop is not deadlines._loop:
            deadlines._arm(self.loop, at)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._deadlines._watched.pop(self, None)  # already gone when its deadline fired
        if self.expired and exc_type is asyncio.CancelledError and self.task.uncancel() <= self._cancelling:
            raise TimeoutError from exc

    def expire(self) -> None:
        self.expired = True
        self.task.cancel()


class AttemptDeadlines:
    """The attempts in flight with a deadline, and the one timer armed at the earliest of them (per app)."""

    __slots__ = ("_armed_at", "_loop", "_timer", "_watched")

    def __init__(self) -> None:
        self._watched: dict[Expiry, float] = {}  # attempt -> its deadline
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None

    def _arm(self, loop: asyncio.AbstractEventLoop, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if loop is not self._loop:  # tests run several loops in turn: what an earlier one watched is gone
            self._loop = loop
            self._watched = {expiry: when for expiry, when in self._watched.items() if expiry.loop is loop}
        self._armed_at = at
        self._timer = loop.call_at(at, self._fire)

    def _fire(self) -> None:
        assert self._loop is not None
        # The loop runs a timer once its time is within the clock's resolution: what it was armed for is due.
        due_by = max(self._armed_at, self._loop.time())
        self._timer, self._armed_at = None, math.inf
        due = [expiry for expiry, at in self._watched.items() if at <= due_by]
        for expiry in due:
            del self._watched[expiry]
            expiry.expire()
        if self._watched:
            self._arm(self._loop, min(self._watched.values()))
