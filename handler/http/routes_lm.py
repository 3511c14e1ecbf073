"""The LM's own tasks over HTTP, as the reference API server offers them, and its random-sample
routes. `/format_input` and `/v1/create_sample` run as short jobs on the queue (a GPU worker runs the
LM; this function never loads a model) and the call waits for the result, up to
ACESTEP_SYNC_TIMEOUT_SECONDS; a job nobody finished in time is canceled and the call answers 504.
`/create_random_sample` picks one of our own examples; `/v1/music/random` (the older API) submits a
sample-mode generation and answers like `/v1/music/generate`."""

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from db import JobStatus
from handler.http.body import read_body
from handler.http.reference_request import ReferenceParams, as_bool, generation_fields
from handler.http.routes_jobs import services, submit_generation, validation_detail
from handler.http.routes_release import check_model, enveloped, envelope, reference_caller
from pipeline.contract import GenerationRequest

router = APIRouter()

EXAMPLES = Path(__file__).with_name("examples.json")
SAMPLE_TYPES = ("simple_mode", "custom_mode")
LM_TASK_SECONDS_POLL = (0.05, 0.5)  # first and longest wait between polls of the job row


async def wait_for_job(svc, job_id: str, timeout: float) -> dict[str, Any]:
    """The finished job row; on timeout the job is canceled and 504 raised (nothing left running)."""
    deadline = time.monotonic() + timeout
    pause, longest = LM_TASK_SECONDS_POLL
    while True:
        job = await run_in_threadpool(svc.store.get, UUID(job_id))
        if job["status"] in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED):
            return job
        if time.monotonic() >= deadline:
            await run_in_threadpool(svc.store.cancel, UUID(job_id))
            raise HTTPException(504, f"no worker finished this task within {timeout:g} s "
                                     f"(ACESTEP_SYNC_TIMEOUT_SECONDS); it was canceled. Job {job_id}")
        await asyncio.sleep(pause)
        pause = min(pause * 2, longest)


