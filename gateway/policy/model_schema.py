"""The policy's `models:` section: a public model's targets, routing, resilience, caching and experiments."""

from __future__ import annotations

import datetime
from typing import Literal

from pydantic import Field, model_validator

from gateway.policy.common import RedisUrl, Strict
from gateway.policy.experiment_schema import CanaryPolicy, ShadowTrafficPolicy
from providers.anthropic import PromptCaching

# The request header that pins a route to tagged targets (models.<m>.routing.allow_tag_pinning).
ROUTE_PIN_HEADER = "x-switchboard-tags"


class TargetPolicy(Strict):
    """One deployment that can serve a public model."""

    provider: str = Field(description="Name of an entry under `providers`.")
    model: str = Field(min_length=1, description="The model name the upstream knows.")
    weight: float = Field(1.0, gt=0, description="Share of traffic under `weighted`; tie-break under `least-busy`.")
    tags: dict[str, str] = Field(default_factory=dict,
                                 description="Labels such as region or tier, matched by `x-switchboard-tags`.")
    cost: float | None = Field(None, ge=0, description="Relative price used by the `cost` strategy (lower first).")


class PrefixAffinityPolicy(Strict):
    """Settings of the `prefix-affinity` strategy."""

    spill_margin: int = Field(8, ge=0, description="Leave the affine replica when its load exceeds the "
                              "least-loaded replica's by more than this many requests.")
    table_size: int = Field(100_000, ge=100, description="Prefix blocks remembered (LRU).")
    block_chars: int = Field(1024, ge=16, description="Block size for plain-text (completions) prompts.")
    min_blocks: int = Field(2, ge=1, description="Shortest shared prefix (in blocks) worth following; 2 means "
                            "more than a shared system prompt, so new conversations spread by load.")


class KVScorerWeights(Strict):
    """Weights of the `kv-aware` scorers; each scorer gives every candidate 0-1, higher is better."""

    prefix: float = Field(3.0, ge=0, description="Share of the prompt the replica is known to hold in its KV cache.")
    queue: float = Field(2.0, ge=0, description="1 - scraped waiting requests (vllm:num_requests_waiting, "
                         "sglang:num_queue_reqs) / max_waiting.")
    kv_usage: float = Field(1.0, ge=0, description="1 - scraped KV-cache usage (vllm:kv_cache_usage_perc).")
    in_flight: float = Field(1.0, ge=0, description="This gateway's own requests in flight, relative to the "
                             "busiest candidate.")


class KVAwarePolicy(Strict):
    """Settings of the `kv-aware` strategy (gateway/routing/kv_scoring.py): filter -> weighted score -> pick."""

    weights: KVScorerWeights = Field(default_factory=KVScorerWeights)
    index: Literal["approximate", "precise"] = Field(
        "approximate", description="approximate = learn from where requests were sent; precise = the replicas' "
        "KV-cache events (providers.<name>.kv_events), falling back to approximate while a replica's events stop.")
    home_blocks: int = Field(1, ge=1, description="Leading prompt blocks hashed (rendezvous) to pick a prefix's "
                             "home replica, the same on every gateway replica; 1 = tools + system prompt.")
    max_waiting: float = Field(64, ge=0, description="Replicas with at least this many scraped waiting requests "
                               "are left out (unless all are); also the queue scorer's scale.")
    max_kv_usage: float = Field(0.95, gt=0, le=1, description="Replicas whose scraped KV-cache usage is at least "
                                "this are left out (unless all are).")
    shared_table: bool = Field(False, description="Share learned prefix ownership with the other gateway "
                               "replicas through the state store's Redis (state.url), for conversations that load "
                               "moved away from their home.")
    table_size: int = Field(100_000, ge=100, description="Prefix blocks remembered (LRU).")
    block_chars: int = Field(1024, ge=16, description="Block size for plain-text (completions) prompts.")


class RoutingPolicy(Strict):
    """How a request picks among the model's targets."""

    strategy: Literal["priority", "weighted", "least-busy", "latency", "cost", "prefix-affinity", "kv-aware"] = Field(
        "priority", description="priority = targets in listed order (failover only).")
    allow_tag_pinning: bool = Field(False, description=f"Honour `{ROUTE_PIN_HEADER}: k=v,...` request headers.")
    latency_alpha: float = Field(0.3, gt=0, le=1, description="EWMA weight of the newest latency sample.")
    exploration: float = Field(0.05, ge=0, le=1, description="Share of `latency` requests sent to a random "
                               "target so a recovered one is noticed.")
    prefix_affinity: PrefixAffinityPolicy = Field(default_factory=PrefixAffinityPolicy)
    kv_aware: KVAwarePolicy = Field(default_factory=KVAwarePolicy)


