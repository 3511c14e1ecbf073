"""The reference API server's response envelope: {data, code, error, timestamp, extra}.

Successes carry `code` 200 and the payload in `data`; refusals carry the HTTP status in `code`, the
reason in `error`, and the same reason as `detail` (FastAPI's convention), so clients of either
convention find it."""

import time
from typing import Any

from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute


class EnvelopeRoute(APIRoute):
    """A route of the reference server (`APIRouter(route_class=EnvelopeRoute)`): whatever refusal
    leaves it answers in the envelope (handler/http/errors.py)."""


def now_ms() -> int:
    return int(time.time() * 1000)


def envelope(data: Any, extra: Any = None, *, code: int = 200, error: str | None = None) -> dict:
    """The envelope around `data`. `code`/`error` give the reference's in-band refusals (HTTP 200,
    `code` 400) where its routes answer that way."""
    return {"data": data, "code": code, "error": error, "timestamp": now_ms(), "extra": extra}


def error_message(detail: Any) -> str:
    """One line from an HTTPException detail: a string, or a list of {field, message} problems."""
    if isinstance(detail, list):
        parts = [f"{d.get('field', 'body')}: {d.get('message', '')}" if isinstance(d, dict) else str(d) for d in detail]
        return "; ".join(parts)
    return str(detail)


def error_envelope(status: int, detail: Any, headers: dict[str, str] | None = None, *, data: Any = None) -> JSONResponse:
    """A refusal with HTTP status `status`, in the envelope."""
    body = envelope(data, code=status, error=error_message(detail))
    body["detail"] = detail
    return JSONResponse(body, status, headers)
