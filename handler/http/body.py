"""Reading a submit body in any of the three accepted encodings into fields and uploads."""

import json
from typing import Any

from fastapi import Request, UploadFile

from handler.http.errors import refusal

ACCEPTED = ("application/json", "application/x-www-form-urlencoded", "multipart/form-data")
# Form fields whose "no value" is null: an empty form value means "not given".
_NULLABLE_FORM_FIELDS = {
    "bpm", "audio_duration", "batch_size", "lm_model_path", "lm_top_k", "reference_audio_path",
    "src_audio_path", "repainting_end",
}


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(request: Request, max_bytes: int) -> tuple[dict[str, Any], dict[str, UploadFile]]:
    """(fields, file uploads) of a JSON, urlencoded or multipart body; 415 for anything else."""
    kind = content_type(request)
    if kind not in ACCEPTED:
        raise refusal(415, "Content-Type", f"must be one of {', '.join(ACCEPTED)}; got {kind or 'none'}")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise refusal(413, "body", f"request body is larger than {max_bytes // (1024 * 1024)} MB")
    if kind == "application/json":
        return await _json_fields(request, max_bytes), {}
    if kind == "application/x-www-form-urlencoded" and (await _limited_body(request, max_bytes)).lstrip().startswith(b"{"):
        # `curl -d '{...}'` without -H 'Content-Type: application/json' labels JSON as a form.
        return await _json_fields(request, max_bytes), {}
    form = await request.form(max_files=4, max_fields=200)
    fields: dict[str, Any] = {}
    uploads: dict[str, UploadFile] = {}
    for name in form.keys():
        values = form.getlist(name)
        files = [v for v in values if not isinstance(v, str)]
        if files:
            uploads[name] = files[0]
            continue
        if name in _NULLABLE_FORM_FIELDS and values == [""]:
            continue
        fields[name] = values if len(values) > 1 else values[0]
    return fields, uploads


async def _limited_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refusing more than `max_bytes`; kept as `_body`, which Starlette replays to
    later readers of the request (form parsing)."""
    if not hasattr(request, "_body"):
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise refusal(413, "body", f"request body is larger than {max_bytes // (1024 * 1024)} MB")
        request._body = bytes(body)
    return request._body


async def _json_fields(request: Request, max_bytes: int) -> dict[str, Any]:
    body = await _limited_body(request, max_bytes)
    try:
        fields = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise refusal(400, "body", f"malformed JSON body: {exc}") from None
    if not isinstance(fields, dict):
        raise refusal(400, "body", "the JSON body must be an object of parameters")
    return fields
