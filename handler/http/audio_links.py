"""`/v1/audio?path=<token>`: the reference server's download links, over our object storage.

The reference answers `file: "/v1/audio?path=<server path>"` and its clients fetch
`${base_url}${file}`. Here `path` is an opaque token instead: the storage key (base64url), an expiry
and an HMAC-SHA256 over both with a key derived from the service's secret, so a link names one
object, cannot be forged or extended, and never shows a server path. The signature is the
credential (no API key needed), as with the local backend's signed `/v1/files` URLs. Links are
made fresh on every poll, so the database never holds an expiring URL.

Token: `<b64url(key)>.<expires>.<b64url(signature)>[.<ext>]`; the trailing file extension is only a
hint for clients that name the download after the link (it must match the key's).
"""

import base64
import binascii
import hashlib
import hmac
import mimetypes
import re
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import Response, StreamingResponse

from handler.backends import secret_key
from handler.http.envelope import EnvelopeRoute
from handler.storage import AUDIO_CONTENT_TYPES, ObjectNotFound, StorageError, checked_key

AUDIO_ROUTE = "/v1/audio"
_PURPOSE = b"acestep audio link v1"  # keeps these signatures apart from /v1/files URLs and webhooks
_EXTENSION = re.compile(r"[A-Za-z0-9]{1,5}")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
CHUNK_BYTES = 256 * 1024

router = APIRouter(route_class=EnvelopeRoute)


class LinkRefused(Exception):
    """A token that is malformed, forged or expired."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signing_key(settings) -> bytes:
    return hmac.new(secret_key(settings), _PURPOSE, hashlib.sha256).digest()


def _signature(settings, key: str, expires: int) -> bytes:
    return hmac.new(_signing_key(settings), f"{key}\n{expires}".encode(), hashlib.sha256).digest()


def _extension(key: str) -> str | None:
    suffix = PurePosixPath(key).suffix.lstrip(".")
    return suffix if _EXTENSION.fullmatch(suffix) else None


def audio_token(settings, key: str, *, now: float | None = None) -> str:
    """The signed token for `key`, valid for `settings.url_expires_seconds` from `now`."""
    checked_key(key)
    expires = int((time.time() if now is None else now) + settings.url_expires_seconds)
    token = f"{_b64(key.encode())}.{expires}.{_b64(_signature(settings, key, expires))}"
    ext = _extension(key)
    return f"{token}.{ext}" if ext else token


def audio_link(svc, key: str, *, now: float | None = None) -> str:
    """A RELATIVE link, `/v1/audio?path=<token>`, that downloads object `key` until it expires."""
    return f"{AUDIO_ROUTE}?path={audio_token(svc.settings, key, now=now)}"


def verify_token(settings, token: str, *, now: float | None = None, expiry: bool = True) -> str:
    """The storage key a token names; LinkRefused if it is malformed, forged or (unless `expiry` is
    off: a caller naming a file of their own by its old link) expired."""
    parts = token.split(".")
    if len(parts) not in (3, 4) or not parts[1].isdigit() or len(parts[1]) > 12:
        raise LinkRefused("this audio link is not one this server made")
    try:
        key = _unb64(parts[0]).decode()
        signature = _unb64(parts[2])
        checked_key(key)
    except (binascii.Error, ValueError, UnicodeDecodeError, StorageError):
        raise LinkRefused("this audio link is not one this server made") from None
    expires = int(parts[1])
    if not hmac.compare_digest(_signature(settings, key, expires), signature):
        raise LinkRefused("this audio link's signature is invalid")
    if len(parts) == 4 and parts[3] != _extension(key):
        raise LinkRefused("this audio link's signature is invalid")
    if expiry and (time.time() if now is None else now) > expires:
        raise LinkRefused("this audio link has expired; query the task again for a fresh one")
    return key


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


class RangeNotSatisfiable(Exception):
    """The Range names no byte of the object."""


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """One `bytes=a-b`, `bytes=a-` or `bytes=-n` range of an object of `size` bytes; None for the
    whole object (no header, a malformed one, or several ranges: RFC 9110 lets a server ignore
    those). RangeNotSatisfiable where it names no byte."""
    if not header:
        return None
    match = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if match is None or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if not first:  # the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable()
        return ByteRange(max(0, size - n), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # invalid: ignored
    if start >= size:
        raise RangeNotSatisfiable()
    return ByteRange(start, min(end, size - 1))


def content_type(key: str) -> str:
    ext = _extension(key)
    if ext and ext.lower() in AUDIO_CONTENT_TYPES:
        return AUDIO_CONTENT_TYPES[ext.lower()]
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


def _chunks(body):
    try:
        while chunk := body.read(CHUNK_BYTES):
            yield chunk
    finally:
        body.close()


def serve_object(request: Request, storage, key: str, range_header: str | None) -> Response:
    """GET or HEAD of object `key`: Content-Type, Content-Length and Accept-Ranges always, one byte
    range as 206 with Content-Range, 416 for a range past the end. Both download routes (these
    links and the local backend's signed /v1/files URLs) answer through here; refusals are
    HTTPExceptions, answered in each route's own shape."""
    gone = "audio file not found (it may have been deleted after its retention time)"
    try:
        size = storage.size(key)
    except ObjectNotFound:
        raise HTTPException(404, gone) from None
    headers = {"Accept-Ranges": "bytes", "Content-Type": content_type(key), "Cache-Control": "private, max-age=60"}
    try:
        wanted = parse_range(range_header, size)
    except RangeNotSatisfiable:
        raise HTTPException(416, [{"field": "Range", "message": f"{range_header!r} is outside the file ({size} bytes)"}],
                            {"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"}) from None
    status = 200
    if wanted is not None:
        status = 206
        headers["Content-Range"] = f"bytes {wanted.start}-{wanted.end}/{size}"
    length = wanted.length if wanted is not None else size
    headers["Content-Length"] = str(length)
    if request.method == "HEAD" or length == 0:
        return Response(status_code=status, headers=headers)
    try:
        body = storage.open(key) if wanted is None else storage.open_range(key, wanted.start, wanted.end)
    except ObjectNotFound:
        raise HTTPException(404, gone) from None
    return StreamingResponse(_chunks(body), status_code=status, headers=headers)


@router.get(AUDIO_ROUTE, operation_id="download_audio", summary="Download a result file (the reference's signed link; ranges allowed)",
            responses={206: {}, 403: {}, 404: {}, 416: {}})
@router.head(AUDIO_ROUTE, operation_id="head_audio", summary="A result file's headers (size, type, ranges)",
             responses={206: {}, 403: {}, 404: {}, 416: {}})
def audio(
    request: Request,
    path: Annotated[str, Query(max_length=2048, description="the token from a result's `file` link")],
    range: Annotated[str | None, Header(max_length=200)] = None,  # noqa: A002 - the header's name
) -> Response:
    svc = request.app.state.services
    try:
        key = verify_token(svc.settings, path)
    except LinkRefused as refused:
        raise HTTPException(403, str(refused)) from None
    return serve_object(request, svc.storage, key, range)
