"""The budget hierarchy: organisation -> team -> end user -> key, the most restrictive level winning.

Team and key budgets are gateway/accounting/budgets.py's; this module adds the two other
levels with the same `Budget` objects, counters and settlement, so reserving,
settling exactly once, refunds, calendar and rolling periods, shadow mode,
`on_exhaust: downgrade` and alerts work on them unchanged:

- An organisation's budget is one `Budget` shared by the plans of all its
  teams (`organizations.<o>.teams`). Its counters carry the organisation as
  their Redis Cluster hash tag (`{org:<o>}`), not a team's, so an admission of
  a team in an organisation touches two tags; `reserve` admits each tag's
  checks atomically (concurrently, one round trip) and gives back what one
  tag reserved when the other refused.
- An end user comes from the header `teams.<t>.end_users.header` or the
  OpenAI `user` field, validated (`END_USER_ID`); its budget is the team's
  `end_users.budget` template, counted under the team's tag, so another
  team's user of the same id is another counter. The first `max_tracked`
  users of a team in a period get their own counter; the store decides
  which, atomically across replicas (`EndUserTracker`). Later users share one
  `other` counter and each request so folded is counted: whatever a tenant
  sends, a team has at most `max_tracked` + 1 end-user counters per period,
  and no metric is labelled with a user id.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.accounting.budgets import Budget, budget_problems, build_budget
from gateway.accounting.plans import Plan, dollars
from gateway.errors import ErrorKind, GatewayError
from gateway.policy.parts import PolicyPart
from gateway.policy.team_schema import END_USER_ID
from gateway.state import Check, Delta, StateStore, Verdict
from gateway.timestamps import go_duration

if TYPE_CHECKING:
    from gateway.accounting.plans import Frame
    from gateway.policy.schema import PolicyDocument

OTHER = "other"  # the shared bucket of end users beyond `max_tracked`; reserved, never a user's id
_USER_ID = re.compile(END_USER_ID)
# Users this process remembers as folded, per team, before it forgets them all and asks the store again: a
# tenant sending endless new ids costs the store one call each, never this process's memory.
_FOLDED_MEMORY = 10_000
_BUDGETS_MEMORY = 10_000


@dataclass(frozen=True, slots=True)
class EndUserRules:
    """One team's `end_users` settings, built at policy load."""

    team: str
    tag: str  # the team's hash tag, e.g. {alpha}
    header: str | None
    required: bool
    max_tracked: int
    template: Budget | None  # owner "" and the base of all users' counters; `for_user` makes each one's
    # Budgets made by `for_user`, reused by later requests of the same user (bounded: `_BUDGETS_MEMORY`).
    _made: dict[str, Budget] = field(default_factory=dict, compare=False, repr=False)

    def for_user(self, user: str) -> Budget:
        """The budget of one tracked user, or of the shared `other` bucket."""
        budget = self._made.get(user)
        if budget is None:
            assert self.template is not None
            base = f"{self.tag}:b:user-other" if user == OTHER else f"{self.tag}:b:user:{user}"
            budget = dataclasses.replace(self.template, owner=user, base=base)
            if len(self._made) >= _BUDGETS_MEMORY:
                self._made.clear()
            self._made[user] = budget
        return budget


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """The policy's organisations and end-user rules, by team."""

    organizations: Mapping[str, str] = field(default_factory=dict)  # team -> organisation
    org_budgets: Mapping[str, Budget] = field(default_factory=dict)  # team -> its organisation's budget
    end_users: Mapping[str, EndUserRules] = field(default_factory=dict)

    @property
    def any(self) -> bool:
        return bool(self.org_budgets) or any(r.template is not None for r in self.end_users.values())

    def policy_budgets(self) -> list[Budget]:
        """Each organisation's budget once, and each team's end-user template (owner ""), for policy gauges."""
        distinct = {id(b): b for b in self.org_budgets.values()}
        return [*distinct.values(), *(r.template for r in self.end_users.values() if r.template is not None)]


