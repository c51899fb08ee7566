"""One log line per HTTP request, as vLLM's and llama-server's logs have: method, route,
status, time, and for generation its tokens and the key that paid for them.

    POST /v1/chat/completions 200 in 1.84 s: 43 prompt (32 cached) + 120 completion tokens, key key_3f2a9c01d4e5

A request whose client left before any answer is logged with 499 (nginx's "client closed").
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("r1serve.requests")

# What routes leave in the request's scope state for this line (Starlette's request.state).
JOB, KEY = "r1serve_job", "r1serve_key"
# Polled every few seconds by load balancers and Prometheus: a line each would bury the rest.
QUIET = frozenset({"/health", "/metrics"})


class RequestLog:
    """ASGI middleware; costs nothing when the log level hides its lines."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in QUIET or not log.isEnabledFor(logging.INFO):
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), [499]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            log.info("%s %s %d in %.2f s%s", scope["method"], scope["path"], status[0], time.monotonic() - started,
                     _details(scope.get("state") or {}))


def _details(state: dict) -> str:
    job, key = state.get(JOB), state.get(KEY)
    parts = []
    if job is not None:
        prompt, cached, completion, _ = job.counts()
        parts.append(f"{prompt} prompt ({cached} cached) + {completion} completion tokens")
    if key is not None:
        parts.append(f"key {key}")
    return ": " + ", ".join(parts) if parts else ""
