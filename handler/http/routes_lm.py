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
from fastapi.routing import APIRoute

from db import JobStatus
from db.states import FINISHED_STATUSES
from db.ids import new_job_id
from handler.http.envelope import EnvelopeRoute
from handler.http.inputs import AudioInputs
from handler.http.reference_request import ReferenceParams, as_bool, generation_fields
from handler.http.routes_jobs import persist_generation, services, submit_generation, validate_request
from handler.http.routes_release import (enveloped, envelope, reference_body, reference_body_doc, reference_caller,
                                          submit_reference)
from pipeline.contract import GenerationRequest

router = APIRouter(route_class=EnvelopeRoute)

EXAMPLES = Path(__file__).with_name("examples.json")
SAMPLE_TYPES = ("simple_mode", "custom_mode")
POLL_SECONDS = (0.05, 0.5)  # first and longest wait between polls of the job row
# The LM sampling options every task takes (validated as the generation request's).
LM_SAMPLING = ("lm_model_path", "lm_top_k", "lm_top_p", "lm_temperature", "lm_repetition_penalty")


async def watch_job(svc, job_id: str, timeout: float):
    """The job row at each poll, until one that finished (the last yielded). Past `timeout` the job
    is canceled and 504 raised: nothing is left running for a caller who stopped waiting."""
    deadline = time.monotonic() + timeout
    pause, longest = POLL_SECONDS
    while True:
        job = await run_in_threadpool(svc.store.get, UUID(job_id))
        yield job
        if job["status"] in FINISHED_STATUSES:
            return
        if time.monotonic() >= deadline:
            await run_in_threadpool(svc.store.cancel, UUID(job_id))
            raise HTTPException(504, f"no worker finished this task within {timeout:g} s "
                                     f"(ACESTEP_SYNC_TIMEOUT_SECONDS); it was canceled. Job {job_id}")
        await asyncio.sleep(pause)
        pause = min(pause * 2, longest)


async def wait_for_job(svc, job_id: str, timeout: float) -> dict[str, Any]:
    """The finished job row (see `watch_job`)."""
    async for job in watch_job(svc, job_id, timeout):
        pass
    return job


async def run_lm_task(request: Request, who, task: str, checked: GenerationRequest, params: dict[str, Any]) -> dict[str, Any]:
    """Queue one LM task (its fields validated by the generation contract, so a bad bpm or language
    is refused with the field named) and wait for its answer."""
    svc = services(request)
    submitted = await run_in_threadpool(persist_generation, svc, who, checked, AudioInputs(), new_job_id(), None,
                                        {"task": task, "params": params | {k: getattr(checked, k) for k in LM_SAMPLING}})
    job = await wait_for_job(svc, submitted["job_id"], svc.settings.sync_timeout_seconds)
    if job["status"] == JobStatus.SUCCEEDED:
        return (job["result"] or {}).get("lm_result") or {}
    if job["status"] == JobStatus.CANCELED:
        raise HTTPException(409, f"the {task} task was canceled")
    raise HTTPException(500, f"the {task} task failed: {job['error']}")


async def task_request(request: Request, authorization: str | None, fields_used: tuple[str, ...]):
    """(caller, the body as the reference reads it, the request of the fields a task uses: validated)."""
    who, fields, _ = await reference_body(request, authorization, 1024 * 1024)
    raw = ReferenceParams(fields)
    ours, _, _ = generation_fields(fields)
    ours = {k: v for k, v in ours.items() if k in fields_used + LM_SAMPLING}
    if raw.get("temperature") not in (None, ""):  # these routes' name for the LM temperature
        ours["lm_temperature"] = raw.get("temperature")
    if raw.find("vocal_language") is None:
        ours["vocal_language"] = "unknown"  # not given: the LM decides
    return who, raw, ours


@router.post("/format_input", summary="Let the LM format caption and lyrics (reference API)",
             responses={401: {}, 415: {}, 422: {}, 504: {}},
             openapi_extra=reference_body_doc({"type": "object", "properties": {
                 "prompt": {"type": "string"}, "caption": {"type": "string"}, "lyrics": {"type": "string"},
                 "param_obj": {"anyOf": [{"type": "object"}, {"type": "string"}]}, "temperature": {"type": "number"}}}))
async def format_input(request: Request, authorization: Annotated[str | None, Header()] = None) -> Any:
    async def run():
        metas = ("caption", "lyrics", "bpm", "audio_duration", "key_scale", "time_signature", "vocal_language")
        who, _, ours = await task_request(request, authorization, metas)
        checked = validate_request(ours)
        params = {name: getattr(checked, name) for name in metas}
        return envelope(await run_lm_task(request, who, "format", checked, params))

    return await enveloped(run())


@router.post("/v1/create_sample", summary="Let the LM write caption, lyrics and metas from a description",
             responses={401: {}, 415: {}, 422: {}, 504: {}},
             openapi_extra=reference_body_doc({"type": "object", "properties": {
                 "query": {"type": "string"}, "description": {"type": "string"}, "vocal_language": {"type": "string"},
                 "instrumental": {"type": "boolean"}}}))
async def create_sample(request: Request, authorization: Annotated[str | None, Header()] = None) -> Any:
    async def run():
        who, raw, ours = await task_request(request, authorization, ("vocal_language",))
        query = raw.text("sample_query") or raw.text("query")
        checked = validate_request(ours | {"sample_query": query})
        params = {"query": query, "instrumental": as_bool(raw.get("instrumental"), False),
                  "vocal_language": checked.vocal_language}
        return envelope(await run_lm_task(request, who, "create_sample", checked, params))

    return await enveloped(run())


def load_examples() -> dict[str, list[dict[str, Any]]]:
    return json.loads(EXAMPLES.read_text())


@router.post("/create_random_sample", summary="A random example to fill a form (reference API)", responses={401: {}, 422: {}})
async def create_random_sample(request: Request, authorization: Annotated[str | None, Header()] = None) -> Any:
    async def run():
        fields: dict[str, Any] = {}
        if request.headers.get("content-length", "0") != "0" or request.headers.get("transfer-encoding"):
            _, fields, _ = await reference_body(request, authorization, 64 * 1024)
        else:
            await reference_caller(request, fields, authorization)
        sample_type = str(fields.get("sample_type") or "simple_mode")
        if sample_type not in SAMPLE_TYPES:
            raise HTTPException(422, [{"field": "sample_type", "message": f"must be one of {', '.join(SAMPLE_TYPES)}"}])
        return envelope(random.choice(load_examples()[sample_type]))

    return await enveloped(run())


async def music_random(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> dict:
    """The LM writes caption, lyrics and metas (sample mode); `thinking` (default true here) and the
    other generation fields may be given as in /release_task, or no body at all."""
    if request.headers.get("content-type"):
        submitted, _ = await submit_reference(request, authorization, idempotency_key,
                                              defaults={"thinking": True}, overrides={"sample_mode": True})
        return submitted
    who = await reference_caller(request, {}, authorization)
    return await submit_generation(services(request), who, {"sample_mode": True, "thinking": True}, {}, idempotency_key)


# The older API answers like /v1/music/generate, refusals included (not in the envelope).
router.add_api_route("/v1/music/random", music_random, methods=["POST"], route_class_override=APIRoute,
                     summary="Submit a sample-mode generation (the older API)", responses={401: {}, 415: {}, 422: {}, 429: {}})
