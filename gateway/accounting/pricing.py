"""Prices as data, and the cost of a request's usage.

The shipped table (`policies/prices.yaml`) and the policy's `prices:` section
are merged into one `PriceBook` when the policy loads; a request only looks its
target up in a dict. Every `Price` carries the version and effective date that
billed it, so a ledger entry can always say which price produced its cost.

The API other modules use (budgets, routing by cost) is deliberately small::

    price = policy.prices.price_of(target)
    cost_usd = price.cost(usage) if price is not None else None

Costs are float USD. Prices are per 1M tokens; per-request costs are exact to
far below a micro-dollar, which is plenty for cents-level accounting.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import yaml
from pydantic import ValidationError

from gateway.policy.model_schema import PriceSpec
from gateway.policy.parts import Compiling, PartProblems, PolicyPart
from gateway.policy.schema import PolicyDocument, PricesPolicy
from providers.base import Usage

if TYPE_CHECKING:
    from gateway.compiled.policy import Target

SHIPPED_TABLE = Path(__file__).resolve().parents[2] / "policies" / "prices.yaml"
COST_HEADER = "x-switchboard-cost-usd"

# Provider kinds billed from another kind's price list (e.g. Azure OpenAI bills
# OpenAI models). Every other kind is its own family.
_KIND_FAMILY = {"azure": "openai", "azure_openai": "openai", "vertex_ai": "gemini", "vertex": "gemini"}
# Dated snapshots (gpt-4o-2024-08-06, claude-sonnet-4-5-20250929, ...@20250929)
# are billed like their undated model when the table has no exact entry.
_SNAPSHOT_SUFFIX = re.compile(r"(?:[-@]\d{4}-\d{2}-\d{2}|[-@]\d{8})$")
_PER_TOKEN = 1e-6


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens for one model, and where that number came from.

    `cached_input` and `cache_write` default to the input price when a
    provider does not bill them separately.
    """

    input: float
    output: float
    cached_input: float
    cache_write: float
    effective_date: dt.date
    version: str
    source: str = ""

    def cost(self, usage: Usage) -> float:
        """USD for `usage`.

        Canonical usage counts cached and cache-write tokens inside
        `prompt_tokens` (as OpenAI and Gemini report them, and as the GenAI
        conventions define input tokens), so only the remainder is billed at
        the input price. Reasoning tokens are inside `completion_tokens` and
        billed at the output price.
        """
        cached = usage.cached_tokens
        written = usage.cache_write_tokens
        uncached = max(0, usage.prompt_tokens - cached - written)
        return (uncached * self.input + cached * self.cached_input + written * self.cache_write
                + usage.completion_tokens * self.output) * _PER_TOKEN


class PriceBook:
    """Every price a policy knows, looked up by (provider name, upstream model).

    Lookup order: the public model's `price` (`price_of`), the policy's per-target price (`prices.targets.<provider>`,
    exact model, then `"*"`), then the provider's price family in the merged
    table (policy `prices.models` over the shipped file), exact model name and
    then the undated name of a dated snapshot.
    """

    def __init__(
        self,
        families: Mapping[str, Mapping[str, Price]],
        provider_family: Mapping[str, str],
        targets: Mapping[str, Mapping[str, Price]],
        public: Mapping[str, Price] | None = None,
    ) -> None:
        self._families = families
        self._provider_family = dict(provider_family)
        self._targets = targets
        self._public = dict(public or {})
        self._resolved: dict[tuple[str, str], Price | None] = {}

    def price_for(self, provider: str, model: str) -> Price | None:
        """The price billing `model` on the provider named `provider` (or on a price family of that name)."""
        key = (provider, model)
        try:
            return self._resolved[key]
        except KeyError:
            pass
        price = self._resolve(provider, model)
        if len(self._resolved) < 10_000:  # bounded: model names can come from clients via pass-through routes
            self._resolved[key] = price
        return price

    def price_of(self, target: Target) -> Price | None:
        """The price billing a request served by `target`: its public model's `price`, else `price_for`."""
        public = self._public.get(target.public_model) if self._public else None
        return public if public is not None else self.price_for(target.provider.name, target.upstream_model)

    def _resolve(self, provider: str, model: str) -> Price | None:
        per_target = self._targets.get(provider)
        if per_target is not None:
            price = per_target.get(model) or per_target.get("*")
            if price is not None:
                return price
        table = self._families.get(self._provider_family.get(provider, provider))
        if not table:
            return None
        return table.get(model) or table.get(_SNAPSHOT_SUFFIX.sub("", model))

    def warm(self, pairs: list[tuple[str, str]]) -> None:
        """Resolve the policy's targets up front, so requests only do a dict lookup."""
        for provider, model in pairs:
            self.price_for(provider, model)

    @property
    def families(self) -> Mapping[str, Mapping[str, Price]]:
        return self._families


EMPTY_PRICE_BOOK = PriceBook({}, {}, {})


def build_price_book(section: PricesPolicy, provider_kinds: Mapping[str, str], base_dir: Path,
                     public: Mapping[str, PriceSpec] | None = None) -> PriceBook:
    """Merge the shipped (or configured) table with the policy's prices; raises `ValueError` on a bad table.

    `public` holds the prices set on public models (`models.<name>.price`), which win over all the rest."""
    table_path = SHIPPED_TABLE if section.table is None else (base_dir / section.table)
    families = {family: dict(models) for family, models in load_price_table(table_path).items()}
    default_version = section.version or "policy"
    for family, models in section.models.items():
        entries = families.setdefault(family, {})
        for model, spec in models.items():
            entries[model] = price_from_spec(spec, default_version, "policy prices.models")
    provider_family = {name: _KIND_FAMILY.get(kind, kind) for name, kind in provider_kinds.items()}
    provider_family.update(section.families)
    targets = {
        provider: {model: price_from_spec(spec, default_version, f"policy prices.targets.{provider}")
                   for model, spec in models.items()}
        for provider, models in section.targets.items()
    }
    by_model = {name: price_from_spec(spec, default_version, f"policy models.{name}.price")
                for name, spec in (public or {}).items()}
    return PriceBook(families, provider_family, targets, by_model)


