"""queue_position and eta_seconds: the work ahead of a job and its own, priced by the cost model
(handler/http/cost_model.py), scheduled onto the live worker slots."""

import bisect
import heapq
import logging
import threading
import time

from db import JobStatus, JobStore, StoreError
from handler.http.cost_model import PRIORS, SAMPLE_LIMIT, CostModel, Work, fit_cost_model

log = logging.getLogger(__name__)

DEFAULT_JOB_SECONDS = 30.0  # /v1/stats' average job time before any job has finished


def finish_time(slots: int, running: list[float], ahead: list[float], own: float) -> float:
    """When a job finishes that starts on the first free slot after the running jobs' remaining
    seconds and the queued jobs ahead of it (in claim order) each took the first free slot."""
    free = [0.0] * max(1, slots)
    for seconds in sorted(running, reverse=True) + ahead:
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return heapq.heappop(free) + own


class QueueEstimator:
    """queue_position and eta_seconds for a poll, fast with a deep queue.

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
        running_seconds: float = 1.0,
        worker_stale_seconds: float = 30.0,
    ):
        self._store = store
        self._prior = PRIORS[prior]
        self._step = step
        self._exact_up_to = exact_up_to
        self._simulate_up_to = simulate_up_to
        self._refit = refit_seconds
        self._snapshot_max_age = snapshot_seconds
        self._running_max_age = running_seconds
        self._stale = worker_stale_seconds
        self._lock = threading.Lock()
        self._model = fit_cost_model([], self._prior)
        self._slots = 1
        self._fitted_at = -float("inf")
        self._running: list[dict] = []
        self._running_at = -float("inf")
        self._snapshot: tuple[list[tuple], list[dict]] = ([], [])  # (sorted keys, checkpoints), swapped whole
        self._snapshot_at = -float("inf")

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
        running = [model.remaining(r) for r in self._running_work() if r["id"] != job["id"]]
        ahead = self._store.queue_ahead(job["id"], self._simulate_up_to)
        if ahead and ahead[-1]["id"] == job["id"]:
            costs = [model.seconds(Work.of(r)) for r in ahead[:-1]]
            return len(ahead), round(finish_time(self._slots, running, costs, own), 1)
        position, with_own = self._queued_ahead(job, model)
        if position == 0:  # claimed since the row was read
            return 0, round(own, 1)
        return position, round((max(0.0, with_own - own) + sum(running)) / self._slots + own, 1)

    def _queued_ahead(self, job: dict, model: CostModel) -> tuple[int, float]:
        """Position and priced seconds of the queued work up to and including the job."""
        costs, default = model.sql_costs()
        checkpoint = self._checkpoint_before(job)
        if checkpoint is None or checkpoint["rank"] <= self._exact_up_to:
            return self._store.queue_ahead_total(job["id"], costs, default)
        jobs, seconds = self._store.queue_gap(
            job["priority"], (checkpoint["created_at"], checkpoint["id"]), (job["created_at"], job["id"]), costs, default
        )
        return checkpoint["rank"] + jobs, checkpoint["seconds"] + seconds

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
            costs, default = self._cost_model().sql_costs()
            checkpoints = self._store.queue_checkpoints(costs, default, step=self._step)
            self._snapshot = ([(c["priority"], c["created_at"], c["id"]) for c in checkpoints], checkpoints)
            self._snapshot_at = time.monotonic()
        except StoreError:
            log.warning("queue snapshot failed; positions are counted exactly", extra={"action": "snapshot_failed"})
        finally:
            self._lock.release()

    def _cost_model(self) -> CostModel:
        if time.monotonic() - self._fitted_at >= self._refit:
            self._model = fit_cost_model(self._store.cost_samples(SAMPLE_LIMIT), self._prior)
            self._slots = max(1, self._store.live_capacity(stale_seconds=self._stale)[0])
            self._fitted_at = time.monotonic()
        return self._model

    def _running_work(self) -> list[dict]:
        if time.monotonic() - self._running_at >= self._running_max_age:
            self._running = self._store.running_work()
            self._running_at = time.monotonic()
        return self._running
