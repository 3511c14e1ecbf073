"""LoRA / LoKr adapters: uploads (`/v1/lora/adapters`) and the reference server's `/v1/lora/*`
routes as a per-API-key default, in Postgres.

Where adapters live (a job's `lora` names them):
* uploaded: `POST /v1/lora/adapters` (multipart: `name` and `file`, a .zip of a PEFT adapter folder,
  or the two files adapter_config.json and adapter_model.safetensors as two parts). The server checks
  the config (JSON, peft_type LORA or LOKR, r) and the safetensors header, stores one canonical zip at
  `loras/<owner>/<name>/<sha256>.zip` and a `lora_adapters` row. `GET` lists the caller's,
  `DELETE /v1/lora/adapters/{name}` removes one.
* on the workers' disk: `<ACESTEP_CHECKPOINT_DIR>/loras/<name>/` holding the same two files, for
  every caller. A name that is no upload of the caller is taken to be such a folder; a worker that
  lacks it fails the job saying so.

`/v1/lora/load|unload|toggle|scale|status` keep upstream's bodies and answers, but the state they
set belongs to the API key (a `lora_states` row), not to a process: a later job of that key that
names no `lora` runs with the state's adapters while `use_lora` is on (`apply_default_lora`, at
submit, writes them into the stored request; it lives in db/lora_store.py, which
routes_jobs can import without a cycle). `lora_path` is an uploaded adapter's name, or
`loras/<name>` / `<name>` for a checkpoint-dir folder.
"""

import hashlib
import re
import struct
import tempfile
import zipfile
from pathlib import PurePosixPath
from typing import IO, Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile as StarletteUploadFile

from db.lora_store import STORAGE_PREFIX, LoraStore, adapter_key, adapter_prefix
from handler.http.auth import Caller
from handler.http.body import CountedReceive, content_type
from handler.http.envelope import EnvelopeRoute, envelope
from handler.http.errors import refusal
from handler.http.routes_jobs import caller, services
from handler.http.routes_models import answer, body_schema, json_body
from pipeline.contract import LORA_MAX_ADAPTERS, LORA_NAME_PATTERN, LORA_SCALE_MAX
from pipeline.lora import (CONFIG_FILE, WEIGHTS_FILE, AdapterError, adapter_type, check_safetensors_header,
                           read_adapter_config)

router = APIRouter(route_class=EnvelopeRoute)

MAX_ADAPTER_BYTES = 512 * 1024 * 1024  # one adapter's weights (rank 64 on every attention projection of a 2B DiT: ~200 MB)
MAX_ADAPTERS_PER_KEY = 100
_NAME = re.compile(LORA_NAME_PATTERN)
_COPY_CHUNK = 1024 * 1024
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed: the same files give the same archive, hence the same digest
OK, WARN, FAIL = "\u2705", "\u26a0\ufe0f", "\u274c"


def lora_store(svc_or_store: Any) -> LoraStore:
    return LoraStore.of(svc_or_store)


# --- uploads --------------------------------------------------------------------------------------


def _read_limited(source: IO[bytes], limit: int, what: str) -> bytes:
    data = source.read(limit + 1)
    if len(data) > limit:
        raise refusal(413, "file", f"{what} is larger than {limit} bytes")
    return data


def _copy_limited(source: IO[bytes], sink: IO[bytes], limit: int) -> int:
    copied = 0
    while chunk := source.read(_COPY_CHUNK):
        copied += len(chunk)
        if copied > limit:
            raise refusal(413, "file", f"the adapter weights are larger than {MAX_ADAPTER_BYTES // (1024 * 1024)} MB")
        sink.write(chunk)
    return copied


def _check_weights(weights: IO[bytes], size: int, peft_type: str) -> None:
    weights.seek(0)
    head = weights.read(8)
    if len(head) == 8:
        (length,) = struct.unpack("<Q", head)
        head += weights.read(min(length, size))
    check_safetensors_header(head, size, peft_type)
    weights.seek(0)


