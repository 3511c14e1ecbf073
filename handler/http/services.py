"""What the HTTP function needs, built once in the entry point from the settings and passed down."""

import logging
import secrets
from dataclasses import dataclass

from db import JobStore, make_engine
from db.store import RetryPolicy
from handler.http.auth import Authenticator
from handler.http.eta import QueueEstimator
from handler.http.job_view import job_response
from handler.settings import Settings
from handler.storage import LocalStorage, ObjectStorage, storage_from_url
from handler.webhooks import WebhookDispatcher

log = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    store: JobStore
    storage: ObjectStorage
    auth: Authenticator
    queue: QueueEstimator
    webhooks: WebhookDispatcher

    def job_url(self, key: str) -> str:
        return self.storage.url(key, self.settings.url_expires_seconds)


def secret_key(settings: Settings) -> bytes:
    """Signs local file URLs and derives webhook secrets: configured, else one kept in the data directory."""
    if settings.secret_key:
        return settings.secret_key.encode()
    path = settings.data_dir / "secret-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip().encode()


def open_mode(settings: Settings) -> bool:
    """dev runs open unless ACESTEP_REQUIRE_KEYS; production needs keys unless ACESTEP_ALLOW_OPEN."""
    if settings.env == "dev":
        return not settings.require_keys
    if settings.allow_open:
        log.warning("production API running WITHOUT API keys (ACESTEP_ALLOW_OPEN)", extra={"action": "auth_open"})
    return settings.allow_open


def build_services(settings: Settings, database_url: str) -> Services:
    store = JobStore(
        make_engine(database_url, pool_size=settings.db_pool_size),
        lease_seconds=settings.lease_seconds,
        retry=RetryPolicy(settings.retry_base_seconds, settings.retry_max_seconds),
    )
    public_url = settings.public_url or f"http://{settings.host}:{settings.port}"
    storage_url = settings.storage_url or (settings.data_dir.resolve() / "objects").as_uri()
    storage = storage_from_url(
        storage_url, secret=secret_key(settings), endpoint_url=settings.s3_endpoint_url, public_base_url=public_url
    )
    if isinstance(storage, LocalStorage):
        log.info("storing audio in a local directory", extra={"action": "storage", "root": str(storage.root)})
    auth = Authenticator(store, open_mode=open_mode(settings), default_max_queued=settings.max_queued_per_key)
    webhooks = WebhookDispatcher(
        store,
        lambda job: job_response(job, position=0, eta=None, url_for=lambda key: storage.url(key, settings.url_expires_seconds)),
        secret_key(settings),
        max_attempts=settings.webhook_max_attempts,
        retry=RetryPolicy(settings.webhook_retry_base_seconds, settings.webhook_retry_max_seconds),
    )
    return Services(settings, store, storage, auth, QueueEstimator(store), webhooks)
