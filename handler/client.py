"""`acestep-serverless submit`: a client of the API. Submits a job, shows where it stands until it
finishes, downloads the audio."""

import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
from pydantic import TypeAdapter, ValidationError

from pipeline.contract import GenerationRequest

FINISHED = ("succeeded", "failed", "canceled")


class ClientError(Exception):
    """The API refused the request or the job did not succeed."""


def param_value(name: str, raw: str) -> Any:
    """A `--param NAME=VALUE` value: JSON (numbers, booleans, lists, null) where the field takes such a
    value, the raw text where the field is a string (`time_signature=4` stays "4")."""
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    field = GenerationRequest.model_fields.get(name)
    if field is None or isinstance(parsed, str):
        return parsed
    accepts = TypeAdapter(field.annotation)
    if _accepts(accepts, parsed) or not _accepts(accepts, raw):
        return parsed
    return raw


def _accepts(adapter: TypeAdapter, value: Any) -> bool:
    try:
        adapter.validate_python(value, strict=True)
    except ValidationError:
        return False
    return True


def submit_and_wait(
    base_url: str,
    fields: dict[str, Any],
    *,
    out_dir: Path,
    api_key: str | None = None,
    src_audio: Path | None = None,
    poll_seconds: float = 1.0,
    timeout_seconds: float = 3600.0,
    show=lambda line: print(line, file=sys.stderr, flush=True),
) -> list[Path]:
    """Submit, poll until the job finishes, download its audio into `out_dir`; the files written."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as http:
        if src_audio is not None:
            with src_audio.open("rb") as data:
                form = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}
                response = http.post("/v1/music/generate", data=form, files={"src_audio": (src_audio.name, data)})
        else:
            response = http.post("/v1/music/generate", json=fields)
        if response.status_code != 200:
            raise ClientError(f"the API refused the job (HTTP {response.status_code}): {response.text}")
        job_id = response.json()["job_id"]
        show(f"job {job_id} {response.json()['status']} at position {response.json()['queue_position']}")
        deadline = time.monotonic() + timeout_seconds
        while True:
            job = http.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in FINISHED:
                break
            if time.monotonic() > deadline:
                raise ClientError(f"job {job_id} did not finish within {timeout_seconds:.0f} s (it goes on on the server)")
            show(_progress_line(job))
            time.sleep(poll_seconds)
        if job["status"] != "succeeded":
            raise ClientError(f"job {job_id} {job['status']}: {job['error']}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for index, url in enumerate(job["result"]["audio_paths"]):
            suffix = Path(urlparse(url).path).suffix
            path = out_dir / f"{job_id}-{index}{suffix}"
            download = httpx.get(url, timeout=300)  # a signed URL: no credentials
            download.raise_for_status()
            path.write_bytes(download.content)
            written.append(path)
        show(f"job {job_id} succeeded (seeds {job['result']['seed_value']})")
        return written


def _progress_line(job: dict) -> str:
    if job["status"] == "queued":
        return f"queued: position {job['queue_position']}, about {job['eta_seconds']:.0f} s to go"
    return f"running: {job['stage'] or ''} {round(100 * job['progress'])}%, about {job['eta_seconds'] or 0:.0f} s to go"
