"""The worker as a real process: outcomes of good and bad pipelines, kills, signals, reconnects."""

import os
import signal
import socket
from pathlib import Path

import psycopg
import pytest

from tests.acceptance.worker_harness import kill_group, start_worker, submit, wait_for, wait_status, worker_env


def objects_under(tmp_path, job_id: str) -> list[str]:
    root = tmp_path / "objects"
    return sorted(str(p.relative_to(root)) for p in (root / "jobs" / job_id).rglob("*") if p.is_file())


def test_once_runs_the_queue_and_exits(store, db_url, tmp_path):
    ids = [submit(store, caption="a"), submit(store, caption="b", audio_format="wav", batch_size=1)]
    worker = start_worker(worker_env(db_url, tmp_path), "--once")
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, output
    first, second = (store.get(i) for i in ids)
    assert first["status"] == second["status"] == "succeeded"
    assert first["result"]["audio_keys"] == [f"jobs/{ids[0]}/attempt-1/output-{i}.mp3" for i in range(2)]
    assert first["result"]["seed_value"] == "7,8" and first["result"]["generation_info"].startswith("Steps: 8")
    assert objects_under(tmp_path, ids[1]) == [f"jobs/{ids[1]}/attempt-1/output-0.wav"]
    assert store.workers() == []  # deregistered on exit


def test_bad_pipelines_fail_their_job_and_the_worker_goes_on(store, db_url, tmp_path):
    raised = submit(store, caption="fake:raise")
    exited = submit(store, caption="fake:exit")
    hung = submit(store, caption="fake:hang")
    fine = submit(store, caption="fine")
    env = worker_env(db_url, tmp_path, ACESTEP_JOB_TIMEOUT_SECONDS="3")
    worker = start_worker(env, "--exit-when-idle", "1")
    try:
        for job_id in (raised, exited, hung, fine):
            wait_status(store, job_id, "succeeded", "failed", timeout=90)
    finally:
        output, _ = worker.communicate(timeout=60)
    assert store.get(raised)["error"] == "the pipeline failed: ValueError: the DiT exploded"
    crashed = store.get(exited)
    assert crashed["error"] == "the pipeline process died (exit code 3)" and crashed["attempt"] == 3  # retried, then final
    assert store.get(hung)["error"] == "the pipeline ran past its deadline and was stopped"
    assert store.get(fine)["status"] == "succeeded"
    assert worker.returncode == 0, output


def test_setup_failure_is_reported_and_exits_nonzero(store, db_url, tmp_path):
    worker = start_worker(worker_env(db_url, tmp_path, "broken_setup"), "--once")
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 1
    assert "pipeline setup failed" in output and "no checkpoints in /nowhere" in output
    assert [w["state"] for w in store.workers()] == ["SETUP_FAILED"]


def test_oom_retries_with_a_smaller_batch(store, db_url, tmp_path):
    job_id = submit(store, caption="fake:oom", batch_size=4)
    worker = start_worker(worker_env(db_url, tmp_path), "--once")
    worker.communicate(timeout=120)
    row = store.get(job_id)
    assert row["status"] == "succeeded" and len(row["result"]["audio_keys"]) == 1


def test_sigkill_mid_job_another_worker_completes_it_with_attempt_two(store, db_url, tmp_path):
    job_id = submit(store, caption="slow")
    first = start_worker(worker_env(db_url, tmp_path, FAKE_STAGE_SECONDS="2"))
    wait_for(lambda: store.get(job_id)["stage"] == "dit", timeout=60)
    kill_group(first)
    first.wait(timeout=10)
    second = start_worker(worker_env(db_url, tmp_path, FAKE_STAGE_SECONDS="0.05"), "--exit-when-idle", "6")
    row = wait_status(store, job_id, "succeeded", timeout=60)
    second.communicate(timeout=60)
    assert row["attempt"] == 2
    assert row["result"]["audio_keys"] == [f"jobs/{job_id}/attempt-2/output-{i}.mp3" for i in range(2)]
    assert not any("attempt-1" in key for key in objects_under(tmp_path, job_id))
    assert [e["attempt"] for e in row["errors"]] == [1]


@pytest.mark.parametrize("grace,expected", [("30", "succeeded"), ("0", "queued")])
def test_sigterm_mid_job_finishes_or_returns_it_to_the_queue(store, db_url, tmp_path, grace, expected):
    job_id = submit(store, caption="slow")
    env = worker_env(db_url, tmp_path, FAKE_STAGE_SECONDS="1", ACESTEP_SHUTDOWN_GRACE_SECONDS=grace)
    worker = start_worker(env)
    wait_for(lambda: store.get(job_id)["stage"] == "dit", timeout=60)
    worker.send_signal(signal.SIGTERM)
    output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, output
    row = store.get(job_id)
    assert row["status"] == expected
    if expected == "queued":
        assert row["attempt"] == 0  # a soft shutdown spends no attempt
        assert store.queue_position(job_id) == 1


