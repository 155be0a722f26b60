"""Locust scenarios for Switchboard (or any OpenAI-compatible endpoint): chat and streamed chat.

    SWITCHBOARD_KEY=sk-... SWITCHBOARD_MODEL=gpt-4o-mini \
    locust -f loadtests/locustfile.py --headless -u 50 -r 10 -t 30s \
        --host http://127.0.0.1:8080 --csv loadtests/results/run

Pick one scenario by naming its class last on the command line (`... ChatUser` or `... ChatStreamUser`).
Request names in the stats: "chat" (POST, whole response), "chat stream" (POST, until `[DONE]`) and
"chat stream" with request type TTFT (time to the first non-empty content delta).

Locust is for soak/behaviour runs with many users; bench.py is the precise overhead measurement.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from locust import FastHttpUser, HttpUser, task

KEY = os.environ.get("SWITCHBOARD_KEY", "sk-switchboard-demo")
MODEL = os.environ.get("SWITCHBOARD_MODEL", "gpt-4o-mini")
CHAT_PATH = "/v1/chat/completions"
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
MESSAGES = [{"role": "user", "content": "Write one short sentence about load testing."}]


def chat_body(stream: bool) -> str:
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 64, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body)


def has_content(event: bytes) -> bool:
    """True if an SSE data payload carries a non-empty content delta (the role-only first chunk doesn't)."""
    choices = json.loads(event).get("choices") or []
    return any((choice.get("delta") or {}).get("content") for choice in choices)


class ChatUser(FastHttpUser):
    """Non-streamed chat completions, back to back (FastHttpUser: the cheapest Locust client)."""

    body = chat_body(stream=False)

    @task
    def chat(self) -> None:
        with self.client.post(CHAT_PATH, data=self.body, headers=HEADERS, name="chat", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
            elif '"choices"' not in (resp.text or ""):
                resp.failure("no choices in response")


class ChatStreamUser(HttpUser):
    """Streamed chat completions; reports total time and time to first token (request type TTFT).

    HttpUser (requests) rather than FastHttpUser: its iter_lines() yields each chunk as it arrives,
    whereas geventhttpclient's read(n) blocks until n bytes are buffered, which would skew TTFT.
    """

    body = chat_body(stream=True)

    @task
    def chat_stream(self) -> None:
        start = time.perf_counter()
        with self.client.post(
            CHAT_PATH, data=self.body, headers=HEADERS, name="chat stream", stream=True, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            done = self.consume(resp.iter_lines(), start)
            # Locust stops the clock at the headers for stream=True; report the whole stream instead.
            resp.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            if not done:
                resp.failure("stream ended without data: [DONE]")

    def consume(self, lines: Any, start: float) -> bool:
        """Read SSE lines to the end, firing the TTFT metric once. Returns whether [DONE] arrived."""
        first_token = False
        for line in lines:
            if not line.startswith(b"data: "):
                continue
            payload = line[6:]
            if payload == b"[DONE]":
                return True
            if not first_token and has_content(payload):
                first_token = True
                self.environment.events.request.fire(
                    request_type="TTFT",
                    name="chat stream",
                    response_time=(time.perf_counter() - start) * 1000,
                    response_length=0,
                    exception=None,
                    context={},
                )
        return False
