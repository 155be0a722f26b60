"""The policy's `teams:` and `organizations:` sections: keys, limits, budgets, end users, tags."""

from __future__ import annotations

import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from gateway.policy.common import KEY_HASH_PATTERN, Strict
from gateway.policy.model_schema import CachePolicy

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
