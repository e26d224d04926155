"""ASGI middleware: the bearer-key check on /v1/* and per-endpoint request counts. Plain ASGI
rather than BaseHTTPMiddleware, which would get between StreamingResponse and disconnects."""
from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from .metrics import Metrics
from .protocol import error_body

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class Gate:
    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else ("/v1/models" if path.startswith("/v1/models/") else "other")
        status = 500

        async def send_status(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            if self.api_key and (path == "/v1" or path.startswith("/v1/")) and not self._authorized(scope):
                resp = JSONResponse(error_body("Incorrect or missing API key: send Authorization: Bearer <key>",
                                               code="invalid_api_key"), status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()

    def _authorized(self, scope) -> bool:
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                scheme, _, key = v.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())
        return False
