"""Routing by model (issue 18): a job names its DiT (`model`) and the LM it needs (`lm_model`); a
worker claims only the jobs whose models it serves; submits for models nobody serves are refused;
queue_position and the ETA count only the jobs that compete for the same workers."""

import random
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from db import JobStatus, NewJob, WorkerState
from handler.http.app import create_app
from handler.http.cost_model import Work
from handler.http.eta import QueueEstimator, competition
from handler.http.inputs import AudioInputs
from handler.http.routes_jobs import new_job
from handler.http.services import build_services
from handler.settings import Settings
from handler.storage import LocalStorage
from handler.worker.worker import Worker, WorkerOptions, claim_filter, configured_models
from pipeline.contract import GenerationRequest, PipelineOptions
from tests.fakes.in_process import InProcessPipeline
from tests.fakes.pipelines import Fake

TURBO, BASE, SFT, XL = "acestep-v15-turbo", "acestep-v15-base", "acestep-v15-sft", "acestep-v15-xl-turbo"
LM, LM_SMALL = "acestep-5Hz-lm-1.7B", "acestep-5Hz-lm-0.6B"
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def serving(checkpoint_dir=None, options: PipelineOptions = PipelineOptions()):
    """A fake pipeline that reports what it serves, as the real one does: its DiTs, then its LMs."""
    fake = Fake("ok")
    fake.models = [options.dit_model, *options.dit_models, *options.lm_models]
    return fake


def job(model: str, lm_model: str = "", priority: int = 0) -> NewJob:
    return NewJob(request={}, model=model, lm_model=lm_model, priority=priority, audio_seconds=30.0)


# --- the claim statement ---------------------------------------------------------------------


def test_two_workers_on_one_queue_each_claim_only_their_jobs(store):
    ids = {}
    for i, (model, lm) in enumerate([(TURBO, ""), (BASE, ""), (TURBO, "*"), (BASE, LM), (TURBO, LM_SMALL), ("", ""),
                                     (BASE, "*"), (TURBO, "")]):
        ids[i] = store.submit(job(model, lm)).id
    turbo_no_lm = {j.id for j in store.claim("turbo-worker", 10, dits=[TURBO], lms=[])}
    assert turbo_no_lm == {ids[0], ids[5], ids[7]}  # its DiT (or any DiT), no LM needed
    base_with_lm = {j.id for j in store.claim("base-worker", 10, dits=[BASE], lms=[LM])}
    assert base_with_lm == {ids[1], ids[3], ids[6]}  # "*" is any LM; LM names must match
    assert store.claim("turbo-worker", 10, dits=[TURBO], lms=[]) == []
    left = {j.id for j in store.claim("turbo-lm-worker", 10, dits=[TURBO, SFT], lms=[LM_SMALL])}
    assert left == {ids[2], ids[4]}
    assert {store.get(i)["worker_id"] for i in (ids[1], ids[3], ids[6])} == {"base-worker"}


def test_a_thinking_job_is_not_claimed_by_a_worker_without_an_lm(store):
    settings = Settings(_env_file=None)
    thinking = store.submit(new_job(GenerationRequest(caption="x", thinking=True), AudioInputs(), settings)).id
    assert store.get(thinking)["lm_model"] == "*"
    assert store.claim("no-lm", 5, dits=[TURBO], lms=[]) == []
    assert store.claim_job("no-lm", thinking, dits=[TURBO], lms=[]) is None
    assert [j.id for j in store.claim("with-lm", 5, dits=[TURBO], lms=[LM])] == [thinking]


def test_batch_mates_and_a_named_job_are_routed_too(store):
    for model in (TURBO, BASE, TURBO):
        store.submit(NewJob(request={"batch_key": "k"}, model=model))
    head = store.claim("w", 1, dits=[TURBO], lms=[])
    mates = store.claim_batch("w", "k", 5, dits=[TURBO], lms=[])
    assert [j.model for j in head + mates] == [TURBO, TURBO]
    base = store.submit(job(BASE)).id
    assert store.claim_job("w", base, dits=[TURBO], lms=[]) is None
    assert store.claim_job("b", base, dits=[BASE], lms=[]).id == base


