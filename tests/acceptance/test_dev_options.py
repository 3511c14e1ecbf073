"""Issue 17 through `acestep-serverless dev` on tiny checkpoints (turbo, base and SFT DiTs, the LM):
one job per new sampler / post-processing option and per base-model task, each audio downloaded at
the expected length; bad combinations refused with a 422 naming the field, nothing stored."""

import io
import json
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import soundfile

from tests.acceptance.test_dev_tiny import wait_for_job
from tests.integration.http_harness import free_port, interrupt

BASE = "acestep-v15-base"
SONG = {"caption": "calm piano", "lyrics": "[Instrumental]", "audio_duration": 10, "batch_size": 1,
        "use_random_seed": False, "seed": 7, "thinking": False, "bpm": 90, "key_scale": "C major", "time_signature": "4"}

# (name, fields) run as JSON on /v1/music/generate
JSON_JOBS = [
    ("turbo steps and shift", {"inference_steps": 4, "shift": 2.0}),
    ("custom timesteps", {"timesteps": "0.97,0.76,0.615,0.5,0.395,0.28,0.18,0.085,0"}),
    ("sde", {"infer_method": "sde"}),
    ("heun", {"sampler_mode": "heun"}),
    ("dcw off", {"dcw_enabled": False}),
    ("dcw low", {"dcw_mode": "low", "dcw_scaler": 0.1}),
    ("velocity clamp and ema", {"velocity_norm_threshold": 2.0, "velocity_ema_factor": 0.1}),
    ("retake", {"retake_seed": 42, "retake_variance": 0.3}),
    ("decode options", {"latent_shift": 0.05, "latent_rescale": 1.1, "normalization_db": -3.0,
                        "fade_in_duration": 0.5, "fade_out_duration": 1.0}),
    ("no normalisation", {"enable_normalization": False}),
    ("base apg", {"model": BASE, "inference_steps": 6, "guidance_scale": 5.0}),
    ("base adg and interval", {"model": BASE, "inference_steps": 6, "use_adg": True, "cfg_interval_start": 0.2,
                               "cfg_interval_end": 0.8}),
    ("base custom timesteps", {"model": BASE, "timesteps": [1.0, 0.7, 0.4, 0.0]}),
    ("sft", {"model": "acestep-v15-sft", "inference_steps": 4, "sampler_mode": "heun"}),
]
# (name, fields) run as multipart with a 12 s source song
UPLOAD_JOBS = [
    ("cover noise strength", {"task_type": "cover", "cover_noise_strength": "0.3"}),
    ("cover-nofsq", {"task_type": "cover-nofsq"}),
    ("repaint explicit conservative", {"task_type": "repaint", "repainting_start": "3", "repainting_end": "7",
                                       "chunk_mask_mode": "explicit", "repaint_mode": "conservative"}),
    ("repaint auto_fixed strength", {"task_type": "repaint", "repainting_start": "-2", "repainting_end": "5",
                                     "chunk_mask_mode": "auto_fixed", "repaint_strength": "0.8"}),
    ("lego", {"task_type": "lego", "model": BASE, "track_name": "drums", "global_caption": "a calm piano song",
              "repainting_start": "2", "repainting_end": "8", "inference_steps": "6"}),
    ("extract", {"task_type": "extract", "model": BASE, "track_name": "vocals", "inference_steps": "6"}),
    ("complete", {"task_type": "complete", "model": BASE, "track_classes": "drums", "inference_steps": "6"}),
]
SOURCE_SECONDS = 12


def _song() -> bytes:
    out = io.BytesIO()
    t = np.arange(48000 * SOURCE_SECONDS) / 48000
    soundfile.write(out, np.stack([np.sin(2 * np.pi * 330 * t)] * 2, axis=1) * 0.3, 48000, format="WAV")
    return out.getvalue()


