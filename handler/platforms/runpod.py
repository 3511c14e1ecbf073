"""RunPod serverless handler: `python -m handler.platforms.runpod` (the worker image's default), with
the `ACESTEP_*` variables of a worker and the runpod SDK's own flags (`--test_input`, `--rp_serve_api`).

Two modes, chosen by the job input:

* native: the input is a generation request, the body of `POST /v1/music/generate` (same fields,
  aliases and validation). It becomes a job row in Postgres, once per RunPod job id (a retried RunPod
  job finds its row), visible to `GET /v1/jobs/{job_id}` and priced for the queue's ETA; this worker
  runs it, sends progress (`progress_update`, or stream chunks with ACESTEP_RUNPOD_STREAM=1) and
  returns the job document of `GET /v1/jobs/{job_id}` (audio URLs). Extra input fields:
  `return_audio_base64: true` adds the audio itself (`audio_base64`: the first song,
  `audios_base64`: all); `api_key`: the service key whose jobs this one joins (default: the open-mode
  owner).
* drain: `{"mode": "drain", "time_budget_seconds": N}` (the legacy `{"time_budget_seconds": N}`
  too) runs queued jobs of the Postgres queue until it is empty or N seconds are spent, model load
  included, and returns a summary.

Failures come back as RunPod errors (`error`), never as success; a worker whose models cannot load
also asks RunPod to replace it (`refresh_worker`). The handler is a coroutine that runs the work on a
thread, so the SDK's loop keeps serving its stop channel: RunPod's stop signal cancels the job (native)
or soft-stops the drain, and SIGTERM soft-stops whatever runs (running jobs get the grace period,
then go back to the queue).
"""

import asyncio
import base64
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import UUID

from fastapi import HTTPException
from pydantic import ValidationError

from db import DatabaseUnavailable, JobStatus, StoreError
from db.ids import new_job_id
from handler.drain import Drainer
from handler.http.auth import Caller
from handler.http.errors import problems
from handler.http.inputs import AudioInputs
from handler.http.job_view import job_response
from handler.http.routes_jobs import persist_generation, spec_codes, validate_request
from handler.http.services import Services, build_services
from handler.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_BUDGET_SECONDS = 540.0  # keep under the endpoint's execution timeout
CONTROL_FIELDS = ("mode", "return_audio_base64", "api_key")
PROGRESS_SECONDS = 0.5
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED}


class Refused(Exception):
    """The input cannot become a job: the RunPod error names the field and the reason."""


