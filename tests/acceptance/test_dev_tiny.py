"""`acestep-serverless dev` with the real pipeline and no ACESTEP_CHECKPOINT_DIR: it builds tiny random
checkpoints with a loud warning, and the seed's JSON, thinking=true and file-upload examples complete
through the real LM, DiT, text encoder and VAE code; the audio downloads at the expected length."""

import io
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import soundfile

from tests.integration.http_harness import free_port


def wait_for_job(base: str, job_id: str, deadline: float) -> dict:
    while (job := httpx.get(f"{base}/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    return job


def test_dev_builds_tiny_checkpoints_and_runs_the_seed_examples(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("ACESTEP_DATABASE_URL", "ACESTEP_PIPELINE", "ACESTEP_CHECKPOINT_DIR")}
    port = free_port()
    # The random LM picks any duration it likes; keep its songs short on a CPU.
    env |= {"ACESTEP_DATA_DIR": str(tmp_path / "data"), "ACESTEP_PORT": str(port), "ACESTEP_LM_MAX_DURATION": "15"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "handler.cli", "dev"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    base = f"http://127.0.0.1:{port}"
    output = []
    try:
        deadline = time.monotonic() + 420
        while not any("THE AUDIO IS NOISE" in line for line in output):
            line = proc.stdout.readline()
            assert line, "".join(output)
            output.append(line)
        while f"Uvicorn running on http://127.0.0.1:{port}" not in output[-1]:
            line = proc.stdout.readline()
            assert line, "".join(output)
            output.append(line)
        assert (tmp_path / "data" / "tiny-checkpoints" / ".complete").is_file()
        json_example = httpx.post(f"{base}/v1/music/generate", headers={"Content-Type": "application/json"}, timeout=30,
                                  content='{\n    "caption": "upbeat pop song",\n    "lyrics": "Hello world",\n    "inference_steps": 16\n  }')
        assert json_example.status_code == 200, json_example.text
        song = io.BytesIO()
        t = np.arange(48000 * 3) / 48000
        soundfile.write(song, np.stack([np.sin(2 * np.pi * 330 * t)] * 2, axis=1) * 0.3, 48000, format="WAV")
        upload = httpx.post(f"{base}/v1/music/generate", timeout=30,
                            data={"caption": "remix this song", "task_type": "repaint"},
                            files={"src_audio": ("song.wav", song.getvalue(), "audio/wav")})
        assert upload.status_code == 200, upload.text
        thinking = httpx.post(f"{base}/v1/music/generate", headers={"Content-Type": "application/json"}, timeout=30, content=(
            '{"caption": "upbeat pop song", "lyrics": "Hello world", "thinking": true, "lm_temperature": 0.85, '
            '"lm_cfg_scale": 2.0, "lm_top_k": null, "lm_top_p": 0.9, "lm_repetition_penalty": 1.0}'))
        assert thinking.status_code == 200, thinking.text
        job = wait_for_job(base, json_example.json()["job_id"], deadline)
        assert job["status"] == "succeeded", job
        assert len(job["result"]["audio_paths"]) == 2  # the default batch of 2
        audio = httpx.get(job["result"]["first_audio_path"])
        info = soundfile.info(io.BytesIO(audio.content))
        assert audio.status_code == 200 and info.channels == 2 and info.samplerate == 48000
        # no duration given: the LM filled it (thinking=false still completes missing metadata)
        assert 10 <= job["result"]["duration"] <= 15 and job["result"]["lm_model"] == "acestep-5Hz-lm-0.6B"
        assert abs(info.frames - job["result"]["duration"] * 48000) < 48000 // 10  # mp3 framing adds a little
        repaint = wait_for_job(base, upload.json()["job_id"], deadline)
        assert repaint["status"] == "succeeded", repaint
        info = soundfile.info(io.BytesIO(httpx.get(repaint["result"]["first_audio_path"]).content))
        assert abs(info.frames - 3 * 48000) < 48000 // 10
        lm_job = wait_for_job(base, thinking.json()["job_id"], deadline)
        assert lm_job["status"] == "succeeded", lm_job
        result = lm_job["result"]
        assert 30 <= result["bpm"] <= 300 and result["keyscale"] and result["lm_model"] == "acestep-5Hz-lm-0.6B"
        assert result["lm_backend"] == "pt"  # the spec example asks for vllm; this machine has none
        info = soundfile.info(io.BytesIO(httpx.get(result["first_audio_path"]).content))
        assert abs(info.frames - result["duration"] * 48000) < 48000 // 10 and 10 <= result["duration"] <= 15
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
