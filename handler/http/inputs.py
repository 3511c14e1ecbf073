"""Audio inputs of a request: uploads (size-capped, checked to be decodable audio, stored under the
job's keys) and `*_path` references (files under the input root, or this caller's own objects)."""

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse
from uuid import UUID

from fastapi import UploadFile

from db import JobNotFound, JobStore
from handler.storage import AUDIO_CONTENT_TYPES, S3Storage
from pipeline.contract import INPUT_PATH_FIELDS

# role -> (upload field, path field)
# role -> (upload field, path field): an upload `src_audio` stands for the path field `src_audio_path`.
ROLES = {role: (path_field.removesuffix("_path"), path_field) for role, path_field in INPUT_PATH_FIELDS.items()}
UPLOAD_FIELDS = {upload: role for role, (upload, _) in ROLES.items()}
_JOB_KEY = re.compile(r"^jobs/([0-9a-fA-F-]{36})/[^/]+$")


class InputError(Exception):
    """A client error in an audio input: HTTP status, the field, and why."""

    def __init__(self, status: int, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.status, self.field, self.message = status, field_name, message


@dataclass
class Upload:
    role: str
    data: bytes
    ext: str


@dataclass
class AudioInputs:
    uploads: list[Upload] = field(default_factory=list)
    references: dict[str, dict] = field(default_factory=dict)  # role -> {"key": ...} or {"path": ...}


async def read_upload(name: str, upload: UploadFile, max_bytes: int) -> Upload:
    """Read a file field within the cap and check that it decodes as audio."""
    if name not in UPLOAD_FIELDS:
        raise InputError(422, name, f"unknown file field; accepted: {', '.join(sorted(UPLOAD_FIELDS))}")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(413, name, f"file is larger than the {max_bytes // (1024 * 1024)} MB limit")
    import soundfile  # here: the HTTP function's cold start does not pay for numpy until an upload comes

    try:
        info = soundfile.info(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError):
        raise InputError(400, name, "is not decodable audio (wav, flac, mp3 or ogg)") from None
    ext = info.format.lower()
    if ext not in AUDIO_CONTENT_TYPES or info.frames <= 0:
        raise InputError(400, name, "is not decodable audio (wav, flac, mp3 or ogg)")
    return Upload(role=UPLOAD_FIELDS[name], data=data, ext=ext)


def resolve_reference(
    field_name: str, value: str, *, owner: str, store: JobStore, storage, input_root: Path | None
) -> dict:
    """A `*_path` value to {"path": ...} or {"key": ...}; anything outside what the caller may read is a 400."""
    refused = InputError(
        400,
        field_name,
        "must name a file under the server's input directory, or a key or s3:// URI of one of your jobs' files",
    )
    if value.startswith("/"):
        if input_root is None:
            raise refused
        root = input_root.resolve()
        path = Path(value).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise refused
        return {"path": str(path)}
    key = value
    if value.startswith("s3://"):
        parsed = urlparse(value)
        prefix = f"{storage.prefix}/" if isinstance(storage, S3Storage) and storage.prefix else ""
        if not isinstance(storage, S3Storage) or parsed.netloc != storage.bucket:
            raise refused
        key = parsed.path.lstrip("/")
        if not key.startswith(prefix):
            raise refused
        key = key[len(prefix) :]
    match = _JOB_KEY.match(key)
    if not match:
        raise refused
    try:
        job = store.get(UUID(match.group(1)))
    except (JobNotFound, ValueError):
        raise refused from None
    if job["owner"] != owner:
        raise refused
    return {"key": key}
