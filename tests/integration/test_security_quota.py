"""A key's quota counts its running jobs as well as its queued ones: claiming does not make room."""

import pytest

from db import NewJob, QuotaExceeded


def test_running_jobs_count_against_the_quota(store):
    for _ in range(2):
        store.submit(NewJob(request={}), owner="tenant", max_queued=2)
    assert len(store.claim("w", 1)) == 1  # one runs, one waits
    with pytest.raises(QuotaExceeded, match="queued or running"):
        store.submit(NewJob(request={}), owner="tenant", max_queued=2)
    store.submit(NewJob(request={}), owner="other", max_queued=2)  # another tenant is not affected


def test_a_job_priced_over_the_limit_is_refused_before_it_is_queued(tmp_path, db_url, store):
    from fastapi.testclient import TestClient

    from handler.http.app import create_app
    from handler.http.services import build_services
    from handler.settings import Settings

    svc = build_services(Settings(database_url=db_url, data_dir=tmp_path / "data", max_job_seconds=300,
                                  dit_model="acestep-v15-base"), db_url)
    client = TestClient(create_app(svc))
    huge = client.post("/v1/music/generate", json={"audio_duration": 600, "batch_size": 8,
                                                  "inference_steps": 200, "thinking": False})
    assert huge.status_code == 422, huge.text
    assert "estimated to take" in huge.text and "batch_size" in huge.text and store.stats()["counts"] == {}
    small = client.post("/v1/music/generate", json={"audio_duration": 30, "batch_size": 1, "thinking": False})
    assert small.status_code == 200, small.text
