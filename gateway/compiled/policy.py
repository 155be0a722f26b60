"""Loading a policy: YAML -> validated document -> immutable runtime policy.

Loading happens in two phases. The YAML is parsed, `${ENV}` references are
interpolated and the result is validated strictly against the schema (gateway/policy/schema.py);
then cross-references are resolved into a `Policy` the request path reads
without any further parsing. Every problem found is reported as
`path.to.field: message (line N)`, all of them at once.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.accounting.pricing import EMPTY_PRICE_BOOK, PriceBook
from gateway.accounting.rules import Rules
from gateway.accounting.tags import EMPTY_TAG_PLAN, TagPlan
from gateway.accounting.webhooks import Webhook
from gateway.cache.plan import EMPTY_CACHE_PLAN, CachePlan
from gateway.compiled.parts import POLICY_PARTS
from gateway.policy.alert_schema import AlertsPolicy
from gateway.policy.diagnosis import file_path, line_of, stand_in_document, suggestion
from gateway.policy.key_files import KeysFileError, file_stamp, keys_file_path, merge_keys, read_keys_file
from gateway.policy.model_schema import ModelPolicy
from gateway.policy.parts import Compiling, PartProblems, Problem
from gateway.policy.provider_schema import HealthCheckPolicy, KVEventsPolicy, MetricsScrapePolicy, ProviderBase
from gateway.policy.schema import (
    ConsolePolicy,
    LedgerPolicy,
    PolicyDocument,
    ResponseStorePolicy,
    ServerPolicy,
    StatePolicy,
    TelemetryPolicy,
)
from gateway.response_store.rules import TeamResponseRules
from gateway.routing.experiments import ModelExperiments, build_experiments
from gateway.routing.plan import RoutePlan
from gateway.telemetry.decisions import Candidates, candidates
from providers import adapter_for
from providers.base import Adapter, ProviderSettings


class PolicyError(Exception):
    """A policy that cannot be loaded; `problems` lists each one as `path: message`."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: invalid policy\n" + "\n".join(f"  {p}" for p in problems))
        self.source = source
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Provider:
    """A configured provider, resolved: its adapter and connection settings."""

    settings: ProviderSettings
    adapter: Adapter
    connect_timeout_s: float
    first_byte_timeout_s: float
    total_timeout_s: float
    max_connections: int
    keepalive_s: float
    health_check: HealthCheckPolicy | None = None
    metrics: MetricsScrapePolicy | None = None
    kv_events: KVEventsPolicy | None = None
    # Where the request id goes upstream (gateway/upstream/request_ids.py): header name or None, and whether as a UUID.
    request_id_header: str | None = "x-request-id"
    request_id_uuid: bool = True
    # Settings that require a new connection pool when they change: everything the pooled client is
    # built from (gateway/upstream/pools.py), its timeouts included. Computed once: it holds the options
    # model, whose hash is too slow to recompute on every request.
    pool_identity: tuple[Any, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pool_identity", (
            self.settings.kind, self.settings.base_url, self.max_connections, self.keepalive_s,
            self.connect_timeout_s, self.first_byte_timeout_s, self.total_timeout_s, self.settings.options))

    @property
    def name(self) -> str:
        return self.settings.name


@dataclass(frozen=True, slots=True)
class Target:
    provider: Provider
    upstream_model: str
    weight: float = 1.0
    tags: frozenset[tuple[str, str]] = frozenset()
    cost: float | None = None
    # The public model this target serves here (a deployment shared by two models is two targets): its
    # `price` bills the request (gateway/accounting/pricing.py).
    public_model: str = ""
    # The provider's settings with this model's overrides (e.g. Anthropic `prompt_caching`); None: the provider's.
    settings: ProviderSettings | None = None
    # Identity across reloads, which routing state is kept by: provider name, its URL, the upstream model.
    key: tuple[str, str, str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.provider.name, self.provider.settings.base_url, self.upstream_model))


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    targets: tuple[Target, ...]
    owned_by: str
    # Strategy and resilience settings (gateway/routing/plan.py).
    plan: RoutePlan = field(repr=False, compare=False)
    # How route events name and weigh `targets`, made with the model rather than per event.
    candidates: Candidates = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", candidates(self.targets))


@dataclass(frozen=True, slots=True)
class Team:
    name: str
    allowed_models: frozenset[str]
    all_models: bool
    max_concurrent: int | None = None
    # Models the team may be served as a fallback only (teams.<t>.fallback_models).
    fallback_models: frozenset[str] = frozenset()

    def may_use(self, model: str) -> bool:
        return self.all_models or model in self.allowed_models

    def may_fall_back_to(self, model: str) -> bool:
        return self.may_use(model) or model in self.fallback_models


