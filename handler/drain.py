"""Drain-and-return for serverless GPU platforms (RunPod, Modal): each invocation claims and runs jobs
until the queue is empty or its time budget is spent, then returns a summary. The pipeline processes
stay loaded between invocations of a warm container."""

from uuid import UUID

from handler.settings import Settings
from handler.worker.worker import worker_from_settings


class Drainer:
    def __init__(self, settings: Settings, *, concurrency: int = 1):
        if not settings.database_url:
            raise ValueError("ACESTEP_DATABASE_URL is not set: draining needs the job database")
        self._worker = worker_from_settings(settings, concurrency=concurrency, once=True, keep_warm=True)

    def drain(self, time_budget_seconds: float) -> dict:
        """Run until the queue is empty or the budget is spent (the models' load included); a
        summary of what happened, with `error` set when something kept it from its work."""
        code = self._worker.run(time_budget_seconds=time_budget_seconds)
        return self._worker.summary() | {"setup_failed": code == 1}

    def run_job(self, job_id: UUID, time_budget_seconds: float | None = None) -> dict:
        """Claim and run this one job if it is claimable; the summary of that run."""
        code = self._worker.run(job_id=job_id, time_budget_seconds=time_budget_seconds)
        return self._worker.summary() | {"setup_failed": code == 1}

    def stop(self) -> None:
        """Soft stop of the run in progress (SIGTERM, the platform's stop signal): claim nothing
        more; running jobs get the grace period, then go back to the queue."""
        self._worker.request_stop()

    def close(self) -> None:
        self._worker.close()
