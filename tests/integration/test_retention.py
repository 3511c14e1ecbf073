"""Finished jobs past the retention period go, with their files; everything else stays."""

import io
from datetime import datetime, timedelta, timezone

from db import NewJob
from handler.maintenance import Maintenance
from handler.storage import LocalStorage

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_prune_deletes_expired_jobs_and_their_objects(store, tmp_path):
    storage = LocalStorage(tmp_path / "objects", secret=b"s" * 32)
    old = store.submit(NewJob(request={}), now=T0).id
    job = store.claim("w", 1, now=T0)[0]
    storage.put(f"jobs/{old}/attempt-1/output-0.mp3", io.BytesIO(b"old"), "audio/mpeg")
    store.complete(job, "w", {"audio_keys": [f"jobs/{old}/attempt-1/output-0.mp3"]}, now=T0)
    recent = store.submit(NewJob(request={})).id
    storage.put(f"jobs/{recent}/input-src.wav", io.BytesIO(b"new"), "audio/wav")

    store.clock = lambda: T0 + timedelta(days=8)
    assert Maintenance(store, storage, retention_seconds=7 * 86400).prune() == 1
    assert not (tmp_path / "objects" / "jobs" / str(old)).exists()
    assert (tmp_path / "objects" / "jobs" / str(recent) / "input-src.wav").exists()
    assert store.get(recent)["status"] == "queued"