@dataclass(frozen=True, slots=True)
class KeyEntry:
    key_id: str
    team: Team
    digest: bytes
    disabled: bool
    expires_at: float | None = None  # unix time from which the key is refused
    max_concurrent: int | None = None


@dataclass(frozen=True, slots=True)
class OptionalSteps:
    """Which optional steps of the request path a policy has any use for, decided once when it is built.

    A step no team, key or rule of the policy turns on is skipped outright on every request (no call, no
    lookup that is bound to find nothing): a request pays only for the features its policy uses.
    """

    admission: bool  # rate limits or budgets anywhere (gateway/accounting/limits.py)
    tags: bool  # cost attribution tags (gateway/accounting/tags.py)
    end_users: bool  # a team that names its end users (gateway/accounting/hierarchy.py)
    organizations: bool  # a team in an organisation: the usage record names it
    concurrency_slots: bool  # a key or team with `max_concurrent` (gateway/http/gate.py)
    response_cache: bool  # a (team, model) pair whose responses are cached (gateway/cache/)


@dataclass(frozen=True, slots=True)
class Policy:
    """The runtime policy: everything a request needs, resolved and immutable."""

    source: str
    fingerprint: str
    server: ServerPolicy
    providers: Mapping[str, Provider]
    models: Mapping[str, Model]
    teams: Mapping[str, Team]
    keys: Mapping[bytes, KeyEntry]
    # SHA-256 digests of the keys that may call /admin endpoints.
    admin_keys: frozenset[bytes] = frozenset()
    console: ConsolePolicy = field(default_factory=ConsolePolicy)
    # Cost attribution and observability (gateway/accounting/pricing.py, telemetry.py, ledger.py).
    prices: PriceBook = EMPTY_PRICE_BOOK
    telemetry: TelemetryPolicy = field(default_factory=TelemetryPolicy)
    ledger: LedgerPolicy = field(default_factory=LedgerPolicy)
    ledger_path: Path | None = None
    # Response caching rules per (team, model) (gateway/cache/).
    cache: CachePlan = EMPTY_CACHE_PLAN
    # Rate limits and budgets by scope (gateway/accounting/limits.py) and where their counters live.
    rules: Rules | None = None
    state: StatePolicy = field(default_factory=StatePolicy)
    # The keys file merged into the teams (`keys_file`); the policy store watches it too.
    keys_path: Path | None = None
    keys_stamp: tuple[str, int, int, int] | None = None  # the keys file as it was read
    # Stored Responses API state per team (gateway/response_store/) and where it lives.
    responses: Mapping[str, TeamResponseRules] = field(default_factory=dict)
    response_store: ResponseStorePolicy = field(default_factory=ResponseStorePolicy)
    # Webhooks budget alerts are posted to, secrets read (gateway/accounting/alerts.py, gateway/accounting/webhooks.py).
    webhooks: Mapping[str, Webhook] = field(default_factory=dict)
    alerts: AlertsPolicy = field(default_factory=AlertsPolicy)  # queue settings, read at startup
    # Cost attribution tags per team (gateway/accounting/tags.py); header None: attribution off.
    tags: TagPlan = EMPTY_TAG_PLAN
    # Canary and shadow traffic of the models that have them (gateway/routing/experiments.py).
    experiments: Mapping[str, ModelExperiments] = field(default_factory=dict)
    # Derived from the fields above (so `dataclasses.replace` keeps it true).
    steps: OptionalSteps = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        rules = self.rules
        hierarchy = rules.hierarchy if rules is not None else None
        object.__setattr__(self, "steps", OptionalSteps(
            admission=rules is not None and rules.any,
            tags=self.tags.header is not None,
            end_users=hierarchy is not None and bool(hierarchy.end_users),
            organizations=hierarchy is not None and bool(hierarchy.organizations),
            concurrency_slots=any(team.max_concurrent is not None for team in self.teams.values())
            or any(key.max_concurrent is not None for key in self.keys.values()),
            response_cache=bool(self.cache.rules),
        ))


