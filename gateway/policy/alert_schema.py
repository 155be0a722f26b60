"""The policy's `alerts:` section: webhooks that budget alerts are posted to (accounting/alerts.py, webhooks.py).

Kept apart from gateway/policy/schema.py, which includes it as `PolicyDocument.alerts`; budgets name the
webhooks they notify in `notify`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from gateway.policy.common import Strict

ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


class WebhookBackoffPolicy(Strict):
    """Exponential backoff between delivery attempts: `initial_s`, doubling, at most `max_s` (with jitter)."""

    initial_s: float = Field(1.0, gt=0, le=3600, description="Wait before the second attempt.")
    max_s: float = Field(300.0, gt=0, le=86_400, description="Longest wait between two attempts.")


class WebhookPolicy(Strict):
    """One HTTP endpoint alerts are POSTed to, signed with HMAC-SHA256 (policies/README.md, "alerts")."""

    url: str = Field(description="http(s) URL the alert is POSTed to; a Slack incoming-webhook URL is itself a "
                     "secret: write it as ${ENV_VAR}.")
    format: Literal["json", "slack"] = Field("json", description="json: Switchboard's alert object; slack: a "
                                             "Slack-compatible message ({text, blocks}).")
    secret_env: str | None = Field(None, pattern=ENV_NAME_PATTERN, description="Environment variable holding "
                                   "the signing secret (read at policy load).")
    secret_file: str | None = Field(None, min_length=1, description="File holding the signing secret, relative "
                                    "to the policy file (read at policy load; surrounding whitespace ignored).")
    timeout_s: float = Field(10.0, gt=0, le=120, description="Longest one attempt may take.")
    max_attempts: int = Field(8, ge=1, le=100, description="Attempts before the delivery counts as failed.")
    backoff: WebhookBackoffPolicy = Field(default_factory=WebhookBackoffPolicy)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> WebhookPolicy:
        if self.secret_env is not None and self.secret_file is not None:
            raise ValueError("give `secret_env` or `secret_file`, not both")
        if self.format == "json" and self.secret_env is None and self.secret_file is None:
            raise ValueError("format: json deliveries are signed: set `secret_env` (an environment variable) or "
                             "`secret_file` (a file beside the policy); the secret never goes in the YAML")
        if self.backoff.initial_s > self.backoff.max_s:
            raise ValueError("backoff.initial_s must not exceed backoff.max_s")
        return self


class AlertsPolicy(Strict):
    """Budget alerts (soft thresholds, exhaustion) delivered to webhooks off the request path."""

    webhooks: dict[str, WebhookPolicy] = Field(default_factory=dict, description="Name -> webhook; budgets "
                                               "list the names they alert in `notify`.")
    queue_size: int = Field(1000, ge=1, le=100_000, description="Alerts waiting for delivery; beyond it new "
                            "alerts are dropped and counted (switchboard_alert_deliveries{outcome=dropped}). "
                            "Applies on restart.")
    concurrent_deliveries: int = Field(8, ge=1, le=256, description="Deliveries in progress at once, retries "
                                       "included. Applies on restart.")
    history: int = Field(200, ge=1, le=10_000, description="Recent deliveries listed by GET /admin/alerts. "
                         "Applies on restart.")
