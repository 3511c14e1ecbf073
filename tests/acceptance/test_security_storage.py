"""Storage faults: local storage that cannot be written is an outage (retried, 503), never a raw
OSError, and an outage longer than a lease loses no job and spends no attempt."""

import io
import threading
import time

import pytest

from handler.drain import Drainer
from handler.storage import LocalStorage, StorageUnavailable
from tests.acceptance.test_drain import drain_settings
from tests.acceptance.worker_harness import submit, wait_for


def block(objects):
    """Make `objects/jobs` a plain file: every write under it fails as a full or broken disk would
    (permissions would not stop root, who runs these tests)."""
    objects.mkdir(parents=True, exist_ok=True)
    (objects / "jobs").write_bytes(b"")


def unblock(objects):
    (objects / "jobs").unlink()


def test_an_unwritable_local_store_is_an_outage_and_leaves_no_half_file(tmp_path):
    storage = LocalStorage(tmp_path / "objects", secret=b"k" * 32)
    block(tmp_path / "objects")
    with pytest.raises(StorageUnavailable, match="local storage failed for jobs/a/out.wav"):
        storage.put("jobs/a/out.wav", io.BytesIO(b"x" * 10), "audio/wav")
    unblock(tmp_path / "objects")
    storage.put("jobs/a/out.wav", io.BytesIO(b"x" * 10), "audio/wav")
    assert sorted(p.name for p in (tmp_path / "objects" / "jobs" / "a").iterdir()) == ["out.wav"]
    assert (tmp_path / "objects" / "jobs" / "a" / "out.wav").stat().st_mode & 0o007 == 0  # not world-readable


def test_storage_unwritable_for_longer_than_a_lease_loses_no_job(store, db_url, tmp_path, monkeypatch):
    ids = [submit(store, caption=str(i), batch_size=1) for i in range(4)]
    settings = drain_settings(db_url, tmp_path, monkeypatch, FAKE_STAGE_SECONDS="0.2")  # lease 3 s
    block(tmp_path / "objects")
    drainer = Drainer(settings)
    try:
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(drainer.drain(time_budget_seconds=120)))
        thread.start()
        wait_for(lambda: store.get(ids[0])["stage"] == "uploading", timeout=30)
        time.sleep(3 * settings.lease_seconds)  # the outage outlasts the lease
        assert store.get(ids[0])["status"] == "running"  # its lease kept alive while it waits
        unblock(tmp_path / "objects")
        thread.join(timeout=90)
    finally:
        drainer.close()
    rows = [store.get(i) for i in ids]
    assert [(r["status"], r["attempt"]) for r in rows] == [("succeeded", 1)] * 4, outcome


def test_an_upload_while_local_storage_is_unwritable_is_a_503_and_stores_nothing(tmp_path, db_url, store):
    from fastapi.testclient import TestClient

    from handler.http.app import create_app
    from handler.http.services import build_services
    from handler.settings import Settings
    from tests.integration.http_harness import audio_bytes

    svc = build_services(Settings(database_url=db_url, data_dir=tmp_path / "data"), db_url)
    block(svc.storage.root)
    answer = TestClient(create_app(svc)).post(
        "/v1/music/generate", data={"task_type": "cover", "caption": "x"},
        files={"src_audio": ("a.wav", audio_bytes("wav", 1.0), "audio/wav")})
    assert answer.status_code == 503, answer.text
    assert store.stats()["counts"] == {}
