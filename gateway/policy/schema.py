"""The policy file's schema: strict, frozen pydantic models, one per YAML section.

Unknown keys are refused everywhere, so a typo is an error rather than a
silently ignored setting. Provider entries are a union discriminated by
`kind`, built from the provider registry, so each kind validates its own
`options` and adding a provider needs no change here.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlparse

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from gateway.policy.alert_schema import AlertsPolicy
from providers import ADAPTERS
from providers.anthropic import PromptCaching

KEY_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"


def _redis_url(value: str) -> str:
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    return value


# The cache and the state store both take a Redis URL, validated alike.
RedisUrl = Annotated[str, AfterValidator(_redis_url)]


# The request header that pins a route to tagged targets (models.<m>.routing.allow_tag_pinning).
ROUTE_PIN_HEADER = "x-switchboard-tags"

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


# Shadow rules (gateway/accounting/shadow.py): a limit or budget that is counted, traced and reported but never refuses.
RuleMode = Literal["enforce", "shadow"]
_MODE_DOC = ("enforce: refuse what passes the limit; shadow: count, trace and report what it would refuse "
             "(`x-switchboard-shadow-reject`, switchboard_shadow_rejections, /admin/usage), never refusing.")


class RateLimitsPolicy(Strict):
    """Request and token rate limits for one scope (team, key, or team x model); unset means unlimited.

    Windows are fixed and aligned to the clock (each minute, each UTC day). Token
    limits reserve the prompt (counted with tiktoken) plus `max_tokens` at
    admission and settle to actual usage. A request that reaches a limit
    exactly is admitted; one that would pass it is refused with 429.
    """

    rpm: int | None = Field(None, ge=0, description="Requests per minute.")
    tpm: int | None = Field(None, ge=0, description="Tokens (prompt + completion) per minute.")
    rpd: int | None = Field(None, ge=0, description="Requests per UTC day.")
    tpd: int | None = Field(None, ge=0, description="Tokens per UTC day.")
    mode: RuleMode = Field("enforce", description=_MODE_DOC)


class BudgetPolicy(Strict):
    """A spend budget per period, in tokens and/or USD (gateway/accounting/budgets.py)."""

    period: Literal["daily", "weekly", "monthly", "rolling"] = Field(
        "monthly", description="Calendar periods start at midnight (weeks on Monday, months on the 1st) in "
        "`timezone`; `rolling` counts the last `window_s` seconds.")
    timezone: str = Field("UTC", description="IANA time zone of the calendar periods, e.g. Europe/Berlin.")
    window_s: int | None = Field(None, ge=60, description="Length of a `rolling` window (required for it).")
    tokens: int | None = Field(None, ge=0, description="Tokens (prompt + completion) per period.")
    usd: float | None = Field(None, ge=0, description="US dollars per period; needs prices for the models.")
    on_exhaust: Literal["reject", "downgrade"] = Field(
        "reject", description="reject: 429 `budget_exceeded`; downgrade: serve `downgrade_to` instead.")
    downgrade_to: str | None = Field(None, description="Public model served once the budget is spent.")
    soft_thresholds: list[float] = Field(
        default_factory=list, description="Fractions (e.g. 0.5, 0.8, 1.0) that log a `budget_threshold` event "
        "once per period when crossed, and alert the `notify` webhooks.")
    notify: list[str] = Field(default_factory=list, description="Webhooks (names under `alerts.webhooks`) told "
                              "of each soft threshold crossed and of the budget's exhaustion, once per period.")
    mode: RuleMode = Field("enforce", description=_MODE_DOC)
    hard_stop_streams: bool = Field(
        False, description="Cut a stream with an in-band `budget_exceeded` error event (no [DONE]) when it would "
        "cross this budget mid-stream; needs on_exhaust: reject.")

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown IANA time zone {value!r} (e.g. UTC, Europe/Berlin)") from None
        return value

    @field_validator("soft_thresholds")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < v <= 1 for v in value):
            raise ValueError("each threshold is a fraction between 0 and 1, e.g. 0.8 (1 = the whole budget)")
        return sorted(set(value))

    @model_validator(mode="after")
    def _consistent(self) -> BudgetPolicy:
        if self.tokens is None and self.usd is None:
            raise ValueError("set `tokens`, `usd` or both")
        if (self.period == "rolling") != (self.window_s is not None):
            raise ValueError("`window_s` is required with period: rolling and only allowed with it")
        if (self.on_exhaust == "downgrade") != (self.downgrade_to is not None):
            raise ValueError("`downgrade_to` is required with on_exhaust: downgrade and only allowed with it")
        if self.hard_stop_streams and self.on_exhaust != "reject":
            raise ValueError("`hard_stop_streams` needs on_exhaust: reject (a downgrading budget never refuses)")
        if self.hard_stop_streams and self.mode == "shadow":
            raise ValueError("`hard_stop_streams` needs mode: enforce (a shadow budget never cuts a stream)")
        return self


class KeyPolicy(Strict):
    """A virtual key. Only its hash is stored; `switchboard keys new` makes one."""

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
                    description="A name for the key that is safe to log and trace.")
    hash: str = Field(pattern=KEY_HASH_PATTERN, description="sha256:<hex digest of the key>.")
    disabled: bool = Field(False, description="Refuse this key without deleting it.")
    expires_at: datetime.datetime | None = Field(None, description="Refuse this key from this time on (ISO 8601, "
                                                 "UTC unless it has an offset); `switchboard keys rotate` sets it "
                                                 "on the old key so both work during the overlap.")
    max_concurrent: int | None = Field(None, ge=1, description="Requests this key may have in flight at once "
                                       "(per gateway process); more get 429 before their body is read.")
    limits: RateLimitsPolicy | None = Field(None, description="Rate limits of this key alone.")
    budget: BudgetPolicy | None = Field(None, description="Budget of this key alone (the team's also applies).")


class TeamResponsesPolicy(Strict):
    """The team's Responses API state (gateway/response_store/) and what its native requests may reach upstream."""

    store: bool = Field(True, description="Keep the team's responses (unless a request sends store: false), so "
                        "previous_response_id, GET, DELETE and input_items work; false keeps nothing.")
    scope: Literal["team", "key"] = Field("team", description="Who may use a stored response: any key of the "
                                          "team, or only the key that created it.")
    ttl_s: float = Field(30 * 86400, gt=0, description="How long a stored response is kept (default 30 days).")
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="The team's share of the store; the oldest "
                           "responses are evicted to make room for a new one.")
    upstream_store: bool = Field(False, description="Let `store` reach a native Responses upstream (it keeps "
                                 "the response on the operator's account); otherwise the gateway sends store: false.")
    allowed_prompts: list[str] = Field(default_factory=list, description="Stored prompt ids (`prompt.id`) this "
                                       "team may reference on the operator's account.")
    allowed_vector_stores: list[str] = Field(default_factory=list, description="Vector store ids this team's "
                                             "file_search tools may search.")
    allowed_files: list[str] = Field(default_factory=list, description="File ids this team may reference "
                                     "(input_file, input_image, code_interpreter file_ids).")
    allowed_containers: list[str] = Field(default_factory=list, description="code_interpreter container ids "
                                          "this team may use.")


