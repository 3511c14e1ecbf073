"""The reference project's newer routes, `/release_task` and `/query_result`, over the same jobs,
so clients written for either API work. Their envelope: {data, code, error, timestamp, extra}."""

import json
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from db import JobNotFound, JobStatus
from handler.http.job_view import epoch
from handler.http.routes_jobs import body_limit, services, submit_generation
from handler.http.body import json_safe, parse_json, read_authenticated
from handler.http.audio_links import audio_link
from handler.http.envelope import EnvelopeRoute, envelope, error_envelope
from handler.http.reference_request import generation_fields
from handler.http.routes_models import model_name

router = APIRouter(route_class=EnvelopeRoute)

STATUS_CODES = {JobStatus.QUEUED: 0, JobStatus.RUNNING: 0, JobStatus.SUCCEEDED: 1, JobStatus.FAILED: 2, JobStatus.CANCELED: 2}
UPLOAD_ALIASES = {"ctx_audio": "src_audio", "ref_audio": "reference_audio"}


async def enveloped(call):
    """Await `call`; an HTTPException becomes the envelope's error form."""
    try:
        return await call
    except HTTPException as exc:
        return error_envelope(exc.status_code, exc.detail, exc.headers)


async def reference_caller(request: Request, fields: dict[str, Any], authorization: str | None):
    """The caller, from the Authorization header or the body's `ai_token` (the reference's two ways)."""
    token = fields.pop("ai_token", None)
    svc = services(request)
    return await run_in_threadpool(svc.auth.caller, authorization or (f"Bearer {token}" if token else None))


async def reference_body(request: Request, authorization: str | None, max_bytes: int):
    """(the caller, fields, uploads): the caller checked before the body is read where the
    Authorization header says who it is; an `ai_token` in the body only from a body's first MiB
    (handler/http/body.py, read_authenticated)."""
    return await read_authenticated(request, max_bytes, authorization, services(request).auth)


def check_model(svc, model: str | None, served: tuple[str, ...] | None = None) -> str | None:
    """An empty model means the default (None); another (a name, a path or an OpenRouter id such as
    `acestep/acestep-v15-turbo`) must be one of `served` (by default only ACESTEP_DIT_MODEL, for a
    caller that does not pass the model on to the job): its folder name."""
    name = model_name(model)
    served = served or (svc.settings.dit_model,)
    if name is None or name in served:
        return name
    raise HTTPException(422, [{"field": "model", "message": f"model {model!r} is not served here; this fleet runs "
                                                            f"{', '.join(served)} (see /v1/models)"}])


async def submit_reference(request: Request, authorization: str | None, idempotency_key: str | None, *,
                           defaults: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
                           ) -> tuple[dict, dict]:
    """Read a reference-convention body, submit it through the seed API's one path, and return
    (the submitted job, the options accepted but not acted on). `defaults` fill fields the body
    lacks, `overrides` replace what it says."""
    svc = services(request)
    who, fields, files = await reference_body(request, authorization, body_limit(svc))
    files = {UPLOAD_ALIASES.get(name, name): upload for name, upload in files.items()}
    ours, model, not_applied = generation_fields(fields)
    name = check_model(svc, model, svc.settings.served_dit_models())  # ACESTEP_DIT_MODEL and ACESTEP_DIT_MODELS
    if name is not None:  # the DiT asked for runs the job (None: the deployment's choice, see resolve_model)
        ours["model"] = name
    submitted = await submit_generation(svc, who, (defaults or {}) | ours | (overrides or {}), files, idempotency_key)
    return submitted, not_applied


def reference_body_doc(schema: dict, *, forms: bool = False) -> dict:
    """The OpenAPI request body of a reference route (read by hand, as upstream reads it): `schema`
    as JSON, and with `forms` as form and multipart bodies too. Any other field is accepted as well."""
    kinds = ["application/json"] + (["application/x-www-form-urlencoded", "multipart/form-data"] if forms else [])
    return {"requestBody": {"content": {kind: {"schema": schema} for kind in kinds}, "required": False}}


@router.post("/release_task", summary="Submit a job (reference API shape)", responses={400: {}, 401: {}, 415: {}, 422: {}, 429: {}},
             openapi_extra=reference_body_doc({"$ref": "#/components/schemas/GenerateRequest"}, forms=True))
