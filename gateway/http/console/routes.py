"""The console's routes: its static files at /ui/ and its JSON feeds, all behind the admin key.

A browser cannot attach a bearer token to a page it navigates to, so /ui answers 401 with a Basic
challenge: the browser asks for a user name (any) and password (the admin key), and from then on sends
them with every request under /ui/. That is why the page reads its data from /ui/api/<feed>, the same
handlers as /admin/<feed>, rather than from /admin/ itself. Files are read from the package once, when
the routes are built, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from typing import Any

from starlette.routing import Route

from gateway.accounting.ledger import Ledger
from gateway.auth import authenticate_admin
from gateway.errors import ErrorKind, GatewayError, render
from gateway.exchange import Reply
from gateway.http.admin_routes import SpendRoute, TargetsRoute, UsageRoute
from gateway.http.asgi import request_headers, send_reply
from gateway.http.console.activity import RecentActivity
from gateway.http.console.feeds import BudgetsFeed, OverviewFeed, PolicyFeed, RequestsFeed

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# Everything the page loads comes from the gateway itself; nothing inline, nothing from a CDN.
_SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "cache-control": "no-store",
}
_CHALLENGE = {"www-authenticate": 'Basic realm="Switchboard console", charset="UTF-8"'}


def console_routes(ledger: Ledger | None, activity: RecentActivity) -> list[Route]:
    """/admin/{overview,requests,budgets,policy}, the console's files under /ui/, and its feeds under /ui/api/."""
    feeds: Mapping[str, Any] = {
        "overview": OverviewFeed(activity, ledger), "requests": RequestsFeed(ledger), "budgets": BudgetsFeed(),
        "policy": PolicyFeed(), "spend": SpendRoute(ledger), "usage": UsageRoute(), "targets": TargetsRoute(),
    }
    new = ("overview", "requests", "budgets", "policy")  # the others already are /admin/ endpoints
    page = ConsolePage(_package_files())
    return [
        *(Route(f"/admin/{name}", feeds[name], methods=["GET"]) for name in new),
        *(Route(f"/ui/api/{name}", _Guarded(feed), methods=["GET"]) for name, feed in feeds.items()),
        Route("/ui", page, methods=["GET"]),
        Route("/ui/{file:path}", page, methods=["GET"]),
    ]


def _package_files() -> dict[str, tuple[bytes, str]]:
    static = resources.files("gateway.http.console") / "static"
    return {entry.name: (entry.read_bytes(), _TYPES[suffix]) for entry in static.iterdir()
            if (suffix := "." + entry.name.rpartition(".")[2]) in _TYPES}


async def _refuse(scope: dict[str, Any], send: Any) -> bool:
    """Answer 401 with the Basic challenge unless the request carries an admin key; True when refused."""
    policy = scope["app"].state.services.policy()
    try:
        if not policy.console.enabled:
            raise GatewayError(ErrorKind.NOT_FOUND, f"Unknown endpoint: GET {scope['path']}", code="unknown_url")
        authenticate_admin(policy, request_headers(scope))
    except GatewayError as error:
        status, body, headers = render(error)
        await send_reply(send, Reply(status, body, {**headers, **(_CHALLENGE if status == 401 else {})}))
        return True
    return False


class _Guarded:
    """A feed under /ui/api/: the console's switch and Basic challenge first, then the feed's own check."""

    def __init__(self, feed: Any) -> None:
        self._feed = feed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not await _refuse(scope, send):
            await self._feed(scope, receive, send)


class ConsolePage:
    """GET /ui/ and its files, from the package."""

    def __init__(self, files: Mapping[str, tuple[bytes, str]]) -> None:
        self._files = files

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if await _refuse(scope, send):
            return
        name = scope.get("path_params", {}).get("file")
        if name is None:  # /ui: relative links in the page need the trailing slash
            await _send(send, 308, b"", {"location": "/ui/"})
            return
        found = self._files.get(name or "index.html")
        if found is None:
            error = GatewayError(ErrorKind.NOT_FOUND, f"Unknown endpoint: GET {scope['path']}", code="unknown_url")
            await send_reply(send, Reply(*render(error)))
            return
        body, content_type = found
        await _send(send, 200, body, {"content-type": content_type, **_SECURITY_HEADERS})


async def _send(send: Any, status: int, body: bytes, headers: Mapping[str, str]) -> None:
    encoded = [(k.encode(), v.encode()) for k, v in headers.items()]
    encoded.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": encoded})
    await send({"type": "http.response.body", "body": body})