_TAG_WORD = r"^[A-Za-z0-9_]{1,64}$"
_TAG_VALUE = r"^[A-Za-z0-9_.:/-]{1,64}$"


def _tag_allow_list(value: dict[str, list[str]]) -> dict[str, list[str]]:
    import re

    for key, values in value.items():
        if not re.fullmatch(_TAG_WORD, key):
            raise ValueError(f"tag key {key!r}: use letters, digits and _ (at most 64)")
        for item in values:
            if not re.fullmatch(_TAG_VALUE, item):
                raise ValueError(f"tag {key}: value {item!r}: use letters, digits and _ . : / - (at most 64)")
            if item == "other":
                raise ValueError(f"tag {key}: `other` is what unlisted values become; it cannot be listed")
    return value


# Tag key -> its allowed values (gateway/accounting/tags.py).
TagAllowList = Annotated[dict[str, list[str]], AfterValidator(_tag_allow_list)]


class TagsPolicy(Strict):
    """Cost attribution by request tags (gateway/accounting/tags.py): which keys and values a request may carry."""

    header: str = Field("x-switchboard-tags", pattern=r"^[A-Za-z0-9-]+$", description="Request header of "
                        "`key=value` pairs separated by commas, e.g. `feature=search, env=prod`.")
    allowed: TagAllowList = Field(default_factory=dict, description="Tag key -> its allowed values, for every "
                                  "team. An unlisted value is recorded as `other`; an unlisted key is dropped.")
    strict: bool = Field(False, description="Refuse a request carrying an unlisted key or value (400 "
                         "invalid_tags) instead of recording `other` or dropping it.")


