"""A job row as clients see it (`GET /v1/jobs/{id}`): timestamps as epoch seconds, audio keys turned
into fresh download URLs, errors as the stored client-facing message.

The worker's result contract (written by the worker, rendered here):
    {"audio_keys": [...], "generation_info": str, "status_message": str, "seed_value": "s1,s2",
     and the optional keys of pipeline.contract.RESULT_INFO_FIELDS: "bpm", "duration", "genres",
     "keyscale", "timesignature", "metas", "lm_model", "lm_backend", "dit_model"}
"""

from datetime import datetime
from typing import Any

from db import JobStatus
from pipeline.contract import RESULT_INFO_FIELDS


def epoch(value: datetime | None) -> float | None:
    return round(value.timestamp(), 3) if value is not None else None


def render_result(result: dict[str, Any], url_for) -> dict[str, Any]:
    paths = [url_for(key) for key in result.get("audio_keys", [])]
    rendered = {
        "first_audio_path": paths[0] if paths else None,
        "second_audio_path": paths[1] if len(paths) > 1 else None,
        "audio_paths": paths,
        "generation_info": result.get("generation_info", ""),
        "status_message": result.get("status_message", ""),
        "seed_value": result.get("seed_value", ""),
    }
    rendered.update({name: result[name] for name in RESULT_INFO_FIELDS if result.get(name) is not None})
    return rendered


def job_response(job: dict[str, Any], *, position: int, eta: float | None, url_for) -> dict[str, Any]:
    status = job["status"]
    error = None
    if status == JobStatus.FAILED:
        error = job["error"] or "the job failed"
    elif status == JobStatus.CANCELED:
        error = "canceled at the client's request"
    return {
        "job_id": str(job["id"]),
        "status": status,
        "created_at": epoch(job["created_at"]),
        "started_at": epoch(job["started_at"]),
        "finished_at": epoch(job["finished_at"]),
        "queue_position": position,
        "eta_seconds": eta,
        "progress": job["progress"],
        "stage": job["stage"],
        "result": render_result(job["result"], url_for) if status == JobStatus.SUCCEEDED and job["result"] else None,
        "error": error,
        # A cancel of a running job is pending until its worker stops it (within about a second).
        "cancel_requested": bool(job.get("cancel_requested")) if status in (JobStatus.QUEUED, JobStatus.RUNNING) else None,
    }
