"""Drain-and-return (the logic behind the RunPod and Modal adapters), without their SDKs."""

import importlib.util
import sys
import types

from handler.drain import Drainer
from handler.settings import Settings
from tests.acceptance.worker_harness import ROOT, submit, worker_env


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


def test_runpod_handler_drains_with_the_requested_budget(store, db_url, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "runpod", types.SimpleNamespace(serverless=None))  # the SDK is not installed here
    spec = importlib.util.spec_from_file_location("rp_handler", ROOT / "infra" / "runpod" / "rp_handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    drain_settings(db_url, tmp_path, monkeypatch)
    job_id = submit(store, caption="runpod", batch_size=1)
    try:
        summary = module.handler({"input": {"time_budget_seconds": 60}})
    finally:
        module._drainer.close()
    assert summary["outcomes"] == {"succeeded": 1} and store.get(job_id)["status"] == "succeeded"
