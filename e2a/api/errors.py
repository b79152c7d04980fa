"""Every error is JSON: {"error": {"code", "message", "field"}}, with a fitting status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from e2a.refusal import Refusal

log = logging.getLogger("e2a.api")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers  # sent with the error (e.g. a 429's Retry-After)


def body(code: str, message: str, field: str | None = None) -> dict:
    return {"error": {"code": code, "message": message, "field": field}}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body(code, message, field), status_code=status, headers=headers)


async def deny_websocket(ws, exc: ApiError) -> None:
    """Refuse a WebSocket's upgrade with the usual JSON error and status, before accepting."""
    await ws.send_denial_response(error_response(exc.status, exc.code, exc.message, exc.field))


_STATUS_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                 409: "conflict", 413: "too_large", 415: "unsupported_media_type"}


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(Refusal)
    async def _refusal(_: Request, exc: Refusal):  # a service's refusal, as is
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return error_response(exc.status, exc.code, exc.message, exc.field, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):  # where, not which field
            loc = loc[1:]
        field = ".".join(loc) or None
        kind = first.get("type", "")
        if kind == "json_invalid":
            return error_response(400, "invalid_json", "the request body is not valid JSON")
        if kind == "missing":
            return error_response(400, "missing_field", f"{field} is required", field)
        msg = first.get("msg", "invalid request")
        if kind == "model_attributes_type":
            return error_response(400, "invalid_body", "the request body must be a JSON object")
        return error_response(400, "invalid_field", f"{field}: {msg}" if field else msg, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        code = _STATUS_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal", "internal error")