def test_terminated_database_connections_mid_job_reconnect(store, db_url, tmp_path):
    job_id = submit(store, caption="slow")
    worker = start_worker(worker_env(db_url, tmp_path, FAKE_STAGE_SECONDS="1"), "--exit-when-idle", "2")
    wait_for(lambda: store.get(job_id)["stage"] == "dit", timeout=60)
    with psycopg.connect(db_url, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'acestep-serverless' AND pid <> pg_backend_pid()"
        ).fetchone()[0]
    assert killed >= 1
    row = wait_status(store, job_id, "succeeded", "failed", timeout=60)
    output, _ = worker.communicate(timeout=60)
    assert row["status"] == "succeeded" and row["attempt"] == 1, output


def test_cancel_is_honoured_between_stages(store, db_url, tmp_path):
    job_id = submit(store, caption="slow")
    worker = start_worker(worker_env(db_url, tmp_path, FAKE_STAGE_SECONDS="1"), "--exit-when-idle", "1")
    wait_for(lambda: store.get(job_id)["stage"] == "lm", timeout=60)
    store.cancel(job_id)
    row = wait_status(store, job_id, "canceled", "succeeded", timeout=60)
    worker.communicate(timeout=60)
    assert row["status"] == "canceled" and row["result"] is None


def test_concurrency_and_max_jobs(store, db_url, tmp_path):
    ids = [submit(store, caption=str(i), batch_size=1) for i in range(5)]
    worker = start_worker(worker_env(db_url, tmp_path, FAKE_STAGE_SECONDS="0.5"), "--concurrency", "2", "--max-jobs", "3")
    wait_for(lambda: sum(store.get(i)["status"] == "running" for i in ids) == 2, timeout=60)
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, output
    assert sorted(store.get(i)["status"] for i in ids) == ["queued", "queued", "succeeded", "succeeded", "succeeded"]


def test_a_second_signal_stops_at_once_and_returns_the_job(store, db_url, tmp_path):
    job_id = submit(store, caption="slow")
    env = worker_env(db_url, tmp_path, FAKE_STAGE_SECONDS="5", ACESTEP_SHUTDOWN_GRACE_SECONDS="120")
    worker = start_worker(env)
    wait_for(lambda: store.get(job_id)["stage"] == "lm", timeout=60)
    worker.send_signal(signal.SIGTERM)
    worker.send_signal(signal.SIGINT)
    output, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0, output
    row = store.get(job_id)
    assert (row["status"], row["attempt"]) == ("queued", 0)


def test_compatible_jobs_share_a_batch_and_complete_each_on_its_own(store, db_url, tmp_path):
    same = [submit(store, caption=f"same {i}", audio_duration=60, batch_size=1) for i in range(3)]
    other_steps = submit(store, caption="other", audio_duration=60, inference_steps=16, batch_size=1)
    env = worker_env(db_url, tmp_path, "batching", ACESTEP_WORKER_BATCH_JOBS="4")
    worker = start_worker(env, "--once")
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, output
    rows = [store.get(i) for i in same]
    assert all(r["status"] == "succeeded" and r["result"]["generation_info"].endswith(", one batch of 3 jobs") for r in rows)
    assert len({r["result"]["audio_keys"][0] for r in rows}) == 3  # each job its own files
    lone = store.get(other_steps)
    assert lone["status"] == "succeeded" and lone["result"]["generation_info"].startswith("Steps: 16, Scale: 7.0, Seeds: ")


def test_a_draining_worker_that_cannot_reach_the_database_exits_non_zero(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = start_worker(worker_env(f"postgresql://postgres@127.0.0.1:{port}/none", tmp_path), "--once")
    output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 2, output


def pipeline_children(pid: int) -> set[int]:
    """The worker's pipeline processes (multiprocessing's own resource tracker left out)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.add(int(child))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_pipeline_child_ends_when_its_worker_is_killed_mid_load(store, db_url, tmp_path):
    marker = tmp_path / "loading"
    worker = start_worker(worker_env(db_url, tmp_path, ACESTEP_PIPELINE="tests.fakes.pipelines:slow_setup",
                                     FAKE_SETUP_MARKER=str(marker)))
    try:
        wait_for(marker.exists, timeout=30)  # the child is loading its models
        child = next(iter(pipeline_children(worker.pid)))
        os.kill(worker.pid, signal.SIGKILL)  # the worker alone, as a container runtime's kill of PID 1 may
        worker.wait(timeout=10)
        wait_for(lambda: not alive(child), timeout=5)
    finally:
        kill_group(worker)
