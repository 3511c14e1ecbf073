"""Webhook delivery from the outbox: signed POSTs of a finished job, retried with backoff until the
receiver answers 2xx or the attempts run out. Any number of dispatchers may run (SKIP LOCKED).

Signature: `X-AceStep-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, where
the secret is the caller's webhook secret (`owner_webhook_secret`, printed by `create-key`)."""

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from db import JobStore
from db.store import RetryPolicy, WebhookDelivery

log = logging.getLogger(__name__)

WEBHOOK_RETRY = RetryPolicy(base_seconds=5.0, max_seconds=3600.0)


def owner_webhook_secret(server_secret: bytes, owner: str) -> str:
    """Each caller's own signing secret, derived so that no caller can sign for another."""
    return hmac.new(server_secret, f"webhook:{owner}".encode(), hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class WebhookDispatcher:
    def __init__(
        self,
        store: JobStore,
        render_job: Callable[[dict], dict[str, Any]],
        server_secret: bytes,
        *,
        max_attempts: int = 10,
        retry: RetryPolicy = WEBHOOK_RETRY,
        timeout_seconds: float = 10.0,
        poll_seconds: float = 1.0,
    ):
        self._store = store
        self._render_job = render_job
        self._secret = server_secret
        self._max_attempts = max_attempts
        self._retry = retry
        self._timeout = timeout_seconds
        self._poll = poll_seconds
        self._client = None  # made at the first delivery: the HTTP function starts without httpx

    @property
    def client(self):
        if self._client is None:
            import httpx

            self._client = httpx.Client(timeout=self._timeout, follow_redirects=False)
        return self._client

    def run_once(self) -> int:
        """Send every due delivery once; returns how many were attempted."""
        deliveries = self._store.claim_webhooks(lease_seconds=self._timeout * 3)
        for delivery in deliveries:
            self._send(delivery)
        return len(deliveries)

    def _send(self, delivery: WebhookDelivery) -> None:
        job = self._store.get(delivery.job_id)
        body = json.dumps({"event": delivery.event, "job": self._render_job(job)}, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "X-AceStep-Event": delivery.event,
            "X-AceStep-Delivery": str(delivery.id),
            "X-AceStep-Signature": signature_header(owner_webhook_secret(self._secret, job["owner"]), body, int(time.time())),
        }
        import httpx

        try:
            response = self.client.post(delivery.url, content=body, headers=headers)
            error = None if response.is_success else f"receiver answered HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = f"could not reach the receiver: {type(exc).__name__}"
        if error is None:
            self._store.webhook_delivered(delivery)
            return
        gave_up = self._store.webhook_failed(delivery, error, max_attempts=self._max_attempts, retry=self._retry)
        log.warning(
            "webhook for job %s failed: %s",
            delivery.job_id,
            error,
            extra={"action": "webhook_failed", "job_id": str(delivery.job_id), "error": error, "gave_up": gave_up},
        )

    def run_until(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                sent = self.run_once()
            except Exception:  # a dispatcher must outlive a database blip; the outbox keeps the work
                log.exception("webhook dispatch round failed", extra={"action": "webhook_round_failed"})
                sent = 0
            if not sent:
                stop.wait(self._poll)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
