"""The reference project's newer routes, `/release_task` and `/query_result`, over the same jobs,
so clients written for either API work. Their envelope: {data, code, error, timestamp, extra}."""

import json
import time
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from db import JobNotFound, JobStatus
from handler.http.job_view import epoch
from handler.http.routes_jobs import body_limit, services, submit_generation
from handler.http.body import read_body

router = APIRouter()

STATUS_CODES = {JobStatus.QUEUED: 0, JobStatus.RUNNING: 0, JobStatus.SUCCEEDED: 1, JobStatus.FAILED: 2, JobStatus.CANCELED: 2}
UPLOAD_ALIASES = {"ctx_audio": "src_audio", "ref_audio": "reference_audio"}
# Reference fields this server does not implement: accepted only at their no-op defaults.
NO_OP_DEFAULTS: dict[str, Any] = {
    "sample_mode": False, "sample_query": "", "use_format": False, "analysis_only": False,
    "full_analysis_only": False, "use_adg": False, "cfg_interval_start": 0.0, "cfg_interval_end": 1.0,
    "infer_method": "ode", "shift": 3.0, "timesteps": None, "use_tiled_decode": True,
    "constrained_decoding": True, "constrained_decoding_debug": False, "use_cot_caption": True,
    "use_cot_language": True, "is_format_caption": False, "allow_lm_batch": True,
}


def envelope(data: Any) -> dict:
    return {"data": data, "code": 200, "error": None, "timestamp": int(time.time() * 1000), "extra": None}


def _as_default(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return str(value).lower() == str(default).lower()
    if isinstance(default, float):
        try:
            return float(value) == default
        except (TypeError, ValueError):
            return False
    return value == default or (default is None and value in ("", None))


def seed_fields(fields: dict[str, Any], default_model: str) -> dict[str, Any]:
    """Translate a release_task body to the seed API's fields, refusing what would be ignored."""
    fields = dict(fields)
    if "prompt" in fields:
        if "caption" in fields:
            raise HTTPException(422, [{"field": "prompt", "message": "give prompt or caption, not both"}])
        fields["caption"] = fields.pop("prompt")
    model = fields.pop("model", None)
    if model not in (None, "", default_model):
        raise HTTPException(422, [{"field": "model", "message": f"unknown model {model!r}; this server runs {default_model}"}])
    for name, default in NO_OP_DEFAULTS.items():
        if name in fields:
            value = fields.pop(name)
            if not _as_default(value, default):
                raise HTTPException(422, [{"field": name, "message": f"not supported by this server (only {default!r})"}])
    return fields


@router.post("/release_task", summary="Submit a job (reference API shape)", responses={400: {}, 401: {}, 415: {}, 422: {}, 429: {}})
async def release_task(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> dict:
    svc = services(request)
    fields, files = await read_body(request, max_bytes=body_limit(svc))
    token = fields.pop("ai_token", None)
    who = await run_in_threadpool(svc.auth.caller, authorization or (f"Bearer {token}" if token else None))
    files = {UPLOAD_ALIASES.get(name, name): upload for name, upload in files.items()}
    submitted = await submit_generation(svc, who, seed_fields(fields, svc.settings.dit_model), files, idempotency_key)
    return envelope({"task_id": submitted["job_id"], "status": JobStatus.QUEUED, "queue_position": submitted["queue_position"]})


def task_result(job: dict[str, Any], url_for) -> list[dict[str, Any]]:
    """The reference's per-audio list (it is sent JSON-encoded inside `result`)."""
    status = job["status"]
    code = STATUS_CODES[status]
    if status != JobStatus.SUCCEEDED:
        item = {"file": "", "wave": "", "status": code, "progress": job["progress"], "stage": job["stage"] or status}
        if code == 2:
            item["error"] = job["error"] or "canceled at the client's request"
        return [item]
    request, result = job["request"], job["result"] or {}
    metas = {
        "bpm": result.get("bpm", request.get("bpm")),
        "duration": result.get("duration", request.get("audio_duration")),
        "genres": result.get("genres", ""),
        "keyscale": result.get("keyscale", request.get("key_scale")),
        "timesignature": result.get("timesignature", request.get("time_signature")),
        "prompt": request.get("caption", ""),
        "lyrics": request.get("lyrics", ""),
    }
    return [
        {
            "file": url_for(key), "wave": "", "status": 1, "create_time": epoch(job["created_at"]),
            "env": "production", "prompt": request.get("caption", ""), "lyrics": request.get("lyrics", ""),
            "metas": metas, "generation_info": result.get("generation_info", ""),
            "seed_value": result.get("seed_value", ""), "lm_model": result.get("lm_model", ""),
            "dit_model": result.get("dit_model", job["model"]), "progress": 1.0, "stage": "succeeded",
        }
        for key in result.get("audio_keys", [])
    ]


def _task_ids(fields: dict[str, Any]) -> list[str]:
    ids = fields.get("task_id_list")
    if isinstance(ids, str):
        try:
            ids = json.loads(ids)
        except json.JSONDecodeError:
            ids = [ids]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or not 1 <= len(ids) <= 100:
        raise HTTPException(422, [{"field": "task_id_list", "message": "a list (or JSON string of a list) of 1 to 100 task ids"}])
    return ids


@router.post("/query_result", summary="Poll jobs (reference API shape)", responses={401: {}, 415: {}, 422: {}})
async def query_result(request: Request, authorization: Annotated[str | None, Header()] = None) -> dict:
    svc = services(request)
    fields, _ = await read_body(request, max_bytes=1024 * 1024)
    token = fields.pop("ai_token", None)
    who = await run_in_threadpool(svc.auth.caller, authorization or (f"Bearer {token}" if token else None))
    return envelope(await run_in_threadpool(_query, svc, who, _task_ids(fields)))


def _query(svc, who, task_ids: list[str]) -> list[dict]:
    data = []
    for task_id in task_ids:
        try:
            job = svc.store.get(UUID(task_id))
        except (ValueError, JobNotFound):
            job = None
        if job is None or job["owner"] != who.owner:
            missing = [{"file": "", "wave": "", "status": 2, "progress": 0.0, "stage": "failed", "error": "task not found"}]
            data.append({"task_id": task_id, "status": 2, "result": json.dumps(missing), "progress_text": "task not found"})
            continue
        items = task_result(job, svc.job_url)
        progress_text = f"{job['stage'] or job['status']} {round(100 * (job['progress'] or 0))}%"
        data.append({"task_id": task_id, "status": STATUS_CODES[job["status"]], "result": json.dumps(items),
                     "progress_text": progress_text})
    return data
