"""Health, models, stats, and the signed file URLs of the local storage backend."""

import mimetypes
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from db import StoreError
from db.states import SERVING_STATES
from handler.http.auth import Caller
from handler.http.routes_jobs import caller, services
from handler.storage import LOCAL_FILES_ROUTE, LocalStorage, ObjectNotFound, StorageError

router = APIRouter()
WORKER_STALE_SECONDS = 30.0


@router.get("/health", summary="Database reachable, live workers, models loaded")
def health(request: Request) -> dict:
    store = services(request).store
    try:
        workers = store.workers(stale_seconds=WORKER_STALE_SECONDS)
    except StoreError as exc:
        raise HTTPException(503, {"status": "unavailable", "database": str(exc)}) from None
    slots, live = store.live_capacity(stale_seconds=WORKER_STALE_SECONDS)
    models = sorted({m for w in workers if w["alive"] and w["state"] in SERVING_STATES for m in w["models"]})
    return {
        "status": "ok",
        "database": "ok",
        "live_workers": live,
        "worker_slots": slots,
        "workers": [{"id": w["id"], "state": w["state"], "alive": w["alive"], "models": w["models"]} for w in workers],
        "models_loaded": models,
    }


@router.get("/v1/models", summary="Models the live workers have loaded", responses={401: {}})
def models(request: Request, who: Annotated[Caller, Depends(caller)]) -> dict:
    svc = services(request)
    workers = [w for w in svc.store.workers(stale_seconds=WORKER_STALE_SECONDS) if w["alive"] and w["state"] in SERVING_STATES]
    loaded = sorted({m for w in workers for m in w["models"]})
    return {"default": svc.settings.dit_model, "models": [{"name": m} for m in loaded]}


@router.get("/v1/stats", summary="Jobs per status, queue depth, live workers, average job time", responses={401: {}})
def stats(request: Request, who: Annotated[Caller, Depends(caller)]) -> dict:
    return services(request).store.stats(stale_seconds=WORKER_STALE_SECONDS)


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