class TeamTagsPolicy(Strict):
    """A team's own tags, added to the policy's `tags.allowed`."""

    allowed: TagAllowList = Field(default_factory=dict, description="More tag keys and values for this team.")
    strict: bool | None = Field(None, description="Overrides `tags.strict` for this team.")


END_USER_ID = r"^[A-Za-z0-9._@+=/-]{1,64}$"


class EndUsersPolicy(Strict):
    """The team's end users (gateway/accounting/hierarchy.py): who a request is for, and a budget for each of them."""

    header: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$", description=(
        "A request header naming the end user, e.g. x-end-user; when a request has none, its OpenAI `user` body "
        "field is used. Unset: only the `user` field."))
    required: bool = Field(False, description="Refuse (400 `invalid_end_user`) a request that names no end user; "
                           "otherwise such a request counts against no end-user budget.")
    max_tracked: int = Field(1000, ge=1, le=1_000_000, description="Distinct end users per team per budget period "
                             "that get a budget of their own; later ones share one `other` bucket (with the same "
                             "limits), and the requests so folded are counted.")
    budget: BudgetPolicy | None = Field(None, description="The budget each end user gets separately (a template; "
                                        "the team's and key's budgets also apply).")


class OrganizationPolicy(Strict):
    """An organisation: a group of teams with a budget over the spend of all of them (accounting/hierarchy.py)."""

    teams: list[str] = Field(min_length=1, description="Names of teams under `teams`; a team belongs to at most "
                             "one organisation.")
    budget: BudgetPolicy | None = Field(None, description="The budget all the organisation's teams spend together.")


class TeamPolicy(Strict):
    keys: list[KeyPolicy] = Field(default_factory=list)
    models: list[str] = Field(
        default_factory=list, description='Public models this team may use; "*" allows every model.'
    )
    limits: RateLimitsPolicy | None = Field(None, description="Rate limits shared by all the team's keys.")
    max_concurrent: int | None = Field(None, ge=1, description="Requests all the team's keys may have in flight "
                                       "at once (per gateway process); more get 429 before their body is read.")
    fallback_models: list[str] = Field(default_factory=list, description="Models this team may be served as a "
                                       "fallback (`models.<m>.fallbacks`) without being allowed to request them; "
                                       "any other fallback the team may not use is skipped.")
    model_limits: dict[str, RateLimitsPolicy] = Field(default_factory=dict,
                                                      description="Rate limits per public model for this team.")
    budget: BudgetPolicy | None = Field(None, description="The team's spend budget.")
    cache: CachePolicy | None = Field(None, description="Replaces the models' `cache` settings for this "
                                      "team's requests.")
    responses: TeamResponsesPolicy = Field(default_factory=TeamResponsesPolicy,
                                           description="Stored Responses API state and upstream resources.")
    tags: TeamTagsPolicy | None = Field(None, description="Tag keys and values this team may send, on top of "
                                        "`tags.allowed` (cost attribution).")
    end_users: EndUsersPolicy | None = Field(None, description="End users of this team's requests and their "
                                             "budget (the `user` body field or a header).")


class ReloadPolicy(Strict):
    watch: bool = Field(True, description="Reload when the policy file changes (SIGHUP always reloads).")
    poll_interval_s: float = Field(1.0, gt=0, le=3600)


class AdminListenerPolicy(Strict):
    """A second listener for the operator's surfaces: /metrics, /admin/* and /ui* (gateway/http/admin_surface.py).

    With it, the tenant port answers those paths with 404 and this one serves
    only them. Bind it to an address tenants cannot reach (loopback, a private
    network); it needs `--workers 1`. Changes apply on restart.
    """

    host: str = Field("127.0.0.1", min_length=1, description="Address of the admin listener.")
    port: int = Field(ge=1, le=65535, description="Port of the admin listener (not the tenant port).")
    metrics_need_key: bool = Field(False, description="Also require an admin key for /metrics on this listener "
                                   "(/admin/* always requires one).")


