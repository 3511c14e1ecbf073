"""The Modal app's own code against a real job store, without Modal running: the kicker's view of the
fleet and its decision, the GPU class's drain (a setup failure stops it and holds the kicker off),
and the scheduled maintenance round (rescue, retention, every due webhook)."""

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from handler.platforms.scaling import Fleet

from db import NewJob, WorkerState
from handler.http.services import build_services
from handler.settings import Settings
from tests.acceptance.worker_harness import submit, worker_env
from tests.integration.test_webhooks import Receiver

pytest.importorskip("modal")  # the `modal` extra

from tests.unit.test_modal_app import internal, load_app  # noqa: E402


@pytest.fixture(scope="module")
def modal_app():
    module, _ = load_app()
    return module


@pytest.fixture
def env(db_url, tmp_path, monkeypatch):
    """The ACESTEP_* variables the Modal secret would hold, for a fake pipeline and local storage."""
    values = worker_env(db_url, tmp_path)
    for key, value in values.items():
        if key.startswith(("ACESTEP_", "FAKE_")):
            monkeypatch.setenv(key, value)
    return values


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def expired_job(store) -> str:
    """A running job whose worker stopped heartbeating long enough ago for its lease to have run out."""
    then = utcnow() - timedelta(seconds=store.lease_seconds + 30)
    job_id = store.submit(NewJob(request={}), now=then).id
    assert [job.id for job in store.claim("gone", 1, now=then)] == [job_id]
    return str(job_id)


# --- the kicker --------------------------------------------------------------------------------------


def test_fleet_of_an_empty_store_needs_no_drain(modal_app, store):
    fleet = modal_app.read_fleet(store)
    assert fleet == Fleet(queued=0, expired_leases=0, draining=0, pending=0, setup_failed_at=None)
    assert modal_app.kick_decision(fleet).spawn == 0


def test_fleet_counts_queued_jobs_expired_leases_and_live_drains(modal_app, store):
    for i in range(3):
        submit(store, caption=str(i), batch_size=1)
    expired_job(store)
    store.register_worker("live", host="h", capacity=1, models=["m"], state=WorkerState.BUSY)
    store.register_worker("stale", host="h", capacity=1, models=["m"], state=WorkerState.READY,
                          now=utcnow() - timedelta(seconds=modal_app.WORKER_STALE_SECONDS + 5))
    fleet = modal_app.read_fleet(store)
    assert (fleet.queued, fleet.expired_leases, fleet.draining, fleet.pending) == (3, 1, 1, 0)
    assert modal_app.kick_decision(fleet, cap=2).spawn == 1  # 4 jobs of work, 1 drain under way, cap 2
    # Modal counts more drains than have registered (containers still starting): the larger count wins
    assert modal_app.read_fleet(store, running_inputs=2).draining == 2
    assert modal_app.kick_decision(modal_app.read_fleet(store, running_inputs=1, backlog=1), cap=2).spawn == 0


def test_a_recent_setup_failure_holds_the_kicker_off_and_an_old_one_does_not(modal_app, store):
    submit(store, caption="waits", batch_size=1)
    store.register_worker("failed-long-ago", host="h", capacity=1, models=["m"], state=WorkerState.SETUP_FAILED,
                          now=utcnow() - timedelta(seconds=modal_app.SETUP_BACKOFF_SECONDS + 60))
    assert modal_app.kick_decision(modal_app.read_fleet(store)).spawn == 1
    store.register_worker("failed-now", host="h", capacity=1, models=["m"], state=WorkerState.SETUP_FAILED)
    fleet = modal_app.read_fleet(store)
    assert fleet.setup_failed_at is not None and modal_app.kick_decision(fleet).spawn == 0


class FakeDrainMethod:
    def __init__(self, running: int = 0, backlog: int = 0):
        self.spawned = 0
        self._stats = SimpleNamespace(num_running_inputs=running, backlog=backlog, num_total_runners=running,
                                      input_headroom=0)

    def spawn(self):
        self.spawned += 1

    def get_current_stats(self):
        return self._stats


def test_the_scheduled_kick_spawns_up_to_the_cap(modal_app, store, env, monkeypatch):
    method = FakeDrainMethod(running=0, backlog=0)
    monkeypatch.setattr(modal_app, "GpuWorker", lambda: SimpleNamespace(drain=method))
    for i in range(5):
        submit(store, caption=str(i), batch_size=1)
    result = modal_app.kick.local()
    assert result["spawned"] == method.spawned == modal_app.GPU_MAX_CONTAINERS
    method.spawned = 0
    method._stats = SimpleNamespace(num_running_inputs=1, backlog=1)  # the two from before are under way
    assert modal_app.kick.local()["spawned"] == method.spawned == 0


