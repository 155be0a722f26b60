"""Keys files: team keys kept beside the policy (`keys_file:`), read on load and written by `switchboard keys`.

Loading: the file is validated on its own (problems quote its path and lines), then its keys are added
to the teams of the policy's raw document before the policy is validated, so duplicate ids and hashes
are caught across both files. The policy's fingerprint covers the keys file, and the policy store
watches it, so a revocation applies on the next reload (file change or SIGHUP).

Writing (`switchboard keys new|revoke|rotate`): the keys file is rewritten whole and replaced atomically.
A key that lives in the policy file itself is edited in place, one line, keeping the rest of the file
(comments included) as it is; a policy without a keys file gets `keys_file: <policy>.keys.yaml`
appended the first time a key is created.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.policy.diagnosis import line_of
from gateway.policy.schema import KeysFileDocument

HEADER = "# Virtual keys, written by `switchboard keys` (hashes only; the keys themselves are never stored).\n"


class KeysFileError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def keys_file_path(policy_path: str | Path, raw: Mapping[str, Any]) -> Path | None:
    """Where the policy's `keys_file` points, relative to the policy file; None when it has none."""
    name = raw.get("keys_file")
    if not isinstance(name, str) or not name:
        return None
    base = Path(policy_path).parent if os.path.isfile(policy_path) else Path.cwd()
    return base / name


Stamp = tuple[str, int, int, int] | None


def file_stamp(path: Path) -> Stamp:
    """What tells a changed file: its resolved path, modification time, size, inode (None when missing).

    A Kubernetes ConfigMap volume never rewrites a file: kubelet writes a new timestamped directory
    and swaps the `..data` symlink the file's own symlink goes through. The resolved path changes
    with every swap, so the swap is seen even if the new file matches the old one's size and time
    and reuses a freed inode (tests/test_policy_configmap.py).
    """
    try:
        stat = os.stat(path)
        target = os.path.realpath(path)
    except OSError:
        return None
    return (target, stat.st_mtime_ns, stat.st_size, stat.st_ino)


