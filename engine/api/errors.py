"""Errors as OpenAI sends them: every 4xx/5xx has its error body, and the OpenAPI schema says so."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.request import Overloaded, RequestError
from .protocol import ErrorResponse, error_body

RETRY_AFTER_S = 1   # a full engine frees slots as requests finish: a short wait is worth a retry


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


def overloaded(message: str) -> APIError:
    return APIError(429, message, "rate_limit_error", code="server_overloaded",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def engine_error(e: BaseException, engine) -> APIError:
    """What an error out of the engine means for the client."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, Overloaded):
        return overloaded(str(e))
    if isinstance(e, RequestError):
        return APIError(400, str(e), param=e.param, code=e.code)
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    if not engine.is_running or isinstance(e, RuntimeError):
        return APIError(503, f"the engine cannot serve: {e}", "server_error", code="engine_unavailable")
    return APIError(500, f"{type(e).__name__}: {e}", "server_error")


def _doc(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


GENERATE_ERRORS = {400: _doc("invalid request: wrong types, out-of-range values, prompt + max_tokens over "
                             "the context, malformed JSON"),
                   401: _doc("missing or wrong API key (only with --api-key)"),
                   404: _doc("unknown model"), 413: _doc("request body over --max-body-bytes"),
                   429: _doc("the server holds as many requests as it may: retry after Retry-After seconds"),
                   503: _doc("the engine cannot serve")}
NOT_FOUND = {404: _doc("no such model")}


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema with its default 422 removed: validation errors answer 400 here, in
    OpenAI's error body, so a schema-driven client (or fuzzer) expects what the server sends."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for ops in schema["paths"].values():
            for op in ops.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


async def _api_error(request, e: APIError):
    return JSONResponse(e.body, status_code=e.status, headers=e.headers)


async def _overloaded(request, e: Overloaded):
    return await _api_error(request, overloaded(str(e)))


async def _request_error(request, e: RequestError):
    return JSONResponse(error_body(str(e), param=e.param, code=e.code), status_code=400)


async def _validation_error(request, e: RequestValidationError):
    errs = e.errors()
    if any(er.get("type") == "json_invalid" for er in errs):
        return JSONResponse(error_body(f"request body is not valid JSON: {errs[0].get('ctx', {}).get('error', '')}"),
                            status_code=400)

    def where(er):
        return ".".join(str(x) for x in er.get("loc", ()) if x != "body") or None
    def say(er):
        if er.get("type") == "extra_forbidden":  # OpenAI's own words for a field it does not know
            return f"Unrecognized request argument supplied: {where(er)}"
        return f"{where(er) or 'body'}: {er.get('msg')}"
    msg = "; ".join(say(er) for er in errs)
    return JSONResponse(error_body(msg or "invalid request", param=where(errs[0]) if errs else None), status_code=400)


async def _http_error(request, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(e.status_code)
    # e.headers carries the Allow of a 405, which RFC 9110 requires
    return JSONResponse(error_body(str(e.detail), code=code), status_code=e.status_code, headers=e.headers)


def install(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(Overloaded, _overloaded)
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.openapi = lambda: openapi_schema(app)
