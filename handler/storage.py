"""Object storage for job inputs and outputs: S3 (boto3, SigV4 presigned GETs) or a local directory
(URLs served by the HTTP function at a signed, expiring path). Rows store keys; URLs are made at
read time, so nothing expired is ever stored."""

import contextlib
import hashlib
import hmac
import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol
from urllib.parse import quote, urlencode, urlparse


LOCAL_FILES_ROUTE = "/v1/files"
AUDIO_CONTENT_TYPES = {"wav": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg", "ogg": "audio/ogg"}


class StorageError(Exception):
    """Object storage failed."""


class StorageUnavailable(StorageError):
    """Object storage could not be reached; the operation may be retried."""


class ObjectNotFound(StorageError):
    """No object has this key."""


class ObjectStorage(Protocol):
    def put(self, key: str, data: BinaryIO, content_type: str) -> None: ...
    def open(self, key: str) -> BinaryIO: ...
    def size(self, key: str) -> int: ...
    def open_range(self, key: str, start: int, end: int) -> BinaryIO: ...
    def url(self, key: str, expires_in: int) -> str: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def list_keys(self, prefix: str) -> Iterator[tuple[str, float]]: ...


def checked_key(key: str) -> str:
    """A relative key of plain path segments; anything that could step outside is refused."""
    if not key or "\\" in key or any(part in ("..", ".", "") for part in key.split("/")):
        raise StorageError(f"invalid object key {key!r}")
    return key


FILE_MODE = 0o640  # stored audio: the service's user and group only
DIR_MODE = 0o750


@contextlib.contextmanager
def _local_faults(key: str) -> Iterator[None]:
    """A filesystem fault (full, read-only, gone, no permission) as StorageUnavailable: the callers'
    retries and 503s apply, as they do to an S3 outage."""
    try:
        yield
    except FileNotFoundError:
        raise ObjectNotFound(f"no object {key}") from None
    except OSError as exc:
        raise StorageUnavailable(f"local storage failed for {key}: {exc.strerror or exc}") from exc


class LocalStorage:
    """Objects as files under `root`; `url` signs `{base}/v1/files/{key}?expires=..&signature=..`."""

    def __init__(self, root: Path, *, secret: bytes, public_base_url: str = ""):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        self._secret = secret
        self.public_base_url = public_base_url.rstrip("/")

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*PurePosixPath(checked_key(key)).parts)

    def put(self, key: str, data: BinaryIO, content_type: str) -> None:
        path = self._path(key)
        partial = path.with_name(path.name + ".partial")
        try:
            with _local_faults(key):
                path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(data, out)
                partial.replace(path)  # readers never see half a file
        except StorageError:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)  # no half file left behind
            raise

    def open(self, key: str) -> BinaryIO:
        with _local_faults(key):
            return self._path(key).open("rb")

    def size(self, key: str) -> int:
        with _local_faults(key):
            return self._path(key).stat().st_size

    def open_range(self, key: str, start: int, end: int) -> BinaryIO:
        """Bytes `start`..`end` (inclusive) of the object."""
        body = self.open(key)
        body.seek(start)
        return _Window(body, end - start + 1)

    def url(self, key: str, expires_in: int, *, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + expires_in)
        query = urlencode({"expires": expires, "signature": self.signature(key, expires)})
        return f"{self.public_base_url}{LOCAL_FILES_ROUTE}/{quote(checked_key(key))}?{query}"

    def signature(self, key: str, expires: int) -> str:
        return hmac.new(self._secret, f"{key}\n{expires}".encode(), hashlib.sha256).hexdigest()

    def verify(self, key: str, expires: int, signature: str, *, now: float | None = None) -> bool:
        """True if the URL for `key` was signed here and has not expired."""
        if (time.time() if now is None else now) > expires:
            return False
        return hmac.compare_digest(self.signature(key, expires).encode(), signature.encode())

    def delete(self, key: str) -> None:
        with _local_faults(key):
            self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix.rstrip("/")), ignore_errors=True)

    def list_keys(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, modified at as a Unix time) of every object under `prefix`, `.partial` leftovers included."""
        base = self._path(prefix.rstrip("/"))
        with _local_faults(prefix):
            for path in sorted(base.rglob("*")) if base.is_dir() else []:
                if path.is_file():
                    yield path.relative_to(self.root).as_posix(), path.stat().st_mtime


class S3Storage:
    """Objects in `bucket` under `prefix`; large uploads go multipart; URLs are SigV4 presigned GETs."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str | None = None):
        import boto3  # here, not at the top: the HTTP function's cold start does not pay for boto3 unless it uses S3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(signature_version="s3v4", retries={"max_attempts": 3, "mode": "standard"}),
        )
        self._transfer = TransferConfig(multipart_threshold=16 * 1024 * 1024)

    def _key(self, key: str) -> str:
        checked_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: BinaryIO, content_type: str) -> None:
        with _translated(key):
            self._client.upload_fileobj(
                data, self.bucket, self._key(key), ExtraArgs={"ContentType": content_type}, Config=self._transfer
            )

    def open(self, key: str) -> BinaryIO:
        with _translated(key):
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]

    def size(self, key: str) -> int:
        with _translated(key):
            return int(self._client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])

    def open_range(self, key: str, start: int, end: int) -> BinaryIO:
        """Bytes `start`..`end` (inclusive) of the object (a ranged GET)."""
        with _translated(key):
            return self._client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{end}")["Body"]

    def url(self, key: str, expires_in: int) -> str:
        with _translated(key):
            return self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_in
            )

    def delete(self, key: str) -> None:
        with _translated(key):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list_keys(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, modified at as a Unix time) of every object under `prefix`, a page at a time."""
        with _translated(prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix.rstrip("/")) + "/"
            )
            cut = len(self.prefix) + 1 if self.prefix else 0
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"][cut:], item["LastModified"].timestamp()

    def delete_prefix(self, prefix: str) -> None:
        with _translated(prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix.rstrip("/")) + "/"
            )
            for page in pages:
                keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if keys:
                    self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})


class _Window(io.RawIOBase):
    """At most `length` bytes of `body` from where it stands; closes it when closed."""

    def __init__(self, body: BinaryIO, length: int):
        self._body = body
        self._left = max(0, length)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if size is None or size < 0 else min(size, self._left)
        chunk = self._body.read(want)
        self._left -= len(chunk)
        return chunk

    def readinto(self, buffer) -> int:
        chunk = self.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        self._body.close()
        super().close()


class _translated:
    """Turn boto errors into StorageError / StorageUnavailable / ObjectNotFound."""

    def __init__(self, key: str):
        self.key = key

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            return False
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise ObjectNotFound(f"no object {self.key}") from exc
            if code.startswith("5") or code in ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"):
                raise StorageUnavailable(f"object storage unavailable ({code})") from exc
            raise StorageError(f"object storage refused {self.key} ({code})") from exc
        if isinstance(exc, BotoCoreError):
            raise StorageUnavailable(f"object storage unavailable: {exc}") from exc
        return False


def storage_from_url(
    url: str, *, secret: bytes, endpoint_url: str | None = None, public_base_url: str = ""
) -> ObjectStorage:
    """`s3://bucket/prefix` or `file:///path` (ACESTEP_STORAGE_URL) to a storage backend."""
    parsed = urlparse(url)
    if parsed.scheme == "s3" and parsed.netloc:
        return S3Storage(parsed.netloc, parsed.path, endpoint_url=endpoint_url)
    if parsed.scheme == "file" and parsed.path:
        return LocalStorage(Path(parsed.path), secret=secret, public_base_url=public_base_url)
    raise ValueError(f"ACESTEP_STORAGE_URL must be s3://bucket/prefix or file:///path, got {url!r}")