def read_keys_file(path: Path) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    """The file's text and its keys per team, validated; raises KeysFileError quoting the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "", {}  # nothing written yet: `switchboard keys new` creates it
    except OSError as exc:
        raise KeysFileError([f"keys_file: cannot read {path}: {exc.strerror or exc}"]) from exc
    try:
        raw = yaml.safe_load(text) or {}
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise KeysFileError([f"keys_file: {path} is not valid YAML: {getattr(exc, 'problem', exc)}"]) from exc
    try:
        document = KeysFileDocument.model_validate(raw)
    except ValidationError as exc:
        raise KeysFileError([f"keys_file: {path}: " + ".".join(str(p) for p in e["loc"]) + f": {e['msg']}"
                             + _line(root, e["loc"]) for e in exc.errors()]) from exc
    teams = {team: [key.model_dump(mode="json", exclude_defaults=True) for key in keys]
             for team, keys in document.teams.items()}
    return text, teams


def merge_keys(raw: dict[str, Any], teams: Mapping[str, list[dict[str, Any]]], source: Path) -> list[str]:
    """Add the file's keys to the raw policy's teams; problems for teams the policy does not define."""
    problems = []
    defined = raw.get("teams") if isinstance(raw.get("teams"), dict) else {}
    for team, keys in teams.items():
        entry = defined.get(team)
        if not isinstance(entry, dict):
            problems.append(f"keys_file: {source}: teams.{team}: no team {team!r} in the policy; defined: "
                            + ", ".join(sorted(defined)))
            continue
        entry["keys"] = [*(entry.get("keys") or []), *keys]
    return problems


def _line(root: yaml.Node | None, loc: tuple[Any, ...]) -> str:
    line = line_of(root, loc)
    return f" (line {line})" if line else ""


# --- `switchboard keys` ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyRow:
    """One key as `switchboard keys list` shows it: never the key, never its hash."""

    team: str  # "(admin)" for admin keys
    key_id: str
    where: str  # "policy" or "keys file"
    disabled: bool
    expires_at: dt.datetime | None

    def state(self, now: dt.datetime) -> str:
        if self.disabled:
            return "revoked"
        if self.expires_at is None:
            return "active"
        when = self.expires_at.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        return f"expired {when}" if self.expires_at <= now else f"expires {when}"


class KeyBook:
    """The keys of a policy and its keys file, for listing and editing."""

    def __init__(self, policy_path: str | Path) -> None:
        self.policy_path = Path(policy_path)
        self.policy_text = self.policy_path.read_text(encoding="utf-8")
        raw = yaml.safe_load(self.policy_text) or {}
        self.raw = raw if isinstance(raw, dict) else {}
        self.keys_path = keys_file_path(self.policy_path, self.raw)
        self.file_teams: dict[str, list[dict[str, Any]]] = {}
        if self.keys_path is not None:
            self.file_teams = read_keys_file(self.keys_path)[1]

    def rows(self) -> list[KeyRow]:
        rows = []
        for team, config in (self.raw.get("teams") or {}).items():
            for key in (config or {}).get("keys") or []:
                rows.append(_row(team, key, "policy"))
            for key in self.file_teams.get(team, []):
                rows.append(_row(team, key, "keys file"))
        for key in (self.raw.get("admin") or {}).get("keys") or []:
            rows.append(_row("(admin)", key, "policy"))
        return rows

    def team_of(self, key_id: str) -> str:
        for row in self.rows():
            if row.key_id == key_id:
                return row.team
        raise KeyError(f"no key with id {key_id!r} in {self.policy_path}" + (
            f" or {self.keys_path}" if self.keys_path else ""))

    def add(self, team: str, key_id: str, digest: str) -> Path:
        """Add a key to the keys file (creating it, and pointing the policy at it, if needed)."""
        if team not in (self.raw.get("teams") or {}):
            raise KeyError(f"no team {team!r} in {self.policy_path}")
        if any(row.key_id == key_id for row in self.rows()):
            raise KeyError(f"a key with id {key_id!r} already exists")
        if self.keys_path is None:
            name = self.policy_path.stem + ".keys.yaml"
            self.keys_path = self.policy_path.parent / name
            separator = "" if self.policy_text.endswith("\n") else "\n"
            self._write_policy(self.policy_text + f"{separator}\nkeys_file: {name}  # `switchboard keys`\n")
        self.file_teams.setdefault(team, []).append({"id": key_id, "hash": digest})
        self._write_file()
        return self.keys_path

    def set_field(self, key_id: str, field: str, value: bool | str) -> str:
        """Set `disabled` or `expires_at` on a key wherever it lives; returns where ("keys file" or "policy")."""
        for keys in self.file_teams.values():
            for key in keys:
                if key["id"] == key_id:
                    key[field] = value
                    self._write_file()
                    return "keys file"
        self._write_policy(_edited_policy(self.policy_text, key_id, field, value))
        return "policy"

    def _write_policy(self, text: str) -> None:
        _replace(self.policy_path, text)
        self.policy_text = text

    def _write_file(self) -> None:
        assert self.keys_path is not None
        body = yaml.safe_dump({"version": 1, "teams": self.file_teams}, sort_keys=False, default_flow_style=False)
        _replace(self.keys_path, HEADER + body)


def _row(team: str, key: Mapping[str, Any], where: str) -> KeyRow:
    expires = key.get("expires_at")
    if isinstance(expires, str):
        expires = dt.datetime.fromisoformat(expires.replace("Z", "+00:00"))
    if isinstance(expires, dt.datetime) and expires.tzinfo is None:
        expires = expires.replace(tzinfo=dt.UTC)
    return KeyRow(team, str(key.get("id")), where, bool(key.get("disabled")), expires)


def _edited_policy(text: str, key_id: str, field: str, value: bool | str) -> str:
    """The policy text with `field: value` set on the key `key_id`, changing nothing else."""
    mapping = _key_node(yaml.compose(text, Loader=yaml.SafeLoader), key_id)
    if mapping is None:
        raise KeyError(f"no key with id {key_id!r}")
    rendered = ("true" if value else "false") if isinstance(value, bool) else f'"{value}"'
    for key_node, value_node in mapping.value:
        if key_node.value == field:  # already set: replace the value's text
            return text[:value_node.start_mark.index] + rendered + text[value_node.end_mark.index:]
    if mapping.flow_style:  # {id: a, hash: b} -> {id: a, hash: b, disabled: true}
        end = text.rindex("}", 0, mapping.end_mark.index)
        return text[:end] + f", {field}: {rendered}" + text[end:]
    first = mapping.value[0][0]  # a new line under the key's first field, at its indentation
    line_end = text.index("\n", first.start_mark.index) + 1 if "\n" in text[first.start_mark.index:] else len(text)
    return text[:line_end] + " " * first.start_mark.column + f"{field}: {rendered}\n" + text[line_end:]


def _key_node(root: yaml.Node | None, key_id: str) -> yaml.MappingNode | None:
    def child(node: yaml.Node | None, name: str) -> yaml.Node | None:
        if isinstance(node, yaml.MappingNode):
            return next((v for k, v in node.value if k.value == name), None)
        return None

    lists = [child(team, "keys") for _, team in (child(root, "teams").value if isinstance(  # type: ignore[union-attr]
        child(root, "teams"), yaml.MappingNode) else [])]
    lists.append(child(child(root, "admin"), "keys"))
    for keys in lists:
        if isinstance(keys, yaml.SequenceNode):
            for item in keys.value:
                id_node = child(item, "id")
                if isinstance(item, yaml.MappingNode) and id_node is not None and id_node.value == key_id:
                    return item
    return None


def _replace(path: Path, text: str) -> None:
    """Write a file atomically: a reader (the gateway's reload) sees the old file or the new one."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        if path.exists():
            os.chmod(temporary, path.stat().st_mode & 0o777)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