def test_what_a_job_needs_is_decided_from_its_request():
    settings = Settings(_env_file=None)
    need = {
        (): "", ("thinking",): "*", ("sample_mode",): "*", ("use_format",): "*", ("analysis_only",): "*",
    }
    for flags, expected in need.items():
        row = new_job(GenerationRequest(caption="x", **{f: True for f in flags}), AudioInputs(), settings)
        assert (row.model, row.lm_model) == (TURBO, expected), flags
    assert new_job(GenerationRequest(sample_query="a song"), AudioInputs(), settings).lm_model == "*"
    assert new_job(GenerationRequest(lm_model_path=LM_SMALL), AudioInputs(), settings).lm_model == LM_SMALL
    pinned = Settings(_env_file=None, lm_model=LM)
    assert new_job(GenerationRequest(thinking=True), AudioInputs(), pinned).lm_model == LM
    task = new_job(GenerationRequest(), AudioInputs(), settings, lm_task={"task": "format"})
    assert task.lm_model == "*"


# --- workers ---------------------------------------------------------------------------------


def test_a_worker_serves_its_configured_dits_and_lms(tmp_path):
    settings = Settings(_env_file=None, dit_models=f"{BASE},{SFT}", lm_models=f"{LM_SMALL},{LM}", lm_model=LM)
    assert configured_models(settings) == (TURBO, BASE, SFT, LM_SMALL, LM)
    for name in (LM_SMALL, "acestep-v15-turbo", "vae"):
        (tmp_path / name).mkdir()
    found = Settings(_env_file=None, checkpoint_dir=tmp_path)  # ACESTEP_LM_MODELS empty: every LM folder there
    assert configured_models(found) == (TURBO, LM_SMALL)
    assert claim_filter([TURBO, BASE, LM]) == ([TURBO, BASE], [LM])
    assert claim_filter([]) == (None, None)  # declares nothing: takes any job


def test_in_process_workers_claim_only_the_jobs_of_their_models(store, tmp_path, db_url):
    storage = LocalStorage(tmp_path / "objects", secret=b"k" * 32)
    settings = Settings(_env_file=None, dit_models=BASE)
    ids = {name: store.submit(new_job(GenerationRequest(caption=name, **fields), AudioInputs(), settings)).id
           for name, fields in [("turbo", {}), ("base", {"model": BASE}), ("turbo-thinking", {"thinking": True})]}

    def run_worker(options: PipelineOptions, model_names: tuple[str, ...]) -> tuple[Worker, list]:
        opts = WorkerOptions(pipeline="unused", once=True, heartbeat_seconds=0.1, poll_seconds=0.1,
                             model_names=model_names)
        w = Worker(store, storage, db_url, opts,
                   make_process=lambda: InProcessPipeline("tests.integration.test_model_routing:serving", options))
        registered = []
        real = store.register_worker
        store.register_worker = lambda worker_id, **kw: registered.append(kw["models"]) or real(worker_id, **kw)
        try:
            assert w.run() == 0
        finally:
            store.register_worker = real
        return w, registered

    turbo, registered = run_worker(PipelineOptions(dit_model=TURBO), (TURBO, LM))
    assert registered == [[TURBO, LM], [TURBO]]  # configured before the load, then what it loaded
    assert turbo.outcomes == {JobStatus.SUCCEEDED: 1}
    assert store.get(ids["turbo"])["status"] == JobStatus.SUCCEEDED
    assert {store.get(ids[n])["status"] for n in ("base", "turbo-thinking")} == {JobStatus.QUEUED}
    base, _ = run_worker(PipelineOptions(dit_model=BASE), (BASE,))
    assert base.outcomes == {JobStatus.SUCCEEDED: 1} and store.get(ids["base"])["status"] == JobStatus.SUCCEEDED
    with_lm, _ = run_worker(PipelineOptions(dit_model=TURBO, lm_models=(LM,)), (TURBO, LM))
    assert with_lm.outcomes == {JobStatus.SUCCEEDED: 1}
    assert store.get(ids["turbo-thinking"])["status"] == JobStatus.SUCCEEDED


# --- submit ----------------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path, db_url):
    def make(**overrides):
        settings = Settings(database_url=db_url, data_dir=tmp_path / "data", **overrides)
        svc = build_services(settings, db_url)
        return svc, TestClient(create_app(svc))

    return make


