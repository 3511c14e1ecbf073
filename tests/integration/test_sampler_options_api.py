"""Upstream main's sampler and post-processing options through both API surfaces: accepted and stored
in the job's request (our names on /v1/music/generate, the reference's camelCase on /release_task),
and the checks that need the model refused naming the field, the resolved DiT in the request, the
job row and the batch key."""

import httpx
import pytest

from handler.settings import Settings
from tests.integration.http_harness import audio_bytes, free_port, start_api

OPTIONS = {
    "shift": 2.0, "timesteps": [0.97, 0.76, 0.615, 0.5, 0.395, 0.28, 0.18, 0.085, 0.0], "infer_method": "sde",
    "sampler_mode": "heun", "velocity_norm_threshold": 2.0, "velocity_ema_factor": 0.1, "dcw_enabled": False,
    "dcw_mode": "low", "dcw_scaler": 0.1, "dcw_high_scaler": 0.03, "dcw_wavelet": "haar", "cover_noise_strength": 0.3,
    "chunk_mask_mode": "auto_fixed", "repaint_mode": "conservative", "repaint_strength": 0.7,
    "repaint_latent_crossfade_frames": 12, "repaint_wav_crossfade_sec": 0.5, "retake_seed": [42, 43],
    "retake_variance": 0.3, "latent_shift": 0.1, "latent_rescale": 1.2, "enable_normalization": False,
    "normalization_db": -3.0, "fade_in_duration": 1.5, "fade_out_duration": 2.0,
}


def live_api(tmp_path, db_url, **overrides):
    return start_api(Settings(database_url=db_url, data_dir=tmp_path, port=free_port(), **overrides), db_url)


@pytest.fixture
def api(tmp_path, db_url):
    # the default DiT acestep-v15-turbo, with the base and SFT DiTs served beside it
    live = live_api(tmp_path, db_url, dit_models="acestep-v15-base,acestep-v15-sft")
    yield live
    live.stop()


@pytest.fixture
def client(api):
    with httpx.Client(base_url=api.url, timeout=30) as client:
        yield client


def job(api, job_id: str) -> dict:
    return api.services.store.get(job_id)


def field_of(response: httpx.Response) -> str:
    return response.json()["detail"][0]["field"]


def test_every_option_is_accepted_and_stored(api, client):
    created = client.post("/v1/music/generate", json={"caption": "ambient", "audio_duration": 20, **OPTIONS})
    assert created.status_code == 200, created.text
    row = job(api, created.json()["job_id"])
    assert {k: row["request"][k] for k in OPTIONS} == OPTIONS
    assert row["request"]["model"] == row["model"] == "acestep-v15-turbo"
    assert row["request"]["batch_key"].startswith("acestep-v15-turbo|")
    assert row["dit_steps"] == 2 * 8 - 1  # 8 custom timesteps above 0, Heun's corrector on all but the last


def test_form_fields_and_the_comma_timesteps(api, client):
    created = client.post("/v1/music/generate", data={"caption": "x", "timesteps": "0.97,0.76,0.5,0.28,0",
                                                      "shift": "2.5", "retake_seed": "42,43", "use_adg": "false",
                                                      "dcw_enabled": "false", "model": "acestep-v15-turbo"})
    assert created.status_code == 200, created.text
    request = job(api, created.json()["job_id"])["request"]
    assert request["timesteps"] == [0.97, 0.76, 0.5, 0.28, 0.0] and request["shift"] == 2.5
    assert request["retake_seed"] == [42, 43] and request["dcw_enabled"] is False


def test_release_task_reads_the_camel_case_aliases(api, client):
    body = {"prompt": "lofi", "shift": "2.0", "timesteps": "0.97,0.76,0.5,0", "inferMethod": "SDE",
            "samplerMode": "heun", "velocityNormThreshold": "2", "velocityEmaFactor": "0.1", "dcwEnabled": "false",
            "dcwMode": "high", "dcwScaler": "0.1", "dcwHighScaler": "0.04", "dcwWavelet": "haar",
            "coverNoiseStrength": "0.2", "chunkMaskMode": "explicit", "repaintMode": "aggressive",
            "repaintStrength": "0.9", "repaintLatentCrossfadeFrames": "5", "repaintWavCrossfadeSec": "0.2",
            "retakeSeed": "7", "retakeVariance": "0.25", "latentShift": "0.05", "latentRescale": "0.9",
            "enableNormalization": "0", "normalizationDb": "-6", "fadeInDuration": "1", "fadeOutDuration": "3",
            "use_tiled_decode": True, "model": "acestep-v15-turbo"}
    created = client.post("/release_task", json=body)
    assert created.status_code == 200, created.text
    assert created.json()["extra"] == {"not_applied": {"use_tiled_decode": True}}
    request = job(api, created.json()["data"]["task_id"])["request"]
    assert request["timesteps"] == [0.97, 0.76, 0.5, 0.0] and request["infer_method"] == "sde"
    assert (request["shift"], request["sampler_mode"], request["velocity_norm_threshold"]) == (2.0, "heun", 2.0)
    assert (request["dcw_enabled"], request["dcw_mode"], request["dcw_scaler"], request["dcw_high_scaler"]) == (
        False, "high", 0.1, 0.04)
    assert (request["cover_noise_strength"], request["chunk_mask_mode"], request["repaint_mode"]) == (
        0.2, "explicit", "aggressive")
    assert (request["repaint_strength"], request["repaint_latent_crossfade_frames"],
            request["repaint_wav_crossfade_sec"]) == (0.9, 5, 0.2)
    assert (request["retake_seed"], request["retake_variance"]) == (7, 0.25)
    assert (request["latent_shift"], request["latent_rescale"], request["enable_normalization"],
            request["normalization_db"]) == (0.05, 0.9, False, -6.0)
    assert (request["fade_in_duration"], request["fade_out_duration"], request["model"]) == (1.0, 3.0, "acestep-v15-turbo")
    refused = client.post("/release_task", json={"prompt": "x", "useAdg": "true"})
    assert refused.status_code == 422 and refused.json()["detail"][0]["field"] == "use_adg"
    refused = client.post("/release_task", json={"prompt": "x", "dcwWavelet": "db4"})
    assert refused.status_code == 422 and "only the haar wavelet" in refused.json()["error"]


