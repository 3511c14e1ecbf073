"""The reference's /release_task and /query_result, backed by the same jobs as the seed API."""

import json

import httpx
import pytest

from handler.settings import Settings
from tests.integration.http_harness import audio_bytes, free_port, run_fake_jobs, start_api


@pytest.fixture
def api(tmp_path, db_url):
    live = start_api(Settings(database_url=db_url, data_dir=tmp_path, port=free_port()), db_url)
    yield live
    live.stop()


def query(client, *task_ids, as_string=False):
    ids = json.dumps(list(task_ids)) if as_string else list(task_ids)
    response = client.post("/query_result", json={"task_id_list": ids})
    assert response.status_code == 200, response.text
    return response.json()


def test_release_then_query_until_done(api):
    with httpx.Client(base_url=api.url, timeout=30) as client:
        created = client.post("/release_task", json={"prompt": "upbeat pop song", "lyrics": "Hello world",
                                                      "infer_method": "ode", "use_tiled_decode": True,
                                                      "model": "acestep-v15-turbo", "audio_duration": 30})
        assert created.status_code == 200, created.text
        body = created.json()
        assert (body["code"], body["error"], body["extra"]) == (200, None, None)
        assert body["data"]["status"] == "queued" and body["data"]["queue_position"] == 1
        task_id = body["data"]["task_id"]

        pending = query(client, task_id)["data"][0]
        assert pending["status"] == 0 and json.loads(pending["result"])[0]["status"] == 0

        run_fake_jobs(api.services.store, api.services.storage)
        done = query(client, task_id, as_string=True)["data"][0]
        assert done["task_id"] == task_id and done["status"] == 1
        items = json.loads(done["result"])
        assert len(items) == 2 and all(item["status"] == 1 for item in items)
        assert items[0]["prompt"] == "upbeat pop song" and items[0]["metas"]["duration"] == 30.0
        assert items[0]["seed_value"] == "1000,1001" and items[0]["stage"] == "succeeded"
        assert httpx.get(items[0]["file"]).status_code == 200

        # The same job through the seed API.
        assert client.get(f"/v1/jobs/{task_id}").json()["status"] == "succeeded"


def test_unknown_tasks_end_instead_of_pending_forever(api):
    with httpx.Client(base_url=api.url, timeout=30) as client:
        data = query(client, "00000000-0000-0000-0000-000000000000", "nonsense")["data"]
    assert [d["status"] for d in data] == [2, 2]
    assert json.loads(data[0]["result"])[0]["error"] == "task not found"


def test_release_task_uploads_and_refusals(api):
    with httpx.Client(base_url=api.url, timeout=30) as client:
        upload = client.post("/release_task", data={"prompt": "remix", "task_type": "cover"},
                             files={"ctx_audio": ("a.wav", audio_bytes(), "audio/wav")})
        assert upload.status_code == 200, upload.text
        task_id = upload.json()["data"]["task_id"]
        assert api.services.store.get(task_id)["request"]["inputs"]["src"]["key"].endswith("input-src.wav")
        for body, field in [({"model": "acestep-v15-base"}, "model"), ({"shift": 1.0}, "shift"),
                            ({"sample_mode": True}, "sample_mode"), ({"prompt": "a", "caption": "b"}, "prompt"),
                            ({"bpm": 1000}, "bpm")]:
            refused = client.post("/release_task", json=body)
            assert refused.status_code == 422, body
            assert refused.json()["detail"][0]["field"] == field
        bad_ids = client.post("/query_result", json={"task_id_list": 5})
        assert bad_ids.status_code == 422
    assert api.services.store.stats()["queue_depth"] == 1
