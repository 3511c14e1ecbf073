"""Retention: finished jobs older than the TTL are deleted in batches, their objects with them."""

import logging
import threading

from db import JobStore, StoreError
from handler.storage import ObjectStorage, StorageError

log = logging.getLogger(__name__)


def prune_once(store: JobStore, storage: ObjectStorage, ttl_seconds: float, *, batch: int = 500) -> int:
    """Delete what has expired; returns how many jobs went. Objects of a deleted row whose removal
    fails are logged (an orphaned file, never a job that points at a missing one)."""
    pruned = 0
    for ids in store.prune_finished(ttl_seconds, batch=batch):
        for job_id in ids:
            try:
                storage.delete_prefix(f"jobs/{job_id}/")
            except StorageError as exc:
                log.warning("could not delete the files of pruned job %s: %s", job_id, exc,
                            extra={"action": "prune_objects_failed", "job_id": str(job_id)})
        pruned += len(ids)
    return pruned


def prune_until(store: JobStore, storage: ObjectStorage, ttl_seconds: float, stop: threading.Event,
                every_seconds: float = 60.0) -> None:
    while not stop.wait(every_seconds):
        try:
            pruned = prune_once(store, storage, ttl_seconds)
        except StoreError as exc:
            log.warning("pruning failed: %s", exc, extra={"action": "prune_failed"})
            continue
        if pruned:
            log.info("pruned %d finished jobs", pruned, extra={"action": "pruned", "count": pruned})
