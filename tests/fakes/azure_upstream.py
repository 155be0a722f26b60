"""A fake Azure OpenAI resource: FakeOpenAIUpstream's replies behind deployment URLs.

``POST /openai/deployments/{deployment}/chat/completions?api-version=...`` (and ``/completions``,
``/embeddings``) answer as the OpenAI fake does, with the deployment as the model; the key is checked
in the ``api-key`` header and refused in Azure's shape. Requests are recorded with path and query, and
scripted ``Behaviour``s apply as usual.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from tests.fakes.openai_upstream import (
    _CHAT,
    _COMPLETIONS,
    _EMBEDDINGS,
    Behaviour,
    FakeOpenAIUpstream,
    _Endpoint,
    _Exchange,
)

DEPLOYMENTS = "/openai/deployments/{deployment}"


def azure_error(status: int, code: str, message: str, *, inner_code: str | None = None,
                headers: dict[str, str] | None = None) -> Behaviour:
    """Answer with Azure's error body ``{"error": {code, message, ...}}``."""
    error: dict[str, Any] = {"code": code, "message": message, "param": None, "type": None}
    if inner_code:
        error["innererror"] = {"code": inner_code, "content_filter_result": {"hate": {"filtered": True}}}
    return Behaviour(status=status, body={"error": error}, headers=headers or {})


class FakeAzureUpstream(FakeOpenAIUpstream):
    """``url`` (the resource root) is the base_url a `kind: azure_openai` provider points at."""

    def __init__(self, *, require_api_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.api_key = require_api_key

    def make_app(self) -> web.Application:
        app = super().make_app()
        # aiohttp resolves the longest path prefix first, so these win over the OpenAI fake's catch-all.
        for suffix, path, endpoint in (("/chat/completions", _CHAT, self._chat),
                                       ("/completions", _COMPLETIONS, self._completions),
                                       ("/embeddings", _EMBEDDINGS, self._embeddings)):
            app.router.add_post(DEPLOYMENTS + suffix, self._wrap(path, self._deployment(endpoint)))
        return app

    def _deployment(self, endpoint: _Endpoint) -> _Endpoint:
        async def handler(request: web.Request, exchange: _Exchange, body: Any,
                          behaviour: Behaviour) -> web.StreamResponse:
            if self.api_key is not None and request.headers.get("api-key") != self.api_key:
                return _json(401, {"error": {"code": "401", "message": "Access denied due to invalid subscription "
                                             "key or wrong API endpoint."}})
            if not request.query.get("api-version"):
                return _json(404, {"error": {"code": "404", "message": "Resource not found"}})
            if isinstance(body, dict):
                body = {**body, "model": request.match_info["deployment"]}
            return await endpoint(request, exchange, body, behaviour)

        return handler


def _json(status: int, payload: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")
