"""The policy's `providers:` section: one entry per upstream, discriminated by `kind`.

Provider entries are a union built from the provider registry, so each kind validates
its own `options` and adding a provider needs no change here."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, create_model, field_validator

from gateway.policy.common import Strict
from providers import ADAPTERS


class Timeouts(Strict):
    """Per-phase limits for one upstream call."""

    connect_s: float = Field(5.0, gt=0, description="Getting a connection: waiting for a free one in the pool "
                             "(`max_connections`) and establishing TCP/TLS.")
    first_byte_s: float = Field(60.0, gt=0, description="From sending the request to the response headers; also "
                                "the longest silence allowed between stream chunks.")
    total_s: float = Field(600.0, gt=0, description="The whole call, including reading a stream to its end.")


class Pool(Strict):
    """The provider's pooled HTTP client (one per provider, shared by all requests)."""

    max_connections: int = Field(100, ge=1, le=10_000, description="Concurrent connections to the upstream.")
    keepalive_s: float = Field(30.0, ge=0, description="How long an idle connection is kept for reuse.")


class HealthCheckPolicy(Strict):
    """An active health check: GET `path` on the provider's server root."""

    path: str = Field("/health", description="Relative to base_url without its /v1 suffix; e.g. /health "
                      "(vLLM, SGLang, TGI, llama.cpp) or /v1/models (hosted APIs).")
    interval_s: float = Field(10.0, gt=0)
    timeout_s: float = Field(2.0, gt=0)
    unhealthy_after: int = Field(2, ge=1, description="Consecutive failed checks before the targets are skipped.")


class MetricsScrapePolicy(Strict):
    """A Prometheus endpoint reporting the replica's running/waiting requests and KV-cache usage."""

    path: str = Field("/metrics", description="Relative to base_url without its /v1 suffix.")
    interval_s: float = Field(2.0, gt=0)
    timeout_s: float = Field(1.0, gt=0)


class RequestIdPolicy(Strict):
    """How the request id travels to the upstream (upstream/request_ids.py); unset fields take the kind's default."""

    send: bool = Field(True, description="Send the request id upstream at all.")
    header: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9-]+$", description="Header name "
                               "(default per kind: x-request-id for self-hosted servers, x-client-request-id "
                               "for openai, x-ms-client-request-id for azure_openai; none for other hosted APIs).")
    format: Literal["uuid", "as_is"] | None = Field(None, description="uuid: the id if it is one, else a UUID "
                                                   "derived from it (uuid5); as_is: the id unchanged (default: as_is "
                                                   "for openai, uuid otherwise).")
class KVEventsPolicy(Strict):
    """A vLLM replica's KV-cache event publisher (`--kv-events-config`), read by `kv-aware` routing's precise index."""

    endpoint: str = Field(pattern=r"^tcp://", description="The engine's ZMQ PUB socket, e.g. tcp://10.0.0.11:5557.")
    replay_endpoint: str | None = Field(None, pattern=r"^tcp://", description="Its replay (ROUTER) socket, "
                                        "e.g. tcp://10.0.0.11:5558: batches missed after a gap are asked for there.")
    topic: str = Field("", description="The publisher's topic (vLLM's `topic`, default empty).")
    stale_after_s: float = Field(10.0, gt=0, description="Without a batch for this long the replica's block list "
                                 "is not trusted and routing falls back to the approximate index.")
    encoding: str = Field("o200k_base", description="tiktoken encoding the gateway tokenizes prompts with to hash "
                          "them as the engine does; must match the served model's tokenizer.")


class ProviderBase(Strict):
    base_url: str | None = Field(
        None, description="Upstream base URL including the version prefix, e.g. https://api.openai.com/v1. "
        "Defaults to the kind's public endpoint where it has one."
    )
    api_key: str | None = Field(None, description="Upstream credential; use ${ENV_VAR} to keep it out of git.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers sent on every upstream call.")
    timeouts: Timeouts = Field(default_factory=Timeouts)
    pool: Pool = Field(default_factory=Pool)
    health_check: HealthCheckPolicy | None = Field(None, description="Probe the provider in the background; "
                                                   "its targets are skipped while it fails (routing/health.py).")
    metrics: MetricsScrapePolicy | None = Field(None, description="Scrape a vLLM/SGLang Prometheus endpoint for "
                                                "load, used by `prefix-affinity` and `least-busy`.")
    request_id: RequestIdPolicy = Field(default_factory=RequestIdPolicy,
                                        description="The request id header sent upstream.")
    kv_events: KVEventsPolicy | None = Field(None, description="Subscribe to the replica's KV-cache events "
                                             "(vLLM), used by `kv-aware` routing with `index: precise`.")

    @field_validator("base_url")
    @classmethod
    def _base_url_is_http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://", "mock://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else value


def _provider_model(kind: str) -> type[ProviderBase]:
    options_model = ADAPTERS[kind].options_model
    return create_model(  # type: ignore[call-overload,no-any-return]
        f"{kind.title().replace('_', '')}Provider",
        __base__=ProviderBase,
        __doc__=f"A provider of kind `{kind}`.",
        kind=(Literal[kind], ...),
        options=(options_model, Field(default_factory=options_model)),
    )


ProviderPolicy = Annotated[
    Union[tuple(_provider_model(kind) for kind in sorted(ADAPTERS))],  # type: ignore[valid-type]  # noqa: UP007
    Field(discriminator="kind"),
]