EMPTY = Hierarchy()


def org_tag(org: str) -> str:
    # "org:" cannot begin a team's tag: a team name's colons are escaped in its tag (gateway/state `safe_key`).
    return "{org:" + org + "}"


def build_hierarchy(document: PolicyDocument, team_tag: Callable[[str], str]) -> Hierarchy:
    """The runtime levels of a validated document (organisation names are restricted to a safe charset)."""
    organizations: dict[str, str] = {}
    org_budgets: dict[str, Budget] = {}
    for org, config in document.organizations.items():
        budget = None if config.budget is None else build_budget(
            config.budget, "org", org, "", f"{org_tag(org)}:b:org")
        for team in config.teams:
            organizations[team] = org
            if budget is not None:
                org_budgets[team] = budget
    end_users = {}
    for team, config in document.teams.items():
        users = config.end_users
        if users is None:
            continue
        tag = team_tag(team)
        template = None if users.budget is None else build_budget(users.budget, "user", "", team, f"{tag}:b:user")
        end_users[team] = EndUserRules(team, tag, users.header.lower() if users.header else None, users.required,
                                       users.max_tracked, template)
    if not (organizations or end_users):
        return EMPTY
    return Hierarchy(organizations, org_budgets, end_users)


def hierarchy_problems(document: PolicyDocument) -> list[tuple[tuple[Any, ...], str]]:
    """Cross-references: organisations' teams, the new budgets' downgrade models and webhooks."""
    problems: list[tuple[tuple[Any, ...], str]] = []
    owner: dict[str, str] = {}
    for org, config in document.organizations.items():
        for index, team in enumerate(config.teams):
            path = ("organizations", org, "teams", index)
            if team not in document.teams:
                problems.append((path, f"unknown team {team!r}; defined: {', '.join(sorted(document.teams))}"))
            elif team in owner:
                where = "this organisation" if owner[team] == org else f"organisation {owner[team]!r}"
                problems.append((path, f"team {team!r} is already listed in {where}; a team belongs to at most "
                                 "one organisation"))
            else:
                owner[team] = org
        if config.budget is not None:
            members = [t for t in config.teams if t in document.teams]
            problems += budget_problems(document, ("organizations", org, "budget"), config.budget, members)
    for team, config in document.teams.items():
        users = config.end_users
        if users is None:
            continue
        if users.header is not None and users.header.lower() in ("authorization", "x-api-key", "api-key"):
            problems.append((("teams", team, "end_users", "header"), f"{users.header} carries the API key; name "
                             "another header for the end user, e.g. x-end-user"))
        if users.budget is not None:
            problems += budget_problems(document, ("teams", team, "end_users", "budget"), users.budget, [team])
    return problems


# --- the request's end user ----------------------------------------------------------------------


def request_end_user(hierarchy: Hierarchy, team: str, headers: Mapping[str, str],
                     body: Mapping[str, Any]) -> str | None:
    """The end user a request names (the policy's header, else the `user` field), validated; None: none or
    the team tracks no end users. 400 `invalid_end_user` for an id the gateway will not use as a key."""
    rules = hierarchy.end_users.get(team)
    if rules is None:
        return None
    value: Any = headers.get(rules.header) if rules.header is not None else None
    param = rules.header
    if not value:
        value, param = body.get("user"), "user"
    where = "the `user` field" if param == "user" else f"the {param} header"
    if value is None or value == "":
        if rules.required:
            named = f"the {rules.header} header or " if rules.header else ""
            raise _invalid(f"This team's requests must name their end user in {named}the `user` field.", "user")
        return None
    if not isinstance(value, str) or _USER_ID.fullmatch(value) is None:
        shown = repr(value[:64]) if isinstance(value, str) else f"a {type(value).__name__}"
        raise _invalid(f"Invalid end user in {where}: {shown}. Use 1-64 characters of letters, digits and "
                       "._@+=/- (for example a hash of your user's id).", param)
    if value == OTHER:
        raise _invalid(f"Invalid end user in {where}: {OTHER!r} names the gateway's shared bucket of untracked "
                       "end users; use another id.", param)
    return value


