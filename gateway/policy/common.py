"""Pieces every section of the policy schema shares: strict models, Redis URLs, key hashes."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

KEY_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"


def _redis_url(value: str) -> str:
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    return value


# The cache and the state store both take a Redis URL, validated alike.
RedisUrl = Annotated[str, AfterValidator(_redis_url)]


class Strict(BaseModel):
    """A section of the policy: unknown keys are refused (a typo is an error), and nothing changes once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)