def test_every_new_option_and_base_task_runs_through_dev(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("ACESTEP_DATABASE_URL", "ACESTEP_PIPELINE", "ACESTEP_CHECKPOINT_DIR",
                                                            "ACESTEP_DIT_MODELS")}
    port = free_port()
    env |= {"ACESTEP_DATA_DIR": str(tmp_path / "data"), "ACESTEP_PORT": str(port), "ACESTEP_LM_MAX_DURATION": "15"}
    proc = subprocess.Popen([sys.executable, "-m", "handler.cli", "dev"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    output: list[str] = []
    try:
        while f"Uvicorn running on http://127.0.0.1:{port}" not in (output[-1] if output else ""):
            line = proc.stdout.readline()
            assert line, "".join(output)
            output.append(line)
        banner = "".join(output)
        assert BASE in banner and "acestep-v15-sft" in banner, banner  # the banner names the DiTs served

        # refused before anything is stored, each naming its field
        refusals = [
            ({**SONG, "task_type": "lego", "model": "acestep-v15-turbo", "src_audio_path": "x.wav"}, "task_type", BASE),
            ({**SONG, "use_adg": True}, "use_adg", "turbo"),
            ({**SONG, "timesteps": [1.5, 0.5, 0]}, "timesteps", ""),
            ({**SONG, "dcw_wavelet": "db4"}, "dcw_wavelet", "haar"),
        ]
        for fields, field, words in refusals:
            answer = httpx.post(f"{base}/v1/music/generate", json=fields, timeout=30)
            assert answer.status_code == 422, (fields, answer.text)
            assert field in answer.text and words in answer.text, answer.text
        assert httpx.get(f"{base}/v1/jobs", timeout=30).json()["jobs"] == []

        submitted = {}
        for name, fields in JSON_JOBS:
            answer = httpx.post(f"{base}/v1/music/generate", json={**SONG, **fields}, timeout=30)
            assert answer.status_code == 200, (name, answer.text)
            submitted[name] = answer.json()["job_id"]
        song = _song()
        for name, fields in UPLOAD_JOBS:
            form = {k: str(v) for k, v in SONG.items() if k not in ("audio_duration", "lyrics")} | fields
            answer = httpx.post(f"{base}/v1/music/generate", data=form, timeout=30,
                                files={"src_audio": ("song.wav", song, "audio/wav")})
            assert answer.status_code == 200, (name, answer.text)
            submitted[name] = answer.json()["job_id"]
        # the reference route with its camelCase names
        release = httpx.post(f"{base}/release_task", timeout=30, json={
            "prompt": "calm piano", "lyrics": "[Instrumental]", "audioDuration": 10, "batchSize": 1, "model": BASE,
            "inferenceSteps": 4, "inferMethod": "sde", "useAdg": True, "samplerMode": "heun", "dcwEnabled": False})
        assert release.status_code == 200, release.text
        submitted["release_task base"] = release.json()["data"]["task_id"]

        # the analysis modes: text instead of audio
        analyses = {
            "extract codes": httpx.post(f"{base}/v1/music/generate", timeout=30, data={"extract_codes_only": "true"},
                                        files={"src_audio": ("song.wav", song, "audio/wav")}),
            "full analysis": httpx.post(f"{base}/v1/music/generate", timeout=30, data={"full_analysis_only": "true"},
                                        files={"src_audio": ("song.wav", song, "audio/wav")}),
            "analysis": httpx.post(f"{base}/v1/music/generate", timeout=30,
                                   json={"caption": "calm piano", "lyrics": "[Instrumental]", "analysis_only": True}),
        }
        assert all(a.status_code == 200 for a in analyses.values()), {k: a.text for k, a in analyses.items()}
        no_source = httpx.post(f"{base}/v1/music/generate", json={"extract_codes_only": True}, timeout=30)
        assert no_source.status_code == 422 and "extract_codes_only" in no_source.text, no_source.text

        deadline = time.monotonic() + 900
        found = {name: wait_for_job(base, a.json()["job_id"], deadline) for name, a in analyses.items()}
        assert all(job["status"] == "succeeded" for job in found.values()), found
        codes = found["extract codes"]["result"]
        assert codes["audio_paths"] == [] and codes["status_message"] == "Audio Codes Extraction Success"
        assert codes["audio_codes"].count("<|audio_code_") == SOURCE_SECONDS * 5  # 5 codes a second
        full = found["full analysis"]["result"]
        assert full["status_message"] == "Full Hardware Analysis Success" and full["lm_model"] and full["metas"]
        assert found["analysis"]["result"]["status_message"] == "Success" and found["analysis"]["result"]["metas"]
        query = httpx.post(f"{base}/query_result", json={"task_id_list": [analyses["extract codes"].json()["job_id"]]},
                           timeout=30).json()
        item = json.loads(query["data"][0]["result"])[0]
        assert item["file"] == "" and item["audio_codes"] == codes["audio_codes"]

        for name, job_id in submitted.items():
            job = wait_for_job(base, job_id, deadline)
            assert job["status"] == "succeeded", (name, job)
            result = job["result"]
            audio = httpx.get(result["first_audio_path"], timeout=30)
            assert audio.status_code == 200, name
            info = soundfile.info(io.BytesIO(audio.content))
            expected = {"repaint auto_fixed strength": SOURCE_SECONDS + 2}.get(
                name, SOURCE_SECONDS if name in dict(UPLOAD_JOBS) else 10)
            assert info.channels == 2 and abs(info.frames / 48000 - expected) < 0.15, (name, info.frames / 48000)
            wanted = (dict(JSON_JOBS) | dict(UPLOAD_JOBS)).get(name, {}).get("model", "acestep-v15-turbo")
            if name == "release_task base":
                wanted = BASE
            assert result["dit_model"] == wanted, (name, result)
    finally:
        interrupt(proc)
