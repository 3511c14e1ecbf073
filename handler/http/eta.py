"""eta_seconds: work ahead of a job, priced by a cost model fitted on finished jobs, shared by the
live worker slots. seconds ~ a + b * dit_units + c * lm_units, per model (least squares)."""

import time
from dataclasses import dataclass
import numpy as np

from db import JobStore

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


class EtaEstimator:
    """Refits the cost model and re-reads worker capacity at most every `refresh_seconds`."""

    def __init__(self, store: JobStore, *, refresh_seconds: float = 10.0, worker_stale_seconds: float = 30.0):
        self._store = store
        self._refresh = refresh_seconds
        self._stale = worker_stale_seconds
        self._fitted_at = -float("inf")
        self._model = CostModel({}, DEFAULT_JOB_SECONDS)
        self._slots = 1

    def _refresh_if_old(self) -> None:
        now = time.monotonic()
        if now - self._fitted_at < self._refresh:
            return
        self._model = fit_cost_model(self._store.cost_samples())
        self._slots = max(1, self._store.live_capacity(stale_seconds=self._stale)[0])
        self._fitted_at = now

    def eta_seconds(self, job: dict) -> float | None:
        """Seconds until the job (a row from JobStore.get) finishes; None once it has."""
        if job["status"] not in ("queued", "running"):
            return None
        self._refresh_if_old()
        if job["status"] == "running":
            own = self._model.seconds(job["model"], job["dit_units"], job["lm_units"])
            return round(own * (1.0 - (job["progress"] or 0.0)), 1)
        inputs = self._store.eta_inputs(job["id"])
        ahead = sum(self._model.seconds(q["model"], q["dit_units"], q["lm_units"], q["jobs"]) for q in inputs.queued)
        in_progress = sum(
            self._model.seconds(r["model"], r["dit_units"], r["lm_units"]) * (1.0 - (r["progress"] or 0.0))
            for r in inputs.running
        )
        return round((ahead + in_progress) / self._slots, 1)