def _from_zip(upload: IO[bytes]) -> tuple[bytes, IO[bytes], int]:
    """(config bytes, weights file, weights size) of an uploaded .zip of an adapter folder: the
    two files at its root or in one folder (the shallowest pair)."""
    try:
        archive = zipfile.ZipFile(upload)
    except (zipfile.BadZipFile, OSError, EOFError):
        raise refusal(422, "file", "is not a readable .zip") from None
    with archive:
        members = [info for info in archive.infolist() if not info.is_dir()]
        folders = {}
        for info in members:
            path = PurePosixPath(info.filename)
            if path.name in (CONFIG_FILE, WEIGHTS_FILE):
                folders.setdefault(str(path.parent), {})[path.name] = info
        pairs = sorted((folder for folder, found in folders.items() if len(found) == 2), key=lambda f: (f.count("/"), f))
        if not pairs:
            raise refusal(422, "file", f"the .zip holds no folder with both {CONFIG_FILE} and {WEIGHTS_FILE}")
        found = folders[pairs[0]]
        config_info, weights_info = found[CONFIG_FILE], found[WEIGHTS_FILE]
        if weights_info.file_size > MAX_ADAPTER_BYTES:
            raise refusal(413, "file", f"{WEIGHTS_FILE} is larger than {MAX_ADAPTER_BYTES // (1024 * 1024)} MB")
        try:
            with archive.open(config_info) as source:
                config = _read_limited(source, 1024 * 1024, CONFIG_FILE)
            weights = tempfile.TemporaryFile()
            with archive.open(weights_info) as source:
                size = _copy_limited(source, weights, MAX_ADAPTER_BYTES)
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:  # corrupt, encrypted
            raise refusal(422, "file", f"the .zip could not be read: {exc}") from None
    return config, weights, size


def package_adapter(files: list[tuple[str, str, IO[bytes]]]) -> tuple[IO[bytes], str, int, dict[str, Any]]:
    """Uploaded parts ((field, filename, file)) -> (the canonical zip, "sha256:<hex>" of it, its size,
    the adapter config). HTTPException (413/422 naming `file`) for anything that is no adapter."""
    archives = [f for f in files if f[1].lower().endswith(".zip")]
    configs = [f for f in files if f[1] == CONFIG_FILE or f[0] == "adapter_config"]
    weights_parts = [f for f in files if f[1].lower().endswith(".safetensors") or f[0] == "adapter_model"]
    if archives and len(files) == 1:
        config_bytes, weights, size = _from_zip(archives[0][2])
    elif len(configs) == 1 and len(weights_parts) == 1 and len(files) == 2:
        config_bytes = _read_limited(configs[0][2], 1024 * 1024, CONFIG_FILE)
        weights = tempfile.TemporaryFile()
        size = _copy_limited(weights_parts[0][2], weights, MAX_ADAPTER_BYTES)
    else:
        raise refusal(422, "file", f"send one .zip of a PEFT adapter folder, or the two files {CONFIG_FILE} and "
                                   f"{WEIGHTS_FILE}")
    try:
        config = read_adapter_config(config_bytes)
        _check_weights(weights, size, str(config["peft_type"]))
    except AdapterError as exc:
        weights.close()
        raise refusal(422, "file", str(exc)) from None
    out = tempfile.TemporaryFile()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        archive.writestr(zipfile.ZipInfo(CONFIG_FILE, _ZIP_TIME), config_bytes)
        with weights, archive.open(zipfile.ZipInfo(WEIGHTS_FILE, _ZIP_TIME), "w", force_zip64=True) as sink:
            while chunk := weights.read(_COPY_CHUNK):
                sink.write(chunk)
    digest = hashlib.sha256()
    out.seek(0)
    while chunk := out.read(_COPY_CHUNK):
        digest.update(chunk)
    total = out.tell()
    out.seek(0)
    return out, f"sha256:{digest.hexdigest()}", total, config


def adapter_view(row: dict[str, Any]) -> dict[str, Any]:
    config = row.get("config") or {}
    return {
        "name": row["name"], "digest": row["digest"], "size_bytes": int(row["size_bytes"]),
        "adapter_type": adapter_type(config) if config.get("peft_type") else None,
        "r": config.get("r"), "alpha": config.get("lora_alpha", config.get("alpha")),
        "target_modules": config.get("target_modules"),
        "created_at": row["created_at"].isoformat() if row.get("created_at") else None,
    }


