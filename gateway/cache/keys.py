"""Which requests may be cached, and the keys their answers are stored under.

The exact key is one hash over the scope, the endpoint and the request as
canonical JSON (keys sorted at every level), minus the fields that cannot
change the answer. Everything else — messages, tools, response_format,
sampling parameters, `n` — is part of it, so two requests share an entry only
when the upstream would have been asked the same thing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import orjson

from gateway.cache.plan import CacheRule
from providers.base import Endpoint

# Fields that do not change what the model answers (who asks, how it is
# delivered, what is logged or stored upstream), so they stay out of the key.
IGNORED_FIELDS = frozenset({
    "user", "stream", "stream_options", "metadata", "safety_identifier", "prompt_cache_key",
    "prompt_cache_options", "prompt_cache_retention", "store",
})
CACHEABLE_FINISH = frozenset({"stop", "tool_calls", "length"})
KEY_BYTES = 20  # length of an exact key (a blake2b digest)
_SORTED = orjson.OPT_SORT_KEYS
_PERSON = {endpoint: endpoint.value.encode() for endpoint in Endpoint}  # Enum.value is slow on a hot path


def scope_id(rule: CacheRule, team: str, key_id: str) -> bytes:
    """Who shares entries under `rule`: the key, the team, or everyone."""
    if rule.scope == "team":
        return b"team\x00" + team.encode()
    if rule.scope == "key":
        return b"key\x00" + key_id.encode()
    return b"global"


def cacheable(rule: CacheRule, endpoint: Endpoint, body: Mapping[str, Any]) -> bool:
    """Whether this request's answer may be served from, or stored in, the cache."""
    if endpoint is Endpoint.EMBEDDINGS:
        return True  # embeddings are deterministic
    if endpoint is Endpoint.RESPONSES:
        return False  # entries are assembled in chat shape; native Responses bodies are not
    # Log probabilities are not kept when a stream is assembled into an entry.
    if body.get("logprobs") or body.get("top_logprobs"):
        return False
    if rule.only_deterministic:
        seed = body.get("seed")
        return body.get("temperature") == 0 or (isinstance(seed, int) and not isinstance(seed, bool))
    return True


def exact_key(scope: bytes, endpoint: Endpoint, body: Mapping[str, Any], model: str) -> bytes | None:
    """The entry key of this request to public `model`; None if it cannot be encoded."""
    filtered = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    # The model that serves it, which admission may have changed (a budget downgrade).
    filtered["model"] = model
    try:
        canonical = orjson.dumps(filtered, option=_SORTED)
    except TypeError:
        return None
    # Keyed by the scope's digest, so no request body can collide into another scope.
    return hashlib.blake2b(canonical, digest_size=KEY_BYTES, person=_PERSON[endpoint],
                           key=_scope_digest(scope)).digest()


@lru_cache(maxsize=4096)
def _scope_digest(scope: bytes) -> bytes:
    # Scopes are few (keys and teams of the policy) and hashed on every lookup.
    return hashlib.sha256(scope).digest()


def semantic_parts(scope: bytes, endpoint: Endpoint, body: Mapping[str, Any], model: str
                   ) -> tuple[bytes, str] | None:
    """(partition, text) for semantic matching, or None when the request has no plain-text last user turn.

    The partition hashes everything but that turn — system prompt, earlier
    turns, tools, sampling parameters — so only requests that differ in the
    wording of their last question can ever match each other.
    """
    filtered = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    filtered["model"] = model
    if endpoint is Endpoint.CHAT:
        messages = filtered.get("messages")
        if not isinstance(messages, list):
            return None
        last = next((i for i in range(len(messages) - 1, -1, -1)
                     if isinstance(messages[i], dict) and messages[i].get("role") == "user"), None)
        if last is None or not isinstance(messages[last].get("content"), str):
            return None
        text = messages[last]["content"]
        turn = {k: v for k, v in messages[last].items() if k != "content"}
        filtered["messages"] = [*messages[:last], turn, *messages[last + 1:]]
    elif endpoint is Endpoint.COMPLETIONS:
        text = filtered.pop("prompt", None)
        if not isinstance(text, str):
            return None
    else:
        return None
    try:
        canonical = orjson.dumps(filtered, option=_SORTED)
    except TypeError:
        return None
    partition = hashlib.blake2b(canonical, digest_size=20, person=b"semantic" + endpoint.value.encode()[:8],
                                key=_scope_digest(scope)).digest()
    return partition, text
