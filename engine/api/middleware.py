"""ASGI middleware, in the order a request meets it: the Host allowlist (DNS rebinding), the
body-size limit (413, before the body is read or parsed, authenticated or not), the bearer-key
check on /v1/*, /tokenize and /detokenize, a bound on generating requests in progress (429), and per-endpoint request
counts. Plain ASGI rather than BaseHTTPMiddleware, which would get between StreamingResponse
and disconnects."""
from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .metrics import Metrics
from .protocol import error_body

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
             "/metrics")
# behind the key besides /v1/*: they read the served model's tokenizer (vLLM leaves them open)
KEYED = ("/v1", "/tokenize", "/detokenize")
DEFAULT_MAX_BODY_BYTES = 16 << 20   # a full-context prompt as JSON token ids, with room to spare
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class BodyTooLarge(HTTPException):
    """Raised from receive() inside the app: FastAPI passes an HTTPException through its body
    parsing, and errors.py answers it in OpenAI's body."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body over {limit} bytes")


def host_of(scope) -> str | None:
    """The Host header's name, without the port or an IPv6 literal's brackets."""
    for k, v in scope.get("headers", ()):
        if k == b"host":
            h = v.decode("latin-1").strip().lower()
            if h.startswith("["):
                return h[1:h.find("]")] if "]" in h else h
            return h.rsplit(":", 1)[0] if h.count(":") == 1 else h
    return None


class Gate:
    """api_key None: no key needed. allowed_hosts None: any Host; else a list of names ("*" any).
    How many requests are held is the engine's bound (AsyncLLM.admit), not this gate's."""

    def __init__(self, app, api_key: str | None, metrics: Metrics, allowed_hosts=None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app, self.api_key, self.metrics = app, api_key, metrics
        self.allowed_hosts = None if allowed_hosts is None or "*" in allowed_hosts else \
            {h.lower().strip("[]") for h in allowed_hosts}
        self.max_body_bytes = max_body_bytes

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

        async def refuse(code: int, message: str, err: str, headers=None):
            resp = JSONResponse(error_body(message, code=err), status_code=code, headers=headers)
            await resp(scope, receive, send_status)

        try:
            if self.allowed_hosts is not None and host_of(scope) not in self.allowed_hosts:
                return await refuse(400, "Host header not allowed (see --allowed-hosts)", "invalid_host")
            if self._declared_length(scope) > self.max_body_bytes:
                return await refuse(413, f"request body over {self.max_body_bytes} bytes", "request_too_large")
            if self.api_key and (path in KEYED or path.startswith("/v1/")) and not self._authorized(scope):
                return await refuse(401, "Incorrect or missing API key: send Authorization: Bearer <key>",
                                    "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            try:
                await self.app(scope, self._limited(receive), send_status)
            except BodyTooLarge:
                if status == 500:  # nothing sent yet
                    await refuse(413, f"request body over {self.max_body_bytes} bytes", "request_too_large")
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()

    def _limited(self, receive):
        """receive, refusing a body (chunked, or longer than it said) once it passes the limit."""
        seen = 0

        async def wrapped():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return msg
        return wrapped

    @staticmethod
    def _declared_length(scope) -> int:
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    return int(v)
                except ValueError:
                    return 0  # the server itself refuses a malformed length
        return 0

    def _authorized(self, scope) -> bool:
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                scheme, _, key = v.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())
        return False