class Runtime:
    """What a warm RunPod worker keeps between jobs: the settings, the HTTP function's services (to
    validate and insert jobs as the API does) and the drainer (its pipeline processes stay loaded)."""

    def __init__(self, settings: Settings | None = None):
        self._settings = settings
        self._services: Services | None = None
        self._drainer: Drainer | None = None
        self._lock = threading.Lock()  # one invocation at a time drives the pipeline
        self.stopping = threading.Event()  # SIGTERM: this worker is going away

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings()
        return self._settings

    def services(self) -> Services:
        if self._services is None:
            self._services = build_services(self.settings, self.settings.database_url)
        return self._services

    def drainer(self) -> Drainer:
        if self._drainer is None:
            self._drainer = Drainer(self.settings)
        return self._drainer

    def stop(self) -> None:
        """SIGTERM: this worker is going away; soft-stop the run in progress, if any."""
        self.stopping.set()
        self.interrupt()

    def interrupt(self) -> None:
        """RunPod's stop signal for a drain: soft-stop it; the worker takes the next RunPod job."""
        if self._drainer is not None:
            self._drainer.stop()

    def close(self) -> None:
        if self._drainer is not None:
            self._drainer.close()

    # --- the two modes (blocking; the handler runs them on a thread) ---------------------------

    def drain(self, budget: float) -> dict[str, Any]:
        with self._lock:
            summary = self.drainer().drain(budget)
        if summary["setup_failed"]:
            return summary | {"error": f"the models could not be loaded: {summary['error']}", "refresh_worker": True}
        if summary["error"]:
            return summary | {"error": summary["error"]}
        return summary

    def submit(self, runpod_id: str | None, fields: dict[str, Any], api_key: str | None) -> UUID:
        """The input as a job row (the one already made for this RunPod job id, if any)."""
        svc = self.services()
        if api_key is not None:
            try:
                who = svc.auth.caller(f"Bearer {api_key}")
            except HTTPException as exc:
                raise Refused(_described(exc)) from None
        else:
            who = svc.auth.caller(None) if svc.auth.open_mode else _platform_caller(svc)
        try:
            params = spec_codes(validate_request(dict(fields), svc.settings.webhook_allow_networks))
            key = None if runpod_id is None else f"runpod:{runpod_id}"
            submitted = persist_generation(svc, who, params, AudioInputs(), new_job_id(), key)
        except HTTPException as exc:
            raise Refused(_described(exc)) from None
        except ValidationError as exc:
            raise Refused(str(exc)) from None
        return UUID(submitted["job_id"])

    def run_job(self, job_id: UUID, on_progress: Callable[[dict], None], stopped: threading.Event) -> dict[str, Any]:
        """Run the job here (or wait for the worker that holds it) until it ends; its document."""
        svc = self.services()
        watcher = threading.Thread(target=self._watch, args=(job_id, on_progress, stopped), daemon=True)
        watcher.start()
        try:
            with self._lock:
                while not stopped.is_set():
                    row = svc.store.get(job_id)
                    if row["status"] in TERMINAL:
                        break
                    if self.stopping.is_set():
                        return {"job_id": str(job_id), "status": row["status"],
                                "error": "this worker was stopped; the job stays in the queue"}
                    if row["status"] == JobStatus.QUEUED:
                        summary = self.drainer().run_job(job_id)
                        if summary["setup_failed"]:
                            return {"job_id": str(job_id), "status": JobStatus.QUEUED,
                                    "error": f"the models could not be loaded: {summary['error']}; the job "
                                             "stays queued for another worker", "refresh_worker": True}
                        if summary["stopped_because"] == "stopped":  # SIGTERM: handed back to the queue
                            return {"job_id": str(job_id), "status": JobStatus.QUEUED,
                                    "error": "this worker was stopped; the job is back in the queue"}
                        if summary["stopped_because"] == "job done":
                            continue
                    time.sleep(PROGRESS_SECONDS)  # not due yet, or another worker holds it
        finally:
            stopped.set()
            watcher.join(timeout=2)
        return self.document(job_id)

    def document(self, job_id: UUID) -> dict[str, Any]:
        svc = self.services()
        row = svc.store.get(job_id)
        position, eta = svc.queue.estimate(row)
        document = job_response(row, position=position, eta=eta, url_for=svc.job_url)
        if row["status"] == JobStatus.FAILED:
            document["error"] = f"job {job_id} failed: {row['error'] or 'no reason given'}"
        elif row["status"] == JobStatus.CANCELED:
            document["error"] = f"job {job_id} was canceled"
        return document

    def audio_base64(self, document: dict[str, Any], job_id: UUID) -> dict[str, Any]:
        row = self.services().store.get(job_id)
        keys = (row["result"] or {}).get("audio_keys", [])
        encoded = []
        for key in keys:
            with self.services().storage.open(key) as audio:
                encoded.append(base64.b64encode(audio.read()).decode("ascii"))
        return document | {"audio_base64": encoded[0] if encoded else None, "audios_base64": encoded}

    def cancel(self, job_id: UUID) -> None:
        try:
            self.services().store.cancel(job_id)
        except StoreError as exc:
            log.warning("could not cancel job %s: %s", job_id, exc, extra={"action": "cancel_failed", "job_id": str(job_id)})

    def _watch(self, job_id: UUID, on_progress: Callable[[dict], None], stopped: threading.Event) -> None:
        """The row's status, stage and progress each time they change (at most every 0.5 s)."""
        last = None
        while not stopped.wait(PROGRESS_SECONDS):
            try:
                row = self.services().store.get(job_id)
            except StoreError:
                continue
            now = {"job_id": str(job_id), "status": row["status"], "stage": row["stage"],
                   "progress": row["progress"]}
            if now != last:
                on_progress(now)
                last = now


def _platform_caller(svc: Services):
    """With API keys required and no `api_key` in the input: the jobs of RunPod's own callers (RunPod
    authenticated them) share one owner, seen through the API in open mode only."""
    return Caller(owner="runpod", max_queued=svc.settings.max_queued_per_key)


def _described(exc: HTTPException) -> str:
    return f"{exc.status_code}: " + "; ".join(f"{p['field']}: {p['message']}" for p in problems(exc.detail))


# --- the SDK side -------------------------------------------------------------------------------

RUNTIME = Runtime()
_signals_chained = False


def chain_stop_signals(runtime: Runtime = RUNTIME) -> None:
    """Make SIGTERM/SIGINT soft-stop our run as well as the SDK's loop (the SDK's own handler only
    sets a flag that a running job never sees). Done from the handler, after the SDK set its own."""
    global _signals_chained
    if _signals_chained or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)

        def on_signal(signum, frame, previous=previous):
            log.info("signal %s: soft stop", signum, extra={"action": "platform_stop"})
            runtime.stop()
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, on_signal)
    _signals_chained = True


def _mode(job_input: dict[str, Any]) -> str:
    mode = job_input.get("mode")
    if mode is None:
        return "drain" if set(job_input) == {"time_budget_seconds"} else "native"
    if mode not in ("native", "drain"):
        raise Refused(f"422: mode: must be 'native' or 'drain', not {mode!r}")
    return mode


