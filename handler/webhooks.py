"""Webhook delivery from the outbox: signed POSTs of a finished job, retried with backoff until the
receiver answers 2xx or the attempts run out. Any number of dispatchers may run (SKIP LOCKED).

Signature: `X-AceStep-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, where
the secret is the caller's webhook secret (`owner_webhook_secret`, printed by `create-key`).

One tenant's receiver cannot hurt another's:

* deliveries run concurrently (`workers` threads, 8 by default); each POST has a TOTAL deadline
  (`timeout_seconds`, from the claim: connecting, sending, the answer's headers and the body read all
  end by it; a slow-drip receiver is cut there);
* a claim pushes the delivery out by `timeout_seconds + LEASE_MARGIN_SECONDS`, so no other dispatcher
  (another API process) takes the delivery while this one may still be sending it; a dispatcher only
  claims as many deliveries as it has free threads, so none waits in a queue on its lease;
* at most `max_response_bytes` (64 KiB) of the receiver's answer is read, then the connection closed;
* anything that goes wrong with one delivery (a refused or unresolvable destination, a URL stored by an
  older version that nothing can send to, any exception) is that delivery's failure: its attempts count
  up to the give-up, and the other deliveries go on;
* destinations are checked when sent (`handler/webhook_urls.py`): every address the host resolves to
  must be public or in `allow_networks`, and the connection goes to those checked addresses only.

While the database is away the dispatcher logs one warning, retries with a doubling pause (up to
`MAX_OUTAGE_PAUSE_SECONDS`) and logs once more, at info, when it is back."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from db import JobStore, StoreError
from db.store import RetryPolicy, WebhookDelivery
from pipeline.urls import URLRefused, parse_networks

log = logging.getLogger(__name__)

WEBHOOK_RETRY = RetryPolicy(base_seconds=5.0, max_seconds=3600.0)
MAX_RESPONSE_BYTES = 64 * 1024
LEASE_MARGIN_SECONDS = 30.0  # rendering the job and recording the outcome, on top of the POST's deadline
MAX_OUTAGE_PAUSE_SECONDS = 30.0


def owner_webhook_secret(server_secret: bytes, owner: str) -> str:
    """Each caller's own signing secret, derived so that no caller can sign for another."""
    return hmac.new(server_secret, f"webhook:{owner}".encode(), hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, timestamp: int, delivery_id: str | None = None) -> str:
    """`t=<unix>,v1=<HMAC of "<t>.<body>">`, and with a delivery id also `v2=<HMAC of
    "<t>.<delivery id>.<body>">`: v2 signs the X-AceStep-Delivery a receiver dedupes replays on."""
    key = secret.encode()
    header = f"t={timestamp},v1={hmac.new(key, f'{timestamp}.'.encode() + body, hashlib.sha256).hexdigest()}"
    if delivery_id is not None:
        header += f",v2={hmac.new(key, f'{timestamp}.{delivery_id}.'.encode() + body, hashlib.sha256).hexdigest()}"
    return header


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
        workers: int = 8,
        allow_networks: str = "",
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ):
        try:
            self._allowed = parse_networks(allow_networks)
        except ValueError as exc:
            raise ValueError(f"ACESTEP_WEBHOOK_ALLOW_NETWORKS: {exc}") from None
        self._store = store
        self._render_job = render_job
        self._secret = server_secret
        self._max_attempts = max_attempts
        self._retry = retry
        self._timeout = timeout_seconds
        self._poll = poll_seconds
        self._workers = max(1, workers)
        self._max_response_bytes = max_response_bytes
        self._policy = None  # made at the first delivery: the HTTP function starts without httpcore
        self._ssl_context = None
        self._lock = threading.Lock()
        self._failing_since: float | None = None  # monotonic time the database went away, while it is
        self._outcomes: Counter[str] = Counter()  # POSTs made, per outcome (`delivery_counts`)

    def delivery_counts(self) -> dict[str, int]:
        """The POSTs this dispatcher made, per outcome: delivered, failed (to be retried), gave_up,
        unrecorded (the outcome could not be written). For /metrics (handler/metrics.py)."""
        with self._lock:
            return dict(self._outcomes)

    def _count(self, outcome: str) -> None:
        with self._lock:
            self._outcomes[outcome] += 1

    @property
    def lease_seconds(self) -> float:
        """How long a claim keeps a delivery from other dispatchers: longer than the POST may take."""
        return self._timeout + LEASE_MARGIN_SECONDS

    # --- rounds -----------------------------------------------------------------------------

    def run_once(self) -> int:
        """Send the due deliveries (as many as there are threads) concurrently, each once; returns how
        many were attempted. Raises only if the claim itself fails (the database)."""
        claimed_at = time.monotonic()
        deliveries = self._store.claim_webhooks(limit=self._workers, lease_seconds=self.lease_seconds)
        if len(deliveries) == 1:
            self._deliver(deliveries[0], claimed_at + self._timeout)
        elif deliveries:
            with ThreadPoolExecutor(len(deliveries), thread_name_prefix="webhook") as pool:
                list(pool.map(lambda d: self._deliver(d, claimed_at + self._timeout), deliveries))
        return len(deliveries)

    def run_until(self, stop: threading.Event) -> None:
        """Deliver until `stop` is set: claim as many due deliveries as there are free threads, as
        soon as threads free up; a slow receiver holds one thread, not the others' deliveries."""
        pool = ThreadPoolExecutor(self._workers, thread_name_prefix="webhook")
        in_flight: set[Future] = set()
        pause = self._poll
        try:
            while not stop.is_set():
                in_flight = {future for future in in_flight if not future.done()}
                free = self._workers - len(in_flight)
                if free <= 0:
                    wait(in_flight, timeout=self._poll, return_when=FIRST_COMPLETED)
                    continue
                claimed_at = time.monotonic()
                try:
                    deliveries = self._store.claim_webhooks(limit=free, lease_seconds=self.lease_seconds)
                except Exception as exc:  # noqa: BLE001 - a dispatcher outlives a database outage; the outbox keeps the work
                    self._claim_failed(exc)
                    stop.wait(pause)
                    pause = min(pause * 2, MAX_OUTAGE_PAUSE_SECONDS)
                    continue
                self._claim_worked()
                pause = self._poll
                for delivery in deliveries:
                    in_flight.add(pool.submit(self._deliver, delivery, claimed_at + self._timeout))
                if len(deliveries) < free:  # nothing else is due now
                    stop.wait(self._poll)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # those in flight end by their deadline

    def _claim_failed(self, exc: Exception) -> None:
        if self._failing_since is not None:
            log.debug("webhook claim still failing: %s", exc)
            return
        self._failing_since = time.monotonic()
        if isinstance(exc, StoreError):
            log.warning(
                "webhook delivery paused, the database is unreachable (retrying quietly): %s",
                exc,
                extra={"action": "webhook_dispatch_paused", "error": str(exc)},
            )
        else:  # not the database: a bug, worth its traceback, once
            log.exception("webhook delivery paused: claiming failed", extra={"action": "webhook_dispatch_paused"})

    def _claim_worked(self) -> None:
        if self._failing_since is None:
            return
        paused = time.monotonic() - self._failing_since
        self._failing_since = None
        log.info(
            "webhook delivery resumed after %.0f s", paused, extra={"action": "webhook_dispatch_resumed", "paused_seconds": paused}
        )

    # --- one delivery -----------------------------------------------------------------------

    def _deliver(self, delivery: WebhookDelivery, deadline: float) -> None:
        """POST one delivery and record its outcome; never raises (one delivery's failure is its own)."""
        try:
            error = self._post(delivery, deadline)
        except Exception as exc:  # noqa: BLE001 - whatever it is, it fails this delivery only
            error = self._describe(exc, delivery)
        try:
            if error is None:
                self._store.webhook_delivered(delivery)
                self._count("delivered")
                return
            gave_up = self._store.webhook_failed(delivery, error, max_attempts=self._max_attempts, retry=self._retry)
        except Exception as exc:  # noqa: BLE001 - the claim lease runs out and the delivery is retried
            self._count("unrecorded")
            log.warning(
                "webhook for job %s: outcome not recorded (retried after the claim): %s",
                delivery.job_id,
                exc,
                extra={"action": "webhook_unrecorded", "job_id": str(delivery.job_id),
                       "delivery_attempt": delivery.attempts, "error": str(exc)},
            )
            return
        self._count("gave_up" if gave_up else "failed")
        log.warning(
            "webhook for job %s failed: %s",
            delivery.job_id,
            error,
            extra={"action": "webhook_failed", "job_id": str(delivery.job_id), "delivery_attempt": delivery.attempts,
                   "error": error, "gave_up": gave_up},
        )

    def _describe(self, exc: Exception, delivery: WebhookDelivery) -> str:
        import httpcore

        from handler.webhook_urls import DestinationRefused

        if isinstance(exc, URLRefused):
            return f"webhook_url {exc}"
        if isinstance(exc, DestinationRefused):
            return f"destination refused: {exc}"
        if isinstance(exc, httpcore.TimeoutException):
            return f"the receiver did not answer within {self._timeout:g} s ({type(exc).__name__})"
        if isinstance(exc, httpcore.NetworkError | httpcore.ProtocolError):
            return f"could not reach the receiver: {type(exc).__name__}"
        log.warning(
            "webhook for job %s: unexpected error",
            delivery.job_id,
            exc_info=True,
            extra={"action": "webhook_error", "job_id": str(delivery.job_id)},
        )
        return f"delivery failed: {type(exc).__name__}"

    def _tools(self):
        with self._lock:
            if self._policy is None:
                import httpx

                from handler.webhook_urls import WebhookPolicy

                self._ssl_context = httpx.create_ssl_context()  # certifi's roots, as httpx verifies
                self._policy = WebhookPolicy(self._allowed)
            return self._policy, self._ssl_context

    def _post(self, delivery: WebhookDelivery, deadline: float) -> str | None:
        """POST the delivery: None when the receiver answered 2xx, else why not."""
        import httpcore

        from handler.webhook_urls import PinnedBackend

        policy, ssl_context = self._tools()
        job = self._store.get(delivery.job_id)
        body = json.dumps({"event": delivery.event, "job": self._render_job(job)}, separators=(",", ":")).encode()
        destination = policy.destination(delivery.url)
        target = destination.target
        headers = [
            (b"Host", target.host_header.encode("ascii")),
            (b"User-Agent", b"acestep-serverless-webhooks"),
            (b"Content-Type", b"application/json"),
            (b"Content-Length", str(len(body)).encode()),
            (b"Connection", b"close"),
            (b"X-AceStep-Event", delivery.event.encode()),
            (b"X-AceStep-Delivery", str(delivery.id).encode()),
            (
                b"X-AceStep-Signature",
                signature_header(owner_webhook_secret(self._secret, job["owner"]), body, int(time.time()),
                                 str(delivery.id)).encode(),
            ),
        ]
        left = deadline - time.monotonic()
        if left <= 0:
            raise httpcore.ConnectTimeout("the webhook's total deadline passed before sending")
        url = httpcore.URL(scheme=target.scheme.encode(), host=target.host.encode("ascii"), port=target.port,
                           target=target.target.encode("ascii"))
        timeouts = {"connect": left, "read": left, "write": left, "pool": left}
        with httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=1,
            max_keepalive_connections=0,
            network_backend=PinnedBackend(destination, deadline),
        ) as pool:
            with pool.stream("POST", url, headers=headers, content=body, extensions={"timeout": timeouts}) as response:
                status = response.status  # the outcome; the body only lets the receiver finish cleanly
                self._read_some(response)
        return None if 200 <= status < 300 else f"receiver answered HTTP {status}"

    def _read_some(self, response) -> int:
        """Read at most the cap (plus one network read) of the answer's body, by the deadline; the rest
        is never read (the connection is closed). Returns the bytes read."""
        import httpcore

        read = 0
        try:
            for chunk in response.iter_stream():
                read += len(chunk)
                if read >= self._max_response_bytes:
                    break
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError):
            pass  # a body cut short or dripped past the deadline: the status already answered
        return read

    def close(self) -> None:
        """Nothing is held between deliveries (each has its own connection); kept for callers."""
