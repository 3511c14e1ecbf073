"""Drain-and-return for serverless GPU platforms (RunPod, Modal): each invocation claims and runs jobs
until the queue is empty or its time budget is spent, then returns a summary. The pipeline processes
stay loaded between invocations of a warm container."""

from handler.http.services import build_services
from handler.settings import Settings
from handler.worker.worker import Worker, WorkerOptions


class Drainer:
    def __init__(self, settings: Settings, *, concurrency: int = 1):
        if not settings.database_url:
            raise ValueError("ACESTEP_DATABASE_URL is not set: draining needs the job database")
        services = build_services(settings, settings.database_url)
        options = WorkerOptions(
            pipeline=settings.pipeline,
        checkpoint_dir=settings.checkpoint_dir,
            concurrency=concurrency,
            batch_jobs=settings.worker_batch_jobs,
            once=True,
            heartbeat_seconds=settings.heartbeat_seconds,
            job_timeout_seconds=settings.job_timeout_seconds,
            shutdown_grace_seconds=settings.shutdown_grace_seconds,
            model_names=(settings.default_model,),
            keep_warm=True,
        )
        self._worker = Worker(services.store, services.storage, settings.database_url, options)

    def drain(self, time_budget_seconds: float) -> dict:
        """Run until the queue is empty or the budget is spent; a summary of what happened."""
        code = self._worker.run(time_budget_seconds=time_budget_seconds)
        return self._worker.summary() | {"setup_failed": code != 0}

    def close(self) -> None:
        self._worker.close()
