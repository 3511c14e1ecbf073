"""queue_position and eta_seconds: the work ahead of a job and its own, priced by the cost model
(handler/http/cost_model.py), scheduled onto the live worker slots."""

import bisect
import heapq
import logging
import threading
import time

from db import JobStatus, JobStore, StoreError
from db.states import SERVING_STATES
from handler.http.cost_model import PRIORS, SAMPLE_LIMIT, CostModel, Work, fit_cost_model
from pipeline.contract import LM_PREFIX

log = logging.getLogger(__name__)

DEFAULT_JOB_SECONDS = 30.0  # /v1/stats' average job time before any job has finished
MAX_SNAPSHOTS = 32  # rank snapshots kept, one per set of competing models


def serves(worker_models: list[str], job: dict) -> bool:
    """Whether a worker listing `worker_models` claims the job (as claim_jobs routes): its DiT (""
    = any) and its LM ("" none, "*" any). A worker that lists nothing claims every job."""
    if not worker_models:
        return True
    model, lm = job.get("model") or "", job.get("lm_model") or ""
    lms = [m for m in worker_models if m.startswith(LM_PREFIX)]
    return (not model or model in worker_models) and (not lm or lm in lms or (lm == "*" and bool(lms)))


def competition(workers: list[dict], job: dict) -> tuple[tuple[str, ...] | None, int]:
    """(competing DiTs, worker slots) of a queued job: the DiTs of the live workers that would claim
    it (the jobs of those DiTs, and of "", take the same slots), and their slots. With none live,
    the job's own DiT and one slot; None (every job) for a job of any DiT or a worker that
    declares no models."""
    serving = [w for w in workers if serves(w["models"] or [], job)]
    model = job.get("model") or ""
    slots = max(1, sum(w["capacity"] for w in serving))
    if not model or any(not w["models"] for w in serving):
        return None, slots
    dits = {model, ""} | {m for w in serving for m in w["models"] if not m.startswith(LM_PREFIX)}
    return tuple(sorted(dits)), slots


def finish_time(slots: int, running: list[float], ahead: list[float], own: float) -> float:
    """When a job finishes that starts on the first free slot after the running jobs' remaining
    seconds and the queued jobs ahead of it (in claim order) each took the first free slot."""
    free = [0.0] * max(1, slots)
    for seconds in sorted(running, reverse=True) + ahead:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return heapq.heappop(free) + own