def test_the_scheduled_kick_goes_on_when_modal_has_no_stats(modal_app, store, env, monkeypatch):
    class NoStats(FakeDrainMethod):
        def get_current_stats(self):
            raise ConnectionError("Modal is away")

    method = NoStats()
    monkeypatch.setattr(modal_app, "GpuWorker", lambda: SimpleNamespace(drain=method))
    submit(store, caption="one", batch_size=1)
    assert modal_app.kick.local()["spawned"] == method.spawned == 1


# --- the GPU class -------------------------------------------------------------------------------------


def gpu_worker(modal_app):
    """An instance of the GPU class's own Python class (what a container runs), and its methods' bodies."""
    user_cls = internal(modal_app.GpuWorker)._user_cls
    raw = {name: internal(getattr(user_cls, name)).raw_f for name in ("load", "drain", "unload")}
    return user_cls.__new__(user_cls), raw


def test_the_gpu_class_drains_the_queue(modal_app, store, env):
    ids = [submit(store, caption=str(i), batch_size=1) for i in range(2)]
    worker, raw = gpu_worker(modal_app)
    raw["load"](worker)
    try:
        summary = raw["drain"](worker)
    finally:
        raw["unload"](worker)
    assert summary["claimed"] == 2 and summary["outcomes"] == {"succeeded": 2} and not summary["setup_failed"]
    assert {store.get(i)["status"] for i in ids} == {"succeeded"}
    assert store.workers() == []  # a finished drain leaves no worker row behind


def test_a_gpu_container_that_cannot_load_the_models_fails_stops_and_holds_the_kicker_off(
        modal_app, store, env, monkeypatch):
    import modal.experimental

    stopped = []
    monkeypatch.setattr(modal.experimental, "stop_fetching_inputs", lambda: stopped.append(True))
    monkeypatch.setenv("ACESTEP_PIPELINE", "tests.fakes.pipelines:broken_setup")
    job_id = submit(store, caption="waits", batch_size=1)
    worker, raw = gpu_worker(modal_app)
    raw["load"](worker)
    try:
        with pytest.raises(RuntimeError, match="could not load the models from the volume acestep-checkpoints"):
            raw["drain"](worker)
    finally:
        raw["unload"](worker)
    assert stopped == [True]
    assert store.get(job_id)["status"] == "queued"  # nothing claimed, nothing lost
    assert [w["state"] for w in store.workers()] == ["SETUP_FAILED"]
    fleet = modal_app.read_fleet(store)
    assert fleet.queued == 1 and modal_app.kick_decision(fleet).spawn == 0


# --- the maintenance round -------------------------------------------------------------------------


@pytest.fixture
def services(env, db_url):
    built = build_services(Settings(retention_seconds=60, webhook_retry_base_seconds=0.2,
                                    webhook_allow_networks="127.0.0.0/8,::1/128"), db_url)
    yield built
    built.webhooks.close()
    built.store.engine.dispose()


def finished(store, request: dict, *, ago: float) -> str:
    when = utcnow() - timedelta(seconds=ago)
    job_id = store.submit(NewJob(request=request), now=when).id
    job = store.claim("w", 1, now=when)[0]
    store.complete(job, "w", {"audio_keys": []}, now=when)
    return str(job_id)


def test_a_maintenance_round_rescues_prunes_and_delivers_every_due_webhook(modal_app, services):
    store = services.store
    receiver = Receiver()
    try:
        rescued = expired_job(store)
        old = finished(store, {}, ago=3600)
        hooked = [finished(store, {"webhook_url": receiver.url}, ago=5) for _ in range(25)]  # more than one batch
        summary = modal_app.maintenance_round(services)
    finally:
        receiver.close()
    assert (summary.rescued, summary.pruned, summary.webhooks_sent, summary.failed) == (1, 1, 25, {})
    assert store.get(rescued)["status"] == "queued"
    assert len(receiver.received) == 25
    assert {store.get(job_id)["status"] for job_id in hooked} == {"succeeded"}  # within retention: kept
    with pytest.raises(Exception):
        store.get(old)


def test_the_scheduled_maintenance_reports_a_failed_task(modal_app, env, monkeypatch):
    monkeypatch.setenv("ACESTEP_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")  # nothing listens there
    with pytest.raises(RuntimeError, match="maintenance tasks failed"):
        modal_app.maintenance.local()


def test_the_scheduled_maintenance_returns_its_round(modal_app, store, env):
    expired_job(store)
    assert modal_app.maintenance.local() == {"rescued": 1, "pruned": 0, "webhooks_sent": 0, "failed": {}}
