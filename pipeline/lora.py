"""LoRA and LoKr adapters (PEFT) on the DiT, per job.

An adapter is a PEFT adapter folder: `adapter_config.json` (`peft_type` LORA or LOKR, `r`,
`lora_alpha` / `alpha`, `target_modules`, ...) and `adapter_model.safetensors`, whose keys name
the adapted modules (`base_model.model.<module path>.lora_A.weight`, `...lokr_w1`, ...). Upstream
trains on the DiT decoder, so its module paths start at the decoder (`layers.0.self_attn.q_proj`);
paths from the whole checkpoint (`decoder.layers.0...`) load too.

`AdapterCache.activate(dit, adapters)` loads each adapter onto the DiT once (PEFT's
`inject_adapter_in_model` with exactly the modules its weights name, then `set_peft_model_state_dict`),
keeps at most `max_loaded` per DiT (the least recently used is deleted beyond that), and for the
duration of the `with` block makes exactly the given adapters active at their scales; afterwards
every adapted layer is disabled, so the DiT computes exactly what it computes without adapters.
LoRA and LoKr adapters are not combined in one run (PEFT wraps a module for one tuner kind):
switching kinds unwraps the DiT and reloads.

`read_adapter_config` and `check_safetensors_header` are light (no torch): the HTTP function
checks uploads with them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import struct
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# peft_type -> (the tuner's parameter prefix in the weights' keys, adapter_type as /v1/lora/status says it)
SUPPORTED_PEFT_TYPES = {"LORA": ("lora_", "lora"), "LOKR": ("lokr_", "lokr")}
PEFT_PREFIX = "base_model.model."
MAX_HEADER_BYTES = 64 * 1024 * 1024
MAX_CONFIG_BYTES = 1024 * 1024
SCALE_MAX = 2.0
_INTERNAL_NAMES = itertools.count(1)  # PEFT adapter names, unique in the process (several caches may share a DiT)


class AdapterError(ValueError):
    """An adapter that cannot be used: missing files, an unsupported kind, weights that do not fit
    the DiT. The message is for the job's error and the client."""


# ---- light checks (no torch) ------------------------------------------------------------------


def read_adapter_config(raw: bytes | str) -> dict[str, Any]:
    """adapter_config.json as a dict; AdapterError unless it is a JSON object with a supported
    `peft_type` and a positive integer `r`."""
    if isinstance(raw, bytes) and len(raw) > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES // 1024} KB")
    try:
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise AdapterError(f"{CONFIG_FILE}: peft_type {config.get('peft_type')!r} is not supported "
                           f"(supported: {', '.join(SUPPORTED_PEFT_TYPES)})")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{CONFIG_FILE}: r must be a positive integer, got {rank!r}")
    return config


def adapter_type(config: Mapping[str, Any]) -> str:
    """"lora" or "lokr", as /v1/lora/status reports it."""
    return SUPPORTED_PEFT_TYPES[str(config.get("peft_type", "")).upper()][1]


