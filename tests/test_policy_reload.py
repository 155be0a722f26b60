"""Reloads apply everything they can, and refuse, saying so, what needs a restart (gateway/compiled/store.py)."""

from __future__ import annotations

import importlib
import re
import socket
import threading
import time
import types
import typing
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from gateway.compiled.store import RESTART_ONLY
from gateway.policy.schema import PolicyDocument
from tests.conftest import RunningGateway, free_port, key_hash, standard_policy
from tests.fakes import Behaviour, FakeOpenAIUpstream

Start = Callable[..., RunningGateway]
ASK = [{"role": "user", "content": "hi"}]


def _watch(gateway: RunningGateway) -> tuple[threading.Event, list[str]]:
    applied, refusals = threading.Event(), []
    gateway.store.on_change(lambda policy: applied.set())
    gateway.store.on_refusal(lambda error: refusals.extend(error.problems))
    return applied, refusals


def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    done = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if condition():
            return True
        done.wait(0.02)
    return condition()


def test_provider_timeouts_changed_by_a_reload_take_effect(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    policy = standard_policy(upstream.base_url)
    gateway = start_gateway(policy)
    upstream.script(Behaviour.slow_first_byte(800))
    assert gateway.client().chat.completions.create(model="chat-model", messages=ASK).choices  # 2 s: in time
    applied, _ = _watch(gateway)
    gateway.policy_path.write_text(policy.replace("first_byte_s: 2", "first_byte_s: 0.2"))
    assert applied.wait(5)
    upstream.script(Behaviour.slow_first_byte(800))
    with pytest.raises(openai.APIStatusError) as late:
        gateway.client().chat.completions.create(model="chat-model", messages=ASK)
    assert late.value.status_code == 504


def test_server_bounds_and_concurrency_changed_by_a_reload_take_effect(upstream: FakeOpenAIUpstream,
                                                                       start_gateway: Start) -> None:
    policy = standard_policy(upstream.base_url)
    gateway = start_gateway(policy)
    applied, _ = _watch(gateway)
    gateway.policy_path.write_text(policy.replace("  max_body_bytes: 65536\n", "  max_body_bytes: 1024\n").replace(
        "      - id: beta-key\n", "      - id: beta-key\n        max_concurrent: 1\n", 1))
    assert applied.wait(5)
    with pytest.raises(openai.APIStatusError) as large:
        gateway.client().chat.completions.create(model="chat-model", messages=[{"role": "user",
                                                                                "content": "x " * 1000}])
    assert large.value.status_code == 413
    upstream.script(Behaviour.hanging())
    beta = gateway.client("sk-beta", timeout=10)
    worker = threading.Thread(target=lambda: beta.chat.completions.create(model="beta-model", messages=ASK))
    worker.start()
    try:
        assert upstream.wait_for_requests(1)
        with pytest.raises(openai.RateLimitError):
            beta.chat.completions.create(model="beta-model", messages=ASK)
    finally:
        upstream.release()
        worker.join(10)


@pytest.mark.parametrize("path, edit, base", [
    ("server.admin", lambda text: text.replace("server:\n", f"server:\n  admin: {{port: {free_port()}}}\n", 1), ""),
    ("server.shutdown_grace_s", lambda text: text.replace("server:\n", "server:\n  shutdown_grace_s: 3\n", 1), ""),
    ("state", lambda text: text + "state: {backend: memory, key_prefix: 'other:'}\n", ""),
    ("ledger.path", lambda text: text + "ledger: {path: spend.sqlite}\n", ""),
    ("ledger.flush_interval_s", lambda text: text.replace("flush_interval_s: 0.5", "flush_interval_s: 2"),
     "ledger: {path: spend.sqlite, flush_interval_s: 0.5}\n"),
    ("response_store", lambda text: text + "response_store: {timeout_s: 2}\n", ""),
    ("telemetry.metrics.enabled", lambda text: text + "telemetry: {metrics: {enabled: false}}\n", ""),
    ("alerts.queue_size", lambda text: text + "alerts: {queue_size: 5}\n", ""),
    ("alerts.concurrent_deliveries", lambda text: text + "alerts: {concurrent_deliveries: 2}\n", ""),
    ("alerts.history", lambda text: text + "alerts: {history: 7}\n", ""),
])
def test_a_reload_that_needs_a_restart_is_refused_and_says_so(upstream: FakeOpenAIUpstream, start_gateway: Start,
                                                              path: str, edit: Callable[[str], str], base: str) -> None:
    policy = standard_policy(upstream.base_url, extra=base)
    gateway = start_gateway(policy)
    before = gateway.store.current
    applied, refusals = _watch(gateway)
    gateway.policy_path.write_text(edit(policy))
    assert _wait_for(lambda: bool(refusals))
    assert not applied.is_set() and gateway.store.current is before
    assert refusals == [f"{path}: changed, but it is read only at startup; restart the gateway to apply it "
                        "(the running policy keeps serving)"]
    assert gateway.client().chat.completions.create(model="chat-model", messages=ASK).choices


def test_every_restart_only_setting_is_tested() -> None:
    tested = {"server.admin", "server.shutdown_grace_s", "state", "ledger.path", "ledger.flush_interval_s",
              "response_store", "telemetry.metrics.enabled", "alerts.queue_size", "alerts.concurrent_deliveries",
              "alerts.history"}
    assert set(RESTART_ONLY) == tested


# --- each kind of setting, changed by a reload, takes effect ------------------------------------------------------


def _reload(gateway: RunningGateway, text: str) -> None:
    """Write `text` as the policy and wait until the gateway serves it."""
    applied, refusals = _watch(gateway)
    gateway.policy_path.write_text(text)
    assert applied.wait(5), refusals


def test_a_provider_total_timeout_changed_by_a_reload_cuts_a_long_stream(upstream: FakeOpenAIUpstream,
                                                                        start_gateway: Start) -> None:
    policy = standard_policy(upstream.base_url)
    gateway = start_gateway(policy)
    client = gateway.client()
    upstream.script(Behaviour.slow_stream(chunks=12, chunk_delay_ms=50))  # ~0.6 s: inside total_s: 10
    assert list(client.chat.completions.create(model="chat-model", messages=ASK, stream=True))[-1].choices
    _reload(gateway, policy.replace("total_s: 10", "total_s: 0.3"))
    upstream.script(Behaviour.slow_stream(chunks=12, chunk_delay_ms=50))
    with httpx.stream("POST", gateway.v1 + "/chat/completions", headers={"authorization": "Bearer sk-alpha"},
                      json={"model": "chat-model", "messages": ASK, "stream": True}, timeout=10) as response:
        events = [line for line in response.iter_lines() if line]
    assert events[-1] != "data: [DONE]" and '"error"' in events[-1]  # cut mid-stream, said so in-band


def test_a_provider_pool_size_and_connect_timeout_changed_by_a_reload_take_effect(upstream: FakeOpenAIUpstream,
                                                                                  start_gateway: Start) -> None:
    policy = standard_policy(upstream.base_url)
    gateway = start_gateway(policy)
    _reload(gateway, policy.replace("timeouts: {connect_s: 2,", "pool: {max_connections: 1}\n"
                                    "    timeouts: {connect_s: 0.3,"))
    upstream.script(Behaviour.hanging())
    worker = threading.Thread(target=lambda: gateway.client(timeout=10).chat.completions.create(
        model="chat-model", messages=ASK))
    worker.start()
    try:
        assert upstream.wait_for_requests(1)
        # The only connection is taken: the next request waits connect_s for one, then fails.
        with pytest.raises(openai.APIStatusError) as waited:
            gateway.client(timeout=10).chat.completions.create(model="chat-model", messages=ASK)
        assert waited.value.status_code in (502, 504) and upstream.request_count == 1
    finally:
        upstream.release()
        worker.join(10)


def test_a_provider_address_key_and_headers_changed_by_a_reload_take_effect(upstream: FakeOpenAIUpstream,
                                                                            start_gateway: Start) -> None:
    from tests.fakes import FakeOpenAIUpstream as Fake

    policy = standard_policy(upstream.base_url)
    gateway = start_gateway(policy)
    with Fake() as moved:
        _reload(gateway, policy.replace(upstream.base_url, moved.base_url)
                .replace("api_key: sk-upstream-secret", "api_key: sk-rotated\n    headers: {x-tenant: acme}\n"
                         "    request_id: {header: x-trace-me}"))
        gateway.client().chat.completions.create(model="chat-model", messages=ASK)
        assert upstream.request_count == 0 and moved.request_count == 1
        sent = moved.requests[0]
        assert sent.header("authorization") == "Bearer sk-rotated" and sent.header("x-tenant") == "acme"
        assert sent.header("x-trace-me")


def test_connection_limits_changed_by_a_reload_take_effect(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    policy = standard_policy(upstream.base_url)
    gateway = start_gateway(policy)
    big_head = {"authorization": "Bearer sk-alpha", "x-padding": "p" * 6000}
    assert httpx.get(gateway.v1 + "/models", headers=big_head).status_code == 200
    _reload(gateway, policy.replace("server:\n", "server:\n  max_header_bytes: 4096\n  header_timeout_s: 0.3\n", 1))
    assert httpx.get(gateway.v1 + "/models", headers=big_head).status_code == 431
    host, port = gateway.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as slow:
        slow.sendall(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n")  # and never the rest of the head
        started = time.monotonic()
        while slow.recv(65536):
            pass
        assert time.monotonic() - started < 3  # dropped at the reloaded 0.3 s, not the default 10 s


def test_model_routing_and_resilience_changed_by_a_reload_take_effect(upstream: FakeOpenAIUpstream,
                                                                      start_gateway: Start) -> None:
    policy = standard_policy(upstream.base_url)
    gateway = start_gateway(policy)
    client = gateway.client()
    upstream.script(Behaviour.error(500))
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="chat-model", messages=ASK)
    _reload(gateway, policy.replace("  chat-model:\n", "  chat-model:\n    retries: 1\n    backoff: {initial_s: 0}\n"
                                    "    context_window: 50\n    fallbacks: {context_window: [embed-model]}\n", 1))
    upstream.reset()
    upstream.script(Behaviour.error(500))
    answer = client.chat.completions.with_raw_response.create(model="chat-model", messages=ASK)
    assert answer.headers["x-switchboard-route"] == "chat-model@upstream:500,chat-model@upstream:ok"
    long = [{"role": "user", "content": "word " * 100}]
    routed = client.chat.completions.with_raw_response.create(model="chat-model", messages=long)
    assert routed.headers["x-switchboard-model"] == "embed-model"  # over the reloaded context window
    # beta may not use chat-model: a fallback to it is skipped until the reload allows it as beta's fallback.
    fallback = policy.replace("  beta-model:\n", "  beta-model:\n    fallbacks: {default: [chat-model]}\n", 1)
    _reload(gateway, fallback)
    upstream.script(Behaviour.error(500))
    with pytest.raises(openai.APIStatusError):
        gateway.client("sk-beta").chat.completions.create(model="beta-model", messages=ASK)
    _reload(gateway, fallback.replace("    models: [beta-model]\n", "    models: [beta-model]\n"
                                      "    fallback_models: [chat-model]\n", 1))
    upstream.script(Behaviour.error(500))
    served = gateway.client("sk-beta").chat.completions.with_raw_response.create(model="beta-model", messages=ASK)
    assert served.headers["x-switchboard-model"] == "chat-model"


def test_limits_budgets_and_admission_changed_by_a_reload_take_effect(upstream: FakeOpenAIUpstream,
                                                                      start_gateway: Start) -> None:
    policy = standard_policy(upstream.base_url)
    gateway = start_gateway(policy)
    client = gateway.client()
    client.chat.completions.create(model="chat-model", messages=ASK)
    _reload(gateway, policy.replace(
        "    models: [chat-model, embed-model]\n", "    models: [chat-model, embed-model]\n"
        "    limits: {tpm: 100000}\n    budget: {tokens: 200, period: daily}\n", 1)
        + "admission: {default_completion_tokens: 7}\n")
    answer = client.chat.completions.with_raw_response.create(model="chat-model", messages=ASK)
    used = 100000 - int(answer.headers["x-ratelimit-remaining-tokens"])
    assert used < 30  # the prompt and the reloaded 7-token default, not the default 1,024
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="chat-model", messages=ASK, max_tokens=500)
    assert refused.value.code == "budget_exceeded"


def test_prices_changed_by_a_reload_take_effect(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    prices = "prices:\n  targets:\n    upstream:\n      upstream-chat: {input: 1.0, output: 1.0}\n"
    policy = standard_policy(upstream.base_url, extra=prices)
    gateway = start_gateway(policy)
    client = gateway.client()
    first = client.chat.completions.with_raw_response.create(model="chat-model", messages=ASK)
    _reload(gateway, policy.replace("{input: 1.0, output: 1.0}", "{input: 1000.0, output: 1000.0}"))
    second = client.chat.completions.with_raw_response.create(model="chat-model", messages=ASK)
    assert float(second.headers["x-switchboard-cost-usd"]) == pytest.approx(
        1000 * float(first.headers["x-switchboard-cost-usd"]))
    _reload(gateway, policy.replace("    targets:\n      - provider: upstream\n        model: upstream-chat\n",
                                    "    price: {input: 0.5, output: 0.5}\n    targets:\n      - provider: upstream\n"
                                    "        model: upstream-chat\n", 1))
    third = client.chat.completions.with_raw_response.create(model="chat-model", messages=ASK)
    assert float(third.headers["x-switchboard-cost-usd"]) == pytest.approx(
        0.5 * float(first.headers["x-switchboard-cost-usd"]))


def test_caching_changed_by_a_reload_takes_effect(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    policy = standard_policy(upstream.base_url)
    gateway = start_gateway(policy)
    client = gateway.client()
    assert "x-switchboard-cache" not in client.chat.completions.with_raw_response.create(
        model="chat-model", messages=ASK).headers
    _reload(gateway, policy.replace("        model: upstream-chat\n",
                                    "        model: upstream-chat\n    cache: {mode: exact}\n", 1))
    heard = [client.chat.completions.with_raw_response.create(model="chat-model", messages=ASK).headers[
        "x-switchboard-cache"] for _ in range(2)]
    assert heard == ["miss", "hit"]
    _reload(gateway, policy.replace("    models: [chat-model, embed-model]\n", "    models: [chat-model, embed-model]\n"
                                    "    cache: {mode: \"off\"}\n", 1).replace(
        "        model: upstream-chat\n", "        model: upstream-chat\n    cache: {mode: exact}\n", 1))
    assert "x-switchboard-cache" not in client.chat.completions.with_raw_response.create(
        model="chat-model", messages=ASK).headers  # the team's block replaces the model's


def test_trace_settings_changed_by_a_reload_take_effect(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    from tests.fakes.otlp_receiver import WaitingSpanExporter

    exporter = WaitingSpanExporter()
    policy = standard_policy(upstream.base_url)
    gateway = start_gateway(policy, span_exporter=exporter)
    gateway.client().chat.completions.create(model="chat-model", messages=ASK)
    _reload(gateway, policy + "telemetry:\n  traces: {record_content: [alpha], service_name: reloaded}\n")
    gateway.client().chat.completions.create(model="chat-model", messages=ASK)
    spans = exporter.wait_for_servers(2)
    servers = sorted((s for s in spans if s.kind.name == "SERVER"), key=lambda s: s.start_time or 0)
    assert [s.resource.attributes["service.name"] for s in servers] == ["switchboard", "reloaded"]
    assert "gen_ai.input.messages" not in servers[0].attributes
    assert "hi" in servers[1].attributes["gen_ai.input.messages"]


def test_health_checks_changed_by_a_reload_take_effect(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    policy = standard_policy(upstream.base_url)
    gateway = start_gateway(policy)
    # A probe of a path the upstream does not serve fails: the provider's targets are skipped.
    _reload(gateway, policy.replace("    api_key: sk-upstream-secret\n", "    api_key: sk-upstream-secret\n"
                                    "    health_check: {path: /no-such-probe, interval_s: 0.05, timeout_s: 1, "
                                    "unhealthy_after: 1}\n", 1))

    def refused() -> bool:
        try:
            gateway.client().chat.completions.create(model="chat-model", messages=ASK)
        except openai.APIStatusError as error:
            return error.status_code == 503
        return False

    assert _wait_for(refused)


def test_admin_keys_and_the_console_changed_by_a_reload_take_effect(upstream: FakeOpenAIUpstream,
                                                                    start_gateway: Start) -> None:
    policy = standard_policy(upstream.base_url)
    gateway = start_gateway(policy)
    admin = {"authorization": "Bearer sk-admin-reloaded"}
    assert httpx.get(gateway.base_url + "/admin/targets", headers=admin).status_code == 401
    with_admin = policy + f'admin:\n  keys: [{{id: ops, hash: "{key_hash("sk-admin-reloaded")}"}}]\n'
    _reload(gateway, with_admin)
    assert httpx.get(gateway.base_url + "/admin/targets", headers=admin).status_code == 200
    assert httpx.get(gateway.base_url + "/ui/", headers=admin).status_code == 200
    _reload(gateway, with_admin + "  console: {enabled: false}\n")
    assert httpx.get(gateway.base_url + "/ui/", headers=admin).status_code == 404


# --- every field of the schema: applied by a reload (and tested), or refused until a restart ---------------------

_BOUNDS = "tests/test_policy_reload.py::test_server_bounds_and_concurrency_changed_by_a_reload_take_effect"
_CONNECTIONS = "tests/test_policy_reload.py::test_connection_limits_changed_by_a_reload_take_effect"
_FIRST_BYTE = "tests/test_policy_reload.py::test_provider_timeouts_changed_by_a_reload_take_effect"
_TOTAL = "tests/test_policy_reload.py::test_a_provider_total_timeout_changed_by_a_reload_cuts_a_long_stream"
_POOL = "tests/test_policy_reload.py::test_a_provider_pool_size_and_connect_timeout_changed_by_a_reload_take_effect"
_PROVIDER = "tests/test_policy_reload.py::test_a_provider_address_key_and_headers_changed_by_a_reload_take_effect"
_MONITOR = "tests/test_policy_reload.py::test_health_checks_changed_by_a_reload_take_effect"
_ROUTING = "tests/test_policy_reload.py::test_model_routing_and_resilience_changed_by_a_reload_take_effect"
_LIMITS = "tests/test_policy_reload.py::test_limits_budgets_and_admission_changed_by_a_reload_take_effect"
_PRICES = "tests/test_policy_reload.py::test_prices_changed_by_a_reload_take_effect"
_CACHE = "tests/test_policy_reload.py::test_caching_changed_by_a_reload_takes_effect"
_TRACES = "tests/test_policy_reload.py::test_trace_settings_changed_by_a_reload_take_effect"
_ADMIN = "tests/test_policy_reload.py::test_admin_keys_and_the_console_changed_by_a_reload_take_effect"
_TEAMS = "tests/test_policy.py::test_reload_applies_a_valid_edit_without_restart"
_HIERARCHY = "tests/test_budget_hierarchy.py::test_organisation_and_end_user_settings_apply_on_reload"

# Field patterns (`*` one key or name, `**` a whole subtree) -> the test that changes them by a reload and sees the
# effect. A subtree maps to one test where one object, rebuilt from every reloaded policy, holds all of it: the
# model's route plan (gateway/routing/strategies.py `build_plan`), the provider and its pool
# (`Provider.pool_identity`), the
# limit rules (`build_rules`), the cache plan, the price book, the tracing settings (`Telemetry.configure`),
# the health monitor (`Monitor.apply`, which also subscribes KV events). A new field matching no pattern here and
# no RESTART_ONLY entry fails `test_every_policy_field_takes_effect_on_reload_or_is_refused`.
RELOADED = {
    "server.max_body_bytes": _BOUNDS,
    "server.max_header_bytes": _CONNECTIONS,
    "server.header_timeout_s": _CONNECTIONS,
    # Read through the same live accessor as the two above (gateway/http/connections.py).
    "server.body_timeout_s": _CONNECTIONS,
    "server.max_connections": _CONNECTIONS,
    "server.reload.**": "tests/test_cli.py::test_sighup_reloads_the_policy",
    "server.drain_s": "tests/test_cli.py::test_a_drain_set_by_a_reload_applies_to_the_next_sigterm",
    "providers.*.timeouts.first_byte_s": _FIRST_BYTE,
    "providers.*.timeouts.total_s": _TOTAL,
    "providers.*.timeouts.connect_s": _POOL,
    "providers.*.pool.**": _POOL,
    "providers.*.base_url": _PROVIDER,
    "providers.*.api_key": _PROVIDER,
    "providers.*.headers": _PROVIDER,
    "providers.*.request_id.**": _PROVIDER,
    "providers.*.kind": _PROVIDER,
    "providers.*.options.**": _PROVIDER,
    "providers.*.health_check.**": _MONITOR,
    "providers.*.metrics.**": _MONITOR,
    "providers.*.kv_events.**": _MONITOR,
    "models.*.targets[].model": "tests/test_policy.py::test_policy_swap_is_atomic_under_concurrent_requests",
    "models.*.targets[].**": _ROUTING,
    "models.*.owned_by": _ROUTING,
    "models.*.routing.**": _ROUTING,
    "models.*.retries": _ROUTING,
    "models.*.backoff.**": _ROUTING,
    "models.*.deadline_s": _ROUTING,
    "models.*.ttft_timeout_s": _ROUTING,
    "models.*.stream_idle_timeout_s": _ROUTING,
    "models.*.context_window": _ROUTING,
    "models.*.fallbacks.**": _ROUTING,
    "models.*.circuit_breaker.**": _ROUTING,
    "models.*.prompt_caching.**": _ROUTING,
    "models.*.cache.**": _CACHE,
    "models.*.price.**": _PRICES,
    "models.*.canary.**": "tests/test_experiments.py::test_every_experiment_setting_applies_on_reload",
    "models.*.shadow.**": "tests/test_experiments.py::test_every_experiment_setting_applies_on_reload",
    "prices.**": _PRICES,
    "teams.*.models": _TEAMS,
    "teams.*.keys[].id": _TEAMS,
    "teams.*.keys[].hash": _TEAMS,
    "teams.*.responses.**": _TEAMS,
    "teams.*.keys[].disabled": "tests/test_keys.py::test_revocation_applies_on_reload_wherever_the_key_lives",
    "teams.*.keys[].expires_at": "tests/test_keys.py::test_revocation_applies_on_reload_wherever_the_key_lives",
    "teams.*.max_concurrent": _BOUNDS,
    "teams.*.keys[].max_concurrent": _BOUNDS,
    "teams.*.fallback_models": _ROUTING,
    "teams.*.limits.**": "tests/test_limits_gateway.py::test_editing_the_policy_file_keeps_counted_usage",
    "teams.*.model_limits.**": _LIMITS,
    "teams.*.keys[].limits.**": _LIMITS,
    "teams.*.budget.**": _LIMITS,
    "teams.*.keys[].budget.**": _LIMITS,
    "teams.*.cache.**": _CACHE,
    "admission.**": _LIMITS,
    "admin.keys[].**": _ADMIN,
    "admin.console.**": _ADMIN,
    "keys_file": "tests/test_keys.py::test_a_new_key_is_shown_once_and_works_after_the_reload",
    "telemetry.traces.**": _TRACES,
    # Looked up in the live policy for each alert fired (gateway/accounting/alerts.py).
    "alerts.webhooks.**": "tests/test_alerts.py::test_a_webhook_changed_by_a_reload_gets_the_next_alert",
    "teams.*.tags.**": "tests/test_tags.py::test_tag_rules_apply_on_reload",
    "organizations.**": _HIERARCHY,
    "teams.*.end_users.**": _HIERARCHY,
    "tags.**": "tests/test_tags.py::test_tag_rules_apply_on_reload",
}
# Fields a valid file cannot change.
FIXED = {"version"}


def _schema_fields(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every leaf field of `model` as a path: `teams.*.keys[].id`; a provider's fields over every kind."""
    fields = set()
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        nested = _nested_models(info.annotation)
        if not nested:
            fields.add(path)
        for suffix, inner in nested:
            fields |= _schema_fields(inner, path + suffix)
    return fields


def _nested_models(annotation: Any) -> list[tuple[str, type[BaseModel]]]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    if origin is typing.Annotated:
        return _nested_models(args[0])
    if origin is list:
        return [("[]" + suffix, inner) for suffix, inner in _nested_models(args[0])]
    if origin is dict:
        return [(".*" + suffix, inner) for suffix, inner in _nested_models(args[1])]
    if origin in (typing.Union, types.UnionType):
        return [found for arg in args for found in _nested_models(arg)]
    return []


def _matches(pattern: str, field: str) -> bool:
    regex = re.escape(pattern).replace(r"\*\*", ".+").replace(r"\*", "[^.]+")
    return re.fullmatch(regex, field) is not None


def test_every_policy_field_takes_effect_on_reload_or_is_refused() -> None:
    fields = _schema_fields(PolicyDocument)
    assert len(fields) > 200  # the walk reached the nested models (providers of every kind included)
    restart_only = [f for f in fields if any(f == path or f.startswith(path + ".") for path in RESTART_ONLY)]
    reloaded = [f for f in fields if any(_matches(pattern, f) for pattern in RELOADED)]
    neither = sorted(set(fields) - set(restart_only) - set(reloaded) - FIXED)
    assert not neither, ("policy fields with neither a reload test (RELOADED) nor a restart refusal "
                         f"(gateway/compiled/store.py RESTART_ONLY): {neither}")
    assert not set(restart_only) & set(reloaded), "a field cannot both apply on reload and need a restart"
    for pattern in RELOADED:  # no stale entries
        assert any(_matches(pattern, f) for f in fields), f"{pattern} matches no field of the schema"
    for path in RESTART_ONLY:
        assert any(f == path or f.startswith(path + ".") for f in fields), f"{path} is not a field of the schema"
    for test in set(RELOADED.values()):  # every test named exists
        module, name = test.split("::")
        found = importlib.import_module(module.removesuffix(".py").replace("/", "."))
        assert callable(getattr(found, name, None)), test