def load_policy(path: str | Path, environ: Mapping[str, str] | None = None) -> Policy:
    """Read, validate and build the policy at `path`; raises `PolicyError`."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(source, [f"cannot read file: {exc.strerror or exc}"]) from exc
    return parse_policy(text, source, environ)


def parse_policy(text: str, source: str = "<policy>", environ: Mapping[str, str] | None = None) -> Policy:
    environ = os.environ if environ is None else environ
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise PolicyError(source, [f"not valid YAML: {getattr(exc, 'problem', exc)}{where}"]) from exc
    if not isinstance(raw, dict):
        raise PolicyError(source, ["the policy must be a mapping with providers, models and teams"])
    problems: list[str] = []
    raw = _interpolate(raw, environ, (), problems, root)
    if problems:
        raise PolicyError(source, problems)
    keys_path = keys_file_path(source, raw)
    keys_text, keys_stamp = "", None
    if keys_path is not None:  # team keys kept beside the policy (gateway/policy/key_files.py)
        keys_stamp = file_stamp(keys_path)  # before reading: a write after it is seen as a change
        try:
            keys_text, file_keys = read_keys_file(keys_path)
        except KeysFileError as exc:
            raise PolicyError(source, exc.problems) from exc
        problems = merge_keys(raw, file_keys, keys_path)
        if problems:
            raise PolicyError(source, problems)
    try:
        document = PolicyDocument.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        problems = [_describe(error, root, raw) for error in errors]
        # The reference and cross-field problems too, checked on stand-ins for the invalid entries.
        stand_in = stand_in_document(raw, errors)
        if stand_in is not None:
            problems += [p for p in _cross_reference_problems(stand_in, root) if p not in problems]
        raise PolicyError(source, problems) from exc
    problems = _cross_reference_problems(document, root)
    if problems:
        raise PolicyError(source, problems)
    compiling = Compiling(document, _base_dir(source), environ,
                          {name: provider.kind for name, provider in document.providers.items()})  # type: ignore[attr-defined]
    parts: dict[str, Any] = {}
    for part in POLICY_PARTS:
        if part.build is not None:
            try:
                parts[part.name] = part.build(compiling)
            except PartProblems as exc:
                raise PolicyError(source, [_at(loc, root, message) for loc, message in exc.problems]) from exc
    fingerprint = hashlib.sha256((text + keys_text).encode()).hexdigest()[:16]
    return _build(document, source, fingerprint, parts, compiling.base_dir, keys_path, keys_stamp)


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, environ: Mapping[str, str], path: tuple[Any, ...], problems: list[str],
                 root: yaml.Node) -> Any:
    # Interpolating parsed scalars (not the raw text) means a variable's value can
    # never change the document's structure.
    if isinstance(value, dict):
        return {k: _interpolate(v, environ, (*path, k), problems, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, environ, (*path, i), problems, root) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ and environ[name] != "":
            return environ[name]
        if default is not None:
            return default
        problems.append(_at(path, root, f"environment variable {name} is not set (write ${{{name}:-default}} "
                                         "to give a default)"))
        return ""

    return _ENV_REFERENCE.sub(substitute, value)


def _describe(error: Mapping[str, Any], root: yaml.Node, raw: Mapping[str, Any]) -> str:
    # Discriminated unions add the tag (e.g. `openai`) as a path element; drop it
    # so the path reads as it does in the file.
    loc = file_path(error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown field" + (suggestion(loc, raw) or
                                     " (check the spelling; `switchboard policy schema` lists the fields)")
    elif error["type"] == "union_tag_invalid":
        message = f"unknown provider kind {error['input'].get('kind')!r}; known kinds: " + ", ".join(
            sorted(error["ctx"]["expected_tags"].replace("'", "").split(", "))
        )
    elif error["type"] == "union_tag_not_found":
        message = "missing `kind` (the provider type, e.g. openai, vllm, mock)"
    return _at(loc, root, message)


def _at(loc: tuple[Any, ...], root: yaml.Node, message: str) -> str:
    path = ".".join(str(p) for p in loc) or "(top level)"
    line = line_of(root, loc)
    return f"{path}: {message}" + (f" (line {line})" if line else "")


def _cross_reference_problems(document: PolicyDocument, root: yaml.Node) -> list[str]:
    """What the schema cannot check: the providers and models first, then each concern's part, then the teams."""
    found = [*_provider_problems(document), *(problem for part in POLICY_PARTS for problem in part.check(document)),
             *_team_problems(document)]
    return [_at(loc, root, message) for loc, message in found]


def _provider_problems(document: PolicyDocument) -> list[Problem]:
    problems: list[Problem] = []
    for name, provider in document.providers.items():
        kind: str = provider.kind  # type: ignore[attr-defined]
        capabilities = adapter_for(kind).capabilities
        if provider.base_url is None and capabilities.default_base_url is None:
            problems.append((("providers", name, "base_url"), f"required for kind {kind!r}"))
        if capabilities.requires_api_key and not provider.api_key:
            problems.append((("providers", name, "api_key"),
                             f"required for kind {kind!r} (e.g. api_key: ${{OPENAI_API_KEY}})"))
    for model_name, model in document.models.items():
        kinds = {getattr(document.providers.get(t.provider), "kind", None) for t in model.targets}
        if model.prompt_caching is not None and "anthropic" not in kinds:
            problems.append((("models", model_name, "prompt_caching"),
                             "applies to kind anthropic targets only, and this model has none"))
        for index, target in enumerate(model.targets):
            if target.provider not in document.providers:
                problems.append((("models", model_name, "targets", index, "provider"),
                                 f"unknown provider {target.provider!r}; defined: "
                                 + ", ".join(sorted(document.providers))))
    return problems


