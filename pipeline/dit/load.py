"""Loading a DiT checkpoint folder (`config.json`, `model.safetensors` or shards, `silence_latent.pt`)
into our modules, strictly: every weight the modules declare must be in the files with the declared
shape, and no file may hold a weight the modules do not declare. No remote code is run."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.dit.config import ConfigError, DiTConfig
from pipeline.dit.model import AceStepDiT


class WeightsError(ValueError):
    """The weights do not match the modules built from config.json."""


def weight_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return [folder / name for name in names]
    raise WeightsError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str, dtype: torch.dtype, device) -> None:
    """Assign `state` to `model` (built on the meta device), checking names and shapes first."""
    expected = {name: tuple(p.shape) for name, p in model.state_dict(keep_vars=True).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(f"{n} {tuple(state[n].shape)} != {expected[n]}" for n in set(expected) & set(state)
                   if tuple(state[n].shape) != expected[n])
    problems = []
    if missing:
        problems.append(f"missing weight(s): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected weight(s): {', '.join(unexpected)}")
    if wrong:
        problems.append(f"wrong shape(s): {', '.join(wrong)}")
    if problems:
        raise WeightsError(f"{source} does not match config.json: " + "; ".join(problems))
    model.load_state_dict({n: t.to(device=device, dtype=dtype) for n, t in state.items()}, strict=True, assign=True)


def build_dit(config: DiTConfig) -> AceStepDiT:
    """Modules with uninitialised (meta) parameters, to be filled by `load_state`."""
    with torch.device("meta"):
        return AceStepDiT(config)


def load_dit(folder: Path, *, device="cpu", dtype: torch.dtype = torch.float32) -> AceStepDiT:
    config = DiTConfig.from_file(folder / "config.json")
    model = build_dit(config)
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        if not path.is_file():
            raise WeightsError(f"{path} is missing")
        state.update(load_file(str(path)))
    load_state(model, state, source=str(folder), dtype=dtype, device=device)
    return model.eval()


def load_silence_latent(folder: Path, *, device="cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`silence_latent.pt`, stored channel-first [1, C, T] like the reference's, as [1, T, C]."""
    path = folder / "silence_latent.pt"
    if not path.is_file():
        raise WeightsError(f"{path} is missing")
    latent = torch.load(path, map_location="cpu", weights_only=True)
    if latent.dim() != 3 or latent.shape[0] != 1:
        raise WeightsError(f"{path} has shape {tuple(latent.shape)}; expected [1, latent_dim, frames]")
    return latent.transpose(1, 2).contiguous().to(device=device, dtype=dtype)


__all__ = ["ConfigError", "WeightsError", "build_dit", "load_dit", "load_silence_latent", "load_state", "weight_files"]
