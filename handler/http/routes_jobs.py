"""The seed API: submit a generation, poll it, list and cancel jobs."""

import base64
import binascii
import hashlib
import io
import json
import logging
import math
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ValidationError

from db.lora_store import apply_default_lora
from db import IdempotencyConflict, JobNotFound, NewJob, QuotaExceeded, StoreError
from db.store import request_hash
from db.states import JobStatus as State, WorkerState
from db.ids import new_job_id
from handler.http.auth import Caller
from handler.http.cost_model import Work, work_of
from handler.http.body import read_body
from handler.http.errors import REQUEST, refusal
from handler.http.inputs import ROLES, AudioInputs, InputError, audio_info, read_upload, resolve_reference
from handler.http.job_view import epoch, job_response
from handler.http.services import Services
from handler.storage import AUDIO_CONTENT_TYPES
from pipeline.contract import (
    BATCH_FIELDS,
    LM_PREFIX,
    GenerationRequest,
    RequestOptionError,
    check_model_options,
    request_document,
    resolve_model,
)

log = logging.getLogger(__name__)
router = APIRouter()


def services(request: Request) -> Services:
    return request.app.state.services


def caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Caller:
    return services(request).auth.caller(authorization)


class Submitted(BaseModel):
    job_id: str
    status: str
    queue_position: int


class JobResult(BaseModel):
    first_audio_path: str | None
    second_audio_path: str | None
    audio_paths: list[str]
    generation_info: str
    status_message: str
    seed_value: str
    bpm: int | None = None
    duration: float | None = None
    genres: str | None = None
    keyscale: str | None = None
    timesignature: str | None = None
    metas: dict[str, Any] | None = None
    lm_model: str | None = None
    lm_backend: str | None = None  # what ran the LM: "pt" where vllm was asked for but could not run
    dit_model: str | None = None
    # the analysis modes (extract_codes_only, full_analysis_only, analysis_only) answer with these
    audio_codes: str | None = None
    caption: str | None = None
    lyrics: str | None = None
    language: str | None = None


class JobStatus(BaseModel):
    job_id: str
    status: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    queue_position: int
    eta_seconds: float | None
    progress: float
    stage: str | None
    result: JobResult | None
    error: str | None
    cancel_requested: bool | None = None  # queued and running jobs: true once a cancel is pending


class JobSummary(BaseModel):
    job_id: str
    status: str
    created_at: float
    finished_at: float | None


class JobPage(BaseModel):
    jobs: list[JobSummary]
    next_before: str | None


def validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    """Pydantic errors as {field, message} pairs: the field and the allowed values, nothing internal."""
    return [
        {"field": ".".join(str(p) for p in err["loc"]) or "body", "message": err["msg"]}
        for err in exc.errors(include_url=False, include_context=False, include_input=False)
    ]


# What jobs must agree on to be claimed together: what one DiT loop runs with for the whole batch
# (pipeline.contract.BATCH_FIELDS: the pipeline's run_batch splits by the same fields) and a few
# more that would only split the claimed batch again (the analysis modes, retake, the chunk mask).
SAMPLER_FIELDS = (*BATCH_FIELDS, "chunk_mask_mode", "retake_variance", "extract_codes_only", "full_analysis_only",
                  "analysis_only")


def batch_key(params: GenerationRequest, model: str) -> str:
    """Jobs with equal keys can share one GPU batch: same model, task, steps, 30 s duration bucket
    and sampler options (a digest of SAMPLER_FIELDS)."""
    bucket = "lm" if params.audio_duration is None else str(math.ceil(params.audio_duration / 30) * 30)
    sampler = hashlib.sha256(json.dumps(params.model_dump(mode="json", include=set(SAMPLER_FIELDS)),
                                        sort_keys=True).encode()).hexdigest()[:12]
    return (f"{model}|{params.task_type}|{params.inference_steps}|{bucket}|{'thinking' if params.thinking else 'dit'}"
            f"|{sampler}")


@dataclass(frozen=True)
class Registered:
    """What the worker rows list, alive or not: the models registered workers serve (or served).
    `loaded`: some row is past its model load (a starting worker lists what it is configured to
    load, which may leave out the LMs it will find in its checkpoints)."""

    models: frozenset[str] = frozenset()
    loaded: bool = False


def registered_models(svc: Services) -> Registered:
    rows = svc.store.workers()
    return Registered(frozenset(str(m) for w in rows for m in w["models"] or []),
                      any(w["state"] != WorkerState.STARTING for w in rows))


