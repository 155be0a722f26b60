"""Reporting every problem of a policy file in one pass, with a suggestion for a misspelt field.

Schema validation fails before cross-references (unknown providers, fallbacks to nowhere, ...) can be
checked, because those checks need a valid document. So when the schema refuses the file, the refused
values are dropped (their defaults apply) and, where that is not enough, the entry is swapped for a
neutral stand-in of the same name (a `mock` provider, a model with one target, an empty team, a
section's default); the cross-field checks run on that. The operator sees the type errors and the
reference errors together.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from gateway.policy.schema import PolicyDocument

_ENTRY_SECTIONS = ("providers", "models", "teams")


def stand_in_document(raw: Mapping[str, Any], errors: Sequence[Mapping[str, Any]]) -> PolicyDocument | None:
    """The document without what the schema refused; None when it cannot be made valid.

    Each refused value is dropped (so its default applies); an entry that still fails, e.g. for a missing
    required field, is swapped for a stand-in of the same name; a top-level section, for its default.
    """
    patched = copy.deepcopy(dict(raw))
    for _ in range(4):
        for error in errors:
            _drop(patched, file_path(error["loc"]))
        try:
            return PolicyDocument.model_validate(patched)
        except ValidationError as exc:
            errors = exc.errors()
    return None


def file_path(loc: Sequence[Any]) -> tuple[Any, ...]:
    """A pydantic error location as the file reads: without the provider union's `kind` tag."""
    loc = tuple(loc)
    return loc[:2] + loc[3:] if len(loc) >= 3 and loc[0] == "providers" else loc


def _drop(document: dict[str, Any], loc: tuple[Any, ...]) -> None:
    if not loc:
        return
    parent: Any = document
    for part in loc[:-1]:
        parent = parent.get(part) if isinstance(parent, dict) else (
            parent[part] if isinstance(parent, list) and isinstance(part, int) and part < len(parent) else None)
    section = loc[0]
    if len(loc) > 2 and isinstance(parent, dict) and loc[-1] in parent:
        del parent[loc[-1]]
    elif section in _ENTRY_SECTIONS and len(loc) >= 2 and isinstance(document.get(section), dict):
        document[section][loc[1]] = _stand_in(section, document)
    else:
        document.pop(section, None)


def _stand_in(section: str, document: Mapping[str, Any]) -> dict[str, Any]:
    if section == "providers":
        return {"kind": "mock"}
    if section == "models":
        providers = document.get("providers")
        provider = next(iter(providers), "-") if isinstance(providers, dict) and providers else "-"
        return {"targets": [{"provider": provider, "model": "-"}]}
    return {}


def line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The YAML line of the deepest node along `loc` that exists."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            match = node.value[part]
        else:
            match = None
        if match is None:
            break
        node, line = match, match.start_mark.line + 1
    return line


def suggestion(loc: Sequence[Any], raw: Mapping[str, Any]) -> str:
    """` (did you mean `x`?)` for an unknown field at `loc` (the path as the file reads), or ''."""
    fields = _fields_at(loc[:-1], raw)
    close = difflib.get_close_matches(str(loc[-1]), sorted(fields), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _fields_at(loc: Sequence[Any], raw: Any) -> set[str]:
    """The field names the schema allows at `loc`, following the values in `raw` through unions."""
    kind: Any = PolicyDocument
    value: Any = raw
    for part in loc:
        kind = _concrete(kind, value)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            field = kind.model_fields.get(str(part))
            if field is None:
                return set()
            kind = field.annotation
        else:
            arguments = typing.get_args(kind)
            if not arguments:
                return set()
            kind = arguments[-1]  # dict[str, X] -> X, list[X] -> X
        value = value.get(part) if isinstance(value, dict) else (
            value[part] if isinstance(value, list) and isinstance(part, int) and part < len(value) else None)
    kind = _concrete(kind, value)
    return set(kind.model_fields) if isinstance(kind, type) and issubclass(kind, BaseModel) else set()


def _concrete(kind: Any, value: Any) -> Any:
    """Unwrap Annotated and Optional; pick a discriminated union's member by the value's `kind`."""
    while typing.get_origin(kind) is typing.Annotated:
        kind = typing.get_args(kind)[0]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(kind) if m is not type(None)]
        if len(members) == 1:
            return _concrete(members[0], value)
        wanted = value.get("kind") if isinstance(value, dict) else None
        for member in members:
            field = getattr(member, "model_fields", {}).get("kind")
            if field is not None and wanted in typing.get_args(field.annotation):
                return member
        return members[0] if members else kind
    return kind
