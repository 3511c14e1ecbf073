"""The hourly sweep: objects no job row points at go once they are an hour old; nothing a job
still uses is touched."""

import io
import os
import time
from uuid import uuid4

from db import NewJob
from handler.maintenance import Maintenance
from handler.storage import LocalStorage


def put(storage, key: str, age: float) -> None:
    storage.put(key, io.BytesIO(b"x"), "audio/wav")
    then = time.time() - age
    os.utime(storage.root / key, (then, then))


def test_the_sweep_deletes_orphans_and_dead_attempts_and_keeps_what_jobs_use(store, tmp_path):
    storage = LocalStorage(tmp_path / "objects", secret=b"k" * 32)
    hour = 3600
    finished = store.submit(NewJob(request={"inputs": {"src": {"key": "PLACEHOLDER"}}})).id
    # a finished job: attempt 1 died after writing, attempt 2's audio is the result
    job = store.claim("w", 1)[0]
    store.release(job, "w", refund=False)
    job = store.claim("w", 1)[0]
    result_key = f"jobs/{finished}/attempt-2/output-0.wav"
    store.complete(job, "w", {"audio_keys": [result_key]})
    running = store.submit(NewJob(request={})).id
    store.claim("w2", 1)
    gone = uuid4()  # a submit whose process died before its row was made
    put(storage, result_key, 2 * hour)
    put(storage, f"jobs/{finished}/attempt-1/output-0.wav", 2 * hour)
    put(storage, f"jobs/{finished}/attempt-2/output-1.wav.partial", 2 * hour)
    put(storage, f"jobs/{running}/attempt-1/output-0.wav", 2 * hour)
    put(storage, f"jobs/{gone}/input-src.wav", 2 * hour)
    put(storage, f"jobs/{uuid4()}/input-src.wav", 60)  # young: may be a submit in flight
    swept = Maintenance(store, storage, retention_seconds=7 * 86400).sweep()
    left = sorted(key for key, _ in storage.list_keys("jobs"))
    assert swept == 3
    assert result_key in left and f"jobs/{running}/attempt-1/output-0.wav" in left and len(left) == 3
    assert not any(str(gone) in key or "attempt-1/output-0.wav" in key and str(finished) in key for key in left)


def test_s3_lists_keys_under_a_prefix_without_the_storage_prefix(s3_endpoint, s3_bucket):
    from handler.storage import S3Storage

    storage = S3Storage(s3_bucket, "music", endpoint_url=s3_endpoint)
    for key in ("jobs/a/attempt-1/output-0.wav", "jobs/b/input-src.wav", "other/x.wav"):
        storage.put(key, io.BytesIO(b"x"), "audio/wav")
    listed = dict(storage.list_keys("jobs"))
    assert sorted(listed) == ["jobs/a/attempt-1/output-0.wav", "jobs/b/input-src.wav"]
    assert all(abs(t - time.time()) < 300 for t in listed.values())
