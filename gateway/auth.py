"""Virtual keys: recognising a caller from the key it presents."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Mapping

from gateway.compiled.policy import KeyEntry, Policy
from gateway.errors import ErrorKind, GatewayError

KEY_PREFIX = "sk-sb-"


def authenticate(policy: Policy, headers: Mapping[str, str]) -> KeyEntry:
    """The policy's entry for the key in `Authorization: Bearer` or `api-key`; 401 otherwise."""
    presented = _presented_key(headers)
    if not presented:
        raise GatewayError(ErrorKind.AUTHENTICATION,
                           "Missing API key. Send it as 'Authorization: Bearer <key>' or an 'api-key' header.",
                           code="missing_api_key")
    digest = hashlib.sha256(presented.encode()).digest()
    # The dict is keyed by the SHA-256 of each key, so lookup timing can only
    # reveal bits of a hash the caller cannot steer; the final comparison is
    # constant-time all the same.
    entry = policy.keys.get(digest)
    if entry is None or not hmac.compare_digest(entry.digest, digest):
        raise GatewayError(ErrorKind.AUTHENTICATION, "Incorrect API key provided.", code="invalid_api_key")
    if entry.disabled or entry.expires_at is not None:  # most keys neither: no clock to read for them
        usable_key(entry, time.time())
    return entry


def usable_key(entry: KeyEntry, now: float) -> KeyEntry:
    """The entry when it may call at `now`: not disabled, not expired; 401 otherwise (also `policy simulate`)."""
    if entry.disabled:
        raise GatewayError(ErrorKind.AUTHENTICATION, "Incorrect API key provided.", code="invalid_api_key")
    if entry.expires_at is not None and now >= entry.expires_at:  # rotated: the overlap is over
        raise GatewayError(ErrorKind.AUTHENTICATION, "This API key has expired.", code="invalid_api_key")
    return entry


def authenticate_admin(policy: Policy, headers: Mapping[str, str]) -> None:
    """Pass when `Authorization: Bearer` carries one of the policy's `admin.keys`; 401 otherwise.

    `Authorization: Basic` with the admin key as the password (any user name) is accepted too:
    it is what a browser sends for the console at /ui after its login prompt.

    Admin endpoints (/admin/usage, /admin/targets, /admin/spend) all call this.
    Every admin key is compared, in constant time, so timing says nothing about
    which one nearly matched.
    """
    presented = _presented_admin_key(headers.get("authorization", ""))
    if not presented:
        raise GatewayError(ErrorKind.AUTHENTICATION, "Missing admin key (Authorization: Bearer <admin key>).",
                           code="missing_api_key")
    digest = hashlib.sha256(presented.encode()).digest()
    matched = False
    for known in policy.admin_keys:
        matched |= hmac.compare_digest(digest, known)
    if not matched:
        raise GatewayError(ErrorKind.AUTHENTICATION, "Incorrect admin key provided.", code="invalid_api_key")


def _presented_admin_key(authorization: str) -> str:
    scheme, _, value = authorization.partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "bearer":
        return value
    if scheme == "basic":
        try:
            return base64.b64decode(value, validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return ""
    return ""


def _presented_key(headers: Mapping[str, str]) -> str:
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            return value.strip()
    return (headers.get("api-key") or headers.get("x-api-key") or "").strip()


def new_key() -> tuple[str, str]:
    """A fresh virtual key and the hash to put in the policy."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
