"""Webhook delivery: signed POSTs, retried with backoff, off the request path.

`WebhookDispatcher` is owned by the app's lifespan: `submit` only puts a
delivery on a bounded queue (a full queue drops it, counted); one background
task takes deliveries off the queue and runs up to `concurrent_deliveries` of
them at once, each retried until the receiver answers 2xx, answers a 4xx
other than 408/429 (it will never accept it), or `max_attempts` is spent.

Every attempt of one delivery carries the same `idempotency-key` and body,
so a receiver that saw an earlier attempt (whose answer got lost) can tell.
Each attempt is signed afresh: `x-switchboard-timestamp: <unix seconds>` and
`x-switchboard-signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>`;
receivers recompute it and refuse old timestamps (policies/README.md, "alerts").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from gateway.policy.parts import Compiling, PartProblems, PolicyPart
from gateway.timestamps import iso_time

if TYPE_CHECKING:
    from gateway.policy.alert_schema import AlertsPolicy, WebhookPolicy

log = logging.getLogger("switchboard.webhooks")

SIGNATURE_HEADER = "x-switchboard-signature"
TIMESTAMP_HEADER = "x-switchboard-timestamp"
IDEMPOTENCY_HEADER = "idempotency-key"
# Longest a shutdown waits for queued alerts: a receiver that is down would otherwise hold every restart for
# the whole grace period, for deliveries that are sleeping in backoff anyway.
DRAIN_S = 5.0
# Answers that say "try again later"; any other 4xx means the receiver will never accept this body.
_RETRYABLE_4XX = frozenset({408, 425, 429})


@dataclass(frozen=True, slots=True)
class Webhook:
    """A configured webhook, built at policy load with its secret read."""

    name: str
    url: str = field(repr=False)  # a Slack webhook URL is itself a credential
    format: str  # "json" or "slack"
    secret: bytes | None = field(repr=False)  # None: unsigned (format: slack without a secret)
    timeout_s: float
    max_attempts: int
    backoff_initial_s: float
    backoff_max_s: float


def build_webhooks(config: AlertsPolicy, base_dir: Path,
                   environ: Mapping[str, str]) -> tuple[dict[str, Webhook], list[tuple[tuple[Any, ...], str]]]:
    """The policy's webhooks with their secrets, and the problems (YAML path, message) found reading them."""
    webhooks: dict[str, Webhook] = {}
    problems: list[tuple[tuple[Any, ...], str]] = []
    for name, hook in config.webhooks.items():
        secret, problem = _secret(hook, base_dir, environ)
        if problem is not None:
            field_name = "secret_env" if hook.secret_env is not None else "secret_file"
            problems.append((("alerts", "webhooks", name, field_name), problem))
            continue
        webhooks[name] = Webhook(name, hook.url, hook.format, secret, hook.timeout_s, hook.max_attempts,
                                 hook.backoff.initial_s, hook.backoff.max_s)
    return webhooks, problems


