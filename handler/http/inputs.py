"""Audio inputs of a request: uploads (size-capped, checked to be decodable audio, stored under the
job's keys) and `*_path` references (files under the input root, or the files of this caller's own
jobs: a previous result named by its download URL, its /v1/audio link, its key or its s3:// URI)."""

import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse
from uuid import UUID

from fastapi import UploadFile
from fastapi.concurrency import run_in_threadpool

from db import JobNotFound, JobStore
from handler.http.audio_links import AUDIO_ROUTE, LinkRefused, verify_token
from handler.storage import AUDIO_CONTENT_TYPES, LOCAL_FILES_ROUTE, ObjectNotFound, S3Storage, StorageError, checked_key
from pipeline.contract import INPUT_PATH_FIELDS

# role -> (upload field, path field)
# role -> (upload field, path field): an upload `src_audio` stands for the path field `src_audio_path`.
ROLES = {role: (path_field.removesuffix("_path"), path_field) for role, path_field in INPUT_PATH_FIELDS.items()}
UPLOAD_FIELDS = {upload: role for role, (upload, _) in ROLES.items()}
_JOB_KEY = re.compile(r"^jobs/([0-9a-fA-F-]{36})/.+$")
# The inputs a job holds beside its results (jobs/<id>/input-src.wav, ...).
_INPUT_FILE = re.compile(rf"input-(?:{'|'.join(ROLES)})\.(?:{'|'.join(AUDIO_CONTENT_TYPES)})")
YOUR_FILES = "one of your results (its download URL, or its key jobs/<job_id>/attempt-N/output-I.ext)"


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
    seconds: float | None = None  # its length, as its header says
    digest: str = ""  # "sha256:<hex>" of its bytes: what an idempotent retry is compared by


@dataclass
class AudioInputs:
    uploads: list[Upload] = field(default_factory=list)
    references: dict[str, dict] = field(default_factory=dict)  # role -> {"key": ...} or {"path": ...}


async def read_upload(name: str, upload: UploadFile, max_bytes: int, max_seconds: float | None = None) -> Upload:
    """Read a file field within the cap and check that it decodes as audio (its start and its end:
    a truncated file is refused here, not in the worker) no longer than `max_seconds`."""
    if name not in UPLOAD_FIELDS:
        raise InputError(422, name, f"unknown file field; accepted: {', '.join(sorted(UPLOAD_FIELDS))}")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(413, name, f"file is larger than the {max_bytes // (1024 * 1024)} MB limit")
    ext, seconds = await run_in_threadpool(audio_info, name, data, max_seconds)
    return Upload(role=UPLOAD_FIELDS[name], data=data, ext=ext, seconds=seconds,
                  digest="sha256:" + hashlib.sha256(data).hexdigest())


# What is decoded to check a file: this many frames at its start and at its end.
CHECK_FRAMES = 4096
NOT_AUDIO = "is not decodable audio (wav, flac, mp3 or ogg)"


def audio_info(name: str, source: bytes | str, max_seconds: float | None) -> tuple[str, float]:
    """(format, seconds) of audio bytes or a file, from its header, after decoding a little of its
    start and its end (a truncated or corrupt file fails there); a 400 naming `name` otherwise, a
    422 when it is longer than `max_seconds` (a bomb: a small file that decodes to hours)."""
    import soundfile  # here: the HTTP function's cold start does not pay for numpy until an upload comes

    try:
        with soundfile.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else source) as audio:
            ext, frames, rate = audio.format.lower(), audio.frames, audio.samplerate
            if ext not in AUDIO_CONTENT_TYPES or frames <= 0 or rate <= 0:
                raise InputError(400, name, NOT_AUDIO)
            seconds = frames / rate
            if max_seconds is not None and seconds > max_seconds:
                raise InputError(422, name, f"is {seconds:.0f} s long by its header; the longest audio input "
                                 f"accepted is {max_seconds:.0f} s (ACESTEP_MAX_INPUT_AUDIO_SECONDS)")
            head = audio.read(min(frames, CHECK_FRAMES), dtype="float32", always_2d=True)
            if len(head) == 0:
                raise InputError(400, name, NOT_AUDIO + ": no audio data")
            if frames > CHECK_FRAMES and audio.seekable():
                audio.seek(frames - CHECK_FRAMES)
                tail = audio.read(CHECK_FRAMES, dtype="float32", always_2d=True)
                if len(tail) < CHECK_FRAMES:
                    raise InputError(400, name, NOT_AUDIO + ": the file is truncated (it ends before its header says)")
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError, OverflowError, EOFError):
        raise InputError(400, name, NOT_AUDIO + ": corrupt or truncated") from None
    return ext, seconds


def resolve_reference(field_name: str, value: str, *, owner: str, store: JobStore, storage, settings) -> dict:
    """A `*_path` value to {"path": ...} (a file under ACESTEP_INPUT_ROOT) or {"key": ...} (a file
    of one of the caller's jobs); anything else is a 400 that says why."""
    key = object_key(field_name, value, storage, settings)
    if key is None:
        return {"path": input_file(field_name, value, settings.input_root)}
    return {"key": owned_key(field_name, key, owner=owner, store=store, storage=storage)}