def job_count(svc) -> int:
    with svc.store.engine.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM jobs")).scalar()


def refusal(response) -> tuple[int, str, str]:
    (problem,) = response.json()["detail"]
    return response.status_code, problem["field"], problem["message"]


def test_a_job_for_a_model_nobody_serves_is_refused_and_nothing_is_stored(api):
    svc, client = api()
    status, field, message = refusal(client.post("/v1/music/generate", json={"model": XL}))
    assert (status, field) == (422, "model") and XL in message and TURBO in message
    status, field, _ = refusal(client.post("/v1/music/generate", json={"task_type": "lego", "src_audio_path": "x.wav"}))
    assert (status, field) == (422, "task_type")  # a base task without a model: the base DiT is not served
    svc.store.register_worker("gpu-1", host="h", capacity=1, models=[TURBO], state=WorkerState.READY)
    status, field, message = refusal(client.post("/v1/music/generate", json={"thinking": True}))
    assert (status, field) == (422, "lm_model_path") and "needs a 5 Hz LM" in message
    status, field, _ = refusal(client.post("/v1/music/generate", json={"lm_model_path": LM_SMALL}))
    assert (status, field) == (422, "lm_model_path")
    assert job_count(svc) == 0


def test_a_model_a_registered_worker_lists_is_accepted_even_when_not_configured(api):
    svc, client = api()
    svc.store.register_worker("gpu-xl", host="h", capacity=1, models=[XL, LM], state=WorkerState.READY,
                              now=T0)  # long dead: its row still says what the fleet runs
    response = client.post("/v1/music/generate", json={"model": XL, "thinking": True})
    assert response.status_code == 200, response.text
    row = svc.store.get(response.json()["job_id"])
    assert (row["model"], row["lm_model"], row["status"]) == (XL, "*", JobStatus.QUEUED)


