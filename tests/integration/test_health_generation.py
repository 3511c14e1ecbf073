"""`/health` says whether generation can run now (issue 14), while staying 200 with `status: ok`
for the HTTP function's own liveness: scale-to-zero deployments have no live worker by design."""

from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient

from handler.http.app import create_app
from handler.http.services import build_services
from handler.settings import Settings

TURBO = "acestep-v15-turbo"


@pytest.fixture
def api(tmp_path, db_url):
    svc = build_services(Settings(database_url=db_url, data_dir=tmp_path / "data"), db_url)
    return svc, TestClient(create_app(svc))


def health(client) -> dict:
    response = client.get("/health")
    assert response.status_code == 200 and response.json()["data"]["status"] == "ok"
    return response.json()["data"]


def test_no_worker_means_no_live_worker(api):
    svc, client = api
    data = health(client)
    assert data["generation"] == "no_live_worker" and data["live_workers"] == 0


def test_a_worker_loading_its_models_is_starting(api):
    svc, client = api
    svc.store.register_worker("gpu-1", host="h", capacity=1, models=[TURBO], state="STARTING")
    data = health(client)
    assert data["generation"] == "starting" and data["live_workers"] == 0


def test_a_ready_worker_makes_generation_ready(api):
    svc, client = api
    svc.store.register_worker("gpu-1", host="h", capacity=2, models=[TURBO], state="READY")
    data = health(client)
    assert data["generation"] == "ready" and data["live_workers"] == 1 and data["worker_slots"] == 2


def test_a_silent_or_failed_worker_is_no_live_worker(api):
    svc, client = api
    an_hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    svc.store.register_worker("gpu-old", host="h", capacity=1, models=[TURBO], state="READY", now=an_hour_ago)
    svc.store.register_worker("gpu-bad", host="h", capacity=1, models=[TURBO], state="SETUP_FAILED")
    data = health(client)
    assert data["generation"] == "no_live_worker" and data["live_workers"] == 0
