"""Our RunPod handler through the runpod SDK's own local modes (`--test_input`, `--rp_serve_api`),
both modes, on the real pipeline with tiny random checkpoints (and on the fake one where a test is
about the handler's own answers)."""

import json
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.acceptance.worker_harness import ROOT, submit, wait_for, worker_env

pytest.importorskip("runpod", reason="the runpod SDK (the `runpod` extra) is not installed")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random checkpoints in the real layout (no 5 Hz LM: these requests do not think)."""
    from pipeline.tiny import build_tiny_checkpoints

    folder = build_tiny_checkpoints(tmp_path_factory.mktemp("tiny"), with_lm=False)
    return {"ACESTEP_PIPELINE": "pipeline.service:load_pipeline", "ACESTEP_CHECKPOINT_DIR": str(folder),
            "ACESTEP_DEVICE": "cpu", "ACESTEP_ETA_PRIOR": "cpu-tiny"}


def runpod_env(db_url, tmp_path, **extra) -> dict[str, str]:
    env = worker_env(db_url, tmp_path, **extra)
    for name in ("RUNPOD_WEBHOOK_GET_JOB", "RUNPOD_WEBHOOK_POST_OUTPUT", "RUNPOD_POD_ID", "RUNPOD_AI_API_KEY"):
        env.pop(name, None)  # the SDK's local modes: nothing of RunPod's worker API
    return env


def run_test_input(env: dict[str, str], job: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "handler.platforms.runpod", "--test_input", json.dumps(job)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def logged_result(output: str) -> dict:
    """The SDK logs `Job result: {...}` (a Python repr) when a local job succeeds."""
    line = next(line for line in output.splitlines() if "Job result:" in line)
    import ast

    return ast.literal_eval(line.split("Job result:", 1)[1].strip())


def test_native_job_through_test_input(store, db_url, tmp_path, tiny):
    done = run_test_input(runpod_env(db_url, tmp_path, **tiny),
                      {"id": "rp-native-1", "input": {"caption": "calm piano", "audio_duration": 10, "batch_size": 2}})
    assert done.returncode == 0, done.stdout + done.stderr
    output = logged_result(done.stdout + done.stderr)["output"]
    row = store.get(output["job_id"])
    assert (row["status"], output["status"]) == ("succeeded", "succeeded")
    assert row["request"]["caption"] == "calm piano" and row["audio_seconds"] == 10
    assert len(output["result"]["audio_paths"]) == 2 and "error" not in output


def test_native_job_returns_the_audio_inline_when_asked(store, db_url, tmp_path, monkeypatch):
    """In-process (the SDK's local mode truncates long log lines): the handler's own output."""
    import asyncio
    import base64

    from handler.platforms.runpod import OUTPUT, PROGRESS, Runtime, events
    from tests.acceptance.test_drain import drain_settings

    runtime = Runtime(drain_settings(db_url, tmp_path, monkeypatch, FAKE_STAGE_SECONDS="1"))

    async def collect():
        job = {"id": "rp-b64", "input": {"caption": "x", "audio_duration": 10, "batch_size": 1, "return_audio_base64": True}}
        return [event async for event in events(job, runtime)]

    try:
        seen = asyncio.run(collect())
    finally:
        runtime.close()
    kinds = [kind for kind, _ in seen]
    assert kinds[-1] == OUTPUT and kinds.count(OUTPUT) == 1 and PROGRESS in kinds
    stages = [p["stage"] for kind, p in seen if kind == PROGRESS]
    assert "dit" in stages  # progress went out while the job ran
    output = seen[-1][1]
    key = store.get(output["job_id"])["result"]["audio_keys"][0]
    stored = (tmp_path / "objects" / key).read_bytes()
    assert base64.b64decode(output["audio_base64"]) == stored and output["audios_base64"] == [output["audio_base64"]]


def test_invalid_native_input_is_an_error_naming_the_field_and_stores_nothing(store, db_url, tmp_path):
    done = run_test_input(runpod_env(db_url, tmp_path), {"id": "rp-bad", "input": {"caption": "x", "audio_duration": "long"}})
    assert done.returncode == 1  # the SDK's local mode exits 1 on an `error`
    assert "audio_duration" in done.stdout + done.stderr
    assert store.stats()["counts"] == {}


def test_drain_job_through_test_input(store, db_url, tmp_path, tiny):
    ids = [submit(store, caption=str(i), batch_size=1, audio_duration=10) for i in range(3)]
    done = run_test_input(runpod_env(db_url, tmp_path, **tiny), {"id": "rp-drain", "input": {"mode": "drain", "time_budget_seconds": 60}})
    assert done.returncode == 0, done.stdout + done.stderr
    output = logged_result(done.stdout + done.stderr)["output"]
    assert output["claimed"] == 3 and output["outcomes"] == {"succeeded": 3} and output["stopped_because"] == "queue empty"
    assert {store.get(i)["status"] for i in ids} == {"succeeded"}


def test_a_worker_without_weights_reports_an_error_never_success(store, db_url, tmp_path):
    empty = tmp_path / "weights"
    empty.mkdir()
    env = runpod_env(db_url, tmp_path, ACESTEP_PIPELINE="pipeline.service:load_pipeline", ACESTEP_CHECKPOINT_DIR=str(empty))
    job_id = submit(store, caption="waits", batch_size=1)
    for job in ({"id": "rp-w1", "input": {"mode": "drain", "time_budget_seconds": 60}},
                {"id": "rp-w2", "input": {"caption": "x", "audio_duration": 10}}):
        done = run_test_input(env, job)
        out = done.stdout + done.stderr
        assert done.returncode == 1, out
        assert "could not be loaded" in out and str(empty) in out
    assert store.get(job_id)["status"] == "queued"  # nothing claimed, nothing spent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_both_modes_through_rp_serve_api(store, db_url, tmp_path, tiny):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "handler.platforms.runpod", "--rp_serve_api", "--rp_api_host", "127.0.0.1",
         "--rp_api_port", str(port)],
        cwd=ROOT, env=runpod_env(db_url, tmp_path, **tiny), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _up(base), timeout=60, interval=0.2)
        with httpx.Client(base_url=base, timeout=120) as http:
            native = http.post("/runsync", json={"input": {"caption": "served", "audio_duration": 10, "batch_size": 1}}).json()
            assert native["status"] == "COMPLETED", native
            assert store.get(native["output"]["job_id"])["status"] == "succeeded"
            queued = submit(store, caption="drained", batch_size=1, audio_duration=10)
            drained = http.post("/runsync", json={"input": {"mode": "drain", "time_budget_seconds": 30}}).json()
            assert drained["status"] == "COMPLETED" and drained["output"]["claimed"] == 1, drained
            assert store.get(queued)["status"] == "succeeded"
            refused = http.post("/runsync", json={"input": {"mode": "sideways"}}).json()
            assert refused["status"] == "FAILED" and "mode" in refused["error"], refused
    finally:
        server.terminate()
        server.wait(timeout=30)


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/docs", timeout=1).status_code < 500  # answered (a redirect to /docs/)
    except httpx.HTTPError:
        time.sleep(0.2)
        return False
