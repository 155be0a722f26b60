"""The operator's surfaces (/metrics, /admin/*, /ui*) and who may reach them.

`/metrics` shows every team's names, models, tokens and cost, so it is never
open to tenants. Two set-ups (policies/README.md, "server.admin"):

- No `server.admin` (the default): the surfaces stay on the tenant port and
  /metrics needs an admin key, like /admin/* always does (Prometheus:
  `authorization: {credentials_file: ...}` in the scrape job).
- `server.admin: {host, port}`: a second listener in the same process serves
  only the surfaces (plus /healthz and /readyz) and the tenant port answers
  them with 404; on that listener /metrics is open unless `metrics_need_key`.

/admin/* routes check the admin key themselves (gateway/auth.py
`authenticate_admin`); /ui* pages are static and fetch /admin/* with the key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.auth import authenticate_admin
from gateway.errors import ErrorKind, GatewayError, render
from gateway.exchange import Reply
from gateway.http.asgi import ON_ADMIN_LISTENER, request_headers, send_reply

if TYPE_CHECKING:
    from gateway.compiled.policy import Policy

_PROBES = ("/healthz", "/readyz")


def is_admin_path(path: str) -> bool:
    return path == "/metrics" or path.startswith("/admin/") or path == "/ui" or path.startswith("/ui/")


class AdminSurfaces:
    """Decides, before routing, whether this listener serves the path and whether it needs the admin key."""

    def __init__(self, policy: Callable[[], Policy]) -> None:
        self._policy = policy

    def refusal(self, scope: dict[str, Any]) -> GatewayError | None:
        """None when the request may go on to its route; otherwise the error to answer with."""
        path = scope["path"]
        on_admin = scope.get(ON_ADMIN_LISTENER, False)
        admin_path = is_admin_path(path)
        policy = self._policy()
        listener = policy.server.admin
        if on_admin and not admin_path and path not in _PROBES:
            return _unknown(scope)
        if not on_admin and admin_path and listener is not None:
            return _unknown(scope)  # served only on the admin listener: nothing here to find
        if path == "/metrics" and (not on_admin or (listener is not None and listener.metrics_need_key)):
            try:
                authenticate_admin(policy, request_headers(scope))
            except GatewayError as error:
                return error
        return None

    async def refuse(self, send: Any, error: GatewayError) -> None:
        await send_reply(send, Reply(*render(error)))


def _unknown(scope: dict[str, Any]) -> GatewayError:
    return GatewayError(ErrorKind.NOT_FOUND, f"Unknown endpoint: {scope['method']} {scope['path']}",
                        code="unknown_url")


class AdminListener:
    """The ASGI app of the admin listener: the same gateway, with each request marked as arriving here."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope[ON_ADMIN_LISTENER] = True
        await self.app(scope, receive, send)
