"""Target health: active health checks, Prometheus load scrapes, and what GET /admin/targets reports.

`Monitor` runs one background task per provider that has `health_check` or
`metrics` configured, never on the request path. Results land in the app's
`RouteState`: a provider failing `unhealthy_after` checks in a row has its
targets skipped by routing; scraped running + waiting requests feed the
targets' load (vLLM `vllm:num_requests_*`, SGLang `sglang:num_running_reqs`
/ `sglang:num_queue_reqs`, llama.cpp `llamacpp:requests_*`), their queue alone
and KV-cache usage. Providers with `kv_events` get a KV-cache event subscriber
(gateway/routing/kv_events.py), started and stopped here with the other loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from gateway.routing.kv_events import KVEventSubscriber, ReplicaBlocks
from gateway.routing.prefix_sharing import SHARE_KEY, SharedOwnership, wanted_url
from gateway.routing.strategies import RouteState, TargetState, target_key

if TYPE_CHECKING:
    from gateway.compiled.policy import Policy, Provider

log = logging.getLogger("switchboard.health")

# Metric name -> what it counts. Running and waiting add up to the replica's load; waiting is its queue.
_LOAD_METRICS = {
    b"vllm:num_requests_running": "load", b"vllm:num_requests_waiting": "waiting",
    b"sglang:num_running_reqs": "load", b"sglang:num_queue_reqs": "waiting",
    b"llamacpp:requests_processing": "load", b"llamacpp:requests_deferred": "waiting",
    # vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc (0.10); both are read.
    b"vllm:kv_cache_usage_perc": "kv", b"vllm:gpu_cache_usage_perc": "kv", b"sglang:token_usage": "kv",
}


def parse_load(text: bytes) -> tuple[float | None, float | None, float | None]:
    """Running + waiting requests, waiting alone, and KV-cache usage (0-1) from a Prometheus text page."""
    load = waiting = kv = None
    for line in text.splitlines():
        if not line or line.startswith(b"#"):
            continue
        name = line.split(b"{", 1)[0].split(b" ", 1)[0]
        what = _LOAD_METRICS.get(name)
        if what is None:
            continue
        try:
            value = float(line.rsplit(b" ", 1)[1])
        except (IndexError, ValueError):
            continue
        if what == "kv":
            kv = max(kv or 0.0, value)
            continue
        load = (load or 0.0) + value
        if what == "waiting":
            waiting = (waiting or 0.0) + value
    return load, waiting, kv


def _server_root(provider: Provider) -> str:
    base = provider.settings.base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


class Monitor:
    """Background health checks and metric scrapes for the providers of the current policy."""

    def __init__(self, states: RouteState, policy: Callable[[], Policy]) -> None:
        self._states = states
        self._policy = policy
        self._tasks: dict[tuple[Any, ...], asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None  # noqa: TID251 - see _client
        self._kv_events = KVEventSubscriber(states, policy)
        self._sharing: SharedOwnership | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def apply(self, policy: Policy) -> None:
        """Start loops for newly configured providers and stop those no longer wanted."""
        wanted: dict[tuple[Any, ...], tuple[str, Provider]] = {}
        for provider in policy.providers.values():
            if provider.health_check is not None:
                wanted[("health", provider.name, provider.settings.base_url, provider.health_check)] = (
                    "health", provider)
            if provider.metrics is not None:
                wanted[("metrics", provider.name, provider.settings.base_url, provider.metrics)] = (
                    "metrics", provider)
        for key in [k for k in self._tasks if k not in wanted]:
            self._tasks.pop(key).cancel()
        for key, (what, provider) in wanted.items():
            if key not in self._tasks:
                loop = self._health_loop if what == "health" else self._metrics_loop
                self._tasks[key] = asyncio.create_task(loop(provider.name))
        self._kv_events.apply(policy.providers.values())
        url = wanted_url(policy)
        if self._sharing is not None and self._sharing.url != url:
            closing = asyncio.create_task(self._sharing.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            self._sharing = None
        if url is not None and self._sharing is None:
            self._sharing = SharedOwnership(self._states, self._policy, url, policy.state.key_prefix)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        await self._kv_events.close()
        if self._sharing is not None:
            await self._sharing.close()
        if self._session is not None:
            await self._session.close()

    def _client(self) -> aiohttp.ClientSession:  # noqa: TID251 - background probes only
        if self._session is None:
            # A tiny separate client, not gateway/upstream/pools.py's pools: probes must never queue
            # behind (or count against) the connection limit of real traffic.
            self._session = aiohttp.ClientSession()  # noqa: TID251 - background probes only
        return self._session

    def _targets_of(self, name: str) -> list[TargetState]:
        policy = self._policy()
        return [self._states.state(t) for m in policy.models.values() for t in m.targets if t.provider.name == name]

    async def _get(self, url: str, timeout_s: float) -> tuple[int, bytes]:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with self._client().get(url, timeout=timeout) as response:
            return response.status, await response.read()

    async def _health_loop(self, name: str) -> None:
        failures = 0
        while True:
            provider = self._policy().providers.get(name)
            if provider is None or provider.health_check is None:
                return
            check = provider.health_check
            try:
                status, _ = await self._get(_server_root(provider) + check.path, check.timeout_s)
                ok = status < 400
            except (aiohttp.ClientError, TimeoutError, OSError):
                ok = False
            failures = 0 if ok else failures + 1
            healthy = failures < check.unhealthy_after
            for state in self._targets_of(name):
                if state.healthy != healthy:
                    log.warning("provider %s is now %s", name, "healthy" if healthy else "unhealthy")
                state.healthy = healthy
            await asyncio.sleep(check.interval_s)

    async def _metrics_loop(self, name: str) -> None:
        while True:
            provider = self._policy().providers.get(name)
            if provider is None or provider.metrics is None:
                return
            scrape = provider.metrics
            load = waiting = kv = None
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                status, text = await self._get(_server_root(provider) + scrape.path, scrape.timeout_s)
                if status == 200:
                    load, waiting, kv = parse_load(text)
            now = self._states.clock()
            for state in self._targets_of(name):
                state.scraped_load, state.scraped_waiting, state.kv_cache_usage = load, waiting, kv
                state.scraped_at, state.scrape_interval_s = now, scrape.interval_s
            await asyncio.sleep(scrape.interval_s)


def targets_report(policy: Policy, states: RouteState) -> dict[str, Any]:
    """What GET /admin/targets shows: every target's breaker state, in-flight count, latency EWMA and errors."""
    models: dict[Any, list[str]] = {}
    for model in policy.models.values():
        for target in model.targets:
            states.state(target)  # list configured targets even before their first request
            models.setdefault(target_key(target), []).append(model.name)
    rows = states.snapshot()
    now = states.clock()
    for row in rows:
        row["models"] = models.get((row["provider"], row["base_url"], row["model"]), [])
        blocks = states.tables.get(("kv-blocks", row["provider"], row["base_url"]))
        if isinstance(blocks, ReplicaBlocks):  # KV-cache events: blocks held, seconds since the last batch
            row["kv_blocks"] = len(blocks)
            row["kv_events_age_s"] = None if blocks.last_event_at < 0 else round(now - blocks.last_event_at, 3)
            row["kv_events_gaps"] = blocks.gaps
    body: dict[str, Any] = {"object": "list", "data": rows}
    sharer = states.tables.get(SHARE_KEY)
    if isinstance(sharer, SharedOwnership):
        body["shared_ownership"] = {"received": sharer.received}
    return body
