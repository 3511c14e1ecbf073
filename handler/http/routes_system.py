"""Health and stats in the reference API server's envelope (`acestep/api/http/model_service_routes.py`),
and the signed file URLs of the local storage backend."""

import logging
import mimetypes
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from db import StoreError
from handler.http.auth import Caller
from handler.http.envelope import envelope, error_envelope
from handler.http.eta import DEFAULT_JOB_SECONDS
from handler.http.routes_jobs import caller, services
from handler.http.routes_models import WORKER_STALE_SECONDS, live_fleet, unavailable
from handler.storage import LOCAL_FILES_ROUTE, LocalStorage, ObjectNotFound, StorageError

__all__ = ["router", "WORKER_STALE_SECONDS"]

log = logging.getLogger(__name__)
router = APIRouter()
SERVICE_NAME = "ACE-Step API"
SERVICE_VERSION = "1.0"


@router.get("/health", summary="Database reachable, live workers, models they serve (no API key needed)", responses={503: {}})
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
    return envelope({
        "status": "ok",
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
        "default_model": svc.settings.dit_model,
        "live_workers": live,
        "worker_slots": slots,
        "workers": [{"id": w["id"], "state": w["state"], "alive": w["alive"], "models": w["models"]} for w in fleet.all_workers],
        "models_loaded": sorted({*fleet.dit, *fleet.lm}),
    })


@router.get("/v1/stats", summary="Jobs per status, queue size, live workers, average job time", responses={401: {}, 503: {}})
def stats(request: Request, who: Annotated[Caller, Depends(caller)]) -> Any:
    svc = services(request)
    try:
        raw = svc.store.stats(stale_seconds=WORKER_STALE_SECONDS)
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


@router.get(LOCAL_FILES_ROUTE + "/{key:path}", summary="Download an audio file (signed URL)", responses={403: {}, 404: {}})
def download(
    key: str,
    request: Request,
    expires: Annotated[int, Query()],
    signature: Annotated[str, Query(max_length=128)],
) -> StreamingResponse:
    storage = services(request).storage
    if not isinstance(storage, LocalStorage):
        raise HTTPException(404, "files are served by the object store")
    try:
        valid = storage.verify(key, expires, signature)
    except StorageError:
        valid = False
    if not valid:
        raise HTTPException(403, "this file URL is invalid or has expired; poll the job for a fresh one")
    try:
        body = storage.open(key)
    except (ObjectNotFound, StorageError):
        raise HTTPException(404, "file not found") from None
    media_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    return StreamingResponse(body, media_type=media_type)
