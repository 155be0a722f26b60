"""`switchboard policy diff OLD NEW`: what a policy change does, per team and model, in words.

Both files are loaded into runtime policies first (gateway/compiled/policy.py), so
defaults, `"*"`, the keys file and the price table are resolved: a change
that only restates a default is no change, and a price table edit shows up
on every model it bills. Each policy is described as subjects (a provider, a
model, a team, a team's key, a team x model pair, a settings section), each
with named aspects rendered as short text; the diff compares the two
descriptions aspect by aspect.

Secrets never reach the output: key hashes, upstream API keys, extra headers
and URLs that may carry a password are `Hidden`, compared but printed only
as "changed".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from gateway.accounting.budgets import MICROS, Budget
from gateway.accounting.hierarchy import EndUserRules
from gateway.accounting.plans import RateRule
from gateway.compiled.policy import Model, Policy, Provider

# Field names whose values may be credentials: compared, never printed.
_SECRET_FIELDS = frozenset({"api_key", "headers", "url", "hash", "extra_headers"})
# user:password@ in a URL (a base_url, an OTLP endpoint).
_URL_CREDENTIALS = re.compile(r"//[^/@\s]+@")
# Subjects print in this order, then by name.
_PERIOD = {"daily": "day", "weekly": "week", "monthly": "month"}
# What an added or removed subject is summarised by (prices too); the rest is listed only when it changes.
_HEADLINES = frozenset({"kind", "base_url", "routes", "fallbacks", "models", "keys", "rate limits", "budget",
                        "state", "expires", "cache", "tags"})
_KIND_ORDER = {"settings": 0, "provider": 1, "model": 2, "team": 3, "team model": 4, "key": 5}


@dataclass(frozen=True, slots=True)
class Hidden:
    """A secret: equal when the secrets are equal; its text says nothing about it."""

    secret: Any

    def __str__(self) -> str:
        return "(not shown)"


Value = str | tuple[str, ...] | Hidden


@dataclass(frozen=True, slots=True)
class Change:
    """One aspect of one subject that differs; `old`/`new` is None where the subject or aspect is absent."""

    kind: str  # a key of _KIND_ORDER
    name: tuple[str, ...]  # e.g. ("alpha",) or ("alpha", "chat-model")
    aspect: str
    old: Value | None
    new: Value | None

    @property
    def subject(self) -> str:
        if self.kind == "team model":
            return f"team {self.name[0]}, model {self.name[1]}"
        if self.kind == "key":
            return f"team {self.name[0]}, key {self.name[1]}"
        return f"{self.kind} {self.name[0]}"


Subject = tuple[str, tuple[str, ...]]


def diff_policies(old: Policy, new: Policy) -> list[Change]:
    """Every aspect that differs between two loaded policies, in a stable order (subject, then aspect)."""
    before, after = describe(old), describe(new)
    changes: list[Change] = []
    for subject in sorted(before.keys() | after.keys(), key=lambda s: (_KIND_ORDER[s[0]], s[1])):
        old_aspects, new_aspects = before.get(subject), after.get(subject)
        if old_aspects is None or new_aspects is None:  # added or removed: one line, with what it is
            present = new_aspects if old_aspects is None else old_aspects
            assert present is not None
            summary = "; ".join(f"{aspect} {_text(value)}" for aspect, value in present.items()
                                if aspect in _HEADLINES or aspect.startswith("price on "))
            changes.append(Change(subject[0], subject[1], "", summary if old_aspects else None,
                                  summary if new_aspects else None))
            continue
        for aspect in [*old_aspects, *(a for a in new_aspects if a not in old_aspects)]:
            was, now = old_aspects.get(aspect), new_aspects.get(aspect)
            if was != now:
                changes.append(Change(subject[0], subject[1], aspect, was, now))
    return changes


def describe(policy: Policy) -> dict[Subject, dict[str, Value]]:
    """The policy as subjects and their aspects (text), everything resolved."""
    subjects: dict[Subject, dict[str, Value]] = {}
    settings = {"server": policy.server, "state": policy.state, "telemetry": policy.telemetry,
                "ledger": policy.ledger, "console": policy.console, "response_store": policy.response_store}
    for section, model in settings.items():
        subjects[("settings", (section,))] = dict(_flatten(model.model_dump(mode="json")))
    rules = policy.rules
    subjects[("settings", ("admission",))] = {
        "default_completion_tokens": str(rules.default_completion_tokens if rules else 1024)}
    subjects[("settings", ("tags",))] = {"header": policy.tags.header or "off (no cost attribution tags)"}
    subjects[("settings", ("admin",))] = {"admin keys": Hidden(policy.admin_keys),
                                          "admin key count": str(len(policy.admin_keys))}
    for name, provider in policy.providers.items():
        subjects[("provider", (name,))] = _provider(provider)
    for name, model in policy.models.items():
        subjects[("model", (name,))] = _model(policy, model)
    keys_by_team: dict[str, list[Any]] = {}
    for entry in policy.keys.values():
        keys_by_team.setdefault(entry.team.name, []).append(entry)
    for name, team in policy.teams.items():
        aspects: dict[str, Value] = {
            "models": ("every model",) if team.all_models else tuple(sorted(team.allowed_models)),
            "fallback models": tuple(sorted(team.fallback_models)),
            "max concurrent": _or_none(team.max_concurrent),
            "rate limits": _rates(rules.team_rates.get(name, ()) if rules else ()),
            "budget": _budget(rules.team_budgets.get(name) if rules else None),
            "organization": (rules.hierarchy.organizations.get(name) or "none") if rules else "none",
            "organization budget": _budget(rules.hierarchy.org_budgets.get(name) if rules else None),
            "end users": _end_users(rules.hierarchy.end_users.get(name) if rules else None),
            "keys": tuple(sorted(entry.key_id for entry in keys_by_team.get(name, ()))),
            "tags": tag_rules.describe() if (tag_rules := policy.tags.teams.get(name)) is not None else "off",
        }
        subjects[("team", (name,))] = aspects
        for model_name in sorted(policy.models):
            pair = _team_model(policy, name, model_name)
            if pair:
                subjects[("team model", (name, model_name))] = pair
        for entry in keys_by_team.get(name, ()):
            subjects[("key", (name, entry.key_id))] = {
                "state": "disabled" if entry.disabled else "enabled",
                "expires": _time(entry.expires_at),
                "max concurrent": _or_none(entry.max_concurrent),
                "rate limits": _rates(rules.key_rates.get(entry.key_id, ()) if rules else ()),
                "budget": _budget(rules.key_budgets.get(entry.key_id) if rules else None),
                "secret": Hidden(entry.digest),
            }
    return subjects


def _provider(provider: Provider) -> dict[str, Value]:
    settings = provider.settings
    aspects: dict[str, Value] = {
        "kind": settings.kind, "base_url": _text(settings.base_url),
        "api_key": Hidden(settings.api_key), "headers": Hidden(tuple(sorted(settings.extra_headers.items()))),
        "timeouts": f"connect {provider.connect_timeout_s:g}s, first byte {provider.first_byte_timeout_s:g}s, "
                    f"total {provider.total_timeout_s:g}s",
        "pool": f"{provider.max_connections} connections, keepalive {provider.keepalive_s:g}s",
        "request id header": f"{provider.request_id_header or 'not sent'}"
                             + (" (uuid)" if provider.request_id_header and provider.request_id_uuid else ""),
    }
    for label, block in (("health_check", provider.health_check), ("metrics", provider.metrics),
                         ("kv_events", provider.kv_events)):
        aspects[label] = "off" if block is None else _inline(block)
    if isinstance(settings.options, BaseModel):
        aspects.update(_flatten(settings.options.model_dump(mode="json"), ("options",)))
    return aspects


def _model(policy: Policy, model: Model) -> dict[str, Value]:
    config = model.plan.config
    aspects: dict[str, Value] = {"routes": tuple(f"{t.provider.name}/{t.upstream_model}" for t in model.targets)}
    for target in model.targets:
        aspects[f"weight of {target.provider.name}/{target.upstream_model}"] = f"{target.weight:g}"
    fallbacks = config.fallbacks
    aspects["fallbacks"] = tuple(f"{reason}: {' -> '.join(chain)}" for reason, chain in (
        ("default", fallbacks.default), ("context_window", fallbacks.context_window),
        ("content_policy", fallbacks.content_policy)) if chain)
    for target in model.targets:
        where = f"{target.provider.name}/{target.upstream_model}"
        if target.cost is not None:
            aspects[f"routing cost of {where}"] = f"{target.cost:g}"
        if target.tags:
            aspects[f"tags of {where}"] = ",".join(f"{k}={v}" for k, v in sorted(target.tags))
        price = policy.prices.price_of(target)
        aspects[f"price on {where}"] = "none" if price is None else (
            f"${price.input:g} input, ${price.cached_input:g} cached input, ${price.output:g} output per 1M tokens "
            f"(version {price.version})")
    settings = config.model_dump(mode="json", exclude={"targets", "fallbacks", "cache", "price"})
    aspects.update(_flatten(settings))
    return aspects


def _team_model(policy: Policy, team: str, model: str) -> dict[str, Value]:
    aspects: dict[str, Value] = {}
    rates = policy.rules.model_rates.get((team, model)) if policy.rules else None
    if rates:
        aspects["rate limits"] = _rates(rates)
    rule = policy.cache.rules.get(team, {}).get(model)
    if rule is not None:
        store = rule.store
        where = f"redis {store.key_prefix}" if store.kind == "redis" else f"memory {store.max_bytes} bytes"
        aspects["cache"] = (f"{rule.mode}, scope {rule.scope}, ttl {rule.ttl_s:g}s, {where}"
                            + (", deterministic only" if rule.only_deterministic else "")
                            + ("" if rule.coalesce else ", no coalescing")
                            + (", hits count tokens" if rule.hits_count_tokens else "")
                            + (f", threshold {rule.semantic.threshold:g} via {rule.semantic.embedding_model}"
                               if rule.semantic is not None else ""))
    return aspects


def _rates(rules: Iterable[RateRule]) -> str:
    return ", ".join(f"{rule.limit} {rule.label}" for rule in rules) or "none"


def _end_users(users: EndUserRules | None) -> str:
    if users is None:
        return "not tracked"
    source = f"header {users.header}, else the user field" if users.header else "the user field"
    return (f"from {source}{', required' if users.required else ''}; up to {users.max_tracked} per period, "
            f"each with budget {_budget(users.template)}")


def _budget(budget: Budget | None) -> str:
    if budget is None:
        return "none"
    amounts = []
    if budget.tokens is not None:
        amounts.append(f"{budget.tokens} tokens")
    if budget.usd_micros is not None:
        amounts.append(f"${budget.usd_micros / MICROS:g}")
    period = budget.period
    text = f"{' and '.join(amounts)} per " + (period.describe() if period.kind == "rolling" else _PERIOD[period.kind])
    if period.kind != "rolling":
        text += f" ({budget.period.zone.key})"
    text += ", then " + ("reject" if budget.on_exhaust == "reject" else f"downgrade to {budget.downgrade_to}")
    if budget.soft_thresholds:
        text += ", alerts at " + ", ".join(f"{t:.0%}" for t in budget.soft_thresholds)
    if budget.hard_stop_streams:
        text += ", streams cut when spent"
    return text


def _time(timestamp: float | None) -> str:
    import datetime as dt

    return "never" if timestamp is None else dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(
        timespec="seconds").replace("+00:00", "Z")


def _or_none(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


def _inline(block: BaseModel) -> str:
    return ", ".join(f"{k} {v}" for k, v in block.model_dump(mode="json").items())


def _flatten(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterable[tuple[str, Value]]:
    for key, value in data.items():
        path = (*prefix, key)
        if key in _SECRET_FIELDS:
            yield ".".join(path), Hidden(repr(value))
        elif isinstance(value, dict) and value:
            yield from _flatten(value, path)
        else:
            yield ".".join(path), _text(value)


def _text(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ", ".join(str(v) for v in value) or "none"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return _URL_CREDENTIALS.sub("//(credentials not shown)@", str(value))


# --- rendering ------------------------------------------------------------------------------


def render_text(changes: list[Change]) -> str:
    """The changes grouped by subject, one line per aspect; "no changes" when there are none."""
    if not changes:
        return "no changes\n"
    lines: list[str] = []
    current = ""
    for change in changes:
        if not change.aspect:
            lines.append(f"{change.subject}: {'added' if change.old is None else 'removed'}"
                         + (f" ({change.new or change.old})" if change.new or change.old else ""))
            current = ""
            continue
        if change.subject != current:
            lines.append(f"{change.subject}:")
            current = change.subject
        lines.append(f"  {change.aspect}: {_sentence(change.old, change.new)}")
    return "\n".join(lines) + "\n"


def _sentence(old: Value | None, new: Value | None) -> str:
    if isinstance(old, Hidden) or isinstance(new, Hidden):
        return "changed (value not shown)"
    if isinstance(old, tuple) and isinstance(new, tuple):
        added = [v for v in new if v not in old]
        removed = [v for v in old if v not in new]
        parts = [f"added {', '.join(added)}"] if added else []
        parts += [f"removed {', '.join(removed)}"] if removed else []
        if not parts:  # same items, another order (priority order matters for routes and fallbacks)
            parts = [f"reordered: {_text(old)} -> {_text(new)}"]
        return "; ".join(parts)
    if old is None:
        return f"{_text(new)} (new)"
    if new is None:
        return f"no longer applies (was {_text(old)})"
    return f"{_text(old)} -> {_text(new)}"


def render_json(changes: list[Change]) -> list[dict[str, Any]]:
    """The changes as JSON-ready objects; hidden values are null with `hidden: true`."""
    out = []
    for change in changes:
        entry: dict[str, Any] = {
            "kind": change.kind.replace(" ", "_"), "name": list(change.name),
            "change": "added" if change.old is None else "removed" if change.new is None else "changed",
            "aspect": change.aspect or None,
        }
        if isinstance(change.old, Hidden) or isinstance(change.new, Hidden):
            entry.update(old=None, new=None, hidden=True)
        else:
            entry.update(old=_json_value(change.old), new=_json_value(change.new))
        out.append(entry)
    return out


def _json_value(value: Value | None) -> Any:
    return list(value) if isinstance(value, tuple) else value
