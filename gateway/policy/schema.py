"""The policy file's schema: strict, frozen pydantic models, one per YAML section.

Unknown keys are refused everywhere, so a typo is an error rather than a
silently ignored setting. The document's root and its operational sections
(server, admin, state, prices, telemetry, ledger) are here; providers, models
and teams each have a module of their own (provider_schema.py, model_schema.py,
team_schema.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import AfterValidator, Field, field_validator, model_validator

from gateway.policy.alert_schema import AlertsPolicy
from gateway.policy.common import RedisUrl, Strict
from gateway.policy.model_schema import ModelPolicy, PriceSpec
from gateway.policy.provider_schema import ProviderPolicy
from gateway.policy.team_schema import KeyPolicy, OrganizationPolicy, TagsPolicy, TeamPolicy


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
    drain_s: float = Field(0.0, ge=0, le=300, description="After SIGTERM, keep serving this long with /readyz "
                           "answering 503, so a load balancer takes the replica out of rotation before its "
                           "listener closes; then the shutdown_grace_s wait begins. SIGINT skips it. Needs "
                           "--workers 1.")
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


class LeasePolicy(Strict):
    """Admission from a local lease of each counter's room, for the Redis store (gateway/state/leases.py).

    Without it every admission is one Redis round trip, and limits are exact across replicas. With it a
    replica reserves a share of a limit's room in one round trip and admits the next requests from it in
    process: limits are still never passed, but a replica may refuse while another holds an unused lease.
    """

    requests: int = Field(32, ge=2, le=10_000, description="A lease covers up to this many more requests like "
                          "the one that takes it (its tokens and cost for token and USD limits); a busy process's "
                          "leases keep pace with it, up to 8 times this: four times the requests that looked to a "
                          "lease while its last top-up was on its way.")
    headroom_fraction: float = Field(0.05, gt=0, le=0.5, description="And at most this share of the room the "
                                     "limit has left, so leases shrink to nothing as a limit fills up and the "
                                     "last of it is admitted exactly.")
    idle_s: float = Field(1.0, ge=0.05, le=60, description="A lease nobody admitted from for this long is given "
                          "back; at most this long another replica may be refused for room a lease holds.")


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
    leases: LeasePolicy | None = Field(None, description="Admit from local leases of each limit's room instead "
                                       "of one Redis round trip per request (Redis only; see LeasePolicy).")

    @model_validator(mode="after")
    def _url_for_redis(self) -> StatePolicy:
        if self.url and self.cluster:
            raise ValueError("set `url` (one Redis) or `cluster` (a Redis Cluster's nodes), not both")
        if self.backend == "redis" and not (self.url or self.cluster):
            raise ValueError("backend: redis needs `url` (or `cluster`)")
        if self.cluster and self.backend in ("memory", "durable"):
            raise ValueError(f"`cluster` is only used by backend: redis (this is backend: {self.backend})")
        if self.leases is not None and (self.backend in ("memory", "durable") or not (self.url or self.cluster)):
            raise ValueError("`leases` saves Redis round trips: it needs backend: redis (`url` or `cluster`); the "
                             "memory and durable stores admit in process already")
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
    """Span batches: finished traces are queued and exported off the request path, on a thread of their own."""

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
    keep_slower_than_ms: float | None = Field(None, gt=0, description="Also keep every trace whose request took "
                                              "at least this long, sampled or not (tail sampling).")
    keep_costlier_than_usd: float | None = Field(None, gt=0, description="Also keep every trace whose request "
                                                 "cost at least this much, sampled or not (tail sampling). Costs "
                                                 "and budgets come from the ledger, never from traces.")
    batch: BatchExportPolicy = Field(default_factory=BatchExportPolicy)
    admission_events: Literal["notable", "all"] = Field(
        "notable", description="notable: a `switchboard.admission` event (and its `.settled` reconciliation) for "
        "a refusal, a downgrade, a fallback's own limits, or an admission that leaves a limit or budget with under "
        "10% of its room; all: for every admitted request as well.")
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
