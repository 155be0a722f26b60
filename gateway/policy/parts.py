"""How a concern compiles its part of the runtime policy: one interface for all of them.

Loading a policy (gateway/compiled/policy.py) validates the document, then asks
every concern listed in gateway/compiled/parts.py for two things: the
cross-references its section has that the schema cannot check, and the
compiled object the request path reads. The loader knows the interface and
the table, not how limits, prices, caching or routing are compiled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.policy.schema import PolicyDocument

# Where in the YAML a problem is (e.g. ("teams", "search", "budget", "downgrade_to")), and what it is.
Location = tuple[str | int, ...]
Problem = tuple[Location, str]


class PartProblems(Exception):
    """Problems a part finds only while compiling (a secret file that cannot be read, a bad price table)."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(message for _, message in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Compiling:
    """What a part may read besides its own section."""

    document: PolicyDocument
    base_dir: Path  # where the policy's relative paths start: its file's directory
    environ: Mapping[str, str]
    provider_kinds: Mapping[str, str]  # provider name -> kind


def _no_problems(document: PolicyDocument) -> Iterable[Problem]:
    return ()


@dataclass(frozen=True, slots=True)
class PolicyPart:
    """One concern's share of the runtime policy.

    `check` runs on every document that passed the schema, and on stand-ins for
    the entries that did not, so all problems are reported at once. `build`
    runs once the document is clean; its result becomes the runtime policy's
    attribute `name` (see `Policy` for the type each concern returns).
    """

    name: str
    check: Callable[[PolicyDocument], Iterable[Problem]] = _no_problems
    build: Callable[[Compiling], Any] | None = None
