"""The reference API server's model routes, with a serverless meaning: `/v1/models` (its OpenRouter
list), `/v1/model_inventory`, `/v1/init` and `/v1/reinitialize` (`/v1/lora/*`: routes_lora.py).

The HTTP function never loads a model. What is "loaded" is what the live workers serve (they report
their models in their worker row); `/v1/init` succeeds when the model asked for is served, and
says what is served when it is not.

Shapes follow the reference (ace-step/ACE-Step-1.5): `acestep/openrouter_adapter.py` +
`acestep/openrouter_models.py` (`/v1/models`), `acestep/api/http/model_service_routes.py`
(inventory, init), `acestep/api/http/reinitialize_route.py`.
"""

import json
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from db import DatabaseUnavailable, StoreError
from db.states import SERVING_STATES
from handler.http.auth import Caller
from handler.http.envelope import EnvelopeRoute, envelope, error_envelope
from handler.http.routes_jobs import caller, services
from handler.storage import StorageUnavailable
from pipeline.contract import API_TASK_TYPES, BASE_MODEL_TASK_TYPES, DURATION_MAX, LM_PREFIX, dit_kind

router = APIRouter(route_class=EnvelopeRoute)
WORKER_STALE_SECONDS = 30.0
OPENROUTER_PREFIX = "acestep"  # the reference's OpenRouter ids: acestep/<model folder>
TASK_ORDER = ("text2music", "repaint", "cover", "cover-nofsq", "extract", "lego", "complete")  # the reference's order
MAX_BODY_BYTES = 64 * 1024
SERVERLESS_NOTE = ("this server loads nothing on request: GPU workers load their models when they start; "
                   "this answer reports what the live workers serve")


# --- what the live workers serve ------------------------------------------------------------


@dataclass
class Fleet:
    """Live workers (recent heartbeat, ready or busy) and the models they serve."""

    workers: list[dict[str, Any]] = field(default_factory=list)
    all_workers: list[dict[str, Any]] = field(default_factory=list)
    dit: dict[str, int] = field(default_factory=dict)  # DiT folder -> when its first live worker started (epoch s)
    lm: dict[str, int] = field(default_factory=dict)
    slots: dict[str, int] = field(default_factory=dict)  # model (DiT or LM) -> job slots of the live workers serving it

    def preferred_dit(self, default: str) -> str | None:
        return default if default in self.dit else min(self.dit, default=None)

    def preferred_lm(self, default: str | None) -> str | None:
        return default if default in self.lm else min(self.lm, default=None)


def live_fleet(store) -> Fleet:
    rows = store.workers(stale_seconds=WORKER_STALE_SECONDS)
    fleet = Fleet(all_workers=rows)
    for worker in rows:
        if not worker["alive"] or worker["state"] not in SERVING_STATES:
            continue
        fleet.workers.append(worker)
        started = int(worker["started_at"].timestamp())
        for name in worker["models"] or []:
            kind = fleet.lm if str(name).startswith(LM_PREFIX) else fleet.dit
            kind[name] = min(kind.get(name, started), started)
            fleet.slots[name] = fleet.slots.get(name, 0) + int(worker["capacity"])
    return fleet


def supported_task_types(model: str) -> list[str]:
    """Turbo and SFT DiTs: text2music, repaint, cover, cover-nofsq; base DiTs: also extract, lego,
    complete (`pipeline.contract.check_model_options` refuses them elsewhere)."""
    try:
        base = dit_kind(model) == "base"
    except ValueError:  # a name that does not tell: what every DiT can do
        base = False
    return [t for t in TASK_ORDER if t in API_TASK_TYPES and (base or t not in BASE_MODEL_TASK_TYPES)]


def model_inventory(settings, fleet: Fleet) -> dict[str, Any]:
    """The reference's inventory: every DiT a live worker serves plus the configured ones
    (ACESTEP_DIT_MODEL and ACESTEP_DIT_MODELS: jobs for them are accepted while no worker is live),
    and the LMs likewise (ACESTEP_LM_MODELS, ACESTEP_LM_MODEL); `is_loaded`: a live worker serves it."""
    default = settings.dit_model
    dits = sorted(set(fleet.dit) | set(settings.served_dit_models()))
    configured_lms = {name.strip() for name in settings.lm_models.split(",") if name.strip()}
    lms = sorted(set(fleet.lm) | configured_lms | ({settings.lm_model} if settings.lm_model else set()))
    return {
        "models": [
            {"name": name, "is_default": name == default, "is_loaded": name in fleet.dit,
             "supported_task_types": supported_task_types(name)}
            for name in dits
        ],
        "default_model": default,
        "lm_models": [{"name": name, "is_loaded": name in fleet.lm} for name in lms],
        "loaded_lm_model": fleet.preferred_lm(settings.lm_model),
        "llm_initialized": bool(fleet.lm),
        "gpus": [],  # the HTTP function has none; each worker has its own
        "gpu_mapping": None,
        "device_map": None,
    }


def model_name(value: str | None) -> str | None:
    """A model folder from a name, a checkpoint path or an OpenRouter id (`acestep/<name>`)."""
    if value is None:
        return None
    name = value.strip().replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return name or None


def unavailable() -> JSONResponse:
    return error_envelope(503, "service temporarily unavailable (job database); retry shortly", {"Retry-After": "5"})


async def _fleet(svc) -> Fleet:
    return await run_in_threadpool(live_fleet, svc.store)


async def answer(call) -> Any:
    """Await the route's work; refusals and an unreachable database become the envelope's error form."""
    try:
        return await call
    except HTTPException as exc:
        return error_envelope(exc.status_code, exc.detail, exc.headers)
    except (DatabaseUnavailable, StorageUnavailable):
        return unavailable()


