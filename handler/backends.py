"""The job store and object storage every entry point uses, built from the settings."""

import logging
import os
import secrets

from db import JobStore, make_engine
from db.store import RetryPolicy
from handler.settings import Settings
from handler.storage import LocalStorage, ObjectStorage, storage_from_url

log = logging.getLogger(__name__)


def secret_key(settings: Settings) -> bytes:
    """Signs local file URLs and derives webhook secrets: configured, else one kept in the data directory."""
    if settings.secret_key:
        return settings.secret_key.encode()
    path = settings.data_dir / "secret-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # created readable by its owner only, from the first byte
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process of this dev setup made it just now
            pass
        else:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def build_store(settings: Settings, database_url: str, *, worker: bool = False) -> JobStore:
    """The job store; a worker's plans its statements on their indexes (db/engine.py INDEX_PLANS)."""
    return JobStore(
        make_engine(database_url, pool_size=settings.db_pool_size, index_plans=worker),
        lease_seconds=settings.lease_seconds,
        retry=RetryPolicy(settings.retry_base_seconds, settings.retry_max_seconds),
    )


def build_storage(settings: Settings) -> ObjectStorage:
    """ACESTEP_STORAGE_URL, else a local directory in the data dir (URLs served by this API)."""
    public_url = settings.public_url or f"http://{settings.host}:{settings.port}"
    storage_url = settings.storage_url or (settings.data_dir.resolve() / "objects").as_uri()
    storage = storage_from_url(
        storage_url, secret=secret_key(settings), endpoint_url=settings.s3_endpoint_url, public_base_url=public_url
    )
    if isinstance(storage, LocalStorage):
        log.info("storing audio in a local directory", extra={"action": "storage", "root": str(storage.root)})
    return storage