def with_model(params: GenerationRequest, settings, registered: frozenset[str] = frozenset()) -> GenerationRequest:
    """The request with the DiT it runs on in `model` (resolve_model: the one named, else the
    deployment's default, or a base model for lego/extract/complete); 422 naming the field for an
    option that model cannot honour (check_model_options), or for a DiT no worker is configured
    (ACESTEP_DIT_MODEL, ACESTEP_DIT_MODELS) or registered (`registered`: Registered.models) to
    serve: no worker would ever claim it. Every submit path comes through here: /v1/music/generate,
    the reference routes and the RunPod native input."""
    model = resolve_model(params, settings.dit_model)
    try:
        check_model_options(params, model)
    except RequestOptionError as exc:
        raise refusal(422, exc.field, exc.message) from None
    served = settings.served_dit_models()
    if model not in served and model not in registered:
        fleet = sorted({*served, *(m for m in registered if not m.startswith(LM_PREFIX))})
        field, why = ("model", f"{model} is not served here") if params.model else (
            "task_type", f"{params.task_type} runs on a base model ({model}), which is not served here")
        raise refusal(422, field, f"{why}; this fleet runs {', '.join(fleet)}")
    return params if params.model == model else params.model_copy(update={"model": model})


# What makes a job need a 5 Hz LM to run at all (without them the LM is optional: a worker without
# one fills missing metas with N/A).
LM_NEEDING_FIELDS = ("thinking", "sample_mode", "sample_query", "use_format", "full_analysis_only", "analysis_only")


def lm_model_of(params: GenerationRequest, settings, lm_task: dict[str, Any] | None = None) -> str:
    """The `lm_model` of a job: the LM named in lm_model_path; else, for a job that needs an LM
    (LM_NEEDING_FIELDS, the LM's own tasks) ACESTEP_LM_MODEL, or "*" (any LM) when that is unset;
    else "" (runs with or without one)."""
    if params.lm_model_path and params.lm_model_path.strip():
        return params.lm_model_path.strip()
    if lm_task is not None or any(getattr(params, name) for name in LM_NEEDING_FIELDS):
        return settings.lm_model or "*"
    return ""


def check_lm_model(lm_model: str, settings, registered: Registered) -> None:
    """422 naming lm_model_path for an LM no worker is configured (ACESTEP_LM_MODELS,
    ACESTEP_LM_MODEL) or registered to serve. An empty ACESTEP_LM_MODELS means every LM in the
    checkpoints, unknown here: then an LM is refused only when registered workers have loaded (their
    rows list the LMs they found) and none lists it ("*", any LM: none lists an LM)."""
    if not lm_model:
        return
    listed = [name.strip() for name in settings.lm_models.split(",") if name.strip()]
    configured = {*listed, *([settings.lm_model] if settings.lm_model else [])}
    known = sorted({m for m in registered.models if m.startswith(LM_PREFIX)})
    if lm_model == "*":
        if configured or known or not registered.loaded:
            return
        raise refusal(422, "lm_model_path", "this job needs a 5 Hz LM and no worker serves one; "
                                            f"the workers serve: {', '.join(sorted(registered.models)) or 'none'}")
    if lm_model in configured or lm_model in known:
        return
    if listed or registered.loaded:
        why = f"unknown 5 Hz LM {lm_model!r}; the workers have loaded: {', '.join(known) or 'none'}"
        if configured:
            why += f"; configured (ACESTEP_LM_MODELS, ACESTEP_LM_MODEL): {', '.join(sorted(configured))}"
        raise refusal(422, "lm_model_path", why)


