"""Hostile tenants: team beta attacks the gateway; team alpha's answers, limits and data stay its own.

Each test runs one class of attack from issue 14 against a real gateway (uvicorn with the guarded protocol,
gateway/http/connections.py) over real sockets and the openai SDK, and checks what a user or operator would.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ADMIN_KEY, ADMIN_POLICY, RunningGateway, free_port, metrics_text, standard_policy
from tests.fakes import Behaviour, FakeOpenAIUpstream

Start = Callable[..., RunningGateway]
ASK = [{"role": "user", "content": "hello there"}]


def _series(text: str) -> list[tuple[str, dict[str, str]]]:
    return [(s.name, s.labels) for f in text_string_to_metric_families(text) for s in f.samples]


def _server(policy_text: str, server_lines: str) -> str:
    """The standard policy with more `server:` settings (indented two spaces each)."""
    return policy_text.replace("server:\n", "server:\n" + server_lines, 1)


def _connect(gateway: RunningGateway, timeout: float = 5.0) -> socket.socket:
    host, port = gateway.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket timeout: the test's deadline)."""
    received = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return received
        received += chunk


# --- 1. bounded metric cardinality ---------------------------------------------------------------------


def test_invented_model_names_never_become_metric_labels(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    gateway = start_gateway(standard_policy(upstream.base_url, extra=ADMIN_POLICY))
    beta = gateway.client("sk-beta")
    gateway.client().chat.completions.create(model="chat-model", messages=ASK)
    before = len(metrics_text(gateway))
    invented = [f"model-{i}-" + os.urandom(8).hex() * 64 for i in range(40)]  # ~1 KB each
    for name in invented:
        with pytest.raises(openai.NotFoundError):
            beta.chat.completions.create(model=name, messages=ASK)
    gateway.usage.wait_for(41)

    text = metrics_text(gateway)
    assert not any(name[:40] in text for name in invented)
    models = {labels.get("model") for _, labels in _series(text) if labels.get("team") == "beta"}
    assert models == {"other"}
    # 40 requests under one label: the exposition grew by a few series, not by 40 model names.
    assert len(text) - before < 8_000
    requests = [(n, lab) for n, lab in _series(text) if n == "switchboard_requests_total" and lab["team"] == "beta"]
    assert requests == [("switchboard_requests_total", {"team": "beta", "model": "other", "provider": "none",
                                                        "status": "404"})]


def test_failed_requests_create_no_token_or_cost_series(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    gateway = start_gateway(standard_policy(upstream.base_url, extra=ADMIN_POLICY))
    upstream.script(Behaviour.error(500))
    with pytest.raises(openai.InternalServerError):
        gateway.client("sk-beta").chat.completions.create(model="beta-model", messages=ASK)
    gateway.usage.wait_for(1)
    series = _series(metrics_text(gateway))
    assert ("switchboard_requests_total", {"team": "beta", "model": "beta-model", "provider": "none",
                                           "status": "502"}) in series
    billed = [n for n, labels in series if labels.get("team") == "beta"
              and n.startswith(("switchboard_tokens", "switchboard_cost_usd"))]
    assert billed == []
    assert not any(n.startswith("gen_ai_client_token_usage") for n, _ in series)


def test_bad_keys_are_counted_by_reason_never_by_key(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    gateway = start_gateway(standard_policy(upstream.base_url, extra=ADMIN_POLICY))
    keys = [f"sk-guess-{i}-{os.urandom(6).hex()}" for i in range(5)]
    for key in keys:
        response = httpx.post(gateway.v1 + "/chat/completions", headers={"authorization": f"Bearer {key}"},
                              json={"model": "chat-model", "messages": ASK})
        assert response.status_code == 401
    assert httpx.post(gateway.v1 + "/embeddings", json={"model": "embed-model", "input": "x"}).status_code == 401
    text = metrics_text(gateway)
    assert not any(key in text for key in keys)
    series = dict((labels.get("reason"), n) for n, labels in _series(text) if n == "switchboard_auth_rejections_total")
    assert set(series) == {"invalid_api_key", "missing_api_key"}
    samples = {s.labels["reason"]: s.value for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == "switchboard_auth_rejections_total"}
    assert samples == {"invalid_api_key": 5, "missing_api_key": 1}


# --- 2. admin surfaces tenants cannot read ---------------------------------------------------------------


def test_metrics_and_admin_need_the_admin_key_on_the_tenant_port(upstream: FakeOpenAIUpstream,
                                                                start_gateway: Start) -> None:
    gateway = start_gateway(standard_policy(upstream.base_url, extra=ADMIN_POLICY))
    gateway.client().chat.completions.create(model="chat-model", messages=ASK)
    for headers in ({}, {"authorization": "Bearer sk-beta"}, {"authorization": "Bearer sk-alpha"}):
        response = httpx.get(gateway.base_url + "/metrics", headers=headers)
        assert response.status_code == 401
        assert "alpha" not in response.text and "chat-model" not in response.text
        assert response.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
    assert 'team="alpha"' in metrics_text(gateway)


def test_an_admin_listener_serves_the_admin_surfaces_and_the_tenant_port_hides_them(
        upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    policy = _server(standard_policy(upstream.base_url, extra=ADMIN_POLICY),
                     f"  admin: {{host: 127.0.0.1, port: {free_port()}}}\n")
    gateway = start_gateway(policy)
    assert gateway.admin_url is not None
    gateway.client().chat.completions.create(model="chat-model", messages=ASK)
    admin_header = {"authorization": f"Bearer {ADMIN_KEY}"}
    for path in ("/metrics", "/admin/targets", "/ui", "/ui/index.html"):
        response = httpx.get(gateway.base_url + path, headers=admin_header)
        assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_url", path
    scraped = httpx.get(gateway.admin_url + "/metrics")  # Prometheus: no credentials, a private address
    assert scraped.status_code == 200 and 'team="alpha"' in scraped.text
    assert httpx.get(gateway.admin_url + "/admin/targets").status_code == 401
    assert httpx.get(gateway.admin_url + "/admin/targets", headers=admin_header).status_code == 200
    assert httpx.get(gateway.admin_url + "/readyz").status_code == 200
    inference = httpx.post(gateway.admin_url + "/v1/chat/completions", headers={"authorization": "Bearer sk-alpha"},
                           json={"model": "chat-model", "messages": ASK})
    assert inference.status_code == 404


def test_the_admin_listener_can_require_the_key_for_metrics(upstream: FakeOpenAIUpstream,
                                                            start_gateway: Start) -> None:
    policy = _server(standard_policy(upstream.base_url, extra=ADMIN_POLICY),
                     f"  admin: {{host: 127.0.0.1, port: {free_port()}, metrics_need_key: true}}\n")
    gateway = start_gateway(policy)
    assert httpx.get(f"{gateway.admin_url}/metrics").status_code == 401
    response = httpx.get(f"{gateway.admin_url}/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200


# --- 3. no work before authentication ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses",
                                  "/v1/messages"])
def test_an_unauthenticated_request_is_refused_before_its_body_is_read(
        upstream: FakeOpenAIUpstream, start_gateway: Start, path: str) -> None:
    gateway = start_gateway(standard_policy(upstream.base_url))
    with _connect(gateway) as sock:
        # Declares 4 MB and sends none of it: the answer must not wait for the body.
        sock.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-nobody\r\n"
                     f"x-api-key: sk-nobody\r\ncontent-type: application/json\r\n"
                     f"content-length: {4 * 1024 * 1024}\r\n\r\n".encode())
        reply = _read_until_closed(sock)  # the server closes: the unread body is not waited for
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401")
    assert b"connection: close" in head.lower()
    if path == "/v1/messages":
        assert b'"type":"error"' in body and b"authentication_error" in body  # Anthropic's shape
    else:
        assert b'"code":"invalid_api_key"' in body
    assert upstream.request_count == 0


def test_slow_headers_and_slow_bodies_are_dropped(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    gateway = start_gateway(_server(standard_policy(upstream.base_url),
                                    "  header_timeout_s: 0.5\n  body_timeout_s: 0.5\n"))
    with _connect(gateway) as slow_head:
        slow_head.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")  # ...and never the rest
        started = time.monotonic()
        assert _read_until_closed(slow_head) == b""
        assert time.monotonic() - started < 4
    with _connect(gateway) as slow_body:
        slow_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-alpha\r\n"
                          b"content-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"model\":")
        started = time.monotonic()
        assert _read_until_closed(slow_body) == b""
        assert time.monotonic() - started < 4
    # A normal client on the same gateway is served throughout.
    assert gateway.client().chat.completions.create(model="chat-model", messages=ASK).choices


def test_an_oversized_request_head_gets_431(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    gateway = start_gateway(standard_policy(upstream.base_url))
    with _connect(gateway) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"x-pad: " + b"a" * 70_000 + b"\r\n\r\n")
        reply = _read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 431") and b"request_header_too_large" in reply


def test_connections_beyond_the_cap_are_closed(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    gateway = start_gateway(_server(standard_policy(upstream.base_url), "  max_connections: 3\n"))
    held = [_connect(gateway) for _ in range(3)]
    try:
        for sock in held:  # each connection is accepted and serves a request
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        with _connect(gateway) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):  # closed with our request unread: the same refusal
                assert _read_until_closed(extra) == b""
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # the server notices the closed connections, then serves again
        try:
            if httpx.get(gateway.base_url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the gateway never served again after connections were closed"


def test_a_key_over_its_concurrency_limit_is_refused_and_other_teams_are_not(upstream: FakeOpenAIUpstream,
                                                                              start_gateway: Start) -> None:
    policy = standard_policy(upstream.base_url).replace(
        "      - id: beta-key\n", "      - id: beta-key\n        max_concurrent: 1\n", 1)
    gateway = start_gateway(policy)
    upstream.script(Behaviour.hanging())
    beta = gateway.client("sk-beta", timeout=10)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(beta.chat.completions.create, model="beta-model", messages=ASK)
        assert upstream.wait_for_requests(1)
        with pytest.raises(openai.RateLimitError) as refused:
            beta.chat.completions.create(model="beta-model", messages=ASK)
        assert refused.value.code == "concurrency_limit_exceeded"
        assert gateway.client().chat.completions.create(model="chat-model", messages=ASK).choices  # alpha: served
        upstream.release()
        assert first.result(timeout=10).choices
    assert beta.chat.completions.create(model="beta-model", messages=ASK).choices  # the slot came back


# --- 6. upstream text is the operator's, not the tenant's ----------------------------------------------------

OPERATOR_429 = ("Rate limit reached for gpt-4o in organization org-OperatorsOrg1234567 on tokens per min (TPM): "
                "Limit 30000, Used 29796, Requested 1146. Please try again in 1.884s.")
OPERATOR_TEXT = ("org-OperatorsOrg1234567", "30000", "29796", "1146")


def test_upstream_errors_reach_tenants_without_the_operators_account(upstream: FakeOpenAIUpstream,
                                                                      start_gateway: Start) -> None:
    gateway = start_gateway(standard_policy(upstream.base_url, extra=ADMIN_POLICY))
    upstream.script(Behaviour.error(429, OPERATOR_429, code="rate_limit_exceeded", type="tokens"))
    with pytest.raises(openai.RateLimitError) as limited:
        gateway.client("sk-beta").chat.completions.create(model="beta-model", messages=ASK)
    error = limited.value.body
    assert isinstance(error, dict)
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens"  # what a client acts on stays
    assert "Rate limit reached" in error["message"]
    assert not any(text in error["message"] for text in OPERATOR_TEXT)

    upstream.script(Behaviour.error_mid_stream(after_chunks=1, message=OPERATOR_429))
    with pytest.raises(openai.APIError) as midway:
        list(gateway.client("sk-beta").chat.completions.create(model="beta-model", messages=ASK, stream=True))
    assert not any(text in str(midway.value) for text in OPERATOR_TEXT)

    targets = httpx.get(gateway.base_url + "/admin/targets", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert targets.status_code == 200 and "Rate limit reached" in targets.text
    assert not any(text in targets.text for text in OPERATOR_TEXT)


# --- 8. fallbacks respect the caller's access ----------------------------------------------------------------

FALLBACK_POLICY = """
  shared-model:
    fallbacks: {default: [premium-model, cheap-model]}
    targets: [{provider: upstream, model: upstream-shared}]
  premium-model:
    targets: [{provider: upstream, model: upstream-premium}]
  cheap-model:
    targets: [{provider: upstream, model: upstream-cheap}]
"""


def test_a_fallback_the_team_may_not_use_is_skipped(upstream: FakeOpenAIUpstream, start_gateway: Start) -> None:
    policy = standard_policy(upstream.base_url).replace("models:\n", "models:\n" + FALLBACK_POLICY, 1)
    policy = policy.replace("    models: [beta-model]\n", "    models: [beta-model, shared-model]\n"
                            "    fallback_models: [cheap-model]\n", 1)
    policy = policy.replace("    models: [chat-model, embed-model]\n",
                            "    models: [chat-model, embed-model, shared-model, premium-model]\n", 1)
    gateway = start_gateway(policy)
    upstream.script(Behaviour.error(500))  # shared-model fails once
    answer = gateway.client("sk-beta").chat.completions.with_raw_response.create(model="shared-model", messages=ASK)
    # beta may not use premium-model and the policy does not allow it as beta's fallback: cheap-model answers.
    assert answer.headers["x-switchboard-model"] == "cheap-model"
    assert [r.json["model"] for r in upstream.requests] == ["upstream-shared", "upstream-cheap"]
    upstream.reset()
    upstream.script(Behaviour.error(500))
    answer = gateway.client().chat.completions.with_raw_response.create(model="shared-model", messages=ASK)
    assert answer.headers["x-switchboard-model"] == "premium-model"  # alpha may use it


# --- 5. one tenant cannot stall the others -------------------------------------------------------------------


def _long_prompt(chars: int) -> str:
    rng = __import__("random").Random(5)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(4000)]
    text = " ".join(rng.choices(words, k=chars // 5))
    return text[:chars]


@pytest.mark.slow  # ~40 s on a busy 2-core machine: 4 MB prompts through the gateway and the fake upstream
def test_a_huge_prompt_does_not_stall_another_teams_requests(upstream: FakeOpenAIUpstream,
                                                             start_gateway: Start) -> None:
    # beta's token limit makes admission count its 4 MB prompt: seconds of tiktoken, in a worker thread.
    policy = standard_policy(upstream.base_url).replace("  max_body_bytes: 65536\n", "  max_body_bytes: 8388608\n")
    policy = policy.replace("first_byte_s: 2, total_s: 10", "first_byte_s: 60, total_s: 120")
    policy = policy.replace("    models: [beta-model]\n", "    models: [beta-model]\n    limits: {tpm: 100000000}\n")
    gateway = start_gateway(policy)
    alpha = gateway.client(timeout=30)
    alpha.chat.completions.create(model="chat-model", messages=ASK)  # warm
    prompt = _long_prompt(4 * 1024 * 1024)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        huge = pool.submit(gateway.client("sk-beta", timeout=120).chat.completions.create, model="beta-model",
                           messages=[{"role": "user", "content": prompt}], max_tokens=5)
        latencies = []
        while not huge.done():
            started = time.perf_counter()
            alpha.chat.completions.create(model="chat-model", messages=ASK)
            latencies.append(time.perf_counter() - started)
        assert huge.result().choices
    # While beta's prompt was read, counted and sent, alpha kept being served. Counting it on the event loop
    # stalled alpha for 10 s here (load average 17 on 2 cores); off the loop the slowest alpha request took
    # 0.4-1.5 s, the rest being the 4 MB JSON parsed and re-sent and this process's own threads sharing a GIL.
    assert len(latencies) >= 3, latencies
    assert max(latencies) < 3.0, latencies


# --- the whole class at once: memory stays bounded --------------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@pytest.mark.slow  # 11,000 requests against a gateway process: ~1-2 minutes on 2 busy cores
def test_rss_stays_flat_over_ten_thousand_hostile_requests(tmp_path: Path) -> None:
    import asyncio

    from tests.conftest import key_hash
    from tests.fakes.state_stores import GatewayProcess

    policy = tmp_path / "policy.yaml"
    policy.write_text(f"""
version: 1
server: {{max_body_bytes: 65536}}
providers:
  mock: {{kind: mock, options: {{first_token_ms: 0, token_interval_ms: 0}}}}
models:
  chat: {{targets: [{{provider: mock, model: mock-gpt-4o}}]}}
  secret: {{targets: [{{provider: mock, model: mock-secret}}]}}
teams:
  alpha:
    keys: [{{id: alpha, hash: "{key_hash('sk-alpha')}"}}]
    models: [chat, secret]
  beta:
    keys: [{{id: beta, hash: "{key_hash('sk-beta')}", max_concurrent: 2}}]
    models: [chat]
""")
    gateway = GatewayProcess(policy, tmp_path / "gateway.log").start(timeout=120)  # a loaded 2-core box
    assert gateway.process is not None
    rng = __import__("random").Random(14)

    def hostile(i: int) -> tuple[str, dict[str, str], bytes]:
        beta = {"authorization": "Bearer sk-beta"}
        kind = i % 6
        if kind == 0:  # an invented model name, a new one every time
            return "/v1/chat/completions", beta, orjson.dumps({"model": f"m-{i}-{rng.random()}" * 1600,
                                                              "messages": ASK})
        if kind == 1:  # a guessed key, a new one every time
            return "/v1/chat/completions", {"authorization": f"Bearer sk-{i}-{rng.random()}"}, b"{}"
        if kind == 2:  # another team's model
            return "/v1/chat/completions", beta, orjson.dumps({"model": "secret", "messages": ASK})
        if kind == 3:  # not JSON
            return "/v1/embeddings", beta, os.urandom(64)
        if kind == 4:  # too large
            return "/v1/completions", beta, b'{"model": "chat", "prompt": "' + b"a" * 70_000 + b'"}'
        return "/v1/chat/completions", beta, orjson.dumps({"model": "chat", "messages": ASK, "max_tokens": 4})

    async def attack(first: int, count: int) -> None:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
            async def worker(offset: int) -> None:
                for i in range(first + offset, first + count, 8):
                    path, headers, body = hostile(i)
                    response = await client.post(path, headers=headers, content=body)
                    assert response.status_code < 500, response.text

            await asyncio.gather(*(worker(offset) for offset in range(8)))

    try:
        asyncio.run(attack(0, 1_000))  # warm: first-use allocations, arenas, caches
        before = _rss_bytes(gateway.process.pid)
        asyncio.run(attack(1_000, 10_000))
        grown = _rss_bytes(gateway.process.pid) - before
        assert grown < 50 * 1024 * 1024, f"RSS grew by {grown / 1e6:.1f} MB"
        alpha = httpx.post(gateway.base_url + "/v1/chat/completions", headers={"authorization": "Bearer sk-alpha"},
                           json={"model": "secret", "messages": ASK})
        assert alpha.status_code == 200  # team alpha is still served
    finally:
        gateway.terminate()