class ServerPolicy(Strict):
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Larger request bodies get 413.")
    header_timeout_s: float = Field(10.0, gt=0, le=300, description="A request line and headers must arrive "
                                    "within this from the connection's first byte (or the previous response); "
                                    "slower clients are disconnected.")
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="The whole request body must arrive within "
                                  "this after its headers; slower clients are disconnected.")
    max_header_bytes: int = Field(64 * 1024, ge=4096, le=1024 * 1024, description="Request line plus headers; "
                                  "larger heads get 431 and the connection is closed.")
    max_connections: int = Field(1024, ge=1, le=1_000_000, description="Open client connections per process; "
                                 "connections beyond it are closed as soon as they are accepted.")
    admin: AdminListenerPolicy | None = Field(None, description="Serve /metrics, /admin/* and /ui* on a separate "
                                              "listener only (default: on the tenant port, admin key required).")
    shutdown_grace_s: float = Field(30.0, ge=0, description="How long SIGTERM waits for in-flight requests.")
    reload: ReloadPolicy = Field(default_factory=ReloadPolicy)


class ConsolePolicy(Strict):
    """The read-only admin console at /ui (gateway/http/console/), behind the admin keys."""

    enabled: bool = Field(True, description="Serve the console at /ui (it still needs an admin key).")
    trace_url: str | None = Field(None, description="Link from each ledger row to its trace: a URL template "
                                  "with `{trace_id}`, e.g. http://jaeger:16686/trace/{trace_id}.")
    recent_requests: int = Field(50, ge=1, le=1000, description="Ledger rows shown under Requests.")

    @field_validator("trace_url")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith(("http://", "https://")) or "{trace_id}" not in value):
            raise ValueError("must be an http(s) URL containing {trace_id}, e.g. http://jaeger:16686/trace/{trace_id}")
        return value


class AdminPolicy(Strict):
    """Keys for the operator endpoints under /admin and the console at /ui (separate from team keys)."""

    keys: list[KeyPolicy] = Field(default_factory=list, description="Admin keys, hashed like team keys.")
    console: ConsolePolicy = Field(default_factory=ConsolePolicy)


