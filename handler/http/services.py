"""What the HTTP function needs, built once in the entry point from the settings and passed down."""

import logging
from dataclasses import dataclass

from db import JobStore
from db.store import RetryPolicy
from handler.backends import build_storage, build_store, secret_key
from handler.http.auth import Authenticator
from handler.http.eta import QueueEstimator
from handler.http.job_view import job_response
from handler.settings import Settings
from handler.storage import ObjectStorage
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


def open_mode(settings: Settings) -> bool:
    """dev runs open unless ACESTEP_REQUIRE_KEYS; production needs keys unless ACESTEP_ALLOW_OPEN."""
    if settings.env == "dev":
        return not settings.require_keys
    if settings.allow_open:
        log.warning("production API running WITHOUT API keys (ACESTEP_ALLOW_OPEN)", extra={"action": "auth_open"})
    return settings.allow_open


def build_services(settings: Settings, database_url: str) -> Services:
    store = build_store(settings, database_url)
    storage = build_storage(settings)
    auth = Authenticator(store, open_mode=open_mode(settings), default_max_queued=settings.max_queued_per_key)
    webhooks = WebhookDispatcher(
        store,
        lambda job: job_response(job, position=0, eta=None, url_for=lambda key: storage.url(key, settings.url_expires_seconds)),
        secret_key(settings),
        max_attempts=settings.webhook_max_attempts,
        retry=RetryPolicy(settings.webhook_retry_base_seconds, settings.webhook_retry_max_seconds),
        timeout_seconds=settings.webhook_timeout_seconds,
        allow_networks=settings.webhook_allow_networks,
    )
    return Services(settings, store, storage, auth, QueueEstimator(store, prior=settings.eta_prior), webhooks)