async def _upload_parts(request: Request) -> tuple[str, list[tuple[str, str, IO[bytes]]]]:
    if content_type(request) != "multipart/form-data":
        raise refusal(415, "Content-Type", "must be multipart/form-data (fields `name` and `file`)")
    limit = MAX_ADAPTER_BYTES + 1024 * 1024
    counted = Request(request.scope, CountedReceive(request.receive, limit))
    form = await counted.form(max_files=2, max_fields=10)
    name = form.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name.strip()) or set(name.strip()) == {"."}:
        raise refusal(422, "name", f"must be 1-64 characters of A-Z a-z 0-9 . _ - (not . or ..); got {name!r}")
    files = [(field, value.filename or "", value.file) for field, value in form.multi_items()
             if isinstance(value, (UploadFile, StarletteUploadFile))]
    if not files:
        raise refusal(422, "file", "no file: send a .zip of a PEFT adapter folder, or its two files")
    return name.strip(), files


@router.post("/v1/lora/adapters", summary="Upload a LoRA/LoKr adapter (PEFT folder as a .zip, or its two files)",
             responses={401: {}, 413: {}, 415: {}, 422: {}, 503: {}})
async def upload_adapter(request: Request, who: Annotated[Caller, Depends(caller)]) -> Any:
    async def run():
        svc = services(request)
        name, files = await _upload_parts(request)
        return envelope(await run_in_threadpool(_store_upload, svc, who.owner, name, files))

    return await answer(run())


def _store_upload(svc, owner: str, name: str, files) -> dict[str, Any]:
    store = lora_store(svc)
    if store.adapter(owner, name) is None and len(store.adapters(owner, limit=MAX_ADAPTERS_PER_KEY)) >= MAX_ADAPTERS_PER_KEY:
        raise refusal(422, "name", f"at most {MAX_ADAPTERS_PER_KEY} adapters per API key: delete one first")
    archive, digest, size, config = package_adapter(files)
    key = adapter_key(owner, name, digest)
    with archive:
        svc.storage.put(key, archive, "application/zip")
    # A replaced upload's archive stays (queued jobs may name it) until the adapter is deleted.
    row = store.put_adapter(owner, name, storage_key=key, digest=digest, size_bytes=size, config=config)
    return {"message": f"{OK} LoRA adapter {name!r} uploaded", **adapter_view(row)}


@router.get("/v1/lora/adapters", summary="The caller's uploaded LoRA/LoKr adapters", responses={401: {}, 503: {}})
async def list_adapters(request: Request, who: Annotated[Caller, Depends(caller)]) -> Any:
    async def run():
        rows = await run_in_threadpool(lora_store(services(request)).adapters, who.owner)
        return envelope({"adapters": [adapter_view(row) for row in rows]})

    return await answer(run())


@router.delete("/v1/lora/adapters/{name}", summary="Delete an uploaded LoRA/LoKr adapter",
               responses={401: {}, 404: {}, 422: {}, 503: {}})
async def delete_adapter(request: Request, who: Annotated[Caller, Depends(caller)],
                         name: Annotated[str, Path(pattern=LORA_NAME_PATTERN)]) -> Any:
    async def run():
        svc = services(request)

        def delete() -> dict[str, Any]:
            store = lora_store(svc)
            if store.delete_adapter(who.owner, name) is None:
                raise refusal(404, "name", f"no uploaded adapter named {name!r}")
            svc.storage.delete_prefix(adapter_prefix(who.owner, name))

            def forget(state: dict[str, Any]) -> None:
                state["adapters"] = [e for e in state["adapters"] if not (e["lora"] == name and e.get("source") == "upload")]
                _fix_active(state)

            store.update_state(who.owner, forget)
            return {"message": f"{OK} LoRA adapter {name!r} deleted", "name": name}

        return envelope(await run_in_threadpool(delete))

    return await answer(run())