class BackoffPolicy(Strict):
    """Exponential backoff with full jitter between attempts."""

    initial_s: float = Field(0.1, ge=0, description="Cap of the first wait; doubles per attempt.")
    max_s: float = Field(5.0, ge=0, description="Largest wait between two attempts.")


class FallbackPolicy(Strict):
    """Other public models to try, in order, when this one cannot answer."""

    default: list[str] = Field(default_factory=list, description="When every target failed.")
    context_window: list[str] = Field(default_factory=list, description="When the prompt is too long.")
    content_policy: list[str] = Field(default_factory=list, description="When the upstream refused the content.")


class CircuitBreakerPolicy(Strict):
    """Per-target ejection after repeated failures."""

    enabled: bool = True
    consecutive_failures: int = Field(5, ge=1, description="Open after this many failures in a row.")
    failure_rate: float = Field(0.5, gt=0, le=1, description="...or at this failure share over the window.")
    window_s: float = Field(30.0, gt=0)
    min_requests: int = Field(20, ge=1, description="Requests in the window before the rate is judged.")
    cooldown_s: float = Field(5.0, gt=0, description="First ejection; doubles on each repeated trip.")
    max_cooldown_s: float = Field(300.0, gt=0)
    min_callers: int = Field(2, ge=1, le=64, description="An answered 5xx may be the upstream's verdict on one bad "
                             "request: such failures open the breaker only once they came from this many teams "
                             "within window_s, or a request that failed here succeeded on another target. "
                             "Connection errors, timeouts, 429/503 count whoever sent the request.")


class SemanticCachePolicy(Strict):
    """Semantic matching (gateway/cache/semantic.py): the nearest cached question above a similarity threshold."""

    embedding_model: str = Field(min_length=1, description="Public model (under `models`) that embeds the last "
                                 "user turn; called through the gateway's own providers.")
    threshold: float = Field(0.95, gt=0, le=1, description="Least cosine similarity that counts as the same question.")
    max_entries: int = Field(1000, ge=1, le=100_000, description="Vectors kept in the in-process index (LRU); a "
                             "lookup compares against every vector of the same partition.")
    candidates: int = Field(64, ge=1, le=10_000, description="backend: redis — vectors kept per partition in Redis "
                            "(the newest); a lookup fetches and compares all of them in-process.")


class CachePolicy(Strict):
    """Response caching for a model (or for every model of a team), gateway/cache/. Off by default."""

    mode: Literal["off", "exact", "semantic"] = Field("off", description="exact: identical requests; semantic: "
                                                      "also near-identical last user turns (opt-in, see risks).")
    ttl_s: float = Field(3600.0, gt=0, description="How long an answer is served from the cache.")
    scope: Literal["key", "team", "global"] = Field(
        "team", description="Who shares entries: one virtual key, one team, or every team (global must be chosen "
        "explicitly and needs the same cache settings for every team that uses the model).")
    only_deterministic: bool = Field(False, description="Cache only requests with temperature 0 or a seed.")
    backend: Literal["memory", "redis"] = Field("memory", description="memory: in-process LRU bounded by "
                                                "max_bytes; redis: shared by replicas, expired by Redis.")
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Bound of the in-process store of this block.")
    url: RedisUrl | None = Field(None, description="redis:// URL of the redis backend (default: state.url).")
    key_prefix: str = Field("switchboard:cache:", description="Prefix of every Redis key the cache writes.")
    timeout_s: float = Field(0.25, gt=0, le=10, description="Longest a lookup waits on Redis before it counts "
                             "as a miss.")
    coalesce: bool = Field(True, description="Identical requests in flight at once share one upstream call.")
    hits_count_tokens: bool = Field(False, description="Whether a hit's tokens count against token rate limits "
                                    "and token budgets (it always counts as a request, and never costs USD).")
    semantic: SemanticCachePolicy | None = Field(None, description="Settings of mode: semantic (required by it).")

    @model_validator(mode="after")
    def _semantic_settings(self) -> CachePolicy:
        if (self.mode == "semantic") != (self.semantic is not None):
            raise ValueError("`semantic` settings are required with mode: semantic and only allowed with it")
        return self


