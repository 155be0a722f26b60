"""Budget alerts that reach people: thresholds and exhaustion, posted to the policy's webhooks.

The limiter (gateway/accounting/limits.py) fires a `ThresholdEvent` once per threshold
per budget period across replicas: a soft threshold crossed at settlement,
or the budget exhausted (a request refused, downgraded, or in shadow mode
one it would have refused). The firing is claimed in the shared state store
first, so of several replicas crossing the same line one reports it.
`Alerts` turns the event into one delivery per webhook the budget `notify`s,
as Switchboard's JSON alert or a Slack message, and hands it to the
`WebhookDispatcher` (gateway/accounting/webhooks.py), which posts it off the request path.

The idempotency key is derived from the claim key and the webhook's name, so
every attempt, and any second report after a state-store outage, carries the
same key.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from gateway.accounting.budgets import EXHAUSTED, MICROS, ThresholdEvent, owner_words
from gateway.accounting.webhooks import Webhook, WebhookDispatcher
from gateway.policy.parts import PolicyPart
from gateway.timestamps import iso_time

if TYPE_CHECKING:
    from gateway.compiled.policy import Policy

log = logging.getLogger("switchboard.alerts")


class Alerts:
    """Routes each fired budget event to the webhooks its budget notifies, in the current policy."""

    def __init__(self, dispatcher: WebhookDispatcher, policy: Callable[[], Policy]) -> None:
        self._dispatcher = dispatcher
        self._policy = policy

    def __call__(self, event: ThresholdEvent) -> None:
        webhooks = self._policy().webhooks
        for name in event.notify:
            webhook = webhooks.get(name)
            if webhook is None:  # removed by a reload since the budget was built
                log.warning("budget alert for %s not sent: webhook %r is no longer in the policy", event.team, name)
                continue
            key = idempotency_key(event, webhook)
            self._dispatcher.submit(webhook, key, event_type(event), describe(event), payload(event, webhook, key))


def idempotency_key(event: ThresholdEvent, webhook: Webhook) -> str:
    """The same for every attempt and every replica: the firing's claim key and the webhook's name, hashed."""
    return hashlib.sha256(f"{event.mark}|{webhook.name}".encode()).hexdigest()[:32]


def event_type(event: ThresholdEvent) -> str:
    return "budget.exhausted" if event.kind == EXHAUSTED else "budget.threshold"


def describe(event: ThresholdEvent) -> str:
    """One sentence a person reads in a chat channel."""
    words = owner_words(event.scope, event.owner, event.team)
    who = words[0].upper() + words[1:]
    budget = "USD budget" if event.unit == "usd" else "token budget"
    numbers = f"{_amount(event, event.used)} of {_amount(event, event.limit)}"
    shadow = " [shadow budget: nothing was refused]" if event.shadow else ""
    if event.kind == EXHAUSTED:
        verb = "would have been refused" if event.shadow else "was refused"
        return (f"{who} has exhausted its {budget} ({numbers} used); a request {verb}. "
                f"It resets at {iso_time(event.period_end)}.{shadow}")
    return (f"{who} has used {event.threshold:.0%} of its {budget} ({numbers}). "
            f"It resets at {iso_time(event.period_end)}.{shadow}")


def payload(event: ThresholdEvent, webhook: Webhook, key: str) -> bytes:
    """The body posted to `webhook`: Switchboard's alert object, or a Slack message carrying the same facts."""
    text = describe(event)
    if webhook.format == "slack":
        return orjson.dumps({"text": text, "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*Switchboard budget alert*\n{text}"}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"{event_type(event)} · {key}"}]},
        ]})
    body: dict[str, Any] = {
        "id": key, "type": event_type(event), "team": event.team, "scope": event.scope, "owner": event.owner,
        "unit": event.unit, "threshold": event.threshold,
        "limit": _number(event, event.limit), "used": _number(event, event.used),
        "mode": "shadow" if event.shadow else "enforce",
        "period": {"start": iso_time(event.period_start), "end": iso_time(event.period_end)}, "text": text,
    }
    return orjson.dumps(body)


def _number(event: ThresholdEvent, value: int) -> float | int:
    return value / MICROS if event.unit == "usd" else value


def _amount(event: ThresholdEvent, value: int) -> str:
    return f"${value / MICROS:,.2f}" if event.unit == "usd" else f"{value:,} tokens"



# The alert queue's settings (`Policy.alerts`); the webhooks are webhooks.py's `WEBHOOKS`, and what budgets'
# `notify` lists name is checked with the budgets (budgets.py `budget_problems`).
ALERT_TARGETS = PolicyPart("alerts", build=lambda compiling: compiling.document.alerts)
