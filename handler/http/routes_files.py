"""The local storage backend's signed file URLs (`/v1/files/<key>?expires=..&signature=..`): GET and
HEAD with Content-Length and byte ranges, served by the same code as the /v1/audio links, so
browser players can seek. The signature is the credential (no API key needed)."""

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response

from handler.http.audio_links import serve_object
from handler.http.errors import refusal
from handler.storage import LOCAL_FILES_ROUTE, LocalStorage, StorageError

router = APIRouter()


@router.get(LOCAL_FILES_ROUTE + "/{key:path}", summary="Download a result file (signed URL; ranges allowed)",
            responses={206: {}, 403: {}, 404: {}, 416: {}})
@router.head(LOCAL_FILES_ROUTE + "/{key:path}", operation_id="head_file", summary="A result file's headers (size, type, ranges)",
             responses={206: {}, 403: {}, 404: {}, 416: {}})
def download(
    key: str,
    request: Request,
    expires: Annotated[int, Query()],
    signature: Annotated[str, Query(max_length=128)],
    range: Annotated[str | None, Header(max_length=200)] = None,  # noqa: A002 - the header's name
) -> Response:
    storage = request.app.state.services.storage
    if not isinstance(storage, LocalStorage):
        raise refusal(404, "key", "files are served by the object store, not by this route")
    try:
        valid = storage.verify(key, expires, signature)
    except StorageError:
        valid = False
    if not valid:
        raise refusal(403, "signature", "this file URL is invalid or has expired; poll the job for a fresh one")
    return serve_object(request, storage, key, range)