class QueueEstimator:
    """queue_position and eta_seconds for a poll, fast with a deep queue.

    Only the jobs that compete with a job for the same workers count (`competition`: those of the
    DiTs the live workers serving it serve), onto those workers' slots.

    Up to `simulate_up_to` jobs from the front, every job ahead is placed on the first free worker
    slot in claim order after the running jobs' remaining work. Deeper, the work ahead is summed in
    the database and shared by the slots: shallow jobs are counted exactly; deeper ones start from a
    rank snapshot (refreshed at most every `snapshot_seconds`, in one pass over the queue index) and
    count exactly only the jobs between the nearest checkpoint and the job, so a poll reads at most
    `step` index entries. The snapshot's part is at most `snapshot_seconds` old.
    """

    def __init__(
        self,
        store: JobStore,
        *,
        prior: str = "gpu",
        step: int = 1000,
        exact_up_to: int = 2000,
        simulate_up_to: int = 64,
        refit_seconds: float = 10.0,
        snapshot_seconds: float = 2.0,
        worker_stale_seconds: float = 30.0,
    ):
        self._store = store
        self._prior = PRIORS[prior]
        self._step = step
        self._exact_up_to = exact_up_to
        self._simulate_up_to = simulate_up_to
        self._refit = refit_seconds
        self._snapshot_max_age = snapshot_seconds
        self._stale = worker_stale_seconds
        self._lock = threading.Lock()
        self._model = fit_cost_model([], self._prior)
        self._workers: list[dict] = []  # live, serving workers: models and capacity
        self._fitted_at = -float("inf")
        # per set of competing models (None: every job): (sorted keys, checkpoints, taken at), swapped whole
        self._snapshots: dict[tuple[str, ...] | None, tuple[list[tuple], list[dict], float]] = {}

    @property
    def cost_model(self) -> CostModel:
        return self._cost_model()

    def estimate(self, job: dict) -> tuple[int, float | None]:
        """(queue_position, eta_seconds) of a row from JobStore.get; (0, None) once it finished."""
        if job["status"] not in (JobStatus.QUEUED, JobStatus.RUNNING):
            return 0, None
        model = self._cost_model()
        if job["status"] == JobStatus.RUNNING:
            return 0, round(model.remaining(job), 1)
        own = model.seconds(Work.of(job))
        models, slots = competition(self._workers, job)
        running_rows, ahead = self._store.queue_front(job["id"], self._simulate_up_to, models)
        running = [model.remaining(r) for r in running_rows if r["id"] != job["id"]]
        if ahead and ahead[-1]["id"] == job["id"]:
            costs = [model.seconds(Work.of(r)) for r in ahead[:-1]]
            return len(ahead), round(finish_time(slots, running, costs, own), 1)
        position, with_own = self._queued_ahead(job, model, models)
        if position == 0:  # claimed since the row was read
            return 0, round(own, 1)
        return position, round((max(0.0, with_own - own) + sum(running)) / slots + own, 1)

    def _queued_ahead(self, job: dict, model: CostModel, models: tuple[str, ...] | None) -> tuple[int, float]:
        """Position and priced seconds of the queued work (of `models`) up to and including the job."""
        costs, default = model.sql_costs()
        checkpoint = self._checkpoint_before(job, models)
        if checkpoint is None or checkpoint["rank"] <= self._exact_up_to:
            return self._store.queue_ahead_total(job["id"], costs, default, models)
        jobs, seconds = self._store.queue_gap(
            job["priority"], (checkpoint["created_at"], checkpoint["id"]), (job["created_at"], job["id"]), costs,
            default, models,
        )
        return checkpoint["rank"] + jobs, checkpoint["seconds"] + seconds

    def _checkpoint_before(self, job: dict, models: tuple[str, ...] | None) -> dict | None:
        """The last checkpoint of the snapshot of `models` at or before the job within its priority, if any."""
        self._refresh_snapshot(models)
        keys, checkpoints, _ = self._snapshots.get(models, ([], [], 0.0))
        index = bisect.bisect_right(keys, (job["priority"], job["created_at"], job["id"])) - 1
        if index < 0 or keys[index][0] != job["priority"]:
            return None
        return checkpoints[index]

    def _refresh_snapshot(self, models: tuple[str, ...] | None) -> None:
        """Start a refresh of the snapshot of `models` when it is old: in the background once one
        exists (a poll never waits for the pass over the queue), inline for the very first."""
        snapshot = self._snapshots.get(models)
        if snapshot is not None and time.monotonic() - snapshot[2] < self._snapshot_max_age:
            return
        if not self._lock.acquire(blocking=False):
            return
        if snapshot is None:
            self._take_snapshot(models)
        else:
            threading.Thread(target=self._take_snapshot, args=(models,), daemon=True).start()

    def _take_snapshot(self, models: tuple[str, ...] | None) -> None:
        """Runs holding `_lock`; releases it."""
        try:
            costs, default = self._cost_model().sql_costs()
            checkpoints = self._store.queue_checkpoints(costs, default, step=self._step, models=models)
            snapshots = dict(self._snapshots)
            snapshots[models] = ([(c["priority"], c["created_at"], c["id"]) for c in checkpoints], checkpoints,
                                 time.monotonic())
            while len(snapshots) > MAX_SNAPSHOTS:  # the least recently taken go first
                del snapshots[min(snapshots, key=lambda k: snapshots[k][2])]
            self._snapshots = snapshots
        except StoreError:
            log.warning("queue snapshot failed; positions are counted exactly", extra={"action": "snapshot_failed"})
        finally:
            self._lock.release()

    def _cost_model(self) -> CostModel:
        if time.monotonic() - self._fitted_at >= self._refit:
            self._model = fit_cost_model(self._store.cost_samples(SAMPLE_LIMIT), self._prior)
            self._workers = [w for w in self._store.workers(stale_seconds=self._stale)
                             if w["alive"] and w["state"] in SERVING_STATES]
            self._fitted_at = time.monotonic()
        return self._model
