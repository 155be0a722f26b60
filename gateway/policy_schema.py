"""The policy file's schema: strict, frozen pydantic models, one per YAML section.

Unknown keys are refused everywhere, so a typo is an error rather than a
silently ignored setting. Provider entries are a union discriminated by
`kind`, built from the provider registry, so each kind validates its own
`options` and adding a provider needs no change here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from providers import ADAPTERS

KEY_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(Strict):
    """Per-phase limits for one upstream call."""

    connect_s: float = Field(5.0, gt=0, description="Establishing the TCP/TLS connection.")
    first_byte_s: float = Field(60.0, gt=0, description="From sending the request to the response headers.")
    total_s: float = Field(600.0, gt=0, description="The whole call, including reading a stream to its end.")


class Pool(Strict):
    """The provider's pooled HTTP client (one per provider, shared by all requests)."""

    max_connections: int = Field(100, ge=1, le=10_000, description="Concurrent connections to the upstream.")
    keepalive_s: float = Field(30.0, ge=0, description="How long an idle connection is kept for reuse.")


class ProviderBase(Strict):
    base_url: str | None = Field(
        None, description="Upstream base URL including the version prefix, e.g. https://api.openai.com/v1. "
        "Defaults to the kind's public endpoint where it has one."
    )
    api_key: str | None = Field(None, description="Upstream credential; use ${ENV_VAR} to keep it out of git.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra headers sent on every upstream call.")
    timeouts: Timeouts = Field(default_factory=Timeouts)
    pool: Pool = Field(default_factory=Pool)

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


class ModelPolicy(Strict):
    """A public model name clients may ask for, and where it is served."""

    targets: list[TargetPolicy] = Field(min_length=1, description="Deployments serving this model, in order.")
    owned_by: str = Field("switchboard", description="Shown in GET /v1/models.")


class KeyPolicy(Strict):
    """A virtual key. Only its hash is stored; `switchboard keys new` makes one."""

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
                    description="A name for the key that is safe to log and trace.")
    hash: str = Field(pattern=KEY_HASH_PATTERN, description="sha256:<hex digest of the key>.")
    disabled: bool = Field(False, description="Refuse this key without deleting it.")


class TeamPolicy(Strict):
    keys: list[KeyPolicy] = Field(default_factory=list)
    models: list[str] = Field(
        default_factory=list, description='Public models this team may use; "*" allows every model.'
    )


class ReloadPolicy(Strict):
    watch: bool = Field(True, description="Reload when the policy file changes (SIGHUP always reloads).")
    poll_interval_s: float = Field(1.0, gt=0, le=3600)


class ServerPolicy(Strict):
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Larger request bodies get 413.")
    shutdown_grace_s: float = Field(30.0, ge=0, description="How long SIGTERM waits for in-flight requests.")
    reload: ReloadPolicy = Field(default_factory=ReloadPolicy)


class PolicyDocument(Strict):
    """The whole policy file."""

    version: Literal[1] = Field(1, description="Schema version of this file.")
    server: ServerPolicy = Field(default_factory=ServerPolicy)
    providers: dict[str, ProviderPolicy] = Field(min_length=1)
    models: dict[str, ModelPolicy] = Field(min_length=1)
    teams: dict[str, TeamPolicy] = Field(min_length=1)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the policy file, for editors and CI linting."""
    schema = PolicyDocument.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Switchboard policy"
    return schema