def _invalid(message: str, param: str | None) -> GatewayError:
    return GatewayError(ErrorKind.BAD_REQUEST, message, param=param, code="invalid_end_user")


# --- which counter an end user gets -----------------------------------------------------------------


@dataclass(slots=True)
class _Seen:
    """One team's users this process knows the bucket of, for one tracking period."""

    period: str
    tracked: set[str] = field(default_factory=set)
    folded: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class TrackingPeriod:
    """The span over which a team's distinct end users are capped, and its counters' keys."""

    name: str
    expires_at: int

    def count_key(self, rules: EndUserRules) -> str:
        return f"{rules.tag}:u:count:{self.name}"

    def folded_key(self, rules: EndUserRules) -> str:
        return f"{rules.tag}:u:folded:{self.name}"

    def seen_key(self, rules: EndUserRules, user: str) -> str:
        return f"{rules.tag}:u:seen:{self.name}:{user}"


def tracking_period(budget: Budget, now: float) -> TrackingPeriod:
    """The budget's calendar period; for a rolling window, consecutive fixed spans of its length."""
    period = budget.period
    if period.kind == "rolling":
        length = period.window_s or 86_400
        index = int(now // length)
        return TrackingPeriod(f"t{length}:{index}", (index + 2) * length)
    window = period.window(now)
    return TrackingPeriod(window.slices[-1], window.expires_at)


class EndUserTracker:
    """Decides, with the store, whether an end user has a counter of its own or shares the `other` one.

    The store call (once per user, period and process) reserves against two
    counters at once: the user's 1-limit "seen" marker and the team's count of
    distinct users (limit `max_tracked`). Admitted: a new tracked user. Refused
    on the marker: already tracked (by any replica). Refused on the count: the
    cap is reached, the user is folded. One atomic step, so replicas racing
    for the last place never track more than `max_tracked` users.
    """

    def __init__(self) -> None:
        self._seen: dict[str, _Seen] = {}
        self._metric: Any = None

    def attach_metrics(self, metrics: Any) -> None:
        from prometheus_client import Counter

        self._metric = Counter(
            "switchboard_end_users_folded", "Requests whose end user was beyond the team's end_users.max_tracked "
            "and counted in the shared `other` bucket.", ("team",), registry=metrics.registry)

    async def budget(self, store: StateStore, rules: EndUserRules, user: str, now: float) -> Budget:
        """The budget this request of `user` counts against: the user's own, or the `other` bucket's."""
        assert rules.template is not None
        period = tracking_period(rules.template, now)
        seen = self._seen.get(rules.team)
        if seen is None or seen.period != period.name:
            seen = self._seen[rules.team] = _Seen(period.name)
        if user in seen.tracked:
            return rules.for_user(user)
        if user not in seen.folded:
            verdict = await store.admit([Check((period.seen_key(rules, user),), 1, 1, period.expires_at),
                                         Check((period.count_key(rules),), rules.max_tracked, 1, period.expires_at)])
            if verdict.admitted or verdict.denied == 0:
                if len(seen.tracked) < rules.max_tracked:  # a smaller cap after a reload: ask again next time
                    seen.tracked.add(user)
                return rules.for_user(user)
            if len(seen.folded) >= _FOLDED_MEMORY:
                seen.folded.clear()
            seen.folded.add(user)
        store.settle([Delta(period.folded_key(rules), 1, period.expires_at)])
        if self._metric is not None:
            self._metric.labels(rules.team).inc()
        return rules.for_user(OTHER)


def with_end_user(plan: Plan | None, budget: Budget | None) -> Plan | None:
    """The plan of (key, model) with the request's end-user budget added after the team's."""
    if budget is None:
        return plan
    if plan is None:
        return Plan((), (budget,), True, budget.usd_micros is not None, budget.shadow)
    budgets = plan.budgets
    at = len(budgets) - 1 if budgets and budgets[-1].scope == "key" else len(budgets)  # before the key's
    return Plan(plan.rates, (*budgets[:at], budget, *budgets[at:]), True,
                plan.needs_usd or budget.usd_micros is not None, plan.shadowed or budget.shadow)


# --- reporting ----------------------------------------------------------------------------------


def budget_headers(frame: Frame, checks: Sequence[Check], verdict: Verdict, now: float,
                   end_user: str | None = None, into: dict[str, str] | None = None) -> dict[str, str]:
    """`x-switchboard-budget-<level>-{limit,remaining}-{tokens,usd}` and `-reset` for every enforced budget.

    Levels: org, team, user (the end user's own budget or the `other` bucket), key. USD in dollars; the reset
    as a duration, like `x-ratelimit-reset-*`. Shadow budgets are left out: they must not slow clients down.
    Added to `into` (by default a new dict).
    """
    headers: dict[str, str] = {} if into is None else into
    used, admitted = verdict.used, verdict.admitted
    last, text = -1.0, ""
    for row in frame.budget_rows:
        index = row.index
        remaining = row.limit - used[index] - (checks[index].amount if admitted else 0)
        if remaining < 0:
            remaining = 0
        limit_name, remaining_name, reset_name = row.names
        headers[limit_name] = row.limit_text
        headers[remaining_name] = dollars(remaining) if row.usd else str(remaining)
        if row.resets_at != last:  # a budget's tokens and USD reset together
            last, text = row.resets_at, go_duration(row.resets_at - now)
        headers[reset_name] = text
        if row.bucket is not None and end_user is not None:
            headers["x-switchboard-end-user-bucket"] = row.bucket
    return headers


def organization_of(rules: Any, team: str) -> str | None:
    """The team's organisation, for the ledger; None when it has none."""
    hierarchy: Hierarchy = getattr(rules, "hierarchy", EMPTY) if rules is not None else EMPTY
    return hierarchy.organizations.get(team)


def report_budgets(hierarchy: Hierarchy, team: str, end_user: str | None) -> list[Budget]:
    """The hierarchy's budgets a team's usage report shows: its organisation's, the `other` bucket and, when
    asked for, one end user's."""
    budgets = []
    if (org := hierarchy.org_budgets.get(team)) is not None:
        budgets.append(org)
    rules = hierarchy.end_users.get(team)
    if rules is not None and rules.template is not None:
        if end_user is not None:
            budgets.append(rules.for_user(end_user))
        budgets.append(rules.for_user(OTHER))
    return budgets


async def end_user_summary(store: StateStore, hierarchy: Hierarchy, team: str, now: float,
                           previous: bool) -> dict[str, Any] | None:
    """Distinct end users tracked this period, the cap, and requests folded into `other`."""
    rules = hierarchy.end_users.get(team)
    if rules is None or rules.template is None:
        return None
    template = rules.template
    at = now
    if previous:
        at = template.period.previous(now).start if template.period.kind != "rolling" else \
            now - (template.period.window_s or 0)
    period = tracking_period(template, at)
    tracked, folded = await store.read([(period.count_key(rules),), (period.folded_key(rules),)])
    return {"period": period.name, "tracked": tracked, "max_tracked": rules.max_tracked,
            "folded_requests": folded, "header": rules.header, "required": rules.required}


def valid_end_user(value: str) -> str | None:
    """`value` when it is a well-formed end-user id (an admin's query), else None."""
    return value if _USER_ID.fullmatch(value) is not None else None


# Organisations and end-user settings that name teams, models and webhooks (compiled into `Rules.hierarchy`).
HIERARCHY = PolicyPart("hierarchy", check=hierarchy_problems)
