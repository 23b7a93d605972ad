"""Every error the server answers, in OpenAI's body ``{"error": {"message", "type", "param", "code"}}``:
the OpenAI SDKs read ``type``, ``param`` and ``code`` from it (``BadRequestError.param``), whatever raised
the error — restok's checks, the request model's validation, the framework (404, 405) or a bug (500)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
               409: "conflict_error", 413: "invalid_request_error", 415: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request",
               500: "server_error", 503: "service_unavailable_error", 504: "timeout_error"}


class APIError(Exception):
    """Raised anywhere in a route: answered as an OpenAI error with this status, param and code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else
                                                                  "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _param(loc) -> str | None:
    """A validation error's location as the request field's name: ("body", "class_labels", 2) -> class_labels[2]."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    if not parts:
        return None
    out = str(parts[0])
    for p in parts[1:]:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """(message, param) of the first validation error; never echoes the input (it may be NaN or huge)."""
    errors = exc.errors()
    if not errors:
        return "the request is not valid", None
    e = errors[0]
    param = _param(e.get("loc", ()))
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON (NaN and Infinity are not JSON numbers)", None
    if e.get("type") == "extra_forbidden":
        return f"unknown field {param!r}", param
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{param or 'body'}: {e.get('msg', 'invalid value')}{more}", param


def install_error_handlers(app: FastAPI) -> None:
    """OpenAI bodies for every error (restok.serving.access counts and logs each answer)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 401: "invalid_api_key"}.get(exc.status_code)
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, message, None, code, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error")