class GpuCost(Strict):
    """A self-hosted deployment's running cost, turned into per-token prices by its measured throughput.

    Price per 1M input tokens = hourly_usd x count / (input_tokens_per_s x 3600) x 1e6, and the same
    for output; measure the throughputs at your typical load (e.g. with vLLM's benchmark_serving).
    """

    hourly_usd: float = Field(gt=0, description="USD per hour of one GPU (or one node, with count: 1).")
    count: int = Field(1, ge=1, description="GPUs serving this deployment.")
    input_tokens_per_s: float = Field(gt=0, description="Sustained prompt (prefill) tokens/s of the deployment.")
    output_tokens_per_s: float = Field(gt=0, description="Sustained generated tokens/s of the deployment.")


class PriceSpec(Strict):
    """One model's price in USD per 1M tokens: list prices, or `gpu` for a self-hosted deployment."""

    input: float | None = Field(None, ge=0, description="Uncached prompt tokens.")
    cached_input: float | None = Field(None, ge=0, description="Prompt tokens read from the provider's cache "
                                       "(default: the input price).")
    cache_write: float | None = Field(None, ge=0, description="Prompt tokens written to the cache, where billed "
                                      "(default: the input price).")
    output: float | None = Field(None, ge=0, description="Completion tokens, reasoning tokens included.")
    gpu: GpuCost | None = Field(None, description="Derive input and output prices from a GPU's hourly cost.")
    effective_date: datetime.date | None = Field(None, description="When this price took effect (default: today).")
    version: str | None = Field(None, description="Recorded with every request this price bills "
                                "(default: prices.version).")
    source: str | None = Field(None, description="Where the figure comes from (a pricing page, a contract).")

    @model_validator(mode="after")
    def _one_form(self) -> PriceSpec:
        if self.gpu is None and (self.input is None or self.output is None):
            raise ValueError("give `input` and `output` (USD per 1M tokens), or `gpu` for a self-hosted model")
        if self.gpu is not None and (self.input is not None or self.output is not None):
            raise ValueError("give either `input`/`output` or `gpu`, not both")
        return self


class ModelPolicy(Strict):
    """A public model name clients may ask for, and where it is served."""

    targets: list[TargetPolicy] = Field(min_length=1, description="Deployments serving this model, in order.")
    owned_by: str = Field("switchboard", description="Shown in GET /v1/models.")
    # Routing and resilience (gateway/routing/strategies.py, gateway/routing/resilience.py); the
    # defaults keep a single-target model behaving as a plain proxy.
    routing: RoutingPolicy = Field(default_factory=RoutingPolicy)
    retries: int = Field(0, ge=0, le=10, description="Extra attempts after a retryable failure, across targets.")
    backoff: BackoffPolicy = Field(default_factory=BackoffPolicy)
    deadline_s: float = Field(300.0, gt=0, description="Bounds all attempts, backoff waits and fallbacks of one "
                              "request (for streams: until the first content byte). An upstream Retry-After "
                              "longer than what is left is not waited for: the error goes back with it.")
    ttft_timeout_s: float | None = Field(None, gt=0, description="A stream must send content within this, "
                                         "or the attempt fails over.")
    stream_idle_timeout_s: float | None = Field(None, gt=0, description="Longest silence allowed mid-stream.")
    context_window: int | None = Field(None, ge=1, description="Prompt tokens (+ max_tokens) this model accepts; "
                                       "longer prompts go straight to `fallbacks.context_window`.")
    fallbacks: FallbackPolicy = Field(default_factory=FallbackPolicy)
    circuit_breaker: CircuitBreakerPolicy = Field(default_factory=CircuitBreakerPolicy)
    cache: CachePolicy | None = Field(None, description="Response caching (default: off).")
    price: PriceSpec | None = Field(None, description="What a request to this public model costs, whichever "
                                    "deployment serves it; over prices.targets and the price table. Two public "
                                    "models on one deployment can so be billed differently.")
    prompt_caching: PromptCaching | None = Field(None, description="Anthropic's automatic cache breakpoints for "
                                                 "this model's `kind: anthropic` targets, over the provider's "
                                                 "options.prompt_caching.")
    # Experiments (gateway/routing/experiments.py): a sticky canary split and mirrored shadow traffic.
    canary: CanaryPolicy | None = Field(None, description="Serve a sticky share of callers from a candidate "
                                        "model or deployment (x-switchboard-variant: canary).")
    shadow: ShadowTrafficPolicy | None = Field(None, description="Mirror a sampled share of requests to a "
                                               "candidate off the client's path, billed as shadow spend.")