async def release_task(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Any:
    async def run():
        submitted, not_applied = await submit_reference(request, authorization, idempotency_key)
        data = {"task_id": submitted["job_id"], "status": JobStatus.QUEUED, "queue_position": submitted["queue_position"]}
        return envelope(data, {"not_applied": json_safe(not_applied)} if not_applied else None)

    return await enveloped(run())


def task_result(job: dict[str, Any], links, env: str = "production") -> list[dict[str, Any]]:
    """The reference's per-audio list (it is sent JSON-encoded inside `result`). `links(key)` gives
    (file: the relative /v1/audio?path=<token> link, url: an absolute download URL)."""
    status = job["status"]
    code = STATUS_CODES[status]
    if status != JobStatus.SUCCEEDED:
        item = {"file": "", "wave": "", "status": code, "create_time": epoch(job["created_at"]),
                "progress": job["progress"], "stage": job["stage"] or status}
        if code == 2:
            item["error"] = job["error"] or "canceled at the client's request"
        return [item]
    request, result = job["request"], job["result"] or {}
    caption = result.get("caption", request.get("caption", ""))
    lyrics = result.get("lyrics", request.get("lyrics", ""))
    metas = {
        "bpm": result.get("bpm", request.get("bpm")),
        "duration": result.get("duration", request.get("audio_duration")),
        "genres": result.get("genres", ""),
        "keyscale": result.get("keyscale", request.get("key_scale")),
        "timesignature": result.get("timesignature", request.get("time_signature")),
        "prompt": caption,
        "lyrics": lyrics,
    }
    items = []
    for key in result.get("audio_keys", []):
        file, url = links(key)
        items.append({
            "file": file, "url": url, "wave": "", "status": 1, "create_time": epoch(job["created_at"]),
            "env": env, "prompt": caption, "lyrics": lyrics, "metas": metas,
            "generation_info": result.get("generation_info", ""), "seed_value": result.get("seed_value", ""),
            "lm_model": result.get("lm_model", ""), "dit_model": result.get("dit_model", job["model"]),
            "progress": 1.0, "stage": "succeeded",
        })
    if not items:  # an analysis mode: what it found instead of audio
        items.append({
            "file": "", "url": "", "wave": "", "status": 1, "create_time": epoch(job["created_at"]), "env": env,
            "prompt": caption, "lyrics": lyrics, "metas": metas | (result.get("metas") or {}),
            "audio_codes": result.get("audio_codes", ""), "language": result.get("language", ""),
            "status_message": result.get("status_message", ""), "generation_info": result.get("generation_info", ""),
            "lm_model": result.get("lm_model", ""), "dit_model": result.get("dit_model", job["model"]),
            "progress": 1.0, "stage": "succeeded",
        })
    return items


def file_links(svc, base_url: str):
    """(relative /v1/audio link, absolute URL) per storage key: the object store's own signed URL
    where it is absolute (S3), else the /v1/audio link on this server's base URL."""
    def links(key: str) -> tuple[str, str]:
        file = audio_link(svc, key)
        direct = svc.job_url(key)
        return file, direct if direct.startswith(("http://", "https://")) else base_url.rstrip("/") + file

    return links


def _task_ids(fields: dict[str, Any]) -> list[str]:
    ids = fields.get("task_id_list")
    if isinstance(ids, str):
        try:
            ids = parse_json(ids)
        except ValueError:
            ids = [ids]
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids) or not 1 <= len(ids) <= 100:
        raise HTTPException(422, [{"field": "task_id_list", "message": "a list (or JSON string of a list) of 1 to 100 task ids"}])
    return ids


@router.post("/query_result", summary="Poll jobs (reference API shape)", responses={401: {}, 415: {}, 422: {}},
             openapi_extra=reference_body_doc({"type": "object", "properties": {
                 "task_id_list": {"description": "task ids, as a list or a JSON string of one",
                                  "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}]}}},
                 forms=True))
async def query_result(request: Request, authorization: Annotated[str | None, Header()] = None) -> Any:
    async def run():
        svc = services(request)
        who, fields, _ = await reference_body(request, authorization, 1024 * 1024)
        links = file_links(svc, str(request.base_url))
        return envelope(await run_in_threadpool(_query, svc, who, _task_ids(fields), links))

    return await enveloped(run())


def _query(svc, who, task_ids: list[str], links) -> list[dict]:
    """One entry per id. An id that is unknown (or not the caller's) answers as the reference does:
    status 0 and an empty result list, with progress_text saying so."""
    data = []
    env = "development" if svc.settings.env == "dev" else "production"
    for task_id in task_ids:
        try:
            job = svc.store.get(UUID(task_id))
        except (ValueError, JobNotFound):
            job = None
        if job is None or job["owner"] != who.owner:
            data.append({"task_id": task_id, "status": 0, "result": "[]", "progress_text": "task not found"})
            continue
        items = task_result(job, links, env)
        progress_text = f"{job['stage'] or job['status']} {round(100 * (job['progress'] or 0))}%"
        if job["status"] == JobStatus.FAILED:
            progress_text = f"failed: {job['error']}"
        data.append({"task_id": task_id, "status": STATUS_CODES[job["status"]], "result": json.dumps(items),
                     "progress_text": progress_text})
    return data