def _team_problems(document: PolicyDocument) -> list[Problem]:
    problems: list[Problem] = [
        (("admin", "keys", index, "expires_at"), "admin keys do not expire; add a new admin key, then remove or "
         "disable the old one") for index, key in enumerate(document.admin.keys) if key.expires_at is not None]
    key_owner: dict[str, str] = {}
    for team_name, team in document.teams.items():
        for field_name, names in (("models", team.models), ("fallback_models", team.fallback_models)):
            for index, model_name in enumerate(names):
                if model_name != "*" and model_name not in document.models:
                    problems.append((("teams", team_name, field_name, index),
                                     f"unknown model {model_name!r}; defined: " + ", ".join(sorted(document.models))))
        for index, key in enumerate(team.keys):
            for field_name, value in (("id", "id:" + key.id), ("hash", key.hash)):
                if value in key_owner:
                    problems.append((("teams", team_name, "keys", index, field_name),
                                     f"duplicate key {field_name}; already used by team {key_owner[value]!r}"))
                key_owner[value] = team_name
    return problems


def _build(document: PolicyDocument, source: str, fingerprint: str, parts: dict[str, Any], base_dir: Path,
           keys_path: Path | None, keys_stamp: tuple[str, int, int, int] | None) -> Policy:
    plans = parts.pop("route_plans")
    providers = {name: _build_provider(name, config) for name, config in document.providers.items()}
    models = {
        name: Model(name, tuple(Target(providers[t.provider], t.model, t.weight, frozenset(t.tags.items()), t.cost,
                                       name, _model_settings(providers[t.provider], model))
                                for t in model.targets), model.owned_by, plans[name])
        for name, model in document.models.items()
    }
    teams: dict[str, Team] = {}
    keys: dict[bytes, KeyEntry] = {}
    for name, config in document.teams.items():
        team = Team(name, frozenset(m for m in config.models if m != "*"), "*" in config.models,
                    config.max_concurrent, frozenset(config.fallback_models))
        teams[name] = team
        for key in config.keys:
            digest = bytes.fromhex(key.hash.removeprefix("sha256:"))
            expires = key.expires_at
            if expires is not None and expires.tzinfo is None:
                expires = expires.replace(tzinfo=datetime.UTC)
            keys[digest] = KeyEntry(key.id, team, digest, key.disabled,
                                    expires.timestamp() if expires is not None else None, key.max_concurrent)
    admin_keys = frozenset(bytes.fromhex(k.hash.removeprefix("sha256:")) for k in document.admin.keys if not k.disabled)
    ledger_path = base_dir / document.ledger.path if document.ledger.path else None
    return Policy(source, fingerprint, document.server, providers, models, teams, keys, admin_keys,
                  console=document.admin.console, ledger=document.ledger, ledger_path=ledger_path,
                  state=document.state, keys_path=keys_path, keys_stamp=keys_stamp,
                  response_store=document.response_store,
                  experiments=build_experiments(document, models, providers), **parts)


def _model_settings(provider: Provider, model: ModelPolicy) -> ProviderSettings | None:
    """The provider's settings as this model's requests use them, when the model overrides any."""
    options = provider.settings.options
    if model.prompt_caching is None or not hasattr(options, "prompt_caching"):
        return None
    return dataclasses.replace(provider.settings,
                               options=options.model_copy(update={"prompt_caching": model.prompt_caching}))


def _base_dir(source: str) -> Path:
    """Where the policy's relative paths start: its file's directory (the working directory for a string)."""
    return Path(source).parent if os.path.isfile(source) else Path.cwd()


def _build_provider(name: str, config: ProviderBase) -> Provider:
    kind: str = config.kind  # type: ignore[attr-defined]
    adapter = adapter_for(kind)
    settings = ProviderSettings(
        name=name,
        kind=kind,
        base_url=config.base_url or adapter.capabilities.default_base_url or "",
        api_key=config.api_key,
        extra_headers=dict(config.headers),
        options=config.options,  # type: ignore[attr-defined]
    )
    capabilities, request_id = adapter.capabilities, config.request_id
    header = (request_id.header or capabilities.request_id_header) if request_id.send else None
    as_uuid = capabilities.request_id_uuid if request_id.format is None else request_id.format == "uuid"
    return Provider(
        settings, adapter, config.timeouts.connect_s, config.timeouts.first_byte_s, config.timeouts.total_s,
        config.pool.max_connections, config.pool.keepalive_s, config.health_check, config.metrics,
        config.kv_events,
        header.lower() if header else None, as_uuid,
    )