async def json_body(request: Request, model: type[BaseModel]) -> Any:
    """The body as `model`; an empty body is `{}`. Refusals as HTTPException (400/413/422)."""
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise HTTPException(413, f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise HTTPException(400, "the body must be JSON") from None
    if not isinstance(data, dict):
        raise HTTPException(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [{"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]} for e in exc.errors()]
        raise HTTPException(422, problems) from None


def body_schema(model: type[BaseModel]) -> dict:
    return {"requestBody": {"content": {"application/json": {"schema": model.model_json_schema()}}, "required": False}}


# --- /v1/models (OpenRouter list) and /v1/model_inventory -----------------------------------


@router.get("/v1/models", summary="DiT models the live workers serve (the reference's OpenRouter list)", responses={401: {}})
def list_models(request: Request, who: Annotated[Caller, Depends(caller)]) -> Any:
    try:
        fleet = live_fleet(services(request).store)
    except StoreError:
        return unavailable()
    data = [
        {
            "id": f"{OPENROUTER_PREFIX}/{name}",
            "name": f"ACE-Step {name}",
            "created": started,
            "input_modalities": ["text", "audio"],
            "output_modalities": ["audio", "text"],
            "context_length": 4096,
            "max_output_length": DURATION_MAX,
            "pricing": {"prompt": "0", "completion": "0", "request": "0", "image": "0"},
            "description": "AI music generation model",
            "architecture": None,
        }
        for name, started in sorted(fleet.dit.items())
    ]
    return {"object": "list", "data": data}


@router.get("/v1/model_inventory", summary="DiT and LM models: default, served by live workers, task types", responses={401: {}})
def inventory(request: Request, who: Annotated[Caller, Depends(caller)]) -> Any:
    svc = services(request)
    try:
        fleet = live_fleet(svc.store)
    except StoreError:
        return unavailable()
    return envelope(model_inventory(svc.settings, fleet))


# --- /v1/init and /v1/reinitialize -----------------------------------------------------------


class InitModelRequest(BaseModel):
    """The reference's /v1/init body (`config_path` is accepted for `model`)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=500, description="DiT model, e.g. acestep-v15-base")
    config_path: str | None = Field(None, max_length=500, description="the DiT as a checkpoint path (same as model)")
    slot: int | None = Field(None, ge=1, le=3, description="the reference's handler slot (every worker serves its own models)")
    init_llm: bool = Field(False, description="also require a 5 Hz LM")
    lm_model_path: str | None = Field(None, max_length=500, description="LM model, e.g. acestep-5Hz-lm-1.7B")


def _served(names: dict[str, int]) -> str:
    return ", ".join(sorted(names)) or "none"


def check_init(settings, fleet: Fleet, body: InitModelRequest) -> dict[str, Any]:
    """The reference's init answer when what `body` asks for is served; HTTPException otherwise."""
    wanted = model_name(body.model) or model_name(body.config_path)
    if wanted is not None:
        if wanted not in fleet.dit:
            raise HTTPException(404, f"model {wanted!r} is not served by any live worker (served now: {_served(fleet.dit)}); "
                                     "workers load their models when they start, nothing is loaded on request")
        loaded = wanted
    else:
        if not fleet.workers:
            raise HTTPException(409, f"no live worker right now; jobs for {settings.dit_model} are still accepted and run "
                                     "when a worker starts")
        loaded = fleet.preferred_dit(settings.dit_model)
    loaded_lm = None
    if body.init_llm:
        lm = model_name(body.lm_model_path)
        if lm is not None and lm not in fleet.lm:
            raise HTTPException(404, f"LM {lm!r} is not served by any live worker (served now: {_served(fleet.lm)})")
        if lm is None and not fleet.lm:
            raise HTTPException(404, "no live worker serves a 5 Hz LM (served now: none)")
        loaded_lm = lm or fleet.preferred_lm(settings.lm_model)
    inv = model_inventory(settings, fleet)
    return {
        "message": "Model initialization completed",
        "slot": body.slot or 1,
        "loaded_model": loaded,
        "loaded_lm_model": loaded_lm,
        "models": inv["models"],
        "lm_models": inv["lm_models"],
        "llm_initialized": inv["llm_initialized"],
        "note": SERVERLESS_NOTE,
    }


@router.post("/v1/init", summary="Check that a model is served (the reference's on-demand init; nothing is loaded here)",
             responses={400: {}, 401: {}, 404: {}, 409: {}, 413: {}, 422: {}}, openapi_extra=body_schema(InitModelRequest))
async def init_model(request: Request, who: Annotated[Caller, Depends(caller)]) -> Any:
    async def run():
        svc = services(request)
        body = await json_body(request, InitModelRequest)
        return envelope(check_init(svc.settings, await _fleet(svc), body))

    return await answer(run())


@router.post("/v1/reinitialize", summary="Check that workers are live (the reference's reinitialize; nothing is reloaded here)",
             responses={401: {}, 409: {}})
async def reinitialize(request: Request, who: Annotated[Caller, Depends(caller)]) -> Any:
    async def run():
        svc = services(request)
        fleet = await _fleet(svc)
        if not fleet.workers:
            raise HTTPException(409, f"no live worker right now; jobs for {svc.settings.dit_model} are still accepted and "
                                     "run when a worker starts")
        return envelope({"message": "\u2705 Service reinitialized", "reloaded": [], "note": SERVERLESS_NOTE})

    return await answer(run())