# --- the reference server's /v1/lora/* (a per-key default) ----------------------------------------


class LoadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_path: str = Field(..., max_length=2000, description="an uploaded adapter's name, or loras/<name> (or <name>) "
                                                              "for a folder under the workers' <checkpoint dir>/loras/")
    adapter_name: str | None = Field(None, max_length=64, description="what status calls it (default: the adapter's name)")


class SetLoRAScaleRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    scale: float = Field(..., ge=0.0, le=LORA_SCALE_MAX, allow_inf_nan=False, description="LoRA strength (0 to 2)")
    adapter_name: str | None = Field(None, max_length=64, description="default: the active adapter")


class ToggleLoRARequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    use_lora: bool


def lora_path_name(lora_path: str) -> str:
    """The adapter a `lora_path` names: `<name>` or `loras/<name>`; 400 for anything else."""
    value = lora_path.strip().replace("\\", "/").strip("/")
    value = value.removeprefix(f"{STORAGE_PREFIX}/")
    if not _NAME.fullmatch(value) or set(value) == {"."}:
        raise HTTPException(400, f"{FAIL} {lora_path!r} names no adapter here: give the name of an adapter uploaded "
                                 f"with POST /v1/lora/adapters, or loras/<name> for a folder under the workers' "
                                 f"<checkpoint dir>/loras/ (this server reads no client paths)")
    return value


def _fix_active(state: dict[str, Any]) -> None:
    names = [e["adapter_name"] for e in state["adapters"]]
    if state["active_adapter"] not in names:
        state["active_adapter"] = names[-1] if names else None
    if not names:
        state["use_lora"] = False


def status_view(state: dict[str, Any]) -> dict[str, Any]:
    """Upstream's /v1/lora/status payload."""
    entries = state["adapters"]
    active = next((e for e in entries if e["adapter_name"] == state["active_adapter"]), None)
    types = [e.get("adapter_type") for e in ([active] if active else []) + entries if e.get("adapter_type")]
    return {
        "lora_loaded": bool(entries),
        "use_lora": bool(state["use_lora"]) and bool(entries),
        "lora_scale": float(active["scale"]) if active else 1.0,
        "adapter_type": types[0] if types else None,
        "scales": {e["adapter_name"]: float(e["scale"]) for e in entries},
        "active_adapter": state["active_adapter"],
        "adapters": [e["adapter_name"] for e in entries],
        "synthetic_default_mode": False,
    }


def load_into_state(store: LoraStore, owner: str, lora_path: str, adapter_name: str | None) -> dict[str, Any]:
    name = lora_path_name(lora_path)
    alias = (adapter_name or "").strip() or name
    if not _NAME.fullmatch(alias):
        raise refusal(422, "adapter_name", "must be 1-64 characters of A-Z a-z 0-9 . _ -")
    upload = store.adapter(owner, name)
    entry = {"adapter_name": alias, "lora": name, "scale": 1.0, "source": "upload" if upload else "checkpoint",
             "adapter_type": adapter_type(upload["config"]) if upload and upload["config"].get("peft_type") else None}

    def load(state: dict[str, Any]) -> None:
        others = [e for e in state["adapters"] if e["adapter_name"] != alias]
        twin = next((e for e in others if e["lora"] == name), None)
        if twin is not None:
            raise HTTPException(400, f"{FAIL} {name!r} is already loaded as {twin['adapter_name']!r}")
        if len(others) >= LORA_MAX_ADAPTERS:
            raise HTTPException(400, f"{FAIL} at most {LORA_MAX_ADAPTERS} adapters can be loaded at once; unload first")
        state["adapters"] = others + [entry]
        state["active_adapter"] = alias
        state["use_lora"] = True

    store.update_state(owner, load)
    where = "your uploaded adapter" if upload else f"the workers' <checkpoint dir>/loras/{name} (checked when a job runs)"
    data = {"message": f"{OK} LoRA loaded from {lora_path} ({where}); your later jobs without `lora` use it",
            "lora_path": lora_path}
    if adapter_name:
        data["adapter_name"] = alias
    return data