def _cluster_node_url(value: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError("must start with redis:// or rediss:// (a cluster node is reached over TCP)")
    if parsed.path.strip("/") not in ("", "0"):
        raise ValueError("must not name a database other than 0 (Redis Cluster has only database 0)")
    return value


class RedisClusterPolicy(Strict):
    """A Redis Cluster with several shards: the state store sends each team's calls to its slot's master."""

    nodes: list[Annotated[str, AfterValidator(_cluster_node_url)]] = Field(
        min_length=1, description="redis:// or rediss:// URLs of some of the cluster's nodes (any role; list "
        "more than one so that one being down does not stop a start). The other nodes are discovered with "
        "CLUSTER SLOTS and reached with the first URL's scheme and credentials.")

    @field_validator("nodes")
    @classmethod
    def _same_credentials(cls, nodes: list[str]) -> list[str]:
        first = urlparse(nodes[0])
        for node in nodes[1:]:
            parsed = urlparse(node)
            if (parsed.scheme, parsed.username, parsed.password) != (first.scheme, first.username, first.password):
                raise ValueError(f"every node needs the same scheme and credentials as the first ({node!r} differs)")
        return nodes


class StatePolicy(Strict):
    """Where rate-limit and budget counters live (gateway/state/). Changes apply on restart."""

    backend: Literal["auto", "memory", "durable", "redis"] = Field(
        "auto", description="auto: redis when `url` is set, else durable when any limit or budget is set, "
        "else memory.")
    path: str | None = Field(None, description="SQLite file of the durable store, relative to the policy "
                             "file; default <policy name>.state.sqlite next to it.")
    flush_interval_s: float = Field(1.0, gt=0, le=60, description="Durable store: snapshot period, the most "
                                    "spend a kill -9 can lose.")
    url: RedisUrl | None = Field(None, description="redis:// or rediss:// URL (with /db index); shared by replicas.")
    cluster: RedisClusterPolicy | None = Field(None, description="A multi-shard Redis Cluster instead of `url`.")
    key_prefix: str = Field("switchboard:", pattern=r"^[^{}]*$", description="Prefix of every Redis key.")
    failure_mode: Literal["fail_open", "fail_closed"] = Field(
        "fail_open", description="When Redis is unreachable: serve counting locally and reconcile later, or "
        "refuse with 503.")
    timeout_s: float = Field(0.25, gt=0, le=10, description="Longest a request waits on Redis.")
    retry_interval_s: float = Field(0.5, gt=0, le=60, description="How often an unreachable Redis is probed.")

    @model_validator(mode="after")
    def _url_for_redis(self) -> StatePolicy:
        if self.url and self.cluster:
            raise ValueError("set `url` (one Redis) or `cluster` (a Redis Cluster's nodes), not both")
        if self.backend == "redis" and not (self.url or self.cluster):
            raise ValueError("backend: redis needs `url` (or `cluster`)")
        if self.cluster and self.backend in ("memory", "durable"):
            raise ValueError(f"`cluster` is only used by backend: redis (this is backend: {self.backend})")
        return self


class ResponseStorePolicy(Strict):
    """Where stored Responses API responses live (gateway/response_store/). Changes apply on restart."""

    backend: Literal["sqlite", "redis"] = Field("sqlite", description="sqlite: an embedded file, nothing to "
                                                "install; redis: shared by replicas.")
    path: str | None = Field(None, description="SQLite file relative to the policy file; default "
                             "<policy name>.responses.sqlite next to it.")
    url: RedisUrl | None = Field(None, description="redis:// URL of the redis backend (default: state.url).")
    key_prefix: str = Field("switchboard:responses:", pattern=r"^[^{}]*$",
                            description="Prefix of every Redis key the store writes.")
    timeout_s: float = Field(1.0, gt=0, le=30, description="Longest a request waits on the store before it "
                             "gets 503 response_store_unavailable.")
    retry_interval_s: float = Field(1.0, gt=0, le=60, description="After a store failure, requests that need "
                                    "the store get 503 at once (no upstream call) for this long.")


class AdmissionPolicy(Strict):
    """How admission estimates a request's tokens before it runs."""

    default_completion_tokens: int = Field(
        1024, ge=0, description="Completion tokens reserved when a request sets no max_tokens / "
        "max_completion_tokens; settlement corrects it to actual usage.")
    shadow_reject_header: bool = Field(True, description="Name the caller's shadow rules that would have refused "
                                       "its request in `x-switchboard-shadow-reject` (only the caller's own "
                                       "team, key and model rules ever appear).")


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


class PricesPolicy(Strict):
    """Cost attribution: the price table and this policy's overrides (gateway/accounting/pricing.py)."""

    table: str | None = Field(None, description="Price table file relative to the policy file (default: the "
                              "shipped policies/prices.yaml).")
    version: str | None = Field(None, description="Version recorded for prices set here without their own.")
    families: dict[str, str] = Field(default_factory=dict, description="Provider name -> price family of the "
                                     "table, e.g. an openai_compatible proxy billed as `openai`.")
    models: dict[str, dict[str, PriceSpec]] = Field(default_factory=dict, description="Price family -> model "
                                                    "-> price: overrides or extends the table.")
    targets: dict[str, dict[str, PriceSpec]] = Field(default_factory=dict, description="Provider name -> "
                                                     "upstream model (or \"*\") -> price, e.g. self-hosted models.")


class BatchExportPolicy(Strict):
    """The batch span processor: spans are queued and exported off the request path."""

    max_queue_size: int = Field(2048, ge=1, description="Spans held for export; beyond it new spans are dropped.")
    schedule_delay_ms: int = Field(2000, ge=1, description="Longest a span waits before its batch is sent.")
    max_export_batch_size: int = Field(512, ge=1)
    export_timeout_ms: int = Field(10_000, ge=1, description="Gives up on one export after this long.")

    @model_validator(mode="after")
    def _batch_fits(self) -> BatchExportPolicy:
        if self.max_export_batch_size > self.max_queue_size:
            raise ValueError("max_export_batch_size must not exceed max_queue_size")
        return self


class TracesPolicy(Strict):
    """OpenTelemetry traces (telemetry/traces.py): a SERVER span per request, a CLIENT span per upstream attempt."""

    exporter: Literal["none", "console", "otlp_http", "otlp_grpc"] = Field(
        "none", description="none records nothing (and costs nothing); console prints spans (debugging).")
    endpoint: str | None = Field(None, description="OTLP endpoint; otlp_http: the full traces URL (default "
                                 "http://localhost:4318/v1/traces), otlp_grpc: host:port (default localhost:4317).")
    headers: dict[str, str] = Field(default_factory=dict, description="Sent with every export, e.g. an API key "
                                    "as ${ENV_VAR}.")
    service_name: str = Field("switchboard", min_length=1, description="The `service.name` resource attribute.")
    sample_ratio: float = Field(1.0, ge=0, le=1, description="Share of traces kept; traces with an error are "
                                "always kept. An incoming sampled traceparent is honoured.")
    batch: BatchExportPolicy = Field(default_factory=BatchExportPolicy)
    openinference: bool = Field(True, description="Also set OpenInference `llm.*` attributes (model, token counts, "
                                "cost) on LLM-kind attempt spans, which Arize Phoenix counts and prices.")
    attempt_span_kind: Literal["llm", "chain"] = Field(
        "llm", description="llm: each upstream attempt's span is the LLM call and carries its usage. chain: "
        "attempt spans are chains without usage, for clients that already trace their own LLM call.")
    project: str | None = Field(None, min_length=1, max_length=200, description="Project the traces land in: the "
                                "`openinference.project.name` resource attribute (Phoenix) and the "
                                "`x-project-name` and `Langsmith-Project` export headers (Phoenix, LangSmith).")
    record_content: list[str] = Field(default_factory=list, description="Teams whose prompts and completions "
                                      "are recorded on spans; \"*\" for all. Off by default: content is sensitive.")
    redact_content: bool = Field(True, description="Mask API keys, bearer tokens, emails and card numbers in "
                                 "recorded content.")


class MetricsPolicy(Strict):
    enabled: bool = Field(True, description="Serve Prometheus metrics at GET /metrics.")


class TelemetryPolicy(Strict):
    """Traces and metrics. Exporter changes apply on reload."""

    traces: TracesPolicy = Field(default_factory=TracesPolicy)
    metrics: MetricsPolicy = Field(default_factory=MetricsPolicy)


class LedgerPolicy(Strict):
    """The durable usage ledger (gateway/accounting/ledger.py): one row per request, written off the request path."""

    path: str | None = Field(None, description="SQLite file relative to the policy file; unset: no ledger. "
                             "Changes apply on restart.")
    flush_interval_s: float = Field(0.5, gt=0, le=60, description="Longest a settled request waits to be written.")


class PolicyDocument(Strict):
    """The whole policy file."""

    version: Literal[1] = Field(1, description="Schema version of this file.")
    server: ServerPolicy = Field(default_factory=ServerPolicy)
    providers: dict[str, ProviderPolicy] = Field(min_length=1)
    models: dict[str, ModelPolicy] = Field(min_length=1)
    teams: dict[str, TeamPolicy] = Field(min_length=1)
    organizations: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")], OrganizationPolicy] = Field(
        default_factory=dict, description="Organisations over teams, each with a budget of their joint spend.")
    admin: AdminPolicy = Field(default_factory=AdminPolicy)
    keys_file: str | None = Field(None, description="A YAML file of more team keys (`teams: {team: [key, ...]}`), "
                                  "relative to this file; written by `switchboard keys`, watched like this file.")
    state: StatePolicy = Field(default_factory=StatePolicy)
    admission: AdmissionPolicy = Field(default_factory=AdmissionPolicy)
    prices: PricesPolicy = Field(default_factory=PricesPolicy)
    telemetry: TelemetryPolicy = Field(default_factory=TelemetryPolicy)
    ledger: LedgerPolicy = Field(default_factory=LedgerPolicy)
    response_store: ResponseStorePolicy = Field(default_factory=ResponseStorePolicy)
    alerts: AlertsPolicy = Field(default_factory=AlertsPolicy, description="Webhooks that budget alerts are "
                                 "posted to (gateway/accounting/alerts.py).")
    tags: TagsPolicy | None = Field(None, description="Cost attribution by request tags (header, allowed keys and "
                                    "values); off when unset and no team has `tags`.")

    @model_validator(mode="after")
    def _response_store_url(self) -> PolicyDocument:
        if self.response_store.backend == "redis" and not (self.response_store.url or self.state.url):
            raise ValueError("response_store: backend: redis needs `url` (or state.url)")
        return self


class KeysFileDocument(Strict):
    """A keys file (`keys_file`): team name -> its keys, merged into the policy's teams on load."""

    version: Literal[1] = Field(1, description="Schema version of this file.")
    teams: dict[str, list[KeyPolicy]] = Field(default_factory=dict, description="Keys per team of the policy.")


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the policy file, for editors and CI linting."""
    schema = PolicyDocument.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Switchboard policy"
    return schema
