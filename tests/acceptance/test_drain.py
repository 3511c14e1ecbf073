"""Drain-and-return (the logic behind the RunPod and Modal adapters), without their SDKs."""

import threading
import time

from sqlalchemy.engine import make_url

from handler.drain import Drainer
from handler.settings import Settings
from tests.acceptance.worker_harness import submit, wait_for, worker_env
from tests.tcp_proxy import TcpProxy


def drain_settings(db_url, tmp_path, monkeypatch, **extra) -> Settings:
    for key, value in worker_env(db_url, tmp_path, **extra).items():
        if key.startswith(("ACESTEP_", "FAKE_")):
            monkeypatch.setenv(key, value)
    return Settings()


def test_drain_until_empty_then_again_warm(store, db_url, tmp_path, monkeypatch):
    ids = [submit(store, caption=str(i), batch_size=1) for i in range(3)]
    drainer = Drainer(drain_settings(db_url, tmp_path, monkeypatch))
    try:
        first = drainer.drain(time_budget_seconds=120)
        assert first["claimed"] == 3 and first["outcomes"] == {"succeeded": 3}
        assert first["stopped_because"] == "queue empty" and not first["setup_failed"]
        assert {store.get(i)["status"] for i in ids} == {"succeeded"}
        again = drainer.drain(time_budget_seconds=120)
        assert again["claimed"] == 0 and again["seconds"] < 5  # models stayed loaded
    finally:
        drainer.close()


def test_drain_stops_claiming_when_the_budget_is_spent_and_loses_nothing(store, db_url, tmp_path, monkeypatch):
    drainer = Drainer(drain_settings(db_url, tmp_path, monkeypatch, FAKE_STAGE_SECONDS="0.3"))
    try:
        # warm first: on a loaded machine starting the pipeline process alone can outlast a short budget
        assert drainer.drain(time_budget_seconds=120)["claimed"] == 0
        ids = [submit(store, caption=str(i), batch_size=1) for i in range(6)]
        summary = drainer.drain(time_budget_seconds=1.5)
    finally:
        drainer.close()
    assert summary["stopped_because"] == "time budget spent" and 1 <= summary["claimed"] < 6
    statuses = [store.get(i)["status"] for i in ids]
    assert statuses.count("succeeded") == summary["claimed"] and statuses.count("queued") == 6 - summary["claimed"]


def test_the_legacy_runpod_input_still_drains(store, db_url, tmp_path, monkeypatch):
    """{"time_budget_seconds": N} alone (the adapter's old input) is a drain, not a generation request."""
    import asyncio

    from handler.platforms.runpod import OUTPUT, Runtime, events

    runtime = Runtime(drain_settings(db_url, tmp_path, monkeypatch))
    job_id = submit(store, caption="runpod", batch_size=1)

    async def collect():
        return [event async for event in events({"id": "legacy", "input": {"time_budget_seconds": 60}}, runtime)]

    try:
        (kind, summary), = asyncio.run(collect())
    finally:
        runtime.close()
    assert kind == OUTPUT and summary["outcomes"] == {"succeeded": 1} and store.get(job_id)["status"] == "succeeded"


def test_a_drain_returns_within_its_budget_and_hands_the_running_job_back(store, db_url, tmp_path, monkeypatch):
    slow = submit(store, caption="slow", batch_size=1)
    drainer = Drainer(drain_settings(db_url, tmp_path, monkeypatch, FAKE_STAGE_SECONDS="3"))  # a 12 s job
    try:
        began = time.monotonic()
        summary = drainer.drain(time_budget_seconds=4)  # model load included
        spent = time.monotonic() - began
    finally:
        drainer.close()
    # within the budget, give or take the scheduling jitter of a loaded 2-core machine (4.19 s and 4.55 s
    # seen there; the release comes 0.8 s before the budget's end); without the release it takes 12 s and more
    assert spent < 5.0 and summary["stopped_because"] == "time budget spent" and summary["claimed"] == 1
    row = store.get(slow)
    assert (row["status"], row["attempt"]) == ("queued", 0)  # back in the queue, its attempt unspent


def test_a_database_outage_mid_drain_is_an_error_and_loses_nothing(store, db_url, tmp_path, monkeypatch):
    from handler.worker import job_run, worker

    monkeypatch.setattr(worker, "DB_OUTAGE_SECONDS", 2.0)
    monkeypatch.setattr(job_run, "OUTCOME_PATIENCE_SECONDS", 1.0)
    url = make_url(db_url)
    proxy = TcpProxy(url.host, url.port)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    ids = [submit(store, caption=str(i), batch_size=1) for i in range(3)]
    drainer = Drainer(drain_settings(proxied, tmp_path, monkeypatch, FAKE_STAGE_SECONDS="1.5"))
    try:
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(drainer.drain(time_budget_seconds=60)))
        thread.start()
        wait_for(lambda: store.get(ids[0])["stage"] == "dit", timeout=30)
        proxy.cut()
        thread.join(timeout=40)
        assert not thread.is_alive()
    finally:
        proxy.restore()
        drainer.close()
        proxy.close()
    assert outcome["stopped_because"] == "database unavailable" and "database" in outcome["error"], outcome
    rows = [store.get(i) for i in ids]
    assert {r["status"] for r in rows} <= {"queued", "running"}  # the first job's lease brings it back
    # Nothing lost: once the leases expire, another drain finishes every job.
    again = Drainer(drain_settings(db_url, tmp_path, monkeypatch))
    try:
        wait_for(lambda: again.drain(time_budget_seconds=30)["claimed"] >= 0
                 and all(store.get(i)["status"] == "succeeded" for i in ids), timeout=60, interval=0.5)
    finally:
        again.close()


def test_a_result_made_during_a_database_blip_is_kept_not_recomputed(store, db_url, tmp_path, monkeypatch):
    url = make_url(db_url)
    proxy = TcpProxy(url.host, url.port)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    job_id = submit(store, caption="blip", batch_size=1)
    # lease 30 s: the completion may wait that long for the database
    drainer = Drainer(drain_settings(proxied, tmp_path, monkeypatch, FAKE_STAGE_SECONDS="1", ACESTEP_LEASE_SECONDS="30"))
    try:
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(drainer.drain(time_budget_seconds=60)))
        thread.start()
        wait_for(lambda: store.get(job_id)["stage"] == "vae", timeout=30)
        proxy.cut()
        time.sleep(6)  # longer than the few seconds a completion used to wait
        proxy.restore()
        thread.join(timeout=60)
    finally:
        proxy.restore()
        drainer.close()
        proxy.close()
    row = store.get(job_id)
    assert (row["status"], row["attempt"]) == ("succeeded", 1), outcome  # kept: one attempt, not recomputed
    assert outcome["outcomes"] == {"succeeded": 1}
