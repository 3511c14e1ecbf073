"""A job's LoRA/LoKr adapters made local folders before it runs.

Each `lora` entry of a stored request names either the owner's upload (`storage_key` and `digest`,
written at submit) or a folder on this worker, `<checkpoint dir>/loras/<name>/`. Uploads are
downloaded once, checked against their digest, unpacked into `<data dir>/lora-cache/<sha256>/` (a
folder per digest, so a re-upload under the same name is another folder) and kept there for later
jobs; the most recently used MAX_CACHED folders stay. Every entry leaves with its local `path`.

The directories come from `configure(checkpoint_dir=, cache_dir=)` when the worker calls it, else
from ACESTEP_CHECKPOINT_DIR and ACESTEP_DATA_DIR (default `.acestep`)."""

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from db.lora_store import adapter_key
from handler.storage import ObjectNotFound, ObjectStorage
from pipeline.contract import GenerationRequest, StoredRequestError
from pipeline.lora import CONFIG_FILE, WEIGHTS_FILE

log = logging.getLogger(__name__)

CACHE_DIR_NAME = "lora-cache"
CHECKPOINT_SUBDIR = "loras"
MAX_CACHED = 32
_COMPLETE = ".complete"
_dirs: dict[str, Path | None] = {"checkpoint_dir": None, "cache_dir": None}


class AdapterUnavailable(StoredRequestError):
    """A job's adapter is not there (deleted upload, missing checkpoint-dir folder, bad archive):
    the job fails with this message, without retries."""


def configure(*, checkpoint_dir: Path | None = None, cache_dir: Path | None = None) -> None:
    """Where checkpoint-dir adapters and the download cache are (the worker's settings)."""
    _dirs.update(checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
                 cache_dir=Path(cache_dir) if cache_dir else None)


def checkpoint_dir() -> Path | None:
    if _dirs["checkpoint_dir"] is not None:
        return _dirs["checkpoint_dir"]
    value = os.environ.get("ACESTEP_CHECKPOINT_DIR")
    return Path(value) if value else None


def cache_dir() -> Path:
    if _dirs["cache_dir"] is not None:
        return _dirs["cache_dir"]
    return Path(os.environ.get("ACESTEP_DATA_DIR") or ".acestep") / CACHE_DIR_NAME


def localize_lora(request: GenerationRequest, owner: str, storage: ObjectStorage, *,
                  retry: Callable[..., Any] | None = None, checkpoints: Path | None = None,
                  cache: Path | None = None) -> GenerationRequest:
    """`request` with each `lora` entry's local `path` set (downloading uploads as needed).
    `retry(call, *args)` wraps storage reads (the job's retries while storage is unavailable).
    AdapterUnavailable when an adapter cannot be had; StorageError subclasses pass through."""
    if not request.lora:
        return request
    checkpoints = checkpoints if checkpoints is not None else checkpoint_dir()
    cache = cache if cache is not None else cache_dir()
    local = []
    for choice in request.lora:
        if choice.storage_key:
            path = _uploaded(choice.name, choice.storage_key, choice.digest, owner, storage, cache, retry)
        else:
            path = _on_disk(choice.name, checkpoints)
        local.append(choice.model_copy(update={"path": str(path)}))
    return request.model_copy(update={"lora": local})


def _on_disk(name: str, checkpoints: Path | None) -> Path:
    if checkpoints is None:
        raise AdapterUnavailable(f"LoRA adapter {name!r} is no upload of this API key, and this worker has no "
                                 f"checkpoint dir to find it in (ACESTEP_CHECKPOINT_DIR/{CHECKPOINT_SUBDIR}/{name})")
    folder = checkpoints / CHECKPOINT_SUBDIR / name
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise AdapterUnavailable(f"LoRA adapter {name!r} is no upload of this API key and no adapter folder on this "
                                 f"worker ({CHECKPOINT_SUBDIR}/{name}/ with {CONFIG_FILE} and {WEIGHTS_FILE} under the "
                                 "checkpoint dir)")
    return folder


def _uploaded(name: str, key: str, digest: str | None, owner: str, storage: ObjectStorage, cache: Path,
              retry: Callable[..., Any] | None) -> Path:
    if not digest or key != adapter_key(owner, name, digest):
        raise AdapterUnavailable(f"LoRA adapter {name!r}: the stored request names storage this job's owner did "
                                 "not upload")
    hex_digest = digest.removeprefix("sha256:")
    folder = cache / hex_digest
    if (folder / _COMPLETE).is_file():
        with contextlib.suppress(OSError):
            os.utime(folder / _COMPLETE)  # recently used
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{hex_digest[:12]}-", dir=cache))
    try:
        archive = work / "adapter.zip"
        try:
            (retry or (lambda call, *args: call(*args)))(_download, storage, key, archive)
        except ObjectNotFound:
            raise AdapterUnavailable(f"LoRA adapter {name!r} is gone from storage (deleted after this job was "
                                     "submitted?)") from None
        if _sha256(archive) != hex_digest:
            raise AdapterUnavailable(f"LoRA adapter {name!r}: the stored archive does not match its digest")
        try:
            with zipfile.ZipFile(archive) as zipped:
                for member in (CONFIG_FILE, WEIGHTS_FILE):
                    with zipped.open(member) as source, (work / member).open("wb") as sink:
                        shutil.copyfileobj(source, sink)
        except (KeyError, zipfile.BadZipFile, OSError) as exc:
            raise AdapterUnavailable(f"LoRA adapter {name!r}: the stored archive cannot be unpacked: {exc}") from None
        archive.unlink()
        (work / _COMPLETE).touch()
        try:
            work.rename(folder)
        except OSError:  # another process unpacked it first
            if not (folder / _COMPLETE).is_file():
                raise
        log.info("LoRA adapter %s downloaded", name, extra={"action": "lora_download", "digest": digest})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _prune(cache, keep=folder)
    return folder


def _download(storage: ObjectStorage, key: str, target: Path) -> None:
    with storage.open(key) as source, target.open("wb") as sink:
        shutil.copyfileobj(source, sink)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _prune(cache: Path, *, keep: Path) -> None:
    """Keep the MAX_CACHED most recently used adapter folders."""
    try:
        folders = [p for p in cache.iterdir() if (p / _COMPLETE).is_file()]
        folders.sort(key=lambda p: (p / _COMPLETE).stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in folders[MAX_CACHED:]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