def object_key(field_name: str, value: str, storage, settings) -> str | None:
    """The storage key a value names: a key, an s3:// URI in this server's bucket, a result's
    download URL (a signed /v1/files URL, a /v1/audio link, an S3 presigned URL), absolute or
    relative. None for a server path."""
    try:
        parsed = urlparse(value)
    except ValueError:  # e.g. an unclosed [IPv6] host
        raise InputError(400, field_name, "is not a valid URL; it must be " + YOUR_FILES) from None
    if parsed.scheme == "s3":
        if not isinstance(storage, S3Storage) or parsed.netloc != storage.bucket:
            raise InputError(400, field_name, "is an s3:// URI outside this server's bucket; it must be " + YOUR_FILES)
        return _under_prefix(field_name, parsed.path, storage)
    path = unquote(parsed.path)
    if parsed.scheme in ("http", "https") or path.startswith(f"{LOCAL_FILES_ROUTE}/") or path == AUDIO_ROUTE:
        if path.startswith(f"{LOCAL_FILES_ROUTE}/"):
            return path.removeprefix(f"{LOCAL_FILES_ROUTE}/")
        if path == AUDIO_ROUTE:
            try:
                return verify_token(settings, parse_qs(parsed.query).get("path", [""])[0], expiry=False)
            except LinkRefused:
                raise InputError(400, field_name, "is an audio link this server did not make") from None
        if isinstance(storage, S3Storage):  # a presigned URL, path-style or virtual-hosted
            return _under_prefix(field_name, path.lstrip("/").removeprefix(f"{storage.bucket}/"), storage)
        raise InputError(400, field_name, "is a URL but not a download link of this server; it must be " + YOUR_FILES)
    return None if value.startswith("/") else value


def _under_prefix(field_name: str, path: str, storage: S3Storage) -> str:
    prefix = f"{storage.prefix}/" if storage.prefix else ""
    path = path.lstrip("/")
    if not path.startswith(prefix):
        raise InputError(400, field_name, "is outside this server's part of the bucket; it must be " + YOUR_FILES)
    return path.removeprefix(prefix)


def input_file(field_name: str, value: str, input_root: Path | None) -> str:
    """A server path under the input root, resolved (links followed)."""
    upload = field_name.removesuffix("_path")
    if input_root is None:
        raise InputError(400, field_name, "names a server path, but server paths are off: ACESTEP_INPUT_ROOT is not "
                         f"set. Upload the file as `{upload}`, or name " + YOUR_FILES)
    path = Path(value).resolve()
    if not path.is_relative_to(input_root.resolve()):
        raise InputError(400, field_name, "is outside the server's input directory (ACESTEP_INPUT_ROOT); "
                         f"upload the file as `{upload}`, or name " + YOUR_FILES)
    try:
        found = path.is_file()
    except OSError:  # a name too long for the filesystem, say
        found = False
    if not found:
        raise InputError(400, field_name, "names no file in the server's input directory (ACESTEP_INPUT_ROOT)")
    return str(path)


def owned_key(field_name: str, key: str, *, owner: str, store: JobStore, storage) -> str:
    """`key`, normalised, if it names an existing result (a finished job's audio_keys) or uploaded
    input (jobs/<id>/input-<role>.<ext>) of one of `owner`'s jobs; a 400 saying why otherwise (a job
    of someone else answers as one that does not exist; other files of a job, such as an unfinished
    attempt's output, are no input)."""
    match = _JOB_KEY.match(key)
    try:
        job_id = UUID(match.group(1)) if match else None
        checked_key(key)
    except (ValueError, StorageError):
        job_id = None
    if job_id is None:
        raise InputError(400, field_name, "must be " + YOUR_FILES + ", an s3:// URI of one, or a file under the "
                         "server's input directory (ACESTEP_INPUT_ROOT)")
    try:
        job = store.get(job_id)
    except JobNotFound:
        job = None
    if job is None or job["owner"] != owner:
        raise InputError(400, field_name, f"names a file of job {job_id}, which is not one of your jobs (or no longer exists)")
    key = f"jobs/{job_id}/{key.split('/', 2)[2]}"  # the id as the job's keys spell it
    try:
        storage.size(key)
    except ObjectNotFound:
        raise InputError(400, field_name, f"job {job_id} has no file {key.split('/', 2)[2]!r} (files are deleted "
                         "with their job after the retention time)") from None
    if not _INPUT_FILE.fullmatch(key.split("/", 2)[2]) and key not in ((job.get("result") or {}).get("audio_keys") or []):
        raise InputError(400, field_name, f"names no result of job {job_id}: it must be " + YOUR_FILES +
                         " (of a finished job), or an input of one (jobs/<job_id>/input-src.ext)")
    return key
