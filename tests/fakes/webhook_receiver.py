"""A real HTTP webhook receiver: records every POST and answers with scripted statuses (then 200)."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True)
class Received:
    """One POST as the receiver saw it, and the status it answered."""

    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float

    def json(self) -> Any:
        return orjson.loads(self.body)

    def signed_by(self, secret: bytes, tolerance_s: float = 300) -> bool:
        """What a receiver checks: a fresh timestamp and `v1=` HMAC-SHA256 over "<timestamp>.<body>"."""
        timestamp = self.headers.get("x-switchboard-timestamp", "")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > tolerance_s:
            return False
        expected = hmac.new(secret, timestamp.encode() + b"." + self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("x-switchboard-signature", ""), f"v1={expected}")


class WebhookReceiver:
    """`with WebhookReceiver() as hook:` serves on a loopback port; `hook.fail_next(503, 503)` scripts answers."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self._statuses: list[int] = []
        self._changed = threading.Condition()
        self._open = threading.Event()  # cleared by `hold`: posts wait before they are answered
        self._open.set()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver._changed:
                    status = receiver._statuses.pop(0) if receiver._statuses else 200
                    receiver.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                      body, status, time.time()))
                    receiver._changed.notify_all()
                receiver._open.wait(30)
                self.send_response(status)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks/budget"

    def fail_next(self, *statuses: int) -> None:
        with self._changed:
            self._statuses.extend(statuses)

    def hold(self) -> None:
        """Answer nothing until `release` (a receiver that hangs)."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """The first `count` posts, once they have arrived."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.received) >= count, timeout):
                raise AssertionError(f"expected {count} webhook posts, got {len(self.received)}")
            return list(self.received)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()
