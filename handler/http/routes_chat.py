"""`POST /v1/chat/completions`, OpenRouter-compatible as the reference's adapter: the last user
message becomes a generation job on the same queue (and under the same keys) as `/release_task`;
the answer carries the song as a base64 data URL in `message.audio`, with the caption, metas and
lyrics as markdown in `message.content`.

Message text is read as the reference reads it: `<prompt>…</prompt>` and `<lyrics>…</lyrics>` tags
when present, else lyrics when it looks like lyrics (section markers such as `[verse]`, or four or
more short lines), else the caption. `input_audio` parts are uploads: for text2music the first is
the reference (style) audio; for the source tasks the first is the source, the second the reference.
With `"stream": true` the answer is server-sent events: a role chunk, a "." heartbeat every 2 s
while the job is queued or running, then the content, the audio and `[DONE]`."""

import base64
import io
import json
import re
import secrets
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from starlette.datastructures import UploadFile

from db import JobStatus
from db.states import FINISHED_STATUSES
from handler.http.errors import refusal
from handler.http.reference_request import as_bool
from handler.http.routes_jobs import services, submit_generation
from handler.http.routes_lm import wait_for_job, watch_job
from handler.http.routes_release import check_model, reference_body, reference_body_doc
from handler.storage import AUDIO_CONTENT_TYPES
from pipeline.contract import SOURCE_TASK_TYPES

router = APIRouter()

MODEL_PREFIX = "acestep/"
HEARTBEAT_SECONDS = 2.0
_TAG = {name: re.compile(rf"<{name}>(.*?)</{name}>", re.DOTALL | re.IGNORECASE) for name in ("prompt", "lyrics")}
_SECTION_MARKERS = ("[verse", "[chorus", "[bridge", "[intro", "[outro", "[hook", "[pre-chorus", "[refrain", "[inst")
# audio_config keys -> our request fields
AUDIO_CONFIG_FIELDS = {"duration": "audio_duration", "bpm": "bpm", "key_scale": "key_scale",
                       "time_signature": "time_signature", "vocal_language": "vocal_language", "format": "audio_format"}
# top-level request keys passed on as generation fields (the reference's names)
PASSED_FIELDS = ("thinking", "inference_steps", "guidance_scale", "batch_size", "task_type", "repainting_start",
                 "repainting_end", "audio_cover_strength", "use_format", "use_cot_caption", "use_cot_language",
                 "lm_cfg_scale", "sample_mode")


def looks_like_lyrics(text: str) -> bool:
    lowered = text.lower()
    if any(marker in lowered for marker in _SECTION_MARKERS):
        return True
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return len(lines) >= 4 and sum(map(len, lines)) / len(lines) < 60


def read_messages(messages: Any) -> tuple[str, str, list[tuple[bytes, str]]]:
    """(caption, lyrics, [(audio bytes, format)]) from the last user message."""
    if not isinstance(messages, list):
        raise refusal(400, "messages", "must be a list of chat messages")
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "user" or not message.get("content"):
            continue
        content, audio = message["content"], []
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "text":
                    texts.append(str(part.get("text", "")).strip())
                elif part.get("type") == "input_audio" and isinstance(part.get("input_audio"), dict):
                    data = str(part["input_audio"].get("data", "")).split(",", 1)[-1]
                    try:
                        audio.append((base64.b64decode(data, validate=True), str(part["input_audio"].get("format", "mp3"))))
                    except ValueError:
                        raise refusal(400, "messages.input_audio.data", "is not valid base64") from None
            content = "\n".join(texts)
        text = str(content).strip()
        tagged = {name: pattern.search(text) for name, pattern in _TAG.items()}
        if any(tagged.values()):
            rest = text
            for match in tagged.values():
                if match:
                    rest = rest.replace(match.group(0), "")
            caption = tagged["prompt"].group(1).strip() if tagged["prompt"] else rest.strip()
            return caption, tagged["lyrics"].group(1).strip() if tagged["lyrics"] else "", audio
        return ("", text, audio) if looks_like_lyrics(text) else (text, "", audio)
    return "", "", []


def generation_request(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, UploadFile], str]:
    """(generation fields, uploads, the model id answered) of a chat completion request."""
    caption, lyrics, audio = read_messages(body.get("messages"))
    sample_mode = as_bool(body.get("sample_mode"), False)
    if body.get("lyrics"):  # lyrics given: the message is the caption
        caption, lyrics = caption or lyrics, str(body["lyrics"])
    fields: dict[str, Any] = {"caption": caption, "lyrics": lyrics}
    if sample_mode:  # the message is what to make
        fields |= {"caption": "", "lyrics": "", "sample_query": caption or lyrics}
    if not (fields["caption"] or fields["lyrics"] or sample_mode or audio):
        raise refusal(400, "messages", "no prompt, lyrics, sample query or input audio in the last user message")
    config = body.get("audio_config") or {}
    if not isinstance(config, dict):
        raise refusal(400, "audio_config", "must be an object")
    for key, field in AUDIO_CONFIG_FIELDS.items():
        if config.get(key) not in (None, ""):
            fields[field] = config[key]
    if as_bool(config.get("instrumental"), False) and not fields["lyrics"]:
        fields["lyrics"] = "[inst]"
    for key in PASSED_FIELDS:
        if body.get(key) is not None:
            fields[key] = body[key]
    fields.setdefault("batch_size", 1)
    for ours, theirs in (("lm_temperature", "temperature"), ("lm_top_p", "top_p"), ("lm_top_k", "top_k")):
        if body.get(theirs) is not None:
            fields[ours] = body[theirs]
    if body.get("audio_codes"):
        fields["audio_code_string"] = body["audio_codes"]
    if body.get("seed") is not None:
        fields |= {"seed": body["seed"], "use_random_seed": False}
    roles = ("src_audio", "reference_audio") if fields.get("task_type") in SOURCE_TASK_TYPES else ("reference_audio",)
    uploads = {role: UploadFile(io.BytesIO(data), filename=f"input.{fmt}") for role, (data, fmt) in zip(roles, audio)}
    return fields, uploads, str(body.get("model") or "")