def new_job(params: GenerationRequest, inputs: AudioInputs, settings, lm_task: dict[str, Any] | None = None,
            registered: frozenset[str] = frozenset()) -> NewJob:
    """The job row of a request: the stored request (its `model` resolved), the models it runs on
    and its cost features. `registered`: what worker rows list (see with_model)."""
    lm_model = lm_model_of(params, settings, lm_task)
    if lm_task is not None:  # one of the LM's own tasks: never batched, no audio
        request = request_document(params.model_copy(update={"batch_size": 1}), inputs={}, lm_task=lm_task,
                                   batch_key=f"lm|{uuid.uuid4()}")
        work = work_of(params, settings.dit_model, lm_task=True)
        return NewJob(request=request, model=work.model, lm_model=lm_model, task_type=f"lm_{lm_task['task']}",
                      lm_mode=work.lm_mode)
    params = with_model(params, settings, registered)
    params = params.model_copy(update={"batch_size": params.effective_batch_size(settings.default_batch_size)})
    digests = {"input_digests": {u.role: u.digest for u in inputs.uploads}} if inputs.uploads else {}
    request = request_document(params, inputs=dict(inputs.references), batch_key=batch_key(params, params.model),
                               **digests)
    source = next((u.seconds for u in inputs.uploads if u.role == "src"), None)
    work = work_of(params, params.model, source_seconds=source)
    return NewJob(request=request, model=work.model, lm_model=lm_model, task_type=work.task_type, items=work.items,
                  audio_seconds=work.audio_seconds, dit_steps=work.dit_steps, lm_mode=work.lm_mode)