def check_safetensors_header(head: bytes, total_size: int, peft_type: str | None = None) -> dict[str, Any]:
    """The tensors a safetensors file declares ({name: {dtype, shape, data_offsets}}), from its first
    bytes `head` (at least 8 + the header length) and its size. AdapterError unless the header is
    JSON, every tensor lies inside the file and the data ends where the file does, there is at
    least one tensor, and (with `peft_type`) every tensor is one of that tuner's parameters."""
    if total_size < 8 or len(head) < 8:
        raise AdapterError(f"{WEIGHTS_FILE} is too short to be a safetensors file")
    (length,) = struct.unpack("<Q", head[:8])
    if length > MAX_HEADER_BYTES or 8 + length > total_size:
        raise AdapterError(f"{WEIGHTS_FILE}: the safetensors header length ({length}) does not fit the file")
    if len(head) < 8 + length:
        raise AdapterError(f"{WEIGHTS_FILE}: the safetensors header is cut short")
    try:
        header = json.loads(head[8:8 + length])
    except (ValueError, UnicodeDecodeError):
        raise AdapterError(f"{WEIGHTS_FILE}: the safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{WEIGHTS_FILE}: the safetensors header is not a JSON object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        raise AdapterError(f"{WEIGHTS_FILE} holds no tensors")
    data_size = total_size - 8 - length
    end = 0
    for name, entry in tensors.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size or not isinstance(entry.get("shape"), list)
                or not isinstance(entry.get("dtype"), str)):
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {name!r} is not described correctly in the header")
        end = max(end, offsets[1])
    if end != data_size:
        raise AdapterError(f"{WEIGHTS_FILE}: the tensors' data ({end} bytes) does not end where the file does "
                           f"({data_size} bytes)")
    if peft_type is not None:
        prefix = SUPPORTED_PEFT_TYPES[peft_type.upper()][0]
        foreign = sorted(n for n in tensors if _module_path(n, prefix) is None)
        if foreign:
            raise AdapterError(f"{WEIGHTS_FILE}: tensors that are no {peft_type.upper()} parameters: "
                               f"{', '.join(foreign[:5])}")
    return tensors


def _module_path(key: str, prefix: str) -> str | None:
    """The adapted module's path in a weight key (`base_model.model.a.b.lora_A.weight` -> `a.b`);
    None when no part of the key is a parameter of the tuner (`prefix`: lora_, lokr_)."""
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    for index, part in enumerate(parts):
        if part.startswith(prefix):
            return ".".join(parts[:index]) if index else None
    return None


# ---- loading onto the DiT ------------------------------------------------------------------------


@dataclasses.dataclass
class _Loaded:
    internal: str  # the PEFT adapter name on the model (no dots)
    peft_type: str
    root: str  # "" (the whole DiT) or "decoder": where the weights' module paths start


