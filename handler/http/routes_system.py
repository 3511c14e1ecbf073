"""Health and stats in the reference API server's envelope (`acestep/api/http/model_service_routes.py`),
and the Prometheus metrics (handler/metrics.py)."""

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response

from db import StoreError
from db.states import WorkerState
from handler.http.auth import Caller
from handler.http.envelope import EnvelopeRoute, envelope, error_envelope
from handler.http.eta import DEFAULT_JOB_SECONDS
from handler.http.routes_jobs import caller, services
from handler.http.routes_models import WORKER_STALE_SECONDS, live_fleet, unavailable
from handler.metrics import exposition

__all__ = ["router", "metrics_router", "WORKER_STALE_SECONDS"]

log = logging.getLogger(__name__)
router = APIRouter(route_class=EnvelopeRoute)
metrics_router = APIRouter()  # included only with ACESTEP_METRICS_ENABLED (handler/http/app.py)
SERVICE_NAME = "ACE-Step API"
SERVICE_VERSION = "1.0"


@router.get("/health", summary="Database reachable, whether jobs can run now, live workers and their models "
                               "(no API key needed)", responses={503: {}})
def health(request: Request) -> Any:
    svc = services(request)
    try:
        fleet = live_fleet(svc.store)
        slots, live = svc.store.live_capacity(stale_seconds=WORKER_STALE_SECONDS)
    except StoreError as exc:
        log.warning("health: job database unavailable", extra={"action": "health_unavailable", "error": str(exc)})
        return error_envelope(503, "job database unavailable; retry shortly", {"Retry-After": "5"},
                              data={"status": "unavailable", "service": SERVICE_NAME, "version": SERVICE_VERSION,
                                    "database": "unavailable"})
    loaded_lm = fleet.preferred_lm(svc.settings.lm_model)
    insider = _has_key(svc, request)
    return envelope({
        "status": "ok",  # this HTTP function is up; whether jobs can run now is `generation`
        "service": SERVICE_NAME,
        "version": SERVICE_VERSION,
        "models_initialized": bool(fleet.dit),
        "llm_initialized": bool(fleet.lm),
        "loaded_model": fleet.preferred_dit(svc.settings.dit_model),
        "loaded_lm_model": loaded_lm,
        "gpus": [],
        "gpu_mapping": None,
        "device_map": None,
        # ours: the queue's own facts
        "database": "ok",
        "generation": generation_state(live, fleet.all_workers),
        "default_model": svc.settings.dit_model,
        "live_workers": live,
        "worker_slots": slots,
        # worker ids carry host names: only for callers with a key (or in open mode)
        "workers": [({"id": w["id"]} if insider else {}) | {"state": w["state"], "alive": w["alive"], "models": w["models"]}
                    for w in fleet.all_workers],
        "models_loaded": sorted({*fleet.dit, *fleet.lm}),
        "model_slots": dict(sorted(fleet.slots.items())),  # job slots of the live workers serving each model
    })


def _has_key(svc, request: Request) -> bool:
    """Open mode, or a valid API key on this (unauthenticated) request."""
    try:
        svc.auth.caller(request.headers.get("authorization"))
        return True
    except HTTPException:
        return False


def generation_state(live_workers: int, workers: list[dict[str, Any]]) -> str:
    """Whether a job can start now: "ready" (a live worker takes work), "starting" (live workers are
    still loading their models) or "no_live_worker" (jobs wait in the queue until a worker starts,
    as they do on a deployment that scales to zero)."""
    if live_workers:
        return "ready"
    if any(w["alive"] and w["state"] == WorkerState.STARTING for w in workers):
        return "starting"
    return "no_live_worker"


@router.get("/v1/stats", summary="Jobs per status, queue size, live workers, average job time", responses={401: {}, 503: {}})
def stats(request: Request, who: Annotated[Caller, Depends(caller)]) -> Any:
    svc = services(request)
    try:
        raw = svc.store.stats(stale_seconds=WORKER_STALE_SECONDS, owner=None if svc.auth.open_mode else who.owner)
    except StoreError:
        return unavailable()
    counts = raw["counts"]
    jobs = {"total": sum(counts.values())}
    jobs.update({status: counts.get(status, 0) for status in ("queued", "running", "succeeded", "failed", "canceled")})
    avg = raw["avg_job_seconds"]
    return envelope({
        "jobs": jobs,
        "queue_size": raw["queue_depth"],
        "queue_maxsize": svc.settings.max_queued_per_key,  # no global cap: the per-key one a caller meets
        "avg_job_seconds": avg if avg is not None else DEFAULT_JOB_SECONDS,
        "live_workers": raw["live_workers"],
    })


@metrics_router.get(
    "/metrics", response_class=Response,
    summary="Prometheus metrics: queue depth, workers and slots, webhook deliveries, ETA error (no API key "
            "needed; no job ids, callers or keys in it)",
    responses={200: {"content": {"text/plain": {}}}},
)
def metrics(request: Request) -> Response:
    """Like /health, open: it says what /health says, in numbers, and names no job, caller or key.
    Whatever of it comes from the database is left out while the database is away
    (`acestep_database_up` 0); the answer is still 200."""
    body, content_type = exposition(request.app.state.metrics_registry, request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})
