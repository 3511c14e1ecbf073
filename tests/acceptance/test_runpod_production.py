"""Our RunPod handler in the SDK's production mode, against a stand-in of RunPod's worker API on
127.0.0.1: job take, progress, result, `error`, SIGTERM and the stop signal."""

import signal
import subprocess
import sys

import pytest

from tests.acceptance.runpod_standin import RunpodStandIn
from tests.acceptance.worker_harness import ROOT, submit, wait_for, wait_status, worker_env

pytest.importorskip("runpod", reason="the runpod SDK (the `runpod` extra) is not installed")


@pytest.fixture
def standin():
    api = RunpodStandIn()
    yield api
    api.close()


def start(standin: RunpodStandIn, db_url, tmp_path, **extra) -> subprocess.Popen:
    env = worker_env(db_url, tmp_path, **extra) | standin.env() | {"PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "handler.platforms.runpod"], cwd=ROOT, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    return output


def job_of(store, caption: str) -> list[dict]:
    """The job rows whose request has this caption (the tests give each RunPod job its id as caption)."""
    rows = (store.get(row["id"]) for row in store.list_jobs("", limit=50))
    return [row for row in rows if row["request"].get("caption") == caption]


def test_native_job_progress_result_and_a_retried_delivery(store, db_url, tmp_path, standin):
    proc = start(standin, db_url, tmp_path, FAKE_STAGE_SECONDS="0.6")
    try:
        standin.add_job("rp-1", {"caption": "rp-1", "audio_duration": 10, "batch_size": 1})
        final = wait_for(lambda: standin.final("rp-1"), timeout=120)
        output = final["output"]
        assert "error" not in final and output["status"] == "succeeded", final
        assert store.get(output["job_id"])["status"] == "succeeded"
        progress = standin.progress("rp-1")
        assert {p["job_id"] for p in progress} == {output["job_id"]}
        assert "dit" in {p["stage"] for p in progress}  # progress went out while it ran
        standin.add_job("rp-1", {"caption": "rp-1", "audio_duration": 10, "batch_size": 1})  # RunPod retries the job
        wait_for(lambda: len([p for p in standin.posts["rp-1"] if p.get("status") != "IN_PROGRESS"]) == 2, timeout=60)
        again = standin.final("rp-1")["output"]
        assert again["job_id"] == output["job_id"] and store.get(output["job_id"])["attempt"] == 1  # not run twice
    finally:
        out = stop(proc)
    assert len(job_of(store, "rp-1")) == 1, out


def test_bad_input_and_a_failing_job_come_back_as_errors(store, db_url, tmp_path, standin):
    proc = start(standin, db_url, tmp_path, ACESTEP_PIPELINE="tests.fakes.pipelines:raises")
    try:
        standin.add_job("rp-bad", {"caption": "x", "inference_steps": 0})
        standin.add_job("rp-fails", {"caption": "rp-fails", "audio_duration": 10, "batch_size": 1})
        bad = wait_for(lambda: standin.final("rp-bad"), timeout=60)
        failed = wait_for(lambda: standin.final("rp-fails"), timeout=120)
    finally:
        out = stop(proc)
    assert "inference_steps" in bad["error"] and "output" not in bad, out
    assert failed["error"].startswith(f"job {failed['output']['job_id']} failed") and failed["output"]["status"] == "failed"


def test_a_worker_that_cannot_load_its_models_errors_and_asks_to_be_replaced(store, db_url, tmp_path, standin):
    queued = submit(store, caption="waits", batch_size=1)
    proc = start(standin, db_url, tmp_path, ACESTEP_PIPELINE="tests.fakes.pipelines:broken_setup")
    try:
        standin.add_job("rp-setup", {"mode": "drain", "time_budget_seconds": 60})
        final = wait_for(lambda: standin.final("rp-setup"), timeout=60)
    finally:
        out = stop(proc)
    assert "could not be loaded" in final["error"] and final["stopPod"] is True, out
    assert store.get(queued)["status"] == "queued"


def test_sigterm_mid_drain_soft_stops_and_claims_nothing_more(store, db_url, tmp_path, standin):
    ids = [submit(store, caption=str(i), batch_size=1) for i in range(4)]
    proc = start(standin, db_url, tmp_path, FAKE_STAGE_SECONDS="1", ACESTEP_SHUTDOWN_GRACE_SECONDS="0")
    standin.add_job("rp-drain", {"mode": "drain", "time_budget_seconds": 300})
    wait_for(lambda: any(store.get(i)["stage"] == "dit" for i in ids), timeout=60)
    proc.send_signal(signal.SIGTERM)
    final = wait_for(lambda: standin.final("rp-drain"), timeout=30)
    try:
        out, _ = proc.communicate(timeout=60)  # the one SIGTERM ends the worker
    except subprocess.TimeoutExpired:
        out = stop(proc)
    assert proc.returncode == 0, out
    summary = final["output"]
    assert summary["claimed"] == 1 and summary["stopped_because"] == "stopped", final
    rows = [store.get(i) for i in ids]
    assert [r["status"] for r in rows] == ["queued"] * 4 and {r["attempt"] for r in rows} == {0}  # handed back, unspent


def test_the_stop_signal_cancels_the_native_job_and_the_worker_goes_on(store, db_url, tmp_path, standin):
    proc = start(standin, db_url, tmp_path, FAKE_STAGE_SECONDS="2")
    try:
        standin.add_job("rp-stop", {"caption": "rp-stop", "audio_duration": 10, "batch_size": 1})
        row = wait_for(lambda: (rows := job_of(store, "rp-stop")) and rows[0]["status"] == "running" and rows[0], timeout=60)
        standin.stop("rp-stop")
        assert wait_status(store, row["id"], "canceled", "succeeded", timeout=20)["status"] == "canceled"
        standin.add_job("rp-next", {"caption": "rp-next", "audio_duration": 10, "batch_size": 1})
        try:
            nxt = wait_for(lambda: standin.final("rp-next"), timeout=60)
        except AssertionError:
            nxt = None
    finally:
        out = stop(proc)
    assert nxt is not None and nxt["output"]["status"] == "succeeded", out
    assert standin.final("rp-stop") is None  # a stopped job posts no result


def test_streaming_mode_sends_progress_and_the_output_as_chunks(store, db_url, tmp_path, standin):
    proc = start(standin, db_url, tmp_path, FAKE_STAGE_SECONDS="0.6", ACESTEP_RUNPOD_STREAM="1")
    try:
        standin.add_job("rp-stream", {"caption": "rp-stream", "audio_duration": 10, "batch_size": 1})
        final = wait_for(lambda: standin.final("rp-stream"), timeout=120)
    finally:
        out = stop(proc)
    chunks = [post["output"] for post in standin.streams["rp-stream"]]
    assert chunks[-1]["status"] == "succeeded" and chunks[-1]["result"]["audio_paths"], out
    assert "dit" in {c.get("stage") for c in chunks[:-1]}
    assert final["output"] == chunks  # return_aggregate_stream: /runsync and /status see every chunk
