"""Span attributes: GenAI semantic conventions, the `switchboard.*` namespace and OpenInference.

Pure functions from the request's facts (its body, its settled usage record)
to attribute dicts, each built once per request when its trace finishes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from providers.base import UpstreamFailed

if TYPE_CHECKING:
    from gateway.accounting.usage import UsageRecord
    from gateway.policy.schema import TracesPolicy

OPERATION = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings", "responses": "chat"}
# gen_ai.provider.name values from the GenAI conventions; self-hosted kinds use their own name.
GENAI_PROVIDER = {"openai": "openai", "anthropic": "anthropic", "gemini": "gcp.gemini",
                  "vertex_ai": "gcp.vertex_ai", "azure": "azure.ai.openai", "azure_openai": "azure.ai.openai",
                  "mistral": "mistral_ai", "groq": "groq", "together": "together_ai", "bedrock": "aws.bedrock"}
_REQUEST_PARAMS = (("temperature", "gen_ai.request.temperature"), ("top_p", "gen_ai.request.top_p"),
                   ("top_k", "gen_ai.request.top_k"), ("frequency_penalty", "gen_ai.request.frequency_penalty"),
                   ("presence_penalty", "gen_ai.request.presence_penalty"), ("seed", "gen_ai.request.seed"))


# Span kinds as each observability tool reads them. Phoenix prices and sums every span whose
# OpenInference kind is LLM; LangSmith rolls usage up over `llm` runs; so exactly one kind of
# span - an upstream attempt - may claim to be an LLM call, and the request's span is a chain.
CHAIN_KINDS = {"openinference.span.kind": "CHAIN", "langsmith.span.kind": "chain"}
LLM_KINDS = {"openinference.span.kind": "LLM", "langsmith.span.kind": "llm"}


def attempt_kind_attributes(settings: TracesPolicy, model: str, provider: str) -> dict[str, Any]:
    """The kind of an attempt's CLIENT span (LLM, or a chain when the client traces its own LLM call)."""
    if settings.attempt_span_kind == "chain":
        return dict(CHAIN_KINDS)
    attributes: dict[str, Any] = dict(LLM_KINDS)
    if settings.openinference:
        attributes["llm.model_name"] = model
        attributes["llm.provider"] = provider
    return attributes