def _secret(hook: WebhookPolicy, base_dir: Path, environ: Mapping[str, str]) -> tuple[bytes | None, str | None]:
    if hook.secret_env is not None:
        value = environ.get(hook.secret_env, "")
        if not value:
            return None, f"environment variable {hook.secret_env} is not set (it holds the signing secret)"
        return value.encode(), None
    if hook.secret_file is not None:
        path = base_dir / hook.secret_file
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            return None, f"cannot read {path}: {exc.strerror or exc}"
        if not value:
            return None, f"{path} is empty (it holds the signing secret)"
        return value.encode(), None
    return None, None


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The `x-switchboard-signature` value of `body` sent at `timestamp`."""
    digest = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def backoff_s(webhook: Webhook, attempt: int, rng: random.Random) -> float:
    """The wait after failed attempt number `attempt` (1-based): doubling from initial_s, capped, half-jittered
    so receivers recovering from an outage are not hit by every sender at once."""
    ceiling = min(webhook.backoff_max_s, webhook.backoff_initial_s * 2 ** (attempt - 1))
    return ceiling / 2 + rng.random() * ceiling / 2


@dataclass(slots=True)
class Delivery:
    """One alert on its way to one webhook, as /admin/alerts lists it."""

    key: str  # the idempotency key, the same on every attempt
    webhook: Webhook
    event: str
    summary: str
    body: bytes
    created_at: float
    status: str = "queued"  # queued, delivering, retrying, delivered, failed, dropped
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None
    finished_at: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {"idempotency_key": self.key, "webhook": self.webhook.name, "event": self.event,
                "summary": self.summary, "status": self.status, "attempts": self.attempts,
                "last_http_status": self.last_status, "last_error": self.last_error,
                "created_at": iso_time(self.created_at, timespec="milliseconds"),
                "finished_at": None if self.finished_at is None else iso_time(self.finished_at,
                                                                               timespec="milliseconds")}


class WebhookDispatcher:
    """The bounded delivery queue and its background worker; started and closed by the app lifespan."""

    def __init__(self, config: AlertsPolicy, *, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self._capacity = config.queue_size
        self._concurrency = config.concurrent_deliveries
        self._recent: collections.deque[Delivery] = collections.deque(maxlen=config.history)
        self._clock = clock
        self._rng = rng or random.Random()
        self._queue: asyncio.Queue[Delivery] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None  # noqa: TID251 - see _client
        self._outcomes: Any = None
        self._failures: Any = None
        self._dropped = 0

    def attach_metrics(self, metrics: Any) -> None:
        """Count deliveries and failed attempts in the gateway's Prometheus registry (gateway/telemetry/metrics.py)."""
        from prometheus_client import Counter

        self._outcomes = Counter("switchboard_alert_deliveries", "Alert deliveries by outcome: delivered, "
                                 "failed (attempts spent or refused), dropped (queue full).",
                                 ("webhook", "outcome"), registry=metrics.registry)
        self._failures = Counter("switchboard_alert_delivery_failures", "Failed delivery attempts by reason: "
                                 "http_<status>, timeout or connection.", ("webhook", "reason"),
                                 registry=metrics.registry)

    async def start(self) -> None:
        self._queue = asyncio.Queue(self._capacity)
        self._worker = asyncio.create_task(self._run())

    def submit(self, webhook: Webhook, key: str, event: str, summary: str, body: bytes) -> Delivery:
        """Queue one delivery without waiting; a full (or not started) queue drops it, counted and listed."""
        delivery = Delivery(key, webhook, event, summary, body, self._clock())
        self._recent.append(delivery)
        try:
            if self._queue is None:
                raise asyncio.QueueFull
            self._queue.put_nowait(delivery)
        except asyncio.QueueFull:
            self._dropped += 1
            self._finish(delivery, "dropped")
            log.error("alert %s to webhook %s dropped: the delivery queue is full (%d)", key, webhook.name,
                      self._capacity)
        return delivery

    def recent(self) -> dict[str, Any]:
        """What GET /admin/alerts shows: the queue, drops, and the latest deliveries, newest first."""
        queued = self._queue.qsize() if self._queue is not None else 0
        return {"queue": {"queued": queued, "capacity": self._capacity, "delivering": len(self._running)},
                "dropped": self._dropped, "deliveries": [d.as_json() for d in reversed(self._recent)]}

    async def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what is queued within `timeout_s` (at most `DRAIN_S`), then stop; log what is left undelivered."""
        if self._queue is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), min(timeout_s, DRAIN_S))
        left = self._queue.qsize() + len(self._running)
        if self._worker is not None:
            self._worker.cancel()
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, *(t for t in (self._worker,) if t is not None), return_exceptions=True)
        if left:
            log.error("shutdown: %d alert deliveries were not completed and are lost", left)
            for delivery in self._recent:
                if delivery.finished_at is None:  # named, so an operator can tell the people who missed it
                    log.error("lost alert %s to webhook %s (%s): %s", delivery.key, delivery.webhook.name,
                              delivery.event, delivery.summary)
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        queue = self._queue
        assert queue is not None
        slots = asyncio.Semaphore(self._concurrency)
        while True:
            await slots.acquire()  # first, so a delivery waiting for a slot still counts against the queue's bound
            delivery = await queue.get()
            task = asyncio.create_task(self._deliver(delivery))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            task.add_done_callback(lambda _: (slots.release(), queue.task_done()))

    async def _deliver(self, delivery: Delivery) -> None:
        webhook = delivery.webhook
        while True:
            delivery.attempts += 1
            delivery.status = "delivering"
            now = int(self._clock())
            headers = {"content-type": "application/json", "user-agent": "switchboard-alerts",
                       IDEMPOTENCY_HEADER: delivery.key, "x-switchboard-event": delivery.event,
                       "x-switchboard-delivery-attempt": str(delivery.attempts), TIMESTAMP_HEADER: str(now)}
            if webhook.secret is not None:
                headers[SIGNATURE_HEADER] = signature(webhook.secret, now, delivery.body)
            reason = None
            try:
                status = await self._http_post(webhook.url, delivery.body, headers, webhook.timeout_s)
            except TimeoutError:
                status, reason = None, "timeout"
            except (aiohttp.ClientError, OSError) as exc:
                status, reason = None, "connection"
                delivery.last_error = f"{type(exc).__name__}: {exc}"[:300]
            except Exception as exc:  # whatever else: the delivery still ends listed and counted, never stuck
                log.exception("alert %s to webhook %s: unexpected failure", delivery.key, webhook.name)
                status, reason = None, "error"
                delivery.last_error = f"{type(exc).__name__}: {exc}"[:300]
            delivery.last_status = status
            if status is not None and 200 <= status < 300:
                delivery.last_error = None
                self._finish(delivery, "delivered")
                return
            if status is not None:
                reason = f"http_{status}"
                delivery.last_error = f"HTTP {status}"
            elif reason == "timeout":
                delivery.last_error = f"no answer within {webhook.timeout_s:g}s"
            if self._failures is not None:
                self._failures.labels(webhook.name, reason).inc()
            final = status is not None and 400 <= status < 500 and status not in _RETRYABLE_4XX
            if final or delivery.attempts >= webhook.max_attempts:
                self._finish(delivery, "failed")
                log.error("alert %s to webhook %s failed after %d attempts: %s", delivery.key, webhook.name,
                          delivery.attempts, delivery.last_error)
                return
            delivery.status = "retrying"
            await asyncio.sleep(backoff_s(webhook, delivery.attempts, self._rng))

    def _finish(self, delivery: Delivery, outcome: str) -> None:
        delivery.status = outcome
        delivery.finished_at = self._clock()
        if self._outcomes is not None:
            self._outcomes.labels(delivery.webhook.name, outcome).inc()

    async def _http_post(self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> int:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with self._client().post(url, data=body, headers=dict(headers), timeout=timeout,
                                       allow_redirects=False) as response:
            await response.read()
            return response.status

    def _client(self) -> aiohttp.ClientSession:  # noqa: TID251 - background alert delivery only
        if self._session is None:
            # Its own small client, not gateway/upstream/pools.py's pools: a slow receiver must never hold
            # connections that model traffic needs.
            self._session = aiohttp.ClientSession()  # noqa: TID251 - background alert delivery only
        return self._session


def _compile_webhooks(compiling: Compiling) -> dict[str, Webhook]:
    webhooks, problems = build_webhooks(compiling.document.alerts, compiling.base_dir, compiling.environ)
    if problems:
        raise PartProblems(problems)
    return webhooks


# The webhooks budget alerts are posted to, their secrets read: `Policy.webhooks`.
WEBHOOKS = PolicyPart("webhooks", build=_compile_webhooks)
