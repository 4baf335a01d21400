"""Error responses: every failure answers JSON ``{"error", "message", "detail"}`` (``ErrorBody``).

``ControlPlaneError`` subclasses carry their status code; request validation becomes a 422
``InvalidInputError`` listing each field at fault; a ``MemoryError`` is a 503 (the service could
not afford the request now; it is not the caller's fault and not a crash); anything unexpected is
a logged 500 whose message says nothing internal.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agent.logs import get_logger
from control_plane.errors import (
    AuthError,
    ControlPlaneError,
    PayloadTooLargeError,
    RangeNotSatisfiableError,
)

__all__ = ["install_error_handlers"]

log = get_logger(__name__)


def _body(error: str, message: str, detail: Any = None) -> dict[str, Any]:
    return {"error": error, "message": message, "detail": detail}


async def _control_plane_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ControlPlaneError)
    headers: dict[str, str] = {}
    if isinstance(exc, AuthError):
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, RangeNotSatisfiableError):
        headers["Content-Range"] = f"bytes */{exc.size}"
    if isinstance(exc, PayloadTooLargeError):
        headers["Connection"] = "close"  # the rest of the body is never read
    if exc.status_code >= 500:
        log.error("request_failed", path=request.url.path, error=str(exc))
    field = getattr(exc, "field", None)
    detail = {"field": field} if field else None
    return JSONResponse(
        _body(type(exc).__name__, str(exc), detail), status_code=exc.status_code, headers=headers
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        problems.append({"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg"))})
    message = "; ".join(f"{'.'.join(p['loc'])}: {p['msg']}" for p in problems)[:2000]
    return JSONResponse(_body("InvalidInputError", message, problems), status_code=422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(
        _body("HTTPError", str(exc.detail)), status_code=exc.status_code, headers=exc.headers
    )


async def _out_of_memory(request: Request, exc: Exception) -> JSONResponse:
    log.error("request_out_of_memory", path=request.url.path)
    return JSONResponse(
        _body("UnavailableError", "not enough memory for this request now; retry later"),
        status_code=503,
        headers={"Retry-After": "30"},
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("request_crashed", path=request.url.path, error=repr(exc), exc_info=exc)
    return JSONResponse(_body("InternalError", "internal error; see the service log"), 500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ControlPlaneError, _control_plane_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(MemoryError, _out_of_memory)
    app.add_exception_handler(Exception, _unexpected)
