"""The concerns that compile a part of the runtime policy, in the order their problems are reported.

Adding a concern with its own policy section touches its module (a `PolicyPart`,
gateway/policy/parts.py), this table, and the `Policy` field it fills.
"""

from __future__ import annotations

from gateway.accounting.alerts import ALERT_TARGETS
from gateway.accounting.hierarchy import HIERARCHY
from gateway.accounting.pricing import PRICES
from gateway.accounting.rules import RULES
from gateway.accounting.tags import TAGS
from gateway.accounting.webhooks import WEBHOOKS
from gateway.cache.plan import CACHE
from gateway.policy.parts import PolicyPart
from gateway.response_store.rules import RESPONSES
from gateway.routing.experiments import EXPERIMENTS
from gateway.routing.plan import ROUTES
from gateway.telemetry.export import TRACES

POLICY_PARTS: tuple[PolicyPart, ...] = (
    PRICES, TRACES, CACHE, TAGS, EXPERIMENTS, ROUTES, RULES, ALERT_TARGETS, HIERARCHY, WEBHOOKS, RESPONSES)
