"""Refusals in one shape on our own routes, and in the reference's envelope on its routes.

Our routes (`/v1/music/generate`, `/v1/jobs...`, `/v1/files/...`, `/v1/music/random`,
`/v1/chat/completions`) answer every refusal, whatever raised it (the request model, FastAPI's
parameter checks, authentication, the job store, object storage), with FastAPI's status codes and

    {"detail": [{"field": "<what was wrong>", "message": "<why>"}, ...]}

`field` names a body field (`bpm`, `src_audio_path`), a query or path parameter (`before`,
`job_id`), a header (`Authorization`, `Idempotency-Key`), `body` for the body as a whole, or
`request` where nothing the caller sent is at fault (a full queue, an unreachable database).
The reference server's routes (`EnvelopeRoute`) answer in its envelope instead (envelope.py)."""

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from db import DatabaseUnavailable, StoreError
from handler.http.envelope import EnvelopeRoute, error_envelope
from handler.storage import StorageError, StorageUnavailable

log = logging.getLogger(__name__)

REQUEST = "request"  # the field of a problem with no one field at fault
_LOCATIONS = ("body", "query", "path", "header", "cookie")


def problem(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}


def refusal(status: int, field: str, message: str, headers: dict[str, str] | None = None) -> HTTPException:
    """An HTTPException in the one shape: `field` is at fault because of `message`."""
    return HTTPException(status, [problem(field, message)], headers)


def problems(detail: Any) -> list[dict[str, str]]:
    """An HTTPException's detail (a list of problems, or a plain string) as the list of problems."""
    if isinstance(detail, list) and all(isinstance(d, dict) and "message" in d for d in detail):
        return [problem(str(d.get("field") or REQUEST), str(d["message"])) for d in detail]
    return [problem(REQUEST, str(detail))]


def parameter_field(loc: tuple | list) -> str:
    """A FastAPI error location as the field a caller knows: ("query", "limit") -> "limit",
    ("header", "idempotency-key") -> "Idempotency-Key", ("body",) -> "body"."""
    parts = [str(part) for part in loc]
    if len(parts) > 1 and parts[0] in _LOCATIONS:
        kind, parts = parts[0], parts[1:]
        if kind == "header":
            parts[0] = "-".join(word.capitalize() for word in parts[0].replace("_", "-").split("-"))
    return ".".join(parts) or "body"


def _answer(request: Request, status: int, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
    if isinstance(request.scope.get("route"), EnvelopeRoute):
        return error_envelope(status, detail, headers)
    return JSONResponse({"detail": problems(detail)}, status, headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every refusal that leaves a route, in the shape of its route (see the module docstring)."""

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _answer(request, exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        return _answer(request, 422, [problem(parameter_field(e.get("loc", ())), str(e.get("msg", ""))) for e in errors])

    @app.exception_handler(DatabaseUnavailable)
    @app.exception_handler(StorageUnavailable)
    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        return _answer(request, 503, "service temporarily unavailable; retry shortly", {"Retry-After": "5"})

    @app.exception_handler(StoreError)
    @app.exception_handler(StorageError)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc, extra={"action": "http_error", "path": request.url.path})
        return _answer(request, 500, "internal error in the job service")