@router.post("/v1/lora/load", summary="Add a LoRA adapter to this API key's default (applied to its later jobs)",
             responses={400: {}, 401: {}, 413: {}, 422: {}, 503: {}}, openapi_extra=body_schema(LoadLoRARequest))
async def lora_load(request: Request, who: Annotated[Caller, Depends(caller)]) -> Any:
    async def run():
        body = await json_body(request, LoadLoRARequest)
        store = lora_store(services(request))
        return envelope(await run_in_threadpool(load_into_state, store, who.owner, body.lora_path, body.adapter_name))

    return await answer(run())


@router.post("/v1/lora/unload", summary="Clear this API key's default LoRA adapters", responses={401: {}, 503: {}})
async def lora_unload(request: Request, who: Annotated[Caller, Depends(caller)]) -> Any:
    async def run():
        def unload(state: dict[str, Any]) -> bool:
            had = bool(state["adapters"])
            state.update(adapters=[], active_adapter=None, use_lora=False)
            return had

        _, had = await run_in_threadpool(lora_store(services(request)).update_state, who.owner, unload)
        if not had:
            return envelope({"message": f"{WARN} No LoRA adapter is loaded; nothing to unload"})
        return envelope({"message": f"{OK} LoRA unloaded; your later jobs run without adapters"})

    return await answer(run())


def _no_adapter() -> dict:
    return envelope(None, code=400, error=f"{FAIL} No LoRA adapter is loaded. Load one with /v1/lora/load first")


@router.post("/v1/lora/toggle", summary="Turn this API key's default LoRA adapters on or off",
             responses={401: {}, 413: {}, 422: {}, 503: {}}, openapi_extra=body_schema(ToggleLoRARequest))
async def lora_toggle(request: Request, who: Annotated[Caller, Depends(caller)]) -> Any:
    async def run():
        body = await json_body(request, ToggleLoRARequest)

        def toggle(state: dict[str, Any]) -> bool:
            if not state["adapters"]:
                return False
            state["use_lora"] = body.use_lora
            return True

        _, done = await run_in_threadpool(lora_store(services(request)).update_state, who.owner, toggle)
        if not done:
            return _no_adapter()
        word = "enabled" if body.use_lora else "disabled"
        return envelope({"message": f"{OK} LoRA {word}", "use_lora": body.use_lora})

    return await answer(run())


@router.post("/v1/lora/scale", summary="Set the strength of one of this API key's default LoRA adapters",
             responses={401: {}, 413: {}, 422: {}, 503: {}}, openapi_extra=body_schema(SetLoRAScaleRequest))
async def lora_scale(request: Request, who: Annotated[Caller, Depends(caller)]) -> Any:
    async def run():
        body = await json_body(request, SetLoRAScaleRequest)

        def scale(state: dict[str, Any]) -> str | dict:
            if not state["adapters"]:
                return _no_adapter()
            target = body.adapter_name or state["active_adapter"]
            entry = next((e for e in state["adapters"] if e["adapter_name"] == target), None)
            if entry is None:
                loaded = ", ".join(e["adapter_name"] for e in state["adapters"])
                return envelope(None, code=400, error=f"{FAIL} adapter {target!r} is not loaded (loaded: {loaded})")
            entry["scale"] = float(body.scale)
            return target

        _, target = await run_in_threadpool(lora_store(services(request)).update_state, who.owner, scale)
        if isinstance(target, dict):
            return target
        data = {"message": f"{OK} LoRA scale set to {body.scale:.2f}" + (f" for {target}" if body.adapter_name else ""),
                "scale": body.scale}
        if body.adapter_name:
            data["adapter_name"] = target
        return envelope(data)

    return await answer(run())


@router.get("/v1/lora/status", summary="This API key's default LoRA state (upstream's shape)", responses={401: {}, 503: {}})
async def lora_status(request: Request, who: Annotated[Caller, Depends(caller)]) -> Any:
    async def run():
        state = await run_in_threadpool(lora_store(services(request)).state, who.owner)
        return envelope(status_view(state))

    return await answer(run())