@router.post(
    "/v1/music/generate",
    response_model=Submitted,
    summary="Submit a generation job",
    description="Body as application/json, application/x-www-form-urlencoded or multipart/form-data "
    "(files `src_audio`, `reference_audio`). Fields: see GenerationRequest.",
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}},
                "application/x-www-form-urlencoded": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}},
                "multipart/form-data": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}},
            },
            "required": False,
        }
    },
    responses={400: {}, 401: {}, 409: {}, 413: {}, 415: {}, 422: {}, 429: {}},
)
async def generate(
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> dict:
    svc = services(request)
    fields, files = await read_body(request, max_bytes=body_limit(svc))
    return await submit_generation(svc, who, fields, files, idempotency_key, seed_api=True)


def body_limit(svc: Services) -> int:
    """Two uploads at the cap plus the form fields."""
    return int(2 * svc.settings.max_upload_mb * 1024 * 1024) + 1024 * 1024


async def submit_generation(
    svc: Services, who: Caller, fields: dict[str, Any], files: dict, idempotency_key: str | None,
    lm_task: dict[str, Any] | None = None, *, seed_api: bool = False,
) -> dict:
    """Validate, store uploads, insert the row; on any refusal nothing stays behind. The blocking
    part (database, object storage) runs off the event loop. `seed_api`: the request came to
    /v1/music/generate, whose spec ignores audio codes without thinking (see `spec_codes`)."""
    max_upload = int(svc.settings.max_upload_mb * 1024 * 1024)
    job_id = new_job_id()
    inputs = AudioInputs()
    try:
        for name, upload in files.items():
            inputs.uploads.append(await read_upload(name, upload, max_upload, svc.settings.max_input_audio_seconds))
        for upload in inputs.uploads:  # an uploaded file overrides the matching _path field
            fields[ROLES[upload.role][1]] = f"jobs/{job_id}/input-{upload.role}.{upload.ext}"
    except InputError as exc:
        raise refusal(exc.status, exc.field, exc.message) from None
    params = validate_request(fields, svc.settings.webhook_allow_networks)
    if seed_api:
        params = spec_codes(params)
    return await run_in_threadpool(persist_generation, svc, who, params, inputs, job_id, idempotency_key, lm_task)


def validate_request(fields: dict[str, Any], webhook_allow_networks: str | None = None) -> GenerationRequest:
    """The request of these fields, or 422 naming each field refused (`webhook_allow_networks`: the
    non-public networks a webhook_url may name, ACESTEP_WEBHOOK_ALLOW_NETWORKS)."""
    try:
        return GenerationRequest.model_validate(fields, context={"webhook_allow_networks": webhook_allow_networks})
    except ValidationError as exc:
        raise HTTPException(422, validation_detail(exc)) from None


def spec_codes(params: GenerationRequest) -> GenerationRequest:
    """The seed spec's `thinking=false`: DiT runs text2music and ignores any audio_code_string, so
    the worker never sees them (given codes would otherwise turn the run into a cover, as the
    reference server's own routes do). A list of codes still sets the batch size it implied. Cover
    and repaint keep theirs."""
    codes = params.audio_code_string
    if params.thinking or params.task_type != "text2music" or not codes:
        return params
    batch = params.batch_size if params.batch_size is not None or not isinstance(codes, list) else len(codes)
    return params.model_copy(update={"audio_code_string": "", "batch_size": batch})


def persist_generation(
    svc: Services, who: Caller, params: GenerationRequest, inputs: AudioInputs, job_id: UUID, idempotency_key: str | None,
    lm_task: dict[str, Any] | None = None,
) -> dict:
    settings = svc.settings
    uploaded = {u.role for u in inputs.uploads}
    registered = registered_models(svc)
    if lm_task is None:  # refused before any input is read or stored
        # the DiT it runs on; its adapters: the ones it names, else the key's /v1/lora/* state
        params = apply_default_lora(svc, who.owner, with_model(params, settings, registered.models))
    check_lm_model(lm_model_of(params, settings, lm_task), settings, registered)
    try:
        for role, (_, path_field) in ROLES.items():
            value = getattr(params, path_field)
            if value and role not in uploaded:
                inputs.references[role] = resolve_reference(
                    path_field, value, owner=who.owner, store=svc.store, storage=svc.storage, settings=settings,
                )
                if "path" in inputs.references[role]:  # a server file: checked as an upload is
                    audio_info(path_field, inputs.references[role]["path"], settings.max_input_audio_seconds)
    except InputError as exc:
        raise refusal(exc.status, exc.field, exc.message) from None
    for upload in inputs.uploads:
        inputs.references[upload.role] = {"key": f"jobs/{job_id}/input-{upload.role}.{upload.ext}"}
    job = new_job(params, inputs, settings, lm_task, registered.models)
    refuse_if_too_costly(svc, job)
    if idempotency_key:  # a retry of a submit already made answers with its job, queue full or not
        existing = _idempotent_job(svc, who, idempotency_key, job)
        if existing is not None:
            return _submitted(svc, existing)
    try:
        for upload in inputs.uploads:
            key = inputs.references[upload.role]["key"]
            svc.storage.put(key, io.BytesIO(upload.data), AUDIO_CONTENT_TYPES[upload.ext])
        submitted = svc.store.submit(
            job,
            job_id=job_id,
            owner=who.owner,
            idempotency_key=idempotency_key,
            max_attempts=settings.max_attempts,
            max_queued=who.max_queued,
        )
    except QuotaExceeded as exc:
        _drop_uploads(svc, job_id, inputs)
        existing = _idempotent_job(svc, who, idempotency_key, job) if idempotency_key else None
        if existing is not None:  # a concurrent twin got in first
            return _submitted(svc, existing)
        raise refusal(429, REQUEST, str(exc), {"Retry-After": "30"}) from None
    except IdempotencyConflict as exc:
        _drop_uploads(svc, job_id, inputs)
        existing = _idempotent_job(svc, who, idempotency_key, job)
        if existing is not None:  # the same request, its uploads stored under the first attempt's keys
            return _submitted(svc, existing)
        raise refusal(409, "Idempotency-Key", "was already used with a different request body") from exc
    except BaseException:
        _drop_uploads(svc, job_id, inputs)
        raise
    if not submitted.created:
        _drop_uploads(svc, job_id, inputs)  # a retried submit: the first request's job stands
    return _submitted(svc, submitted.id)


def _submitted(svc: Services, job_id: UUID) -> dict:
    """The submit answer for a job: status and position from one read of the row (a worker may
    have claimed the job since the insert, and the answer must not say "queued" at position 0)."""
    row = svc.store.get(job_id)
    position, eta = svc.queue.estimate(row)
    if eta is not None and row.get("eta_predicted_at") is None:
        _record_first_eta(svc, job_id, eta)
    if row["status"] == State.QUEUED and position < 1:  # claimed between the read and the estimate
        row = svc.store.get(job_id)
        position = max(position, 1) if row["status"] == State.QUEUED else 0
    return {"job_id": str(job_id), "status": row["status"], "queue_position": position}


def _record_first_eta(svc: Services, job_id: UUID, eta: float) -> None:
    """Keep the finish this first ETA promises, for the ETA error of /metrics; a failed write loses
    only that figure, never the submit."""
    try:
        svc.store.record_first_eta(job_id, eta)
    except StoreError as exc:
        log.warning("first ETA of job %s not recorded: %s", job_id, exc,
                    extra={"action": "first_eta_unrecorded", "job_id": str(job_id)})


def refuse_if_too_costly(svc: Services, job: NewJob) -> None:
    """A job priced (by the ETA's cost model) above ACESTEP_MAX_JOB_SECONDS, by default the job
    deadline, would only time out after holding a GPU that long: 422 before it is queued."""
    settings = svc.settings
    limit = settings.max_job_seconds or settings.job_timeout_seconds
    seconds = svc.queue.cost_model.seconds(Work.of(vars(job)))
    if seconds > limit:
        raise refusal(422, REQUEST, f"this job is estimated to take {seconds:.0f} s of GPU time, over the {limit:.0f} s "
                                    "one job may take: ask for fewer songs (batch_size), shorter audio "
                                    "(audio_duration) or fewer inference_steps")


def request_fingerprint(request: dict[str, Any]) -> str:
    """What makes two submits the same request: the stored request with each uploaded input named
    by its bytes' digest instead of the key the attempt stored it under (and no batch key, which
    follows from the rest or, for LM tasks, is drawn per submit)."""
    document = {k: v for k, v in request.items() if k != "batch_key"}
    digests = document.get("input_digests") or {}
    if digests:
        document["inputs"] = dict(document.get("inputs") or {})
        for role, digest in digests.items():
            document["inputs"][role] = {"upload": digest}
            path_field = ROLES.get(role, (None, None))[1]
            if path_field:
                document[path_field] = digest
    return request_hash(document)


def _idempotent_job(svc: Services, who: Caller, idempotency_key: str, job: NewJob) -> UUID | None:
    """The caller's job made earlier with this Idempotency-Key, if its request is this one; None if
    there is none; 409 if it was another request."""
    row = svc.store.find_idempotent(who.owner, idempotency_key)
    if row is None:
        return None
    if request_fingerprint(row["request"]) != request_fingerprint(job.request):
        raise refusal(409, "Idempotency-Key", "was already used with a different request body")
    return row["id"]


def _drop_uploads(svc: Services, job_id: UUID, inputs: AudioInputs) -> None:
    if inputs.uploads:
        svc.storage.delete_prefix(f"jobs/{job_id}/")


def owned_job(svc: Services, job_id: str, who: Caller) -> dict:
    """The job if it exists and belongs to the caller; 404 alike otherwise (no existence leak)."""
    try:
        job = svc.store.get(UUID(job_id))
    except (ValueError, JobNotFound):
        raise refusal(404, "job_id", "Job not found") from None
    if job["owner"] != who.owner:
        raise refusal(404, "job_id", "Job not found")
    return job


@router.get("/v1/jobs/{job_id}", response_model=JobStatus, summary="Poll a job", responses={401: {}, 404: {}})
def get_job(job_id: str, request: Request, who: Annotated[Caller, Depends(caller)]) -> dict:
    svc = services(request)
    job = owned_job(svc, job_id, who)
    position, eta = svc.queue.estimate(job)
    return job_response(job, position=position, eta=eta, url_for=svc.job_url)


@router.get("/v1/jobs", response_model=JobPage, summary="The caller's jobs, newest first", responses={401: {}})
def list_jobs(
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    before: Annotated[str | None, Query(max_length=200, description="next_before of the previous page (opaque)")] = None,
) -> dict:
    after = parse_cursor(before) if before else None
    rows = services(request).store.list_jobs(who.owner, limit=limit, before=after)
    jobs = [
        {"job_id": str(r["id"]), "status": r["status"], "created_at": epoch(r["created_at"]),
         "finished_at": epoch(r["finished_at"])}
        for r in rows
    ]
    next_before = page_cursor(rows[-1]["created_at"], rows[-1]["id"]) if len(rows) == limit else None
    return {"jobs": jobs, "next_before": next_before}


def page_cursor(created_at: datetime, job_id: UUID) -> str:
    """An opaque, URL-safe `next_before`: the last row's (created_at, id), so it pastes into a URL
    unencoded and jobs created in the same instant page correctly."""
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{job_id}".encode()).rstrip(b"=").decode()


def parse_cursor(cursor: str) -> tuple[datetime, UUID]:
    """(created_at, id) of a `page_cursor`; 422 naming `before` for anything else."""
    refused = refusal(422, "before", "is not a next_before this server gave; pass the previous page's value as is")
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, job_id = text.split("|")
        after = datetime.fromisoformat(created_at), UUID(job_id)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise refused from None
    if after[0].tzinfo is None:
        raise refused
    return after


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobStatus, summary="Cancel a job", responses={401: {}, 404: {}})
def cancel_job(job_id: str, request: Request, who: Annotated[Caller, Depends(caller)]) -> dict:
    svc = services(request)
    job = owned_job(svc, job_id, who)
    svc.store.cancel(job["id"])
    return get_job(job_id, request, who)