def _budget(job_input: dict[str, Any]) -> float:
    value = job_input.get("time_budget_seconds", DEFAULT_BUDGET_SECONDS)
    try:
        budget = float(value)
    except (TypeError, ValueError):
        raise Refused(f"422: time_budget_seconds: must be a number of seconds, not {value!r}") from None
    if not budget > 0:
        raise Refused("422: time_budget_seconds: must be greater than 0")
    return budget


PROGRESS, OUTPUT = "progress", "output"


async def events(job: dict[str, Any], runtime: Runtime = RUNTIME) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """What a RunPod job produces: (PROGRESS, the job's status, stage and progress) each time they
    change, then (OUTPUT, the output, with `error` on failure)."""
    chain_stop_signals(runtime)
    async for kind, payload in _events(job, runtime):
        yield kind, payload


async def _events(job: dict[str, Any], runtime: Runtime) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    job_input = job.get("input")
    if not isinstance(job_input, dict):
        yield OUTPUT, {"error": "422: input: must be an object (a generation request, or {\"mode\": \"drain\"})"}
        return
    try:
        mode = _mode(job_input)
        if mode == "drain":
            budget = _budget(job_input)
            try:
                yield OUTPUT, await asyncio.to_thread(runtime.drain, budget)
            except asyncio.CancelledError:  # RunPod's stop signal
                runtime.interrupt()
                raise
            return
        fields = {k: v for k, v in job_input.items() if k not in CONTROL_FIELDS}
        job_id = await asyncio.to_thread(runtime.submit, _idempotency(job), fields, job_input.get("api_key"))
    except Refused as exc:
        yield OUTPUT, {"error": str(exc)}
        return
    except (DatabaseUnavailable, StoreError) as exc:
        yield OUTPUT, {"error": f"the job database is unavailable: {exc}"}
        return
    except Exception as exc:  # settings, storage: the worker cannot serve at all
        log.exception("runpod job %s could not start", job.get("id"))
        yield OUTPUT, {"error": f"this worker cannot take jobs: {exc}", "refresh_worker": True}
        return
    progress: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    stopped = threading.Event()
    running = asyncio.ensure_future(asyncio.to_thread(
        runtime.run_job, job_id, lambda p: loop.call_soon_threadsafe(progress.put_nowait, p), stopped))
    try:
        while not running.done():
            waiter = asyncio.ensure_future(progress.get())
            await asyncio.wait({running, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if waiter.done():
                yield PROGRESS, waiter.result()
            else:
                waiter.cancel()
        while not progress.empty():
            yield PROGRESS, progress.get_nowait()
        output = running.result()
        if job_input.get("return_audio_base64") and output.get("status") == JobStatus.SUCCEEDED:
            output = await asyncio.to_thread(runtime.audio_base64, output, job_id)
        yield OUTPUT, output
    except asyncio.CancelledError:  # RunPod's stop signal (a cancel or the execution timeout)
        stopped.set()
        await asyncio.shield(asyncio.to_thread(runtime.cancel, job_id))
        raise
    except (DatabaseUnavailable, StoreError) as exc:
        yield OUTPUT, {"job_id": str(job_id), "error": f"the job database is unavailable: {exc}; the job is "
                                                       "kept and runs when it is back"}


def _reports_progress() -> bool:
    """progress_update posts to RunPod's job-done URL: only there (not in the SDK's local modes)."""
    return bool(os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"))


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    """The RunPod handler: progress through `progress_update`, the output (or `error`) returned."""
    output: dict[str, Any] = {}
    async for kind, payload in events(job):
        if kind == OUTPUT:
            output = payload
        elif _reports_progress():
            import runpod

            runpod.serverless.progress_update(job, payload)
    return output


async def stream_handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The streaming variant (ACESTEP_RUNPOD_STREAM=1): progress and the output as stream chunks."""
    async for _, payload in events(job):
        yield payload


def _idempotency(job: dict[str, Any]) -> str | None:
    """RunPod's job id makes the row once per RunPod job (a retry finds it); the SDK's local test
    mode names every job "local_test", so there it makes a new row each time."""
    runpod_id = str(job.get("id") or "")
    return None if runpod_id in ("", "local_test") else runpod_id


def main() -> None:
    import runpod  # the RunPod SDK: the `runpod` extra, present in the worker image

    logging.basicConfig(level=logging.INFO)
    stream = RUNTIME.settings.runpod_stream
    config: dict[str, Any] = {"handler": stream_handler if stream else handler}
    if stream:
        config["return_aggregate_stream"] = True
    runpod.serverless.start(config)


if __name__ == "__main__":
    main()