def test_configured_models_are_accepted_with_no_live_worker(api):
    svc, client = api(dit_models=BASE, lm_models=LM_SMALL)
    assert svc.store.workers() == []
    for body, stored in [({"model": BASE}, (BASE, "")), ({"lm_model_path": LM_SMALL}, (TURBO, LM_SMALL)),
                         ({"thinking": True}, (TURBO, "*"))]:
        response = client.post("/v1/music/generate", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "queued"
        row = svc.store.get(response.json()["job_id"])
        assert (row["model"], row["lm_model"]) == stored
    status, field, _ = refusal(client.post("/v1/music/generate", json={"lm_model_path": LM}))
    assert (status, field) == (422, "lm_model_path")  # ACESTEP_LM_MODELS lists the LMs there are


# --- queue_position and ETA ------------------------------------------------------------------


def test_queue_position_counts_only_the_jobs_competing_for_the_same_workers(store):
    estimator = QueueEstimator(store, prior="gpu", refit_seconds=0)
    order = [TURBO, BASE, BASE, TURBO, BASE, TURBO]
    ids = [store.submit(job(model)).id for model in order]
    # No live worker: the jobs of the same DiT.
    assert [estimator.estimate(store.get(i))[0] for i in ids] == [1, 1, 2, 2, 3, 3]
    store.register_worker("t", host="h", capacity=2, models=[TURBO, LM], state=WorkerState.READY)
    store.register_worker("b", host="h", capacity=1, models=[BASE], state=WorkerState.READY)
    assert [estimator.estimate(store.get(i))[0] for i in ids] == [1, 1, 2, 2, 3, 3]
    assert competition(estimator._workers, store.get(ids[0])) == (("", TURBO), 2)  # a DiT's ETA runs on its workers
    # A worker serving both: one pool of workers, so every job ahead competes.
    store.register_worker("both", host="h", capacity=1, models=[TURBO, BASE], state=WorkerState.READY)
    assert [estimator.estimate(store.get(i))[0] for i in ids] == [1, 2, 3, 4, 5, 6]
    assert competition(estimator._workers, store.get(ids[1])) == (("", BASE, TURBO), 2)


def test_the_eta_counts_the_work_of_competing_jobs_only(store):
    estimator = QueueEstimator(store, prior="gpu", refit_seconds=0)
    store.register_worker("t", host="h", capacity=1, models=[TURBO], state=WorkerState.READY)
    store.register_worker("b", host="h", capacity=1, models=[BASE], state=WorkerState.READY)
    for _ in range(5):
        store.submit(job(BASE))
    mine = store.submit(job(TURBO)).id
    own = estimator.cost_model.seconds(Work.of(store.get(mine)))
    assert estimator.estimate(store.get(mine)) == (1, pytest.approx(own, abs=0.1))  # the base jobs are not ahead
    base = store.submit(job(BASE)).id
    position, eta = estimator.estimate(store.get(base))
    assert position == 6 and eta == pytest.approx(6 * own, rel=0.01)  # five same-priced base jobs, one slot


def test_deep_queue_positions_with_two_models_match_the_exact_count(store):
    """The rank snapshot (one per set of competing models) and the gap count agree with a count in
    Python over the queue in claim order."""
    store.register_worker("t", host="h", capacity=1, models=[TURBO], state=WorkerState.READY)
    store.register_worker("b", host="h", capacity=1, models=[BASE, SFT], state=WorkerState.READY)
    rng = random.Random(7)
    jobs = [job(rng.choice([TURBO, BASE, SFT]), priority=rng.choice([0, 0, 1])) for _ in range(1200)]
    ids = []
    for start in range(0, len(jobs), 300):
        ids += store.submit_many(jobs[start:start + 300], now=T0 + timedelta(seconds=start))
    estimator = QueueEstimator(store, step=50, exact_up_to=60, simulate_up_to=0, snapshot_seconds=3600)
    claim_order = [(r["id"], r["model"]) for r in sorted(
        (store.get(i) for i in ids), key=lambda r: (r["priority"], r["created_at"], r["id"]))]
    pools = {TURBO: {TURBO}, BASE: {BASE, SFT}, SFT: {BASE, SFT}}
    rank, seen = {}, {TURBO: 0, BASE: 0, SFT: 0}
    for job_id, model in claim_order:
        seen[model] += 1
        rank[job_id] = sum(seen[m] for m in pools[model])
    for job_id in rng.sample(ids, 120):
        position, eta = estimator.estimate(store.get(job_id))
        assert position == rank[job_id]
        assert eta > 0
    assert set(estimator._snapshots) == {("", TURBO), ("", BASE, SFT)}


# --- what the live workers serve -------------------------------------------------------------


def test_models_inventory_and_health_report_what_live_workers_serve(api):
    svc, client = api(lm_models=f"{LM},{LM_SMALL}")
    svc.store.register_worker("gpu-1", host="h", capacity=2, models=[TURBO, SFT, LM], state=WorkerState.READY)
    svc.store.register_worker("gpu-2", host="h", capacity=1, models=[TURBO], state=WorkerState.BUSY)
    svc.store.register_worker("gpu-old", host="h", capacity=4, models=[XL, LM_SMALL], state=WorkerState.READY, now=T0)
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [f"acestep/{SFT}", f"acestep/{TURBO}"]
    inventory = client.get("/v1/model_inventory").json()["data"]
    assert {m["name"]: m["is_loaded"] for m in inventory["models"]} == {TURBO: True, SFT: True}  # XL: stale worker only
    assert inventory["lm_models"] == [{"name": LM_SMALL, "is_loaded": False}, {"name": LM, "is_loaded": True}]
    health = client.get("/health").json()["data"]
    assert health["models_loaded"] == [LM, SFT, TURBO] and health["loaded_lm_model"] == LM
    assert health["model_slots"] == {LM: 2, SFT: 2, TURBO: 3} and health["worker_slots"] == 3


def test_a_starting_worker_does_not_get_lm_jobs_refused(api):
    """A worker still loading lists what it is configured for, which may leave out the LMs it will
    find in its checkpoints: until a row says what was loaded, jobs needing an LM are accepted."""
    svc, client = api()
    svc.store.register_worker("gpu-1", host="h", capacity=1, models=[TURBO], state=WorkerState.STARTING)
    assert client.post("/v1/music/generate", json={"thinking": True}).status_code == 200
    assert client.post("/v1/music/generate", json={"lm_model_path": LM}).status_code == 200
