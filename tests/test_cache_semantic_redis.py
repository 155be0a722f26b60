"""Semantic mode with the Redis backend: the vector index lives in Redis, so replicas share it.

Two gateways with caches of their own (as two replicas would be) share the
real Redis at 127.0.0.1:6379 under a key prefix unique to the test.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from gateway.cache import ResponseCache
from tests.conftest import RunningGateway
from tests.fakes.embeddings_upstream import WordEmbeddingsUpstream, similarity
from tests.test_cache_semantic import ASKED, CLOSE, FAR, ask, chat_calls, semantic_policy

Start = Callable[..., RunningGateway]
REDIS_URL = "redis://127.0.0.1:6379/0"
THRESHOLD = 0.85


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def prefix() -> Iterator[str]:
    prefix = f"sbtest:semantic:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


def redis_backend(prefix: str, url: str = REDIS_URL, extra: str = "") -> str:
    return f'backend: redis\n      url: "{url}"\n      key_prefix: "{prefix}"\n      ttl_s: 60{extra}'


def contents(prefix: str) -> tuple[int, set[bytes]]:
    """(answers stored, vector members stored) under `prefix`."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=prefix + "*"))
        partitions = [k for k in keys if k.startswith(f"{prefix}sem:".encode())]
        members = {m for k in partitions for m in client.zrange(k, 0, -1)}
        return len(keys) - len(partitions), members
    finally:
        client.close()


def stored(prefix: str, answers: int, vectors: int | None = None, timeout: float = 5.0) -> set[bytes]:
    """Wait until the answers and their vectors have landed in Redis (both are written in the background)."""
    vectors = answers if vectors is None else vectors
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        count, members = contents(prefix)
        if count >= answers and len(members) >= vectors:
            return members
        time.sleep(0.01)
    raise AssertionError(f"{answers} answers were not stored under {prefix}")


def test_a_question_stored_by_one_replica_is_matched_by_another(words: WordEmbeddingsUpstream, start_gateway: Start,
                                                                 prefix: str) -> None:
    policy = semantic_policy(words.base_url, THRESHOLD, redis_backend(prefix))
    first_replica = start_gateway(policy, cache=ResponseCache())
    second_replica = start_gateway(policy, cache=ResponseCache())
    answer, headers = ask(first_replica, ASKED)
    assert headers["x-switchboard-cache"] == "miss"
    stored(prefix, 1)
    close, headers = ask(second_replica, CLOSE)
    assert headers["x-switchboard-cache"] == "hit"
    assert float(headers["x-switchboard-cache-similarity"]) == pytest.approx(similarity(ASKED, CLOSE), abs=1e-3)
    assert close == answer == f"echo: {ASKED}"
    far, headers = ask(second_replica, FAR)
    assert headers["x-switchboard-cache"] == "miss" and far == f"echo: {FAR}"
    assert chat_calls(words) == 2


def test_another_team_never_matches_a_shared_question(words: WordEmbeddingsUpstream, start_gateway: Start,
                                                     prefix: str) -> None:
    policy = semantic_policy(words.base_url, THRESHOLD, redis_backend(prefix))
    first_replica = start_gateway(policy, cache=ResponseCache())
    second_replica = start_gateway(policy, cache=ResponseCache())
    ask(first_replica, ASKED, key="sk-alpha")
    stored(prefix, 1)
    answer, headers = ask(second_replica, CLOSE, key="sk-beta")
    assert headers["x-switchboard-cache"] == "miss" and answer == f"echo: {CLOSE}"
    _, headers = ask(second_replica, CLOSE, key="sk-alpha")
    assert headers["x-switchboard-cache"] == "hit"
    assert chat_calls(words) == 2


def test_shared_vectors_expire_with_their_answers(words: WordEmbeddingsUpstream, start_gateway: Start,
                                                 prefix: str) -> None:
    clock = Clock()
    policy = semantic_policy(words.base_url, THRESHOLD, redis_backend(prefix))
    first_replica = start_gateway(policy, cache=ResponseCache(clock=clock))
    second_replica = start_gateway(policy, cache=ResponseCache(clock=clock))
    ask(first_replica, ASKED)
    stored(prefix, 1)
    clock.now += 59
    assert ask(second_replica, CLOSE)[1]["x-switchboard-cache"] == "hit"
    clock.now += 2  # past ttl_s: 60
    answer, headers = ask(second_replica, CLOSE)
    assert headers["x-switchboard-cache"] == "miss" and answer == f"echo: {CLOSE}"
    # Redis drops the partition by itself once its newest vector has expired.
    client = redis.Redis.from_url(REDIS_URL)
    try:
        ttls = [client.pttl(k) for k in client.scan_iter(match=f"{prefix}sem:*")]
    finally:
        client.close()
    assert ttls and all(0 < ttl <= 60_000 for ttl in ttls)


def test_only_the_newest_candidates_of_a_partition_are_compared(words: WordEmbeddingsUpstream,
                                                                start_gateway: Start, prefix: str) -> None:
    policy = semantic_policy(words.base_url, THRESHOLD, redis_backend(prefix)).replace(
        f"threshold: {THRESHOLD}}}", f"threshold: {THRESHOLD}, candidates: 1}}")
    gateway = start_gateway(policy, cache=ResponseCache())
    ask(gateway, ASKED)
    first = stored(prefix, 1)
    ask(gateway, FAR)  # newer, in the same partition: the only candidate kept
    deadline = time.monotonic() + 5
    while contents(prefix)[1] in (first, set()) or contents(prefix)[0] < 2:
        assert time.monotonic() < deadline, "the newer vector never replaced the older"
        time.sleep(0.01)
    assert len(contents(prefix)[1]) == 1
    _, headers = ask(gateway, CLOSE)
    assert headers["x-switchboard-cache"] == "miss"
    assert chat_calls(words) == 3


def test_an_unreachable_redis_leaves_semantic_mode_a_miss(words: WordEmbeddingsUpstream, start_gateway: Start,
                                                         prefix: str) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = redis_backend(prefix, f"redis://127.0.0.1:{port}/0", "\n      timeout_s: 0.2")
    gateway = start_gateway(semantic_policy(words.base_url, THRESHOLD, backend), cache=ResponseCache())
    for text in (ASKED, CLOSE):
        answer, headers = ask(gateway, text)
        assert headers["x-switchboard-cache"] == "miss" and answer == f"echo: {text}"
    assert chat_calls(words) == 2
