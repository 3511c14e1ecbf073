"""Finding the checkpoints in the Hugging Face layout the real weights come in:

    <root>/acestep-v15-turbo/        config.json (model_type "acestep"), model.safetensors (or a
                                     sharded index), silence_latent.pt; other DiT variants alike
    <root>/vae/                      config.json, diffusion_pytorch_model.safetensors (AutoencoderOobleck)
    <root>/Qwen3-Embedding-0.6B/     config.json, model.safetensors, tokenizer files
    <root>/acestep-5Hz-lm-<size>/    config.json, weights, tokenizer files (optional)

Everything missing is reported at once, by path, so a half-finished download says what to fetch. A DiT
folder that is incomplete (a download of an extra model still running, say) does not stop the others
from loading: it is set aside in `Checkpoints.incomplete` and named with its problems only when asked
for. The VAE, the text encoder and the LMs are shared by every DiT, so their problems always fail."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import contract

VAE_DIR = "vae"
TEXT_ENCODER_DIR = "Qwen3-Embedding-0.6B"
LM_PREFIX = contract.LM_PREFIX
DIT_MODEL_TYPE = "acestep"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class CheckpointError(Exception):
    """The checkpoint directory is missing something the pipeline needs."""


@dataclass(frozen=True)
class Component:
    name: str
    path: Path
    config: dict
    weights: tuple[Path, ...]


@dataclass(frozen=True)
class Checkpoints:
    root: Path
    dits: dict[str, Component] = field(default_factory=dict)
    vae: Component | None = None
    text_encoder: Component | None = None
    lms: dict[str, Component] = field(default_factory=dict)
    # DiT folders found but not usable: name -> what is wrong with each (missing weights, shards, ...).
    incomplete: dict[str, list[str]] = field(default_factory=dict)

    def dit(self, name: str) -> Component:
        if name in self.incomplete:
            raise CheckpointError(f"DiT checkpoint {name!r} in {self.root} is incomplete:\n  "
                                  + "\n  ".join(self.incomplete[name]))
        if name not in self.dits:
            broken = f" (incomplete: {', '.join(sorted(self.incomplete))})" if self.incomplete else ""
            raise CheckpointError(f"no DiT checkpoint {name!r} in {self.root}; found: "
                                  f"{', '.join(sorted(self.dits)) or 'none'}{broken}")
        return self.dits[name]

    def lm(self, name: str) -> Component:
        if name not in self.lms:
            raise CheckpointError(f"no 5 Hz LM checkpoint {name!r} in {self.root}; found: {', '.join(sorted(self.lms)) or 'none'}")
        return self.lms[name]


def _config(path: Path, problems: list[str]) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        problems.append(f"{path / 'config.json'} is missing")
    except json.JSONDecodeError as exc:
        problems.append(f"{path / 'config.json'} is not valid JSON ({exc})")
    return {}


def _weights(path: Path, stem: str, problems: list[str]) -> tuple[Path, ...]:
    """`<stem>.safetensors`, or every shard named by `<stem>.safetensors.index.json`."""
    single = path / f"{stem}.safetensors"
    if single.is_file():
        return (single,)
    index = path / f"{stem}.safetensors.index.json"
    if not index.is_file():
        problems.append(f"{single} is missing (nor is there a sharded {index.name})")
        return ()
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except json.JSONDecodeError as exc:
        problems.append(f"{index} is not valid JSON ({exc})")
        return ()
    shards = sorted({path / name for name in weight_map.values()})
    if not shards:
        problems.append(f"{index} names no weight files")
    missing = [s for s in shards if not s.is_file()]
    problems.extend(f"{s} is missing (named by {index.name})" for s in missing)
    return tuple(shards) if shards and not missing else ()


def _require(path: Path, names: tuple[str, ...], problems: list[str]) -> None:
    problems.extend(f"{path / name} is missing" for name in names if not (path / name).is_file())


def _component(path: Path, weights_stem: str, problems: list[str], extra: tuple[str, ...] = ()) -> Component:
    config = _config(path, problems)
    weights = _weights(path, weights_stem, problems)
    _require(path, extra, problems)
    return Component(path.name, path, config, weights)


def discover(root: Path, *, need_lm: bool = False) -> Checkpoints:
    """The checkpoints under `root`; CheckpointError listing every missing piece of the shared components
    (or when no DiT folder is there at all). A DiT folder with problems goes into `incomplete` instead;
    when every DiT folder is incomplete, that fails too, listing their problems."""
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    problems: list[str] = []
    dits: dict[str, Component] = {}
    incomplete: dict[str, list[str]] = {}
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        config_file = path / "config.json"
        if path.name in (VAE_DIR, TEXT_ENCODER_DIR) or path.name.startswith(LM_PREFIX) or not config_file.is_file():
            continue
        try:
            is_dit = json.loads(config_file.read_text()).get("model_type") == DIT_MODEL_TYPE
        except json.JSONDecodeError:
            continue
        if is_dit:
            own: list[str] = []
            component = _component(path, "model", own, extra=("silence_latent.pt",))
            if own:
                incomplete[path.name] = own
            else:
                dits[path.name] = component
    if not dits and incomplete:
        problems.extend(p for name in sorted(incomplete) for p in incomplete[name])
    elif not dits:
        problems.append(f"no DiT checkpoint (a folder whose config.json has model_type {DIT_MODEL_TYPE!r}) in {root}")
    vae = _component(root / VAE_DIR, "diffusion_pytorch_model", problems) if (root / VAE_DIR).is_dir() else None
    if vae is None:
        problems.append(f"{root / VAE_DIR} is missing")
    text_dir = root / TEXT_ENCODER_DIR
    text_encoder = _component(text_dir, "model", problems, extra=TOKENIZER_FILES) if text_dir.is_dir() else None
    if text_encoder is None:
        problems.append(f"{text_dir} is missing")
    lms = {
        path.name: _component(path, "model", problems, extra=TOKENIZER_FILES)
        for path in sorted(root.glob(f"{LM_PREFIX}*")) if path.is_dir()
    }
    if need_lm and not lms:
        problems.append(f"no 5 Hz LM ({LM_PREFIX}*) in {root}")
    if problems:
        raise CheckpointError("incomplete checkpoints:\n  " + "\n  ".join(problems))
    return Checkpoints(root, dits, vae, text_encoder, lms, incomplete)
