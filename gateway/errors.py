"""The gateway's closed error model and the one place that renders errors for clients.

Every failure a client can see is a `GatewayError` of one `ErrorKind`; the
kind alone decides the HTTP status and OpenAI error `type`. Messages that come
from upstreams pass through `redact` first, so no credential reaches a client,
and neither does the operator's account: upstream text is about the
operator's organization (its ids, its org-wide limits and usage), not the
caller's. The same `redact` guards /admin/targets and the logs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import orjson

from providers.base import FailureKind, UpstreamFailure


class ErrorKind(Enum):
    # value: (HTTP status, OpenAI error type)
    BAD_REQUEST = (400, "invalid_request_error")
    CONTEXT_LENGTH = (400, "invalid_request_error")
    CONTENT_FILTER = (400, "invalid_request_error")
    AUTHENTICATION = (401, "invalid_request_error")
    PERMISSION = (403, "invalid_request_error")
    NOT_FOUND = (404, "invalid_request_error")
    PAYLOAD_TOO_LARGE = (413, "invalid_request_error")
    RATE_LIMITED = (429, "rate_limit_error")
    BUDGET_EXCEEDED = (429, "insufficient_quota")
    INTERNAL = (500, "server_error")
    UPSTREAM_ERROR = (502, "upstream_error")
    UNAVAILABLE = (503, "server_error")
    TIMEOUT = (504, "timeout_error")

    @property
    def status(self) -> int:
        return self.value[0]

    @property
    def error_type(self) -> str:
        return self.value[1]


@dataclass
class GatewayError(Exception):
    """An error a client may see. `message` must already be safe to show."""

    kind: ErrorKind
    message: str
    code: str | None = None
    param: str | None = None
    retry_after: float | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    # Overrides the kind's status for upstream errors passed through as they came.
    status: int | None = None
    error_type: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    @property
    def http_status(self) -> int:
        return self.status or self.kind.status


def render(error: GatewayError) -> tuple[int, bytes, dict[str, str]]:
    """Status, OpenAI-format body and headers for an error response."""
    body = {
        "error": {
            "message": error.message,
            "type": error.error_type or error.kind.error_type,
            "param": error.param,
            "code": error.code,
        }
    }
    headers = dict(error.headers)
    if error.retry_after is not None:
        # SDKs read retry-after-ms first, then retry-after (seconds).
        headers["retry-after"] = str(max(1, round(error.retry_after)))
        headers["retry-after-ms"] = str(int(error.retry_after * 1000))
    return error.http_status, orjson.dumps(body), headers


def render_stream_error(error: GatewayError) -> bytes:
    """The in-band error event the openai SDK raises on when a stream fails midway."""
    _, body, _ = render(error)
    return body


_PASSED_THROUGH = {
    FailureKind.BAD_REQUEST: ErrorKind.BAD_REQUEST,
    FailureKind.NOT_FOUND: ErrorKind.NOT_FOUND,
    FailureKind.CONTEXT_LENGTH: ErrorKind.CONTEXT_LENGTH,
    FailureKind.CONTENT_FILTER: ErrorKind.CONTENT_FILTER,
    FailureKind.RATE_LIMITED: ErrorKind.RATE_LIMITED,
}


def from_upstream(failure: UpstreamFailure, secrets: Iterable[str] = ()) -> GatewayError:
    """What a client sees of an upstream failure.

    Client-side errors (4xx) pass through with the upstream's status and
    message, because the client can fix them. The upstream rejecting the
    gateway's own credentials is the operator's problem, not the caller's, so
    it becomes a 502 rather than a 401 that would blame the caller's key.
    """
    message = redact(failure.message, secrets)
    passed = _PASSED_THROUGH.get(failure.kind)
    if passed is not None:
        return GatewayError(
            passed, message, code=failure.code, param=failure.param, retry_after=failure.retry_after,
            status=failure.status if 400 <= failure.status < 500 else None, error_type=failure.error_type,
        )
    if failure.kind in (FailureKind.AUTHENTICATION, FailureKind.PERMISSION):
        return GatewayError(ErrorKind.UPSTREAM_ERROR,
                            "the upstream provider rejected the gateway's credentials; contact the gateway operator",
                            code="upstream_auth_failed")
    if failure.kind is FailureKind.TIMEOUT:
        return GatewayError(ErrorKind.TIMEOUT, message, code="upstream_timeout")
    if failure.kind is FailureKind.OVERLOADED:
        return GatewayError(ErrorKind.UNAVAILABLE, message, code="upstream_overloaded",
                            retry_after=failure.retry_after)
    if failure.kind is FailureKind.CONNECTION:
        return GatewayError(ErrorKind.UPSTREAM_ERROR, message, code="upstream_unreachable")
    return GatewayError(ErrorKind.UPSTREAM_ERROR, f"upstream error (HTTP {failure.status}): {message}",
                        code="upstream_error")


_SECRET_PATTERNS = re.compile(
    r"(sk-[A-Za-z0-9_\-*]{6,}"  # OpenAI-style keys, including partially masked ones
    r"|(?i:bearer)\s+[A-Za-z0-9._\-~+/=]{8,}"
    r"|AIza[0-9A-Za-z_\-]{20,}"  # Google API keys
    r"|(?<=://)[^/\s:@]+:[^/\s@]+@)"  # credentials inside URLs
)


# The operator's account in upstream messages. OpenAI's 429: "Rate limit reached for gpt-4o in organization
# org-XXXX on tokens per min (TPM): Limit 30000, Used 29796, Requested 1146."; Anthropic's: "...would exceed
# your organization's (UUID) rate limit of 400,000 input tokens per minute"; Google's: "...for consumer
# 'project_number:1234'". Ids and figures go; the sentence, and the error's code, type and param, stay.
_ACCOUNT_IDS = re.compile(
    r"\b(?:project_number:|projects/)\d+"  # Google Cloud projects
    r"|\b(?:org|proj|user)[-_](?=[A-Za-z0-9]*\d)[A-Za-z0-9]{12,}\b"  # OpenAI organization, project, user ids
    r"|\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"  # UUIDs (Anthropic orgs)
)
_ACCOUNT_FIGURES = re.compile(
    r"(?i)\b(limit|used|requested|current|remaining|quota|usage|rate limit of|limit of|quota of)(\s*[:=]?\s*)"
    r"\$?\d+(?:[,._]\d+)*(?:\s*[kmb](?![a-z]))?"
)


def redact(message: str, secrets: Iterable[str] = ()) -> str:
    """Remove credentials and the operator's account ids and figures from a message that came from an upstream."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            message = message.replace(secret, "[redacted]")
    message = _SECRET_PATTERNS.sub("[redacted]", message)
    message = _ACCOUNT_IDS.sub("[redacted]", message)
    return _ACCOUNT_FIGURES.sub(r"\1\2[redacted]", message)