def answer_content(job: dict[str, Any]) -> str:
    """The markdown the reference's adapter answers with: caption and metas, then lyrics."""
    request, result = job["request"], job["result"] or {}
    caption = result.get("caption", request.get("caption", ""))
    lyrics = result.get("lyrics", request.get("lyrics", ""))
    lines = [f"**Caption:** {caption}"] if caption else []
    for label, key, unit in (("BPM", "bpm", ""), ("Duration", "duration", "s"), ("Key", "keyscale", ""),
                             ("Time Signature", "timesignature", "")):
        value = result.get(key)
        if value not in (None, "", "N/A"):
            lines.append(f"**{label}:** {value}{unit}")
    parts = ["## Metadata\n" + "\n".join(lines)] if lines else []
    if lyrics.strip() and lyrics.strip().lower() not in ("[inst]", "[instrumental]"):
        parts.append(f"## Lyrics\n{lyrics}")
    return "\n\n".join(parts) or "Music generated successfully."


def audio_data_url(svc, job: dict[str, Any]) -> list[dict[str, Any]] | None:
    keys = (job["result"] or {}).get("audio_keys") or []
    if not keys:
        return None
    with svc.storage.open(keys[0]) as body:
        data = body.read()
    ext = keys[0].rsplit(".", 1)[-1]
    url = f"data:{AUDIO_CONTENT_TYPES.get(ext, 'audio/mpeg')};base64,{base64.b64encode(data).decode()}"
    return [{"type": "audio_url", "audio_url": {"url": url}}]


def failure(job: dict[str, Any]) -> str:
    return job["error"] or ("canceled" if job["status"] == JobStatus.CANCELED else "generation failed")


@router.post("/v1/chat/completions", summary="Generate music from a chat turn (OpenRouter-compatible)",
             responses={400: {}, 401: {}, 415: {}, 422: {}, 429: {}, 504: {}},
             openapi_extra=reference_body_doc({"type": "object", "required": ["messages"], "properties": {
                 "model": {"type": "string"}, "stream": {"type": "boolean"},
                 "messages": {"type": "array", "items": {"type": "object", "properties": {
                     "role": {"type": "string"}, "content": {"anyOf": [{"type": "string"}, {"type": "array"}]}}}}}}))
async def chat_completions(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Any:
    svc = services(request)
    who, body, _ = await reference_body(
        request, authorization, int(2 * svc.settings.max_upload_mb * 1.4 * 1024 * 1024) + 1024 * 1024)
    fields, uploads, model_id = generation_request(body)
    name = check_model(svc, model_id or None, svc.settings.served_dit_models())
    if name is not None:  # the DiT asked for runs the job
        fields["model"] = name
    submitted = await submit_generation(svc, who, fields, uploads, idempotency_key)
    answered_model = model_id or MODEL_PREFIX + svc.settings.dit_model
    completion_id = f"chatcmpl-{secrets.token_hex(8)}"
    if as_bool(body.get("stream"), False):
        return StreamingResponse(_events(svc, submitted["job_id"], completion_id, answered_model),
                                 media_type="text/event-stream")
    job = await wait_for_job(svc, submitted["job_id"], svc.settings.sync_timeout_seconds)
    if job["status"] != JobStatus.SUCCEEDED:
        raise HTTPException(500, failure(job))
    audio = await run_in_threadpool(audio_data_url, svc, job)
    return {
        "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": answered_model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer_content(job), "audio": audio},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        "job_id": submitted["job_id"],
    }


async def _events(svc, job_id: str, completion_id: str, model: str):
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        data = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(data)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    next_beat = time.monotonic() + HEARTBEAT_SECONDS
    try:
        async for job in watch_job(svc, job_id, svc.settings.sync_timeout_seconds):
            if job["status"] not in FINISHED_STATUSES and time.monotonic() >= next_beat:
                yield chunk({"content": "."})
                next_beat = time.monotonic() + HEARTBEAT_SECONDS
    except HTTPException as exc:  # nobody finished it in time: it was canceled
        yield chunk({"content": f"\n\nError: {exc.detail}"})
        yield chunk({}, "error")
        yield "data: [DONE]\n\n"
        return
    if job["status"] != JobStatus.SUCCEEDED:
        yield chunk({"content": f"\n\nError: {failure(job)}"})
        yield chunk({}, "error")
    else:
        yield chunk({"content": "\n\n" + answer_content(job)})
        audio = await run_in_threadpool(audio_data_url, svc, job)
        if audio:
            yield chunk({"audio": audio})
        yield chunk({}, "stop")
    yield "data: [DONE]\n\n"
