"""Azure OpenAI (`kind: azure_openai`): OpenAI's wire format behind deployment URLs.

Only the address and the credential differ from OpenAI: the deployment (the
target's `model`) sits in the path, `api-version` is a required query
parameter, and the key goes in an `api-key` header. Bodies pass through the
OpenAI-compatible adapter untouched; Azure's own error codes are classified
on top of OpenAI's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from urllib.parse import quote

import orjson
from pydantic import BaseModel, ConfigDict, Field

from providers.base import Call, FailureKind, ProviderSettings, UpstreamFailure, UpstreamRequest
from providers.openai_compat import PATHS, CompatSpec, OpenAICompatAdapter


class AzureOptions(BaseModel):
    """Settings of a `kind: azure_openai` provider."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_version: str = Field("2024-10-21", min_length=1, description="The `api-version` query parameter.")


_CODE_KINDS = {
    "DeploymentNotFound": FailureKind.NOT_FOUND,
    "content_filter": FailureKind.CONTENT_FILTER,
    "ResponsibleAIPolicyViolation": FailureKind.CONTENT_FILTER,
}


class AzureOpenAIAdapter(OpenAICompatAdapter):
    def __init__(self) -> None:
        # Azure takes a client request id as `x-ms-client-request-id`, which must be a GUID.
        super().__init__(CompatSpec(kind="azure_openai", options_model=AzureOptions,
                                    request_id_header="x-ms-client-request-id"))

    def build_request(self, provider: ProviderSettings, call: Call) -> UpstreamRequest:
        request = super().build_request(provider, call)
        options = provider.options
        assert isinstance(options, AzureOptions)
        base = provider.base_url.removesuffix("/openai")
        url = (f"{base}/openai/deployments/{quote(call.upstream_model, safe='')}{PATHS[call.endpoint]}"
               f"?api-version={quote(options.api_version, safe='')}")
        headers = request.headers
        if provider.api_key:
            # Without a key, an Entra ID `Authorization: Bearer` set under the provider's headers is used.
            headers.pop("authorization", None)
            headers["api-key"] = provider.api_key
        return dataclasses.replace(request, url=url)

    def classify_error(self, status: int, headers: Mapping[str, str], body: bytes) -> UpstreamFailure:
        failure = super().classify_error(status, headers, body)
        code = failure.code
        if code is not None and code.isdigit():
            code = None  # Azure repeats the HTTP status as the code ("429"), which tells a client nothing
        kind = _CODE_KINDS.get(code or "") or _CODE_KINDS.get(_inner_code(body) or "")
        return dataclasses.replace(failure, code=code, kind=kind or failure.kind)


def _inner_code(body: bytes) -> str | None:
    try:
        payload = orjson.loads(body)
        return payload["error"]["innererror"]["code"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