def test_lego_on_turbo_is_refused_naming_the_task_type_and_the_base_models(client):
    refused = client.post("/v1/music/generate", json={"task_type": "lego", "track_name": "vocals",
                                                      "src_audio_path": "/nowhere.wav", "model": "acestep-v15-turbo"})
    assert refused.status_code == 422 and field_of(refused) == "task_type"
    assert "acestep-v15-base" in refused.json()["detail"][0]["message"]


def test_guidance_and_schedule_refusals(client):
    for body, field in [({"use_adg": True}, "use_adg"), ({"cfg_interval_start": 0.3}, "cfg_interval_start"),
                        ({"timesteps": [0.9, 1.5, 0]}, "timesteps"), ({"timesteps": "1.5"}, "timesteps"),
                        ({"timesteps": [1 - i / 21 for i in range(22)]}, "timesteps"),
                        ({"model": "acestep-v15-base", "timesteps": [0.5]}, "timesteps"),
                        ({"model": "turbo"}, "model"), ({"shift": 9}, "shift"), ({"dcw_wavelet": "db4"}, "dcw_wavelet")]:
        refused = client.post("/v1/music/generate", json=body)
        assert refused.status_code == 422, (body, refused.text)
        assert field_of(refused) == field, (body, refused.text)
    guided = client.post("/v1/music/generate", json={"model": "acestep-v15-sft", "use_adg": True,
                                                     "cfg_interval_start": 0.2})
    assert guided.status_code == 200, guided.text


def test_lego_without_a_model_on_turbo_runs_on_the_base_model(api, client):
    created = client.post("/v1/music/generate", data={"task_type": "lego", "track_name": "vocals", "caption": "x"},
                          files={"src_audio": ("a.wav", audio_bytes(), "audio/wav")})
    assert created.status_code == 200, created.text
    row = job(api, created.json()["job_id"])
    assert row["request"]["model"] == row["model"] == "acestep-v15-base"
    assert row["request"]["batch_key"].startswith("acestep-v15-base|lego|")
    plain = job(api, client.post("/v1/music/generate", json={"caption": "x"}).json()["job_id"])
    assert plain["request"]["batch_key"].split("|")[0] == plain["model"] == "acestep-v15-turbo"
    cover = client.post("/v1/music/generate", data={"task_type": "cover-nofsq", "caption": "x"},
                        files={"src_audio": ("a.wav", audio_bytes(), "audio/wav")})
    assert cover.status_code == 200, cover.text
    assert job(api, cover.json()["job_id"])["request"]["task_type"] == "cover-nofsq"


def test_a_model_the_fleet_serves_beside_the_default(tmp_path, db_url):
    live = live_api(tmp_path, db_url, dit_models="acestep-v15-base")
    try:
        with httpx.Client(base_url=live.url, timeout=30) as client:
            created = client.post("/release_task", json={"prompt": "x", "model": "acestep/acestep-v15-base",
                                                         "useAdg": True})
            assert created.status_code == 200, created.text
            row = job(live, created.json()["data"]["task_id"])
            assert row["request"]["model"] == row["model"] == "acestep-v15-base" and row["request"]["use_adg"] is True
            refused = client.post("/release_task", json={"prompt": "x", "model": "acestep-v15-sft"})
            assert refused.status_code == 422 and refused.json()["detail"][0]["field"] == "model"
            assert "acestep-v15-turbo, acestep-v15-base" in refused.json()["error"]
    finally:
        live.stop()


def test_a_dit_the_fleet_does_not_serve_is_refused(tmp_path, db_url):
    live = live_api(tmp_path, db_url)  # turbo alone
    try:
        with httpx.Client(base_url=live.url, timeout=30) as client:
            named = client.post("/v1/music/generate", json={"model": "acestep-v15-xl-turbo"})
            assert named.status_code == 422 and field_of(named) == "model", named.text
            assert "acestep-v15-xl-turbo is not served here; this fleet runs acestep-v15-turbo" in named.text
            lego = client.post("/v1/music/generate", data={"task_type": "lego"},
                               files={"src_audio": ("a.wav", audio_bytes(), "audio/wav")})
            assert lego.status_code == 422 and field_of(lego) == "task_type", lego.text
            assert "acestep-v15-base" in lego.text
            assert live.services.store.stats()["queue_depth"] == 0
    finally:
        live.stop()
