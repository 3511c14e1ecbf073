"""Acceptance: existing ACE-Step 1.5 clients against `acestep-serverless dev` (tiny random checkpoints).

Each test replays what one public client sends (paths, methods, bodies, headers, multipart layout,
field names, read from its code) and reads our answers the way that client reads them (same JSON paths,
same URL joining for downloads, same status checks), end to end: submit, poll, download the audio.

Sources read (GitHub, through the code index):
  1. upstream skill client `.claude/skills/acestep/scripts/acestep.sh`: the upstream repo's copy is not in
     the index (only its SKILL.md is: ace-step/ACE-Step-1.5@5fcf506); the script was read from the fork
     Zollicoff/ACE-Step-1.5@2a5829bc (same path), DEFAULT_CONFIG api_mode=native, use_format=true.
  2. ace-step/ACE-Step-DAW `src/services/aceStepApi.ts` (newest stored version, with createRandomSample,
     formatInput, model_inventory), `src/store/modelStore.ts`, `src/services/generationPipeline.ts`
     (text2music / lego / repaint parameter sets), `src/types/api.ts`.
  3. ace-step/acestep.vst3 `plugins/acestep_vst3/src/PluginBackendClient.cpp` @1c0b388.
  4. tsondo/Ace-Step-Wrangler `backend/acestep_wrapper.py` (@7f629b0: health, release_task, query_result,
     create_sample with sample_query + analysis_only, get_audio_bytes). The stored wrapper versions have
     no model-list or LoRA functions: those calls are built from the repo's `docs/LORA_PLAN.md` (which
     names the upstream endpoints and bodies) and from upstream `docs/en/API.md` (`GET /v1/models`).
  5. upstream `ui/studio.html` (copy in tonyjohnvan/ACE-Step-1.5@3afd5af, not in the upstream index):
     a page opened from disk (Origin `null`) or a local static server, JSON fetches => CORS preflight.
  6. Android provider: NOT FOUND in the index. Built from upstream `docs/en/API.md` (ace-step/ACE-Step-1.5,
     sections 1, 4.1, 4.2 "Parameter Naming Convention", 5.1): `ai_token` in the body, form encodings,
     snake/camel aliases.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile

from tests.integration.http_harness import free_port

JOB_DEADLINE_S = 420
SR = 48000


# --------------------------------------------------------------------------------------------- server


def _tiny_cache() -> Path:
    """Tiny random checkpoints built once per machine and reused by every run (dev skips the build when
    `<data dir>/tiny-checkpoints/.complete` exists)."""
    root = Path(tempfile.gettempdir()) / "acestep-client-tests"
    cache = root / "tiny-checkpoints"
    if (cache / ".complete").is_file():
        return cache
    root.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix="tiny-build-", dir=root))
    subprocess.run([sys.executable, "-m", "handler.cli", "make-tiny-checkpoints", str(build / "tc")], check=True)
    (build / "tc" / ".complete").touch()
    try:
        (build / "tc").rename(cache)
    except OSError:  # another run won the race
        shutil.rmtree(build, ignore_errors=True)
    return cache


@pytest.fixture(scope="module")
def server():
    """One `acestep-serverless dev` for the module; yields its base URL. Its data dir (embedded Postgres
    included) lives outside pytest's basetemp, which concurrent pytest runs rotate away under it."""
    root = Path(tempfile.mkdtemp(prefix="acestep-clients-"))
    data = root / "data"
    data.mkdir()
    (data / "tiny-checkpoints").symlink_to(_tiny_cache(), target_is_directory=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("ACESTEP_DATABASE_URL", "ACESTEP_PIPELINE", "ACESTEP_CHECKPOINT_DIR")}
    env |= {"ACESTEP_DATA_DIR": str(data), "ACESTEP_PORT": str(port), "ACESTEP_LM_MAX_DURATION": "15",
            "ACESTEP_DEFAULT_BATCH_SIZE": "1"}
    log_path = data.parent / "dev.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "handler.cli", "dev"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while f"Uvicorn running on http://127.0.0.1:{port}" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------- helpers