def load_price_table(path: Path) -> Mapping[str, Mapping[str, Price]]:
    """A price table file (the format of `policies/prices.yaml`), parsed once per file version."""
    try:
        stamp = path.stat().st_mtime_ns
    except OSError as exc:
        raise ValueError(f"cannot read price table {path}: {exc.strerror or exc}") from exc
    return _parsed_table(str(path), stamp)


@lru_cache(maxsize=8)
def _parsed_table(path: str, stamp: int) -> Mapping[str, Mapping[str, Price]]:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read price table {path}: {exc}") from exc
    defaults = raw.get("defaults") or {}
    families: dict[str, dict[str, Price]] = {}
    for family, models in (raw.get("families") or {}).items():
        for model, entry in (models or {}).items():
            try:
                spec = PriceSpec.model_validate({**defaults, **entry})
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"price table {path}: families.{family}.{model}.{where}: {first['msg']}") from exc
            families.setdefault(family, {})[model] = price_from_spec(spec, "unversioned", path)
    return families


def price_from_spec(spec: PriceSpec, default_version: str, default_source: str) -> Price:
    """A runtime `Price` from a validated entry: list prices, or derived from a GPU's hourly cost."""
    if spec.gpu is not None:
        gpu = spec.gpu
        hourly = gpu.hourly_usd * gpu.count
        input_price = hourly / (gpu.input_tokens_per_s * 3600) * 1e6
        output_price = hourly / (gpu.output_tokens_per_s * 3600) * 1e6
    else:
        assert spec.input is not None and spec.output is not None  # the schema requires one form
        input_price, output_price = spec.input, spec.output
    return Price(
        input=input_price,
        output=output_price,
        cached_input=input_price if spec.cached_input is None else spec.cached_input,
        cache_write=input_price if spec.cache_write is None else spec.cache_write,
        effective_date=spec.effective_date or dt.date.today(),
        version=spec.version or default_version,
        source=spec.source or default_source,
    )


def charge(prices: PriceBook, target: Target | None, usage: Usage | None) -> tuple[float | None, str | None]:
    """(cost in USD, price version) of a request's usage on its target; (None, None) when unpriced."""
    if target is None or usage is None:
        return None, None
    price = prices.price_of(target)
    if price is None:
        return None, None
    return price.cost(usage), price.version


def mark_estimated(data: bytes) -> bytes:
    """A usage chunk the gateway counted itself, marked so in the `switchboard` extension (no price to add)."""
    return _with_extension(data, b'{"usage_estimated":true}')


def format_usd(cost: float) -> str:
    """A cost as the header and stream field carry it: plain decimal, up to 10 places."""
    text = f"{cost:.10f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def with_cost(data: bytes, cost: float, version: str, *, estimated: bool = False) -> bytes:
    """A stream chunk's JSON with the `switchboard` extension object added next to `usage`.

    OpenAI clients ignore unknown fields, so the final usage chunk can carry
    the same authoritative cost a non-streamed reply sends as a header, and
    `usage_estimated` when the gateway counted the usage itself.
    """
    extension = b'{"cost_usd":' + format_usd(cost).encode() + b',"price_version":' + orjson.dumps(version) \
        + (b',"usage_estimated":true}' if estimated else b"}")
    return _with_extension(data, extension)


def _with_extension(data: bytes, extension: bytes) -> bytes:
    body = data.rstrip()
    if not body.endswith(b"}"):
        return data
    return body[:-1] + (b"," if len(body) > 2 else b"") + b'"switchboard":' + extension + b"}"


def price_problems(document: PolicyDocument) -> list[tuple[tuple[str | int, ...], str]]:
    """Cross-references of the `prices:` section, as (YAML path, message) pairs for the policy loader."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    defined = ", ".join(sorted(document.providers))
    for section in ("families", "targets"):
        for provider in getattr(document.prices, section):
            if provider not in document.providers:
                problems.append((("prices", section, provider), f"unknown provider {provider!r}; defined: {defined}"))
    # `prices.models` is keyed by price family, and a provider's name is an easy slip there: its prices would
    # never be looked up (the provider is billed under its family), leaving its requests unpriced.
    billed_under = {name: document.prices.families.get(name) or _KIND_FAMILY.get(provider.kind, provider.kind)
                    for name, provider in document.providers.items()}
    for family in document.prices.models:
        if family in billed_under and family not in billed_under.values():
            problems.append((("prices", "models", family),
                             f"{family!r} is a provider, billed under the price family {billed_under[family]!r}, "
                             f"and prices.models is keyed by price family: to price this provider's models, use "
                             f"prices.targets.{family} (or set prices.families.{family})"))
    return problems


def _compile_prices(compiling: Compiling) -> PriceBook:
    document = compiling.document
    try:
        prices = build_price_book(document.prices, compiling.provider_kinds, compiling.base_dir,
                                  {name: model.price for name, model in document.models.items() if model.price})
    except ValueError as exc:
        raise PartProblems([(("prices", "table"), str(exc))]) from exc
    prices.warm([(target.provider, target.model) for model in document.models.values() for target in model.targets])
    return prices


# The price book every request is billed by: `Policy.prices`.
PRICES = PolicyPart("prices", check=price_problems, build=_compile_prices)
