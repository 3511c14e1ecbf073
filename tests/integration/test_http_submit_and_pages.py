"""`GET /v1/jobs` pages with an opaque cursor (pasted unencoded; ties on created_at page by id), and
the seed spec's `thinking=false`: audio codes are ignored for text2music on /v1/music/generate."""

from datetime import datetime, timezone

import pytest
from fastapi.testclient import TestClient

from db import NewJob
from handler.http.app import create_app
from handler.http.services import build_services
from handler.settings import Settings
from tests.integration.http_harness import audio_bytes

CODES = "<|audio_code_1|><|audio_code_2|><|audio_code_3|>"


@pytest.fixture
def api(tmp_path, db_url):
    svc = build_services(Settings(database_url=db_url, data_dir=tmp_path / "data"), db_url)
    return svc, TestClient(create_app(svc))


def all_pages(client, limit: int) -> list[str]:
    """Every job id, following next_before pasted into the URL as is (no encoding)."""
    seen, url = [], f"/v1/jobs?limit={limit}"
    while True:
        page = client.get(url)
        assert page.status_code == 200, page.text
        seen += [j["job_id"] for j in page.json()["jobs"]]
        cursor = page.json()["next_before"]
        if cursor is None:
            return seen
        assert cursor.isascii() and not set(cursor) & set("+/=&?# ")  # safe in a URL unencoded
        url = f"/v1/jobs?limit={limit}&before={cursor}"


def test_jobs_created_in_the_same_instant_page_once_each_newest_first(api):
    svc, client = api
    instant = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    tied = svc.store.submit_many([NewJob(request={"caption": str(i)}) for i in range(5)], now=instant)
    today = client.post("/v1/music/generate", json={"caption": "now"}).json()["job_id"]
    ids = [str(i) for i in sorted(tied, reverse=True)] + [today]  # the 2030 ones first, by id among themselves
    for limit in (1, 2, 3, 6):
        assert all_pages(client, limit) == ids, limit


def test_a_cursor_with_a_utc_offset_does_not_break_when_pasted(api):
    svc, client = api
    first = svc.store.submit_many([NewJob(request={})], now=datetime(2030, 1, 1, tzinfo=timezone.utc))
    second = svc.store.submit_many([NewJob(request={})], now=datetime(2030, 1, 2, tzinfo=timezone.utc))
    assert all_pages(client, 1) == [str(second[0]), str(first[0])]


@pytest.mark.parametrize("cursor", ["2030-01-01T00:00:00+00:00", "not-a-cursor", "bm8gcGlwZQ"])
def test_a_foreign_cursor_is_a_422_naming_before(api, cursor):
    _, client = api
    refused = client.get("/v1/jobs", params={"before": cursor})
    assert refused.status_code == 422
    assert [p["field"] for p in refused.json()["detail"]] == ["before"]


def stored(svc, response) -> dict:
    assert response.status_code == 200, response.text
    return svc.store.get(response.json()["job_id"])["request"]


def test_thinking_false_text2music_ignores_given_codes(api):
    svc, client = api
    request = stored(svc, client.post("/v1/music/generate", json={"thinking": False, "audio_code_string": CODES}))
    assert request["audio_code_string"] == "" and request["task_type"] == "text2music"
    # a list still sets the batch it implied, and the form encoding reads the same
    listed = stored(svc, client.post("/v1/music/generate", json={"audio_code_string": [CODES] * 3}))
    assert listed["audio_code_string"] == "" and listed["batch_size"] == 3
    form = stored(svc, client.post("/v1/music/generate", data={"thinking": "false", "audio_code_string": CODES}))
    assert form["audio_code_string"] == ""


def test_codes_stay_where_they_are_used(api):
    svc, client = api
    thinking = stored(svc, client.post("/v1/music/generate", json={"thinking": True, "audio_code_string": CODES}))
    assert thinking["audio_code_string"] == CODES
    source = client.post("/v1/music/generate", data={"task_type": "cover", "audio_code_string": CODES},
                         files={"src_audio": ("a.wav", audio_bytes(), "audio/wav")})
    assert stored(svc, source)["audio_code_string"] == CODES
    # the reference server's own route uses given codes whatever `thinking` says, as upstream does
    released = client.post("/release_task", json={"thinking": False, "audio_code_string": CODES})
    assert released.status_code == 200, released.text
    assert svc.store.get(released.json()["data"]["task_id"])["request"]["audio_code_string"] == CODES