def _adapter_files(path: Path) -> tuple[dict[str, Any], Path]:
    folder = Path(path)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterError(f"{folder} is not a PEFT adapter folder (it needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    return read_adapter_config(config_path.read_bytes()), weights_path


def _tuner_layers(module: nn.Module) -> Iterator[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, sub in module.named_modules():
        if isinstance(sub, BaseTunerLayer):
            yield name, sub


def _peft_config(config: dict[str, Any], targets: list[str]):
    """The PEFT config object of a saved config, for inference on exactly `targets`."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = str(config["peft_type"]).upper()
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in config.items() if k in known and k != "peft_type"}
    kwargs.update(target_modules=targets, inference_mode=True, layers_to_transform=None, layers_pattern=None,
                  exclude_modules=None, modules_to_save=None)
    for dropout in ("lora_dropout", "rank_dropout", "module_dropout"):
        if dropout in known:
            kwargs[dropout] = 0.0
    return cls(**kwargs)


def load_adapter(dit: nn.Module, path: Path, internal: str) -> _Loaded:
    """Inject the adapter folder `path` into `dit` as PEFT adapter `internal` and load its weights.
    AdapterError (and nothing left behind) when it does not fit."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config, weights_path = _adapter_files(path)
    peft_type = str(config["peft_type"]).upper()
    prefix = SUPPORTED_PEFT_TYPES[peft_type][0]
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # noqa: BLE001 - a corrupt file, whatever safetensors says
        raise AdapterError(f"{weights_path} could not be read: {exc}") from None
    paths = {_module_path(key, prefix) for key in state}
    if None in paths or not paths:
        raise AdapterError(f"{weights_path}: tensors that are no {peft_type} parameters")
    root_name = _root_for(dit, paths)
    root = dit.get_submodule(root_name) if root_name else dit
    targets = sorted(paths)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "already found a peft_config attribute": several adapters are meant
            inject_adapter_in_model(_peft_config(config, targets), root, adapter_name=internal)
            result = set_peft_model_state_dict(root, state, adapter_name=internal)
        missing = [k for k in result.missing_keys if f".{internal}" in k]
        unexpected = list(result.unexpected_keys)
        if missing or unexpected:
            raise AdapterError(f"{path}: the weights do not match the modules they name "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    except AdapterError:
        _delete(dit, internal)
        raise
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # shapes that do not fit, a config PEFT refuses
        _delete(dit, internal)
        raise AdapterError(f"{path} does not fit this DiT: {str(exc).splitlines()[0]}") from None
    dit.train(dit.training)  # the new layers follow the DiT's mode (eval: no dropout)
    for _, layer in _tuner_layers(dit):
        layer.enable_adapters(False)
    return _Loaded(internal, peft_type, root_name)


def _root_for(dit: nn.Module, paths: set[str]) -> str:
    """"" when every path names a module of the whole DiT, "decoder" when every one names a module
    of the decoder (upstream trains the decoder); AdapterError otherwise."""
    for root_name in ("", "decoder"):
        root = dit.get_submodule(root_name) if root_name else dit
        if all(_has_module(root, p) for p in paths):
            return root_name
    sample = sorted(p for p in paths if not _has_module(dit, p) and not _has_module(dit.get_submodule("decoder"), p))
    raise AdapterError(f"the adapter names modules this DiT does not have: {', '.join(sample[:3])}")


def _has_module(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


def _delete(dit: nn.Module, internal: str) -> None:
    """Remove PEFT adapter `internal` from every layer (and from the peft_config PEFT keeps)."""
    for _, layer in _tuner_layers(dit):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer.delete_adapter(internal)
        layer.enable_adapters(False)
    for module in (dit, getattr(dit, "decoder", None)):
        configs = getattr(module, "peft_config", None)
        if isinstance(configs, dict):
            configs.pop(internal, None)


def unwrap(dit: nn.Module) -> None:
    """Put every adapted module's original layer back: the DiT as it was before any adapter."""
    while True:
        found = next(_tuner_layers(dit), None)  # outermost first: a wrapped wrapper goes at once
        if found is None:
            break
        name, layer = found
        parent_name, _, attr = name.rpartition(".")
        parent = dit.get_submodule(parent_name) if parent_name else dit
        setattr(parent, attr, layer.get_base_layer())
    for module in (dit, getattr(dit, "decoder", None)):
        if module is not None and hasattr(module, "peft_config"):
            del module.peft_config


def _kinds_on(dit: nn.Module) -> set[str]:
    """The tuner kinds (LORA, LOKR, or another) of the PEFT layers on `dit`."""
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    return {"LORA" if isinstance(layer, LoraLayer) else "LOKR" if isinstance(layer, LoKrLayer) else type(layer).__name__
            for _, layer in _tuner_layers(dit)}


def _set_active(dit: nn.Module, active: Sequence[tuple[str, float]]) -> None:
    """Exactly these (internal name, scale) adapters on; layers that hold none of them disabled."""
    names = [name for name, _ in active]
    for _, layer in _tuner_layers(dit):
        present = [name for name in names if name in layer.scaling]
        if not present:
            layer.enable_adapters(False)
            continue
        layer.enable_adapters(True)
        layer.set_adapter(present, inference_mode=True)
        for name, scale in active:
            if name in present:
                layer.set_scale(name, scale)


def _deactivate(dit: nn.Module) -> None:
    for _, layer in _tuner_layers(dit):
        layer.enable_adapters(False)


# ---- the per-worker cache --------------------------------------------------------------------


class AdapterCache:
    """Adapters loaded onto each DiT, at most `max_loaded` per DiT (least recently used deleted).
    One run at a time per cache: `activate` holds a lock for its `with` block."""

    def __init__(self, max_loaded: int = 8):
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.max_loaded = max_loaded
        self._lock = threading.Lock()
        self._by_dit: weakref.WeakKeyDictionary[Any, OrderedDict[tuple, _Loaded]] = weakref.WeakKeyDictionary()

    def loaded(self, dit: nn.Module) -> list[str]:
        """The folders loaded onto `dit`, least recently used first."""
        return [key[0] for key in self._by_dit.get(dit, {})]

    @contextmanager
    def activate(self, dit: nn.Module, adapters: Sequence[Mapping[str, Any]] | None):
        """Within the block `dit` runs with exactly `adapters` ({name, path, scale}) active; an
        adapter at scale 0 is left out (exactly as without it). AdapterError when one cannot load."""
        wanted = [a for a in (adapters or []) if float(a.get("scale", 1.0)) != 0.0]
        with self._lock:
            try:
                active = [(self._ensure(dit, wanted, a).internal, float(a.get("scale", 1.0))) for a in wanted]
                _set_active(dit, active)
                yield dit
            finally:
                _deactivate(dit)

    def _ensure(self, dit: nn.Module, wanted: Sequence[Mapping[str, Any]], adapter: Mapping[str, Any]) -> _Loaded:
        name, path = adapter.get("name", "?"), adapter.get("path")
        if not path:
            raise AdapterError(f"LoRA adapter {name!r} has no local folder")
        scale = float(adapter.get("scale", 1.0))
        if not 0.0 <= scale <= SCALE_MAX:
            raise AdapterError(f"LoRA adapter {name!r}: scale must be 0 to {SCALE_MAX}, got {scale}")
        key = _cache_key(Path(path))
        loaded = self._by_dit.setdefault(dit, OrderedDict())
        if key in loaded:
            if any(loaded[key].internal in layer.scaling for _, layer in _tuner_layers(dit)):
                loaded.move_to_end(key)
                return loaded[key]
            del loaded[key]  # unwrapped since (another kind was loaded onto this DiT): load again
        config, _ = _adapter_files(Path(path))
        peft_type = str(config["peft_type"]).upper()
        kinds = _kinds_on(dit)
        if kinds and kinds != {peft_type}:
            needed = {_cache_key(Path(a["path"])) for a in wanted if a.get("path")}
            if any(k in needed for k in loaded):
                raise AdapterError("one job cannot combine LoRA and LoKr adapters")
            unwrap(dit)  # another kind: the modules are wrapped for the old one
            loaded.clear()
        wanted_keys = {_cache_key(Path(a["path"])) for a in wanted if a.get("path")}
        while len(loaded) >= self.max_loaded:
            victim = next((k for k in loaded if k not in wanted_keys), None)
            if victim is None:
                break
            log.info("unloading LoRA adapter %s (least recently used)", victim[0], extra={"action": "lora_evict"})
            _delete(dit, loaded.pop(victim).internal)
        entry = load_adapter(dit, Path(path), f"adapter{next(_INTERNAL_NAMES)}")
        loaded[key] = entry
        log.info("loaded LoRA adapter %s (%s)", name, peft_type, extra={"action": "lora_load", "path": str(path)})
        return entry


def _cache_key(path: Path) -> tuple:
    """A folder as loaded: its resolved path and its weights file's size and change time (a folder
    replaced on disk loads again)."""
    resolved = path.resolve()
    try:
        stat = (resolved / WEIGHTS_FILE).stat()
    except OSError:
        raise AdapterError(f"{path} is not a PEFT adapter folder (no {WEIGHTS_FILE})") from None
    return str(resolved), stat.st_size, stat.st_mtime_ns


def job_adapters(lora: Sequence[Any] | None) -> list[dict[str, Any]]:
    """A request's `lora` entries (models or dicts, each with its local `path` set by the worker)
    as `activate` takes them."""
    out = []
    for entry in lora or []:
        item = entry if isinstance(entry, Mapping) else entry.model_dump()
        out.append({"name": item["name"], "path": item.get("path"), "scale": float(item.get("scale", 1.0))})
    return out