async def run_lm_task(request: Request, who, task: str, params: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """Queue one LM task (its request fields validated by the generation contract, so a bad bpm or
    language is refused with the field named) and wait for its answer."""
    svc = services(request)
    submitted = await submit_generation(svc, who, fields, {}, None, lm_task={"task": task, "params": params})
    job = await wait_for_job(svc, submitted["job_id"], svc.settings.sync_timeout_seconds)
    if job["status"] == JobStatus.SUCCEEDED:
        return (job["result"] or {}).get("lm_result") or {}
    if job["status"] == JobStatus.CANCELED:
        raise HTTPException(409, f"the {task} task was canceled")
    raise HTTPException(500, f"the {task} task failed: {job['error']}")


def _validated(fields: dict[str, Any]) -> GenerationRequest:
    try:
        return GenerationRequest.model_validate(fields)
    except ValidationError as exc:
        raise HTTPException(422, validation_detail(exc)) from None


def lm_sampling(params: ReferenceParams, request: GenerationRequest) -> dict[str, Any]:
    """The LM sampling options a task call may carry (`temperature` is the reference's name here)."""
    temperature = params.get("temperature", params.get("lm_temperature"))
    return {
        "lm_temperature": float(temperature) if temperature not in (None, "") else request.lm_temperature,
        "lm_top_k": request.lm_top_k, "lm_top_p": request.lm_top_p,
        "lm_repetition_penalty": request.lm_repetition_penalty, "lm_model_path": request.lm_model_path,
    }


@router.post("/format_input", summary="Let the LM format caption and lyrics (reference API)",
             responses={401: {}, 415: {}, 422: {}, 504: {}})
async def format_input(request: Request, authorization: Annotated[str | None, Header()] = None) -> Any:
    async def run():
        fields, _ = await read_body(request, max_bytes=1024 * 1024)
        who = await reference_caller(request, fields, authorization)
        ours, _, _ = generation_fields(fields)
        ours = {k: v for k, v in ours.items() if k in ("caption", "lyrics", "bpm", "audio_duration", "key_scale",
                                                      "time_signature", "vocal_language", "lm_model_path", "lm_top_k",
                                                      "lm_top_p", "lm_temperature", "lm_repetition_penalty")}
        raw = ReferenceParams(fields)
        if raw.find("vocal_language") is None:
            ours["vocal_language"] = "unknown"  # not given: the LM decides
        checked = _validated(ours)
        params = {
            "caption": checked.caption, "lyrics": checked.lyrics, "bpm": checked.bpm,
            "audio_duration": checked.audio_duration, "key_scale": checked.key_scale,
            "time_signature": checked.time_signature, "vocal_language": checked.vocal_language,
        } | lm_sampling(raw, checked)
        return envelope(await run_lm_task(request, who, "format", params, ours))

    return await enveloped(run())


@router.post("/v1/create_sample", summary="Let the LM write caption, lyrics and metas from a description",
             responses={401: {}, 415: {}, 422: {}, 504: {}})
async def create_sample(request: Request, authorization: Annotated[str | None, Header()] = None) -> Any:
    async def run():
        fields, _ = await read_body(request, max_bytes=1024 * 1024)
        who = await reference_caller(request, fields, authorization)
        raw = ReferenceParams(fields)
        ours, _, _ = generation_fields(fields)
        ours = {k: v for k, v in ours.items() if k in ("vocal_language", "lm_model_path", "lm_top_k", "lm_top_p",
                                                      "lm_temperature", "lm_repetition_penalty")}
        query = raw.text("sample_query") or raw.text("query")
        ours["sample_query"] = query
        checked = _validated(ours)
        params = {"query": query, "instrumental": as_bool(raw.get("instrumental"), False),
                  "vocal_language": checked.vocal_language if raw.find("vocal_language") else "unknown"}
        return envelope(await run_lm_task(request, who, "create_sample", params | lm_sampling(raw, checked), ours))

    return await enveloped(run())


def load_examples() -> dict[str, list[dict[str, Any]]]:
    return json.loads(EXAMPLES.read_text())


@router.post("/create_random_sample", summary="A random example to fill a form (reference API)", responses={401: {}, 422: {}})
async def create_random_sample(request: Request, authorization: Annotated[str | None, Header()] = None) -> Any:
    async def run():
        fields: dict[str, Any] = {}
        if request.headers.get("content-length", "0") != "0" or request.headers.get("transfer-encoding"):
            fields, _ = await read_body(request, max_bytes=64 * 1024)
        await reference_caller(request, fields, authorization)
        sample_type = str(fields.get("sample_type") or "simple_mode")
        if sample_type not in SAMPLE_TYPES:
            raise HTTPException(422, [{"field": "sample_type", "message": f"must be one of {', '.join(SAMPLE_TYPES)}"}])
        return envelope(random.choice(load_examples()[sample_type]))

    return await enveloped(run())


@router.post("/v1/music/random", summary="Submit a sample-mode generation (the older API)",
             responses={401: {}, 415: {}, 422: {}, 429: {}})
async def music_random(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> dict:
    """The LM writes caption, lyrics and metas (sample mode); `thinking` and the other generation
    fields may be given as in /release_task."""
    if not request.headers.get("content-type"):
        svc = services(request)
        who = await reference_caller(request, {}, authorization)
        return await submit_generation(svc, who, {"sample_mode": True, "thinking": True}, {}, idempotency_key)
    fields, _ = await read_body(request, max_bytes=1024 * 1024)
    fields.setdefault("thinking", True)
    fields["sample_mode"] = True
    svc = services(request)
    who = await reference_caller(request, fields, authorization)
    ours, model, _ = generation_fields(fields)
    check_model(svc, model)
    return await submit_generation(svc, who, ours, {}, idempotency_key)

