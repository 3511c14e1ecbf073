"""Reading a submit body in any of the three accepted encodings into fields and uploads.

Every body is counted while it is read, whatever its framing (Content-Length or chunked): past
the cap the read stops with 413, so nothing beyond the cap is held in memory or spooled to disk.
JSON is parsed with a bounded nesting depth, and `NaN`/`Infinity` read as floats for the request
model to refuse under the field's own name (never a 500)."""

import json
import math
import re
from collections.abc import Callable
from typing import Any

from fastapi import Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from handler.http.errors import refusal
from pipeline.contract import GenerationRequest

ACCEPTED = ("application/json", "application/x-www-form-urlencoded", "multipart/form-data")
MAX_JSON_DEPTH = 32  # the deepest a request needs is 2 (a list of seeds, codes, track classes)
# Read before the caller is known (a body's `ai_token`, the reference's other way to send a key):
# a body without an Authorization header is read this far at most before the token is checked.
PRE_AUTH_BYTES = 1024 * 1024


def _nullable(name: str) -> bool:
    annotation = GenerationRequest.model_fields[name].annotation
    return type(None) in getattr(annotation, "__args__", ())


# Form fields whose "no value" is null: an empty form value (or the text "null") means "not given".
_NULLABLE_FORM_FIELDS = {name for name in GenerationRequest.model_fields if _nullable(name)}


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def too_large(max_bytes: int):
    return refusal(413, "body", f"request body is larger than {_size(max_bytes)}")


def _size(max_bytes: int) -> str:
    return f"{max_bytes // (1024 * 1024)} MB" if max_bytes >= 1024 * 1024 else f"{max_bytes // 1024} KB"


class CountedReceive:
    """An ASGI `receive` that counts the body as it arrives (`replay`: messages already read, given
    again first) and raises `over()` once more than `max_bytes` came."""

    def __init__(self, receive, max_bytes: int, replay: list[dict] | None = None, over: Callable[[], Exception] | None = None):
        self._receive, self.max_bytes, self._replay = receive, max_bytes, list(replay or [])
        self._over = over or (lambda: too_large(max_bytes))
        self.seen = sum(len(m.get("body", b"")) for m in self._replay)
        if self.seen > max_bytes:
            raise self._over()

    async def __call__(self) -> dict:
        if self._replay:
            return self._replay.pop(0)
        message = await self._receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.max_bytes:
                raise self._over()
        return message


async def read_body(request: Request, max_bytes: int, *, replay: list[dict] | None = None,
                    over: Callable[[], Exception] | None = None) -> tuple[dict[str, Any], dict[str, UploadFile]]:
    """(fields, file uploads) of a JSON, urlencoded or multipart body; 415 for anything else; 413
    as soon as more than `max_bytes` arrived (chunked bodies too)."""
    kind = content_type(request)
    if kind not in ACCEPTED:
        raise refusal(415, "Content-Type", f"must be one of {', '.join(ACCEPTED)}; got {kind or 'none'}")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise (over or (lambda: too_large(max_bytes)))()
    counted = Request(request.scope, CountedReceive(request.receive, max_bytes, replay, over))
    if kind == "application/json":
        return await _json_fields(counted), {}
    if kind == "application/x-www-form-urlencoded" and (await _whole_body(counted)).lstrip().startswith(b"{"):
        # `curl -d '{...}'` without -H 'Content-Type: application/json' labels JSON as a form.
        return await _json_fields(counted), {}
    form = await counted.form(max_files=4, max_fields=200)
    fields: dict[str, Any] = {}
    uploads: dict[str, UploadFile] = {}
    for name in form.keys():
        values = form.getlist(name)
        files = [v for v in values if not isinstance(v, str)]
        if files:
            uploads[name] = files[0]
            continue
        if name in _NULLABLE_FORM_FIELDS and values in ([""], ["null"]):
            continue
        fields[name] = values if len(values) > 1 else values[0]
    return fields, uploads


async def read_authenticated(request: Request, max_bytes: int, authorization: str | None,
                             auth) -> tuple[Any, dict[str, Any], dict[str, UploadFile]]:
    """(the caller, fields, uploads) of a body that may carry its key as `ai_token` (the reference's
    routes). With an Authorization header (or no keys at all) the caller is checked before a byte of
    the body is read; without one, at most PRE_AUTH_BYTES are read to find the `ai_token` (a
    multipart body: its `ai_token` field must come before the files), then the rest."""
    authenticate = auth.caller
    if authorization or auth.open_mode:
        who = await run_in_threadpool(authenticate, authorization)
        fields, files = await read_body(request, max_bytes)
        fields.pop("ai_token", None)
        return who, fields, files

    def unauthenticated() -> Exception:
        return refusal(401, "Authorization", f"missing API key: send Authorization: Bearer <key> (an ai_token in the "
                       f"body is read only from the first {_size(PRE_AUTH_BYTES)} of a body)",
                       {"WWW-Authenticate": "Bearer"})

    if content_type(request) != "multipart/form-data":
        fields, files = await read_body(request, min(max_bytes, PRE_AUTH_BYTES), over=unauthenticated)
        token = fields.pop("ai_token", None)
        who = await run_in_threadpool(authenticate, f"Bearer {token}" if isinstance(token, str) and token else None)
        return who, fields, files
    prefix = await _peek(request, PRE_AUTH_BYTES)
    token = _multipart_field(request, b"".join(m.get("body", b"") for m in prefix), "ai_token")
    who = await run_in_threadpool(authenticate, f"Bearer {token}" if token else None)
    fields, files = await read_body(request, max_bytes, replay=prefix)
    fields.pop("ai_token", None)
    return who, fields, files


async def _peek(request: Request, limit: int) -> list[dict]:
    """The first messages of the body, up to `limit` bytes (or its end), to be replayed."""
    messages, seen = [], 0
    while seen < limit:
        message = await request.receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return messages


def _multipart_field(request: Request, prefix: bytes, name: str) -> str | None:
    """A text field's value in the start of a multipart body (None if it is not there)."""
    match = re.search(r'boundary="?([^";]+)"?', request.headers.get("content-type", ""))
    if not match:
        return None
    boundary = re.escape(match.group(1).encode())
    found = re.search(rb'content-disposition:[^\r\n]*;\s*name="' + re.escape(name.encode()) +
                      rb'"[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n(.*?)\r\n--' + boundary, prefix, re.IGNORECASE | re.DOTALL)
    if not found:
        return None
    try:
        return found.group(1).decode().strip() or None
    except UnicodeDecodeError:
        return None


async def _whole_body(request: Request) -> bytes:
    """The whole (counted) body; Starlette keeps it as `_body` and replays it to later readers."""
    return await request.body()


def parse_json(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON with `NaN`/`Infinity` as floats and at most `max_depth` levels of nesting; ValueError
    (a message for the client) for anything else, deep nesting and huge numbers included."""
    try:
        value = json.loads(text, parse_constant=float)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed JSON: {exc}") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ValueError(f"malformed JSON: {exc}") from None
    if _depth(value) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    return value


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def json_safe(value: Any) -> Any:
    """A parsed value made safe to send back in a JSON answer: non-finite floats as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


async def _json_fields(request: Request) -> dict[str, Any]:
    body = await _whole_body(request)
    try:
        fields = parse_json(body or b"{}")
    except ValueError as exc:
        raise refusal(400, "body", f"malformed JSON body: {exc}") from None
    if not isinstance(fields, dict):
        raise refusal(400, "body", "the JSON body must be an object of parameters")
    return fields