def wav_bytes(seconds: float, sr: int = SR, channels: int = 2, silent: bool = False) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    tone = np.zeros_like(t) if silent else 0.3 * np.sin(2 * np.pi * 330 * t)
    buf = io.BytesIO()
    soundfile.write(buf, np.stack([tone] * channels, axis=1), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def audio_info(content: bytes):
    return soundfile.info(io.BytesIO(content))


def assert_audio(content: bytes, seconds: float | None = None):
    info = audio_info(content)
    assert info.frames > 0 and info.channels in (1, 2), info
    if seconds is not None:
        assert abs(info.frames / info.samplerate - seconds) < 0.25, (info.frames / info.samplerate, seconds)
    return info


def poll_query_result(post, task_id: str, what: str = "") -> dict:
    """`POST /query_result` until `data[0].status` leaves 0, as every native client does; returns data[0]."""
    deadline = time.monotonic() + JOB_DEADLINE_S
    while True:
        r = post(task_id)
        assert r.status_code == 200, (what, r.status_code, r.text)
        entry = r.json()["data"][0]
        if entry["status"] != 0:
            return entry
        assert time.monotonic() < deadline, (what, entry)
        time.sleep(1.0)


def json_post(base: str, path: str, body, timeout: float = 60, **headers) -> httpx.Response:
    return httpx.post(f"{base}{path}", content=json.dumps(body), timeout=timeout,
                      headers={"Content-Type": "application/json", **headers})


# ============================================================================ 1. acestep.sh (skill client)

SKILL_HEADERS = {"Content-Type": "application/json; charset=utf-8"}


def skill_native_generate(base: str, payload: dict, tmp: Path) -> list[Path]:
    """cmd_generate / cmd_random (api_mode=native): release_task, wait_for_job, download_audios."""
    # ensure_connection -> check_health: curl -w %{http_code} ${url}/health == 200
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    r = httpx.post(f"{base}/release_task", content=json.dumps(payload), headers=SKILL_HEADERS, timeout=60)
    body = r.json()
    # job_id=$(jq -r '.data.task_id // .task_id // empty')
    job_id = (body.get("data") or {}).get("task_id") if isinstance(body, dict) else None
    job_id = job_id or (body.get("task_id") if isinstance(body, dict) else None)
    assert job_id, f"Error: Failed to create job: HTTP {r.status_code} {r.text}"

    def query(task_id):
        return httpx.post(f"{base}/query_result", content=json.dumps({"task_id_list": [task_id]}),
                          headers=SKILL_HEADERS, timeout=30)

    entry = poll_query_result(query, job_id, "acestep.sh")
    # parse_query_status: '.data[0].status // .[0].status // 0'; 1 = done, 2 = failed
    assert entry["status"] == 1, f"Generation failed! {entry}"
    result = json.loads(entry["result"])  # parse_query_result: '.data[0].result'
    paths = [item["file"] for item in result if item.get("file")]  # '.[].file // empty'
    assert paths, f"No audio files found in result: {result}"
    saved = []
    for count, audio_path in enumerate(paths, 1):
        # download_url="${api_url}${audio_path}": the file must be a relative /v1/audio?path=... URL
        assert audio_path.startswith("/v1/audio?path="), audio_path
        d = httpx.get(f"{base}{audio_path}", timeout=60)
        assert d.status_code == 200 and d.content, (audio_path, d.status_code, d.text[:300])
        out = tmp / f"{job_id}_{count}.mp3"
        out.write_bytes(d.content)
        saved.append(out)
    # the JSON it saves is read for metas: '.[0].metas.bpm // .[0].bpm', keyscale, duration
    first = result[0]
    assert "metas" in first and "prompt" in first and "lyrics" in first, first
    return saved


def skill_generate_payload(caption="", lyrics="", description="", use_format=True, thinking=True,
                           duration=None, steps=None) -> dict:
    """The jq payload of cmd_generate with the script's DEFAULT_CONFIG (thinking, use_format,
    use_cot_caption, use_cot_language all true, mp3, en), plus --duration / --steps when given."""
    payload = {
        "prompt": caption, "lyrics": lyrics, "sample_query": description, "thinking": thinking,
        "use_format": use_format, "use_cot_caption": True, "use_cot_language": True,
        "vocal_language": "en", "audio_format": "mp3", "use_random_seed": True,
    }
    if steps is not None:
        payload["inference_steps"] = steps
    if duration is not None:
        payload["audio_duration"] = duration
    return payload


def test_skill_default_config_caption_mode(server, tmp_path):
    """`acestep.sh generate -c "..." -l "..." --duration 10 --steps 2` with the default config (use_format on)."""
    files = skill_native_generate(server, skill_generate_payload(
        caption="Electronic pop, energetic synths", lyrics="[Verse]\nHello world", duration=10, steps=2), tmp_path)
    assert_audio(files[0].read_bytes(), 10)


def test_skill_no_format(server, tmp_path):
    """`acestep.sh generate "Jazz with saxophone" --no-format --duration 10 --steps 2`."""
    files = skill_native_generate(server, skill_generate_payload(
        caption="Jazz with saxophone", use_format=False, duration=10, steps=2), tmp_path)
    assert_audio(files[0].read_bytes(), 10)


def test_skill_description_sample_query(server, tmp_path):
    """`acestep.sh generate -d "A cheerful song about spring" --duration 10 --steps 2` (prompt empty,
    sample_query set: the LM writes caption and lyrics)."""
    files = skill_native_generate(server, skill_generate_payload(
        description="A cheerful song about spring", duration=10, steps=2), tmp_path)
    assert_audio(files[0].read_bytes(), 10)


def test_skill_random_sample_mode(server, tmp_path):
    """`acestep.sh random` (native): the body is exactly {sample_mode: true, thinking: true}."""
    files = skill_native_generate(server, {"sample_mode": True, "thinking": True}, tmp_path)
    info = assert_audio(files[0].read_bytes())
    assert 9 <= info.frames / info.samplerate <= 16  # the LM plans it, capped by ACESTEP_LM_MAX_DURATION=15


def test_skill_completion_mode(server, tmp_path):
    """api_mode=completion: get_completion_model (`/v1/models` `.data[0].id`), then
    `POST /v1/chat/completions` and the base64 audio in `.choices[0].message.audio[i].audio_url.url`."""
    models = httpx.get(f"{server}/v1/models", timeout=10)
    assert models.status_code == 200, models.text
    model_id = None
    try:
        data = models.json().get("data")
        model_id = data[0]["id"] if isinstance(data, list) and data and data[0].get("id") else None
    except (ValueError, AttributeError, KeyError, TypeError):
        pass
    assert model_id, f"/v1/models has no .data[0].id (the script would fall back to a guessed name): {models.text}"
    payload = {
        "model": model_id,
        "messages": [{"role": "user", "content": "<prompt>Lo-fi hip hop, mellow piano</prompt><lyrics>[Instrumental]</lyrics>"}],
        "stream": False, "thinking": True, "use_format": True, "sample_mode": False,
        "use_cot_caption": True, "use_cot_language": True,
        "audio_config": {"format": "mp3", "vocal_language": "en", "duration": 10},
    }
    r = httpx.post(f"{server}/v1/chat/completions", content=json.dumps(payload), timeout=JOB_DEADLINE_S,
                   headers={**SKILL_HEADERS, "User-Agent": "curl/8.7.1"})
    assert r.status_code == 200, f"Error: HTTP {r.status_code} {r.text[:500]}"
    body = r.json()
    assert (body["choices"][0].get("finish_reason") or "stop") != "error", body["choices"][0]
    audio = body["choices"][0]["message"].get("audio") or []
    assert len(audio) > 0, "No audio files in response"
    url = audio[0]["audio_url"]["url"]
    assert url.startswith("data:") and ";base64," in url, url[:80]
    b64 = url.split(";base64,", 1)[1]  # "${data_url#data:*;base64,}"
    assert_audio(base64.b64decode(b64), 10)


# ============================================================================ 2. ACE-Step-DAW


def daw_list_models(base: str) -> dict:
    """aceStepApi.listModels: /v1/model_inventory, falling back to /v1/models; both shapes parsed."""
    res = httpx.get(f"{base}/v1/model_inventory", timeout=10)
    if res.status_code >= 300:
        res = httpx.get(f"{base}/v1/models", timeout=10)
    assert res.status_code < 300, f"listModels failed: {res.status_code}"
    js = res.json()
    env = js.get("data")
    if isinstance(env, list) and not (isinstance(env, dict) and env.get("models")):
        names = list(dict.fromkeys((m.get("id") or "").strip() for m in env if (m.get("id") or "").strip()))
        return {"models": [{"name": n, "is_default": i == 0, "is_loaded": True} for i, n in enumerate(names)],
                "default_model": names[0] if names else None, "lm_models": [], "llm_initialized": False}
    env = env or {}
    return {"models": env.get("models") if isinstance(env.get("models"), list) else [],
            "default_model": env.get("default_model"),
            "lm_models": env.get("lm_models") if isinstance(env.get("lm_models"), list) else [],
            "loaded_lm_model": env.get("loaded_lm_model"), "llm_initialized": bool(env.get("llm_initialized"))}


def daw_model_supports(inventory: dict, task_type: str) -> bool:
    """aceStepApi.modelSupportsTaskType."""
    loaded = next((m for m in inventory["models"] if m.get("is_loaded")), None)
    if not loaded:
        return False
    types = loaded.get("supported_task_types") or []
    return not types or task_type in types


def daw_release_task(base: str, src_wav: bytes, params: dict) -> str:
    """aceStepApi.releaseTask: multipart FormData, `src_audio` blob named src_audio.wav first, then every
    non-null param as String(value) (JS: true -> "true", 3.0 -> "3")."""
    def js_string(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)
    fields = [("src_audio", ("src_audio.wav", src_wav, "audio/wav"))]
    fields += [(k, (None, js_string(v))) for k, v in params.items() if v is not None]
    res = httpx.post(f"{base}/release_task", files=fields, timeout=60)
    assert res.is_success, f"releaseLegoTask failed: {res.status_code} - {res.text}"
    return res.json()["data"]["task_id"]


def daw_wait_and_download(base: str, task_id: str, what: str) -> tuple[dict, bytes]:
    def query(tid):
        return json_post(base, "/query_result", {"task_id_list": [tid]})
    entry = poll_query_result(query, task_id, what)
    assert entry["status"] == 1, f"Generation failed: {entry['result']}"
    first = json.loads(entry["result"])[0]
    path = first["file"]
    # downloadAudio: '/v1/...' is joined to the base; anything else is treated as a server file path
    assert path.startswith("/v1/"), path
    res = httpx.get(f"{base}{path}", timeout=60)
    assert res.is_success, f"downloadAudio failed: {res.status_code} {path} {res.text[:200]}"
    return first, res.content


@pytest.fixture(scope="module")
def daw_state(server):
    return {}


def test_daw_models_stats_init(server, daw_state):
    """modelStore.refreshModels / refreshStats / loadModel (DiT, then LM with init_llm)."""
    inventory = daw_list_models(server)
    inv_res = httpx.get(f"{server}/v1/model_inventory", timeout=10)
    assert inv_res.status_code == 200, f"/v1/model_inventory: {inv_res.status_code} {inv_res.text[:300]}"
    assert inventory["models"], inventory
    assert any(m.get("is_loaded") for m in inventory["models"]), inventory  # isModelReady
    assert daw_model_supports(inventory, "text2music"), inventory
    loaded = next(m for m in inventory["models"] if m.get("is_loaded"))
    daw_state["model"] = loaded["name"]

    stats = httpx.get(f"{server}/v1/stats", timeout=10)
    assert stats.is_success, f"getStats failed: {stats.status_code}"
    data = stats.json().get("data")  # envelope.data
    assert isinstance(data, dict) and isinstance(data.get("jobs"), dict), stats.text
    assert {"total", "queued", "running", "succeeded", "failed"} <= set(data["jobs"]), data
    assert "queue_size" in data and "avg_job_seconds" in data, data

    init = json_post(server, "/v1/init", {"model": loaded["name"]})
    assert init.is_success, f"initModel failed: {init.status_code} - {init.text}"
    assert isinstance(init.json()["data"].get("message", ""), str)
    if inventory["lm_models"]:
        lm = inventory["lm_models"][0]["name"]
        init = json_post(server, "/v1/init", {"model": loaded["name"], "init_llm": True, "lm_model_path": lm})
        assert init.is_success, f"initModel failed: {init.status_code} - {init.text}"
    assert daw_list_models(server)["models"]


def test_daw_random_sample_and_format_input(server):
    """createRandomSample('custom_mode') and formatInput (param_obj as a JSON string)."""
    # the browser's fetch has no timeout of its own: wait as long as a job may take
    res = json_post(server, "/create_random_sample", {"sample_type": "custom_mode"}, timeout=JOB_DEADLINE_S)
    assert res.is_success, f"createRandomSample failed: {res.status_code} - {res.text}"
    sample = res.json()["data"]
    assert isinstance(sample, dict) and sample.get("caption"), sample

    res = json_post(server, "/format_input", {
        "prompt": "pop rock", "lyrics": "[Verse 1]\nWalking down the street",
        "param_obj": json.dumps({"language": "en", "bpm": 120, "duration": 10}),
    }, timeout=JOB_DEADLINE_S)
    assert res.is_success, f"formatInput failed: {res.status_code} - {res.text}"
    formatted = res.json()["data"]
    # the fields the DAW fills its form from; the tiny random LM may write an empty caption now and then
    assert isinstance(formatted.get("caption"), str) and isinstance(formatted.get("lyrics"), str), formatted
    assert formatted["bpm"] == 120 and formatted["duration"] == 10.0, formatted  # the param_obj metas kept


def test_daw_text2music_repaint(server, daw_state):
    """regenerateText2MusicClip (silence src_audio + text2music params with negative_prompt), then
    generateRepaintInternal (task_type=repaint with global_caption) on its result."""
    model = daw_state.get("model") or daw_list_models(server)["default_model"] or "acestep-v15-turbo"
    t2m = {
        "task_type": "text2music", "prompt": "lo-fi hip hop", "lyrics": "", "audio_duration": 10,
        "bpm": None, "key_scale": "", "time_signature": "", "inference_steps": 2, "guidance_scale": 5,
        "shift": 3.0, "batch_size": 1, "audio_format": "wav", "thinking": False, "model": model,
        "use_random_seed": True, "vocal_language": "en", "negative_prompt": "no autotune, no heavy reverb",
    }
    task = daw_release_task(server, wav_bytes(10, silent=True), t2m)
    first, song = daw_wait_and_download(server, task, "daw text2music")
    assert_audio(song, 10)
    assert isinstance(first.get("metas") or {}, dict), first  # inferredMetas: metas?.bpm, keyscale, ...

    repaint = {
        "task_type": "repaint", "prompt": "smooth jazz", "global_caption": "jazz song", "lyrics": "",
        "instruction": "Repaint the mask area based on the given conditions:", "repainting_start": 2,
        "repainting_end": 5, "audio_duration": 10, "inference_steps": 2, "guidance_scale": 5, "shift": 3.0,
        "batch_size": 1, "audio_format": "wav", "thinking": False, "model": model,
        "repaint_mode": "balanced", "repaint_strength": 0.5, "negative_prompt": "no falsetto",
    }
    task = daw_release_task(server, song, repaint)
    _, repainted = daw_wait_and_download(server, task, "daw repaint")
    assert_audio(repainted, 10)
    daw_state["song"] = song


def test_daw_lego_on_the_base_model(server, daw_state):
    """generateClipInternal (task_type=lego, global_caption, negative_prompt) on the text2music result.
    The DAW's model library looks for a lego-category model (inferModelCategory: name contains 'lego',
    or supported_task_types has lego) and loads one with /v1/init. The dev fleet serves the tiny base
    DiT beside turbo: the DAW finds it in the inventory, /v1/init of it succeeds, and the lego runs on
    it. A lego sent with the turbo model is refused at submit: 422 in the envelope naming task_type and
    the base models (not global_caption or negative_prompt)."""
    song = daw_state.get("song") or wav_bytes(10)
    inventory = daw_list_models(server)
    lego_models = [m["name"] for m in inventory["models"] if "lego" in (m.get("supported_task_types") or [])]
    assert lego_models == ["acestep-v15-base"], inventory
    init = json_post(server, "/v1/init", {"model": "acestep-v15-base"}, timeout=30)
    assert init.status_code == 200, init.text
    lego = {
        "task_type": "lego", "track_name": "drums", "prompt": "jazz drums", "global_caption": "jazz song",
        "lyrics": "", "instruction": "Generate the DRUMS track based on the audio context:",
        "repainting_start": 0, "repainting_end": 10, "audio_duration": 10, "bpm": None, "key_scale": "",
        "time_signature": "", "inference_steps": 2, "guidance_scale": 5, "shift": 3.0, "batch_size": 1,
        "audio_format": "wav", "thinking": False, "model": "acestep-v15-base",
        "negative_prompt": "no electronic drums",
    }
    first, track = daw_wait_and_download(server, daw_release_task(server, song, lego), "daw lego")
    assert_audio(track, 10)
    assert first["dit_model"] == "acestep-v15-base", first
    fields = [("src_audio", ("src_audio.wav", song, "audio/wav"))]
    fields += [(k, (None, str(v))) for k, v in (lego | {"model": "acestep-v15-turbo"}).items() if v is not None]
    refused = httpx.post(f"{server}/release_task", files=fields, timeout=60)
    assert refused.status_code == 422 and refused.json()["code"] == 422, refused.text
    assert refused.json()["detail"][0]["field"] == "task_type" and "acestep-v15-base" in refused.json()["error"]


# ============================================================================ 3. acestep.vst3


def vst3_read_json(method: str, url: str, body: str | None = None):
    """readJsonResponse: the body must parse to a JSON object; status 200 or it reads `error`."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    res = httpx.request(method, url, content=body, headers=headers, timeout=15, follow_redirects=True)
    try:
        parsed = res.json()
    except ValueError:
        parsed = None
    assert isinstance(parsed, dict), f"Backend returned invalid JSON / unexpected shape: {res.status_code} {res.text[:300]}"
    return res.status_code, parsed


def vst3_wrapped(parsed: dict):
    """getWrappedDataObject: code == 200 and data is an object."""
    return parsed.get("data") if parsed.get("code") == 200 and isinstance(parsed.get("data"), dict) else None


def vst3_build_url(base: str, path: str) -> str:
    if path.lower().startswith(("http://", "https://")):
        return path
    return base.rstrip("/") + (path if path.startswith("/") else "/" + path)


def test_vst3_health_generate_poll_download(server):
    status, parsed = vst3_read_json("GET", vst3_build_url(server, "/health"))
    assert status == 200, parsed
    assert (parsed.get("data") or {}).get("status") == "ok", f"degraded health: {parsed}"

    payload = {
        "prompt": "warm analog synthwave", "lyrics": "", "task_type": "text2music", "audio_duration": 10.0,
        "batch_size": 1, "audio_format": "wav", "thinking": False, "use_random_seed": False, "seed": 42,
        "inference_steps": 6, "guidance_scale": 7.0, "model": "acestep-v15-turbo",
    }
    status, parsed = vst3_read_json("POST", vst3_build_url(server, "/release_task"), json.dumps(payload))
    assert status == 200, parsed.get("error") or parsed
    data = vst3_wrapped(parsed)
    assert data and data.get("task_id"), f"Backend did not return a task id: {parsed}"
    task_id = str(data["task_id"])

    deadline = time.monotonic() + JOB_DEADLINE_S
    while True:
        status, parsed = vst3_read_json("POST", vst3_build_url(server, "/query_result"),
                                        json.dumps({"task_id_list": [task_id]}))
        assert status == 200, parsed
        items = parsed.get("data")
        if isinstance(items, list) and items and int(items[0].get("status", 0)) != 0:
            break
        assert time.monotonic() < deadline, parsed
        time.sleep(1.0)
    task = items[0]
    result = json.loads(str(task.get("result")))
    assert isinstance(result, list) and result, "Task finished without any audio file."
    assert int(task["status"]) == 1, result[0].get("error")
    item = result[0]
    remote = item.get("url") or item.get("file")
    assert remote, "The backend did not return an audio file URL."
    assert isinstance(item.get("metas") or {}, dict), item  # buildResultLabel reads metas.duration / keyscale
    res = httpx.get(vst3_build_url(server, remote), timeout=60, follow_redirects=True)
    assert res.status_code == 200, "Could not download the generated preview audio."
    assert_audio(res.content, 10)


def test_vst3_lora_calls(server):
    """getLoRAStatus / loadLoRA / unloadLoRA / toggleLoRA / setLoRAScale, parsed like the plugin."""
    def lora_status():
        status, parsed = vst3_read_json("GET", vst3_build_url(server, "/v1/lora/status"))
        assert status == 200, parsed
        data = vst3_wrapped(parsed)
        assert data is not None, f"Backend did not return LoRA status data: {parsed}"
        assert isinstance(data.get("lora_loaded"), bool) and isinstance(data.get("use_lora"), bool), data
        assert isinstance(data.get("lora_scale"), (int, float)) and isinstance(data.get("adapters", []), list), data
        assert "active_adapter" in data, data
        return data

    assert lora_status()["lora_loaded"] is False

    # no such adapter: an error the plugin can show (JSON object, non-200, `error` or detail)
    status, parsed = vst3_read_json("POST", vst3_build_url(server, "/v1/lora/load"),
                                    json.dumps({"lora_path": "/nonexistent/lora-adapter"}))
    assert status != 200 or vst3_wrapped(parsed) is None, parsed

    status, parsed = vst3_read_json("POST", vst3_build_url(server, "/v1/lora/unload"), "{}")
    assert status == 200 and vst3_wrapped(parsed) is not None, parsed
    assert isinstance(vst3_wrapped(parsed).get("message"), str), parsed
    lora_status()

    for path, body in (("/v1/lora/toggle", {"use_lora": False}), ("/v1/lora/scale", {"scale": 1.0})):
        status, parsed = vst3_read_json("POST", vst3_build_url(server, path), json.dumps(body))
        if status == 200 and vst3_wrapped(parsed) is not None:
            assert isinstance(vst3_wrapped(parsed).get("message"), str), parsed
        else:  # upstream, no adapter loaded: HTTP 200 wrap_response(None, code=400, error=...) -> plugin error path
            assert parsed.get("code") != 200 and (parsed.get("error") or parsed.get("detail")), parsed
    assert lora_status()["lora_loaded"] is False


# ============================================================================ 4. Ace-Step-Wrangler


def wrangler_query(base: str, task_id: str) -> dict:
    """acestep_wrapper.query_result, normalised like the wrapper (item["file"] must exist)."""
    deadline = time.monotonic() + JOB_DEADLINE_S
    while True:
        r = httpx.post(f"{base}/query_result", json={"task_id_list": [task_id]}, timeout=10)
        r.raise_for_status()
        entry = r.json()["data"][0]
        if entry["status"] != 0:
            break
        assert time.monotonic() < deadline, entry
        time.sleep(1.0)
    if entry["status"] == 2:
        return {"status": "error", "results": None, "entry": entry}
    items = json.loads(entry["result"])
    return {"status": "done", "results": [{"audio_url": i["file"], "meta": i.get("metas")} for i in items]}


def test_wrangler_models_sample_generate_download(server):
    r = httpx.get(f"{server}/health", timeout=10)
    r.raise_for_status()
    r.json()

    r = httpx.get(f"{server}/v1/models", timeout=10)
    r.raise_for_status()
    data = r.json().get("data")
    names = [m.get("id") for m in data] if isinstance(data, list) else [m.get("name") for m in (data or {}).get("models", [])]
    assert [n for n in names if n], r.text

    # create_sample(query): sample_query + analysis_only, polled with query_result
    r = httpx.post(f"{server}/release_task", json={"sample_query": "a mellow lofi beat for studying",
                                                   "analysis_only": True, "vocal_language": "en"}, timeout=30)
    assert r.is_success, f"create_sample: {r.status_code} {r.text}"
    sample = wrangler_query(server, r.json()["data"]["task_id"])
    assert sample["status"] == "done", sample

    # generation with sample_query (release_task(payload) posts the payload as JSON)
    r = httpx.post(f"{server}/release_task", json={
        "sample_query": "a mellow lofi beat for studying", "thinking": True, "vocal_language": "en",
        "audio_duration": 10, "inference_steps": 2, "batch_size": 1, "audio_format": "mp3",
    }, timeout=30)
    assert r.is_success, f"release_task: {r.status_code} {r.text}"
    done = wrangler_query(server, r.json()["data"]["task_id"])
    assert done["status"] == "done", done
    path = done["results"][0]["audio_url"]
    # get_audio_bytes: f"{ACESTEP_BASE_URL}{path}", path = '/v1/audio?path=%2F...'
    assert path.startswith("/v1/audio?path="), path
    a = httpx.get(f"{server}{path}", timeout=60)
    a.raise_for_status()
    assert a.headers.get("content-type", "audio/mpeg").startswith("audio/"), a.headers
    assert_audio(a.content, 10)
    # main.py's proxy re-encodes the query: parse_qs(...)['path'][0], then GET /v1/audio params={"path": ...}
    fs_path = urllib.parse.parse_qs(urllib.parse.urlparse(path).query)["path"][0]
    b = httpx.get(f"{server}/v1/audio", params={"path": fs_path}, timeout=60)
    assert b.status_code == 200 and b.content == a.content, b.status_code


def test_wrangler_lora_calls(server):
    """LoRA proxy calls as docs/LORA_PLAN.md lists them (status, load, scale, toggle, unload)."""
    r = httpx.get(f"{server}/v1/lora/status", timeout=10)
    r.raise_for_status()
    assert isinstance(r.json().get("data"), dict), r.text
    r = httpx.post(f"{server}/v1/lora/load", json={"lora_path": "/nonexistent/adapter", "adapter_name": "jazz"}, timeout=30)
    assert r.status_code in (400, 404, 422) or r.json().get("code") != 200, r.text  # shown as-is in the UI
    r.json()
    for path, body in (("/v1/lora/scale", {"scale": 0.75, "adapter_name": "jazz"}), ("/v1/lora/toggle", {"use_lora": True})):
        r = httpx.post(f"{server}{path}", json=body, timeout=30)
        assert r.status_code != 404 and r.status_code < 500, (path, r.status_code, r.text)
        r.json()
    r = httpx.post(f"{server}/v1/lora/unload", timeout=30)
    r.raise_for_status()
    assert r.json().get("code") == 200, r.text


# ============================================================================ 5. ui/studio.html in a browser


@pytest.mark.parametrize("origin", ["null", "http://localhost:5500"])
def test_studio_cors_preflight(server, origin):
    for path in ("/release_task", "/query_result"):
        r = httpx.options(f"{server}{path}", timeout=10, headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert r.status_code in (200, 204), (path, r.status_code, r.text)
        allow = r.headers.get("access-control-allow-origin")
        assert allow in (origin, "*"), (path, dict(r.headers))
        assert "POST" in r.headers.get("access-control-allow-methods", "").upper() or \
            r.headers.get("access-control-allow-methods") == "*", dict(r.headers)
        assert "content-type" in r.headers.get("access-control-allow-headers", "").lower() or \
            r.headers.get("access-control-allow-headers") == "*", dict(r.headers)


def test_studio_generate_from_file_page(server):
    """The page opened from disk (Origin: null): submit, poll, <audio src=base+file>."""
    origin = "null"

    def cors_post(path, body):
        r = httpx.post(f"{server}{path}", content=json.dumps(body), timeout=30,
                       headers={"Content-Type": "application/json", "Origin": origin})
        assert r.headers.get("access-control-allow-origin") in (origin, "*"), (path, dict(r.headers))
        return r

    body = {"prompt": "upbeat pop song with electric guitar", "lyrics": "", "vocal_language": "en",
            "thinking": True, "batch_size": 1, "audio_duration": 10}
    data = cors_post("/release_task", body).json()
    assert data["code"] == 200 and data["data"] and data["data"]["task_id"], data
    task_id = data["data"]["task_id"]
    deadline = time.monotonic() + JOB_DEADLINE_S
    while True:
        res = cors_post("/query_result", {"task_id_list": [task_id]}).json()
        assert res["code"] == 200, res
        item = res["data"][0]
        if item["status"] in (1, 2):
            break
        assert time.monotonic() < deadline, item
        time.sleep(1.5)
    assert item["status"] == 1, item
    result = json.loads(item["result"]) if isinstance(item["result"], str) else item["result"]
    for r in (result if isinstance(result, list) else [result]):
        file = r.get("file") or ""
        url = file if file.startswith("http") else server + ("" if file.startswith("/") else "/") + file
        audio = httpx.get(url, timeout=60, headers={"Origin": origin})
        assert audio.status_code == 200, (url, audio.status_code)
        assert_audio(audio.content, 10)


# ============================================================================ 6. Android provider (form + ai_token)


def android_poll(server, task_id: str, encoding: str) -> dict:
    def query(tid):
        form = {"ai_token": "android-device-token", "task_id_list": json.dumps([tid])}
        if encoding == "multipart":
            return httpx.post(f"{server}/query_result", files={k: (None, v) for k, v in form.items()}, timeout=30)
        return httpx.post(f"{server}/query_result", data=form, timeout=30)
    return poll_query_result(query, task_id, f"android {encoding}")


@pytest.mark.parametrize("encoding", ["urlencoded", "multipart"])
def test_android_form_with_aliases(server, encoding):
    """Built from upstream docs/en/API.md (no Android provider in the index): `ai_token` in the body,
    `prompt` together with `caption`, `key`, `duration`, `language`, camelCase aliases."""
    form = {
        "ai_token": "android-device-token",
        "prompt": "dreamy synth pop", "caption": "dreamy synth pop",
        "lyrics": "[Instrumental]",
        "duration": "10", "language": "en", "key": "C Major",
        "timeSignature": "4", "inferenceSteps": "2", "batchSize": "1", "audioFormat": "mp3",
        "thinking": "false", "useRandomSeed": "true", "bpm": "100",
    }
    if encoding == "multipart":
        r = httpx.post(f"{server}/release_task", files={k: (None, v) for k, v in form.items()}, timeout=30)
    else:
        r = httpx.post(f"{server}/release_task", data=form, timeout=30)
    assert r.status_code == 200, r.text
    task_id = r.json()["data"]["task_id"]
    entry = android_poll(server, task_id, encoding)
    assert entry["status"] == 1, entry
    item = json.loads(entry["result"])[0]
    metas = item["metas"]
    assert float(metas["duration"]) == 10 and metas["keyscale"] == "C Major", metas
    assert str(metas["timesignature"]) == "4" and int(metas["bpm"]) == 100, metas
    assert item["prompt"] == "dreamy synth pop", item
    d = httpx.get(f"{server}{item['file']}", timeout=60)
    assert d.status_code == 200, (item["file"], d.status_code, d.text[:300])
    assert_audio(d.content, 10)
