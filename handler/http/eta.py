"""eta_seconds: work ahead of a job, priced by a cost model fitted on finished jobs, shared by the
live worker slots. seconds ~ a + b * dit_units + c * lm_units, per model (least squares)."""

import bisect
import logging
import threading
import time
from dataclasses import dataclass

from db import JobStatus, JobStore, StoreError

log = logging.getLogger(__name__)

DEFAULT_JOB_SECONDS = 30.0  # before any job has finished, a job is priced at this
MIN_SAMPLES = 5


@dataclass(frozen=True)
class CostModel:
    coefficients: dict[str, tuple[float, float, float]]  # model -> (a, b, c)
    average: float

    def seconds(self, model: str, dit_units: float, lm_units: float, jobs: int = 1) -> float:
        coef = self.coefficients.get(model)
        if coef is None:
            return self.average * jobs
        a, b, c = coef
        return max(0.0, a * jobs + b * dit_units + c * lm_units)


def fit_cost_model(samples: list[dict]) -> CostModel:
    """Least squares per model with at least MIN_SAMPLES jobs; the mean job time otherwise."""
    import numpy as np  # here: the HTTP function's cold start does not pay for numpy before the first poll
    if not samples:
        return CostModel({}, DEFAULT_JOB_SECONDS)
    average = float(np.mean([s["seconds"] for s in samples]))
    coefficients = {}
    for model in {s["model"] for s in samples}:
        rows = [s for s in samples if s["model"] == model]
        if len(rows) < MIN_SAMPLES:
            continue
        x = np.array([[1.0, r["dit_units"], r["lm_units"]] for r in rows])
        y = np.array([r["seconds"] for r in rows])
        solution, *_ = np.linalg.lstsq(x, y, rcond=None)
        coefficients[model] = tuple(float(v) for v in solution)
    return CostModel(coefficients, average)


class QueueEstimator:
    """queue_position and eta_seconds for a poll, fast with a deep queue.

    Shallow jobs are counted exactly. Deeper ones start from a rank snapshot (refreshed at most every
    `snapshot_seconds`, in one pass over the queue index) and count exactly only the jobs between the
    nearest checkpoint and the job, so a poll reads at most `step` index entries. The snapshot's part
    is at most `snapshot_seconds` old.
    """

    def __init__(
        self,
        store: JobStore,
        *,
        step: int = 1000,
        exact_up_to: int = 2000,
        refit_seconds: float = 10.0,
        snapshot_seconds: float = 2.0,
        running_seconds: float = 1.0,
        worker_stale_seconds: float = 30.0,
    ):
        self._store = store
        self._step = step
        self._exact_up_to = exact_up_to
        self._refit = refit_seconds
        self._snapshot_max_age = snapshot_seconds
        self._running_max_age = running_seconds
        self._stale = worker_stale_seconds
        self._lock = threading.Lock()
        self._model = CostModel({}, DEFAULT_JOB_SECONDS)
        self._slots = 1
        self._fitted_at = -float("inf")
        self._running: list[dict] = []
        self._running_at = -float("inf")
        self._snapshot: tuple[list[tuple], list[dict]] = ([], [])  # (sorted keys, checkpoints), swapped whole
        self._snapshot_at = -float("inf")

    def estimate(self, job: dict) -> tuple[int, float | None]:
        """(queue_position, eta_seconds) of a row from JobStore.get; (0, None) once it finished."""
        if job["status"] not in (JobStatus.QUEUED, JobStatus.RUNNING):
            return 0, None
        model = self._cost_model()
        if job["status"] == JobStatus.RUNNING:
            own = model.seconds(job["model"], job["dit_units"], job["lm_units"])
            return 0, round(own * (1.0 - (job["progress"] or 0.0)), 1)
        position, ahead = self._queued_ahead(job, model)
        running = sum(
            model.seconds(r["model"], r["dit_units"], r["lm_units"]) * (1.0 - (r["progress"] or 0.0))
            for r in self._running_work()
        )
        return position, round((ahead + running) / self._slots, 1)

    def _queued_ahead(self, job: dict, model: CostModel) -> tuple[int, float]:
        """Position and predicted seconds of the queued work up to and including the job."""
        checkpoint = self._checkpoint_before(job)
        if checkpoint is None or checkpoint["rank"] <= self._exact_up_to:
            inputs = self._store.eta_inputs(job["id"])
            position = sum(q["jobs"] for q in inputs.queued)
            return position, sum(model.seconds(q["model"], q["dit_units"], q["lm_units"], q["jobs"]) for q in inputs.queued)
        gap = self._store.queue_gap(
            job["priority"], (checkpoint["created_at"], checkpoint["id"]), (job["created_at"], job["id"])
        )
        position = checkpoint["rank"] + sum(g["jobs"] for g in gap)
        seconds = checkpoint["seconds"] + sum(model.seconds(g["model"], g["dit_units"], g["lm_units"], g["jobs"]) for g in gap)
        return position, seconds

    def _checkpoint_before(self, job: dict) -> dict | None:
        """The last snapshot checkpoint at or before the job within its priority, if any."""
        self._refresh_snapshot()
        keys, checkpoints = self._snapshot
        index = bisect.bisect_right(keys, (job["priority"], job["created_at"], job["id"])) - 1
        if index < 0 or keys[index][0] != job["priority"]:
            return None
        return checkpoints[index]

    def _refresh_snapshot(self) -> None:
        """Start a refresh when the snapshot is old: in the background once one exists (a poll never
        waits for the pass over the queue), inline for the very first."""
        if time.monotonic() - self._snapshot_at < self._snapshot_max_age or not self._lock.acquire(blocking=False):
            return
        if self._snapshot_at == -float("inf"):
            self._take_snapshot()
        else:
            threading.Thread(target=self._take_snapshot, daemon=True).start()

    def _take_snapshot(self) -> None:
        """Runs holding `_lock`; releases it."""
        try:
            model = self._cost_model()
            costs = [{"model": m, "a": a, "b": b, "c": c} for m, (a, b, c) in model.coefficients.items()]
            checkpoints = self._store.queue_checkpoints(costs, default_seconds=model.average, step=self._step)
            self._snapshot = ([(c["priority"], c["created_at"], c["id"]) for c in checkpoints], checkpoints)
            self._snapshot_at = time.monotonic()
        except StoreError:
            log.warning("queue snapshot failed; positions are counted exactly", extra={"action": "snapshot_failed"})
        finally:
            self._lock.release()

    def _cost_model(self) -> CostModel:
        if time.monotonic() - self._fitted_at >= self._refit:
            self._model = fit_cost_model(self._store.cost_samples())
            self._slots = max(1, self._store.live_capacity(stale_seconds=self._stale)[0])
            self._fitted_at = time.monotonic()
        return self._model

    def _running_work(self) -> list[dict]:
        if time.monotonic() - self._running_at >= self._running_max_age:
            self._running = self._store.running_work()
            self._running_at = time.monotonic()
        return self._running