def attempt_usage_attributes(record: UsageRecord, settings: TracesPolicy,
                             params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The answering attempt's usage, TTFT and cost, under the GenAI and (optionally) OpenInference names.

    A chain-kind attempt carries none of it: the client's own LLM span already counts those tokens.
    """
    attributes: dict[str, Any] = {}
    if record.time_to_first_token_ms is not None:
        attributes["gen_ai.response.time_to_first_chunk"] = record.time_to_first_token_ms / 1000
    if record.cost_usd is not None:
        attributes["switchboard.cost_usd"] = record.cost_usd
        attributes["switchboard.price_version"] = record.price_version
    if settings.attempt_span_kind == "chain":
        return attributes
    usage = record.usage
    if usage is not None:
        attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
        attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
        attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
        if usage.cache_write_tokens:
            attributes["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_write_tokens
        if usage.reasoning_tokens:
            attributes["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
    if settings.openinference:
        attributes.update(openinference_attributes(record, params))
    return attributes


def record_attributes(record: UsageRecord) -> dict[str, Any]:
    """The SERVER span's attributes from the settled usage record.

    The SERVER span is a chain with no model and no usage under any tool's names (`gen_ai.*`,
    `llm.*`): tools that sum every span would otherwise count the request's tokens twice, once
    here and once on the attempt that used them. The gateway's own totals stay under `switchboard.*`.
    """
    attributes: dict[str, Any] = {
        **CHAIN_KINDS,
        "switchboard.team": record.team,
        "switchboard.key_id": record.key_id,
        "switchboard.model": record.public_model,
        "switchboard.outcome": record.outcome,
        "switchboard.stream": record.stream,
        "switchboard.overhead_ms": round(record.overhead_ms, 3),
    }
    if record.provider is not None:
        attributes["switchboard.provider"] = record.provider
    if record.upstream_model is not None:
        attributes["switchboard.upstream_model"] = record.upstream_model
    usage = record.usage
    if usage is not None:
        attributes["switchboard.usage.input_tokens"] = usage.prompt_tokens
        attributes["switchboard.usage.output_tokens"] = usage.completion_tokens
        attributes["switchboard.usage.cached_input_tokens"] = usage.cached_tokens
        attributes["switchboard.usage_estimated"] = usage.estimated
    if record.failed_attempt_tokens:  # billed by an upstream that failed after it started answering
        attributes["switchboard.failed_attempt_tokens"] = record.failed_attempt_tokens
        if record.failed_attempt_cost_usd is not None:
            attributes["switchboard.failed_attempt_cost_usd"] = record.failed_attempt_cost_usd
    if record.time_to_first_token_ms is not None:
        attributes["switchboard.ttft_ms"] = round(record.time_to_first_token_ms, 3)
    if record.cost_usd is not None:
        attributes["switchboard.cost_usd"] = record.cost_usd
    if record.price_version is not None:
        attributes["switchboard.price_version"] = record.price_version
    cache = record.cache  # set by the response cache (gateway/cache/) when the model caches
    if cache is not None:
        attributes["switchboard.cache"] = cache
        attributes["switchboard.cache.hit"] = cache == "hit"
        if record.cache_tokens:
            attributes["switchboard.cache.tokens"] = record.cache_tokens
        if record.cost_saved_usd is not None:
            attributes["switchboard.cache.cost_saved_usd"] = record.cost_saved_usd
        if record.cache_overhead_tokens:  # the semantic lookup's embedding, billed to this request
            attributes["switchboard.cache.overhead_tokens"] = record.cache_overhead_tokens
            if record.cache_overhead_cost_usd is not None:
                attributes["switchboard.cache.overhead_cost_usd"] = record.cache_overhead_cost_usd
    if record.variant is not None:  # control, canary or shadow (gateway/routing/experiments.py)
        attributes["switchboard.variant"] = record.variant
    if record.tags:  # allow-listed by the policy (gateway/accounting/tags.py), so bounded
        attributes.update({f"switchboard.tag.{key}": value for key, value in record.tags})
    if record.organization is not None:  # the budget hierarchy (gateway/accounting/hierarchy.py)
        attributes["switchboard.organization"] = record.organization
    if record.end_user is not None:  # validated: 1-64 characters of a safe set
        attributes["switchboard.end_user"] = record.end_user
    return attributes


# Exact types, so a bool (an int subclass) is not a number here. (A tuple, not `int | float`: Python 3.11 builds
# a new union object each time that expression runs.)
_NUMBER_TYPES = (int, float)


# Every body key `request_params` reads (most requests set none of them, or only max_tokens), and the numeric
# sampling parameters among them.
_PARAM_KEYS = frozenset([key for key, _ in _REQUEST_PARAMS] + ["max_completion_tokens", "max_tokens", "stop", "n"])
_SAMPLING_KEYS = frozenset(key for key, _ in _REQUEST_PARAMS)


def request_params(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request's sampling parameters as `gen_ai.request.*` attributes."""
    params: dict[str, Any] = {}
    if _PARAM_KEYS.isdisjoint(body):
        return params
    if not _SAMPLING_KEYS.isdisjoint(body):
        for key, attribute in _REQUEST_PARAMS:
            value = body.get(key)
            if value is not None and type(value) in _NUMBER_TYPES:
                params[attribute] = value
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(max_tokens, int):
        params["gen_ai.request.max_tokens"] = max_tokens
    stop = body.get("stop")
    if isinstance(stop, str):
        params["gen_ai.request.stop_sequences"] = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        params["gen_ai.request.stop_sequences"] = tuple(stop)
    choices = body.get("n")
    if isinstance(choices, int) and choices != 1:
        params["gen_ai.request.choice.count"] = choices
    return params


def openinference_attributes(record: UsageRecord, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """OpenInference (`llm.*`) usage of the answering attempt, so Arize Phoenix counts and prices it."""
    # `llm.model_name` was set when the attempt began: the upstream model the ledger prices, not the
    # response's dated variant, so a tool pricing by model name finds the same price row.
    attributes: dict[str, Any] = {}
    if params:
        attributes["llm.invocation_parameters"] = orjson.dumps(
            {k.removeprefix("gen_ai.request."): v for k, v in params.items()}).decode()
    usage = record.usage
    if usage is not None:
        attributes["llm.token_count.prompt"] = usage.prompt_tokens
        attributes["llm.token_count.completion"] = usage.completion_tokens
        attributes["llm.token_count.total"] = usage.total_tokens
        attributes["llm.token_count.prompt_details.cache_read"] = usage.cached_tokens
        if usage.cache_write_tokens:  # Phoenix prices these at its `cache_write` rate, as the ledger does
            attributes["llm.token_count.prompt_details.cache_write"] = usage.cache_write_tokens
    if record.cost_usd is not None:
        attributes["llm.cost.total"] = record.cost_usd
    return attributes


def error_type_of(exc: BaseException) -> str:
    """`error.type` for an exception raised by an upstream call."""
    if isinstance(exc, UpstreamFailed):
        return exc.failure.kind.value
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return type(exc).__qualname__
