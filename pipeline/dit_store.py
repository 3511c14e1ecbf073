"""The DiTs a worker serves (ACESTEP_DIT_MODEL and ACESTEP_DIT_MODELS): every one loaded at start, or,
with a memory budget (ACESTEP_DIT_MEMORY_BUDGET_GB), the default one at start and the others on
first use, the least recently used evicted when the next would not fit. The worker claims jobs for
every DiT it serves, loaded or not; a job for an evicted one waits for its load (seconds on a GPU)."""

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pipeline.dit.load import weight_files
from pipeline.interface import PipelineError

GIB = 1024 ** 3
BUDGET_VARIABLE = "ACESTEP_DIT_MEMORY_BUDGET_GB"

Loaded = tuple[nn.Module, torch.Tensor]  # the DiT and its silence latent


def resident_bytes(loaded: Loaded) -> int:
    """What a loaded DiT holds on its device: parameters, buffers and the silence latent."""
    dit, silence = loaded
    tensors = [*dit.parameters(), *dit.buffers(), silence]
    return sum(t.numel() * t.element_size() for t in tensors)


def expected_bytes(folder: Path, dtype: torch.dtype) -> int:
    """What loading the DiT in `folder` as `dtype` will take, from its weight files' headers (no
    tensor is read)."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as weights:
            for key in weights.keys():
                numel = 1
                for dim in weights.get_slice(key).get_shape():
                    numel *= dim
                total += numel * size
    return total


class DitStore(Mapping[str, Loaded]):
    """name -> (DiT, silence latent), for every DiT served (`folders`); `load(name, folder)` makes
    one. `budget_bytes` None: all are loaded now and stay. Otherwise `pinned` (the default DiT) is
    loaded now and stays, and reading another loads it, first evicting the least recently used
    others until it fits; a DiT that cannot fit beside the pinned one is a PipelineError naming
    ACESTEP_DIT_MEMORY_BUDGET_GB (at start for the largest)."""

    def __init__(self, folders: Mapping[str, Path], load: Callable[[str, Path], Loaded], *, pinned: str,
                 dtype: torch.dtype = torch.float32, budget_bytes: int | None = None,
                 on_evict: Callable[[str], None] | None = None):
        if pinned not in folders:
            raise ValueError(f"the pinned DiT {pinned} is not among {list(folders)}")
        self._folders = dict(folders)
        self._load = load
        self._pinned = pinned
        self._budget = budget_bytes
        self._on_evict = on_evict
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self.loads = 0  # DiT loads so far (the ones at start included)
        if budget_bytes is None:
            for name in self._folders:
                self._bring(name)
            return
        self._bring(pinned)
        self._expected = {name: expected_bytes(folder, dtype) for name, folder in self._folders.items() if name != pinned}
        room = budget_bytes - self._sizes[pinned]
        too_big = {name: size for name, size in self._expected.items() if size > room}
        if too_big:
            names = ", ".join(f"{n} ({s / GIB:.2f} GiB)" for n, s in too_big.items())
            raise PipelineError(f"{BUDGET_VARIABLE}={budget_bytes / GIB:g}: {pinned} takes {self._sizes[pinned] / GIB:.2f} GiB "
                                f"and leaves no room for {names}; raise the budget or serve fewer DiTs")

    def __getitem__(self, name: str) -> Loaded:
        if name not in self._folders:
            raise KeyError(name)
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return self._loaded[name]
        self._make_room(self._expected[name])
        return self._bring(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._folders)

    def __len__(self) -> int:
        return len(self._folders)

    def loaded(self) -> list[str]:
        """The DiTs in memory, least recently used first."""
        return list(self._loaded)

    def resident(self) -> int:
        return sum(self._sizes[name] for name in self._loaded)

    def _bring(self, name: str) -> Loaded:
        loaded = self._load(name, self._folders[name])
        self.loads += 1
        self._loaded[name] = loaded
        self._sizes[name] = resident_bytes(loaded)
        return loaded

    def _make_room(self, needed: int) -> None:
        while self.resident() + needed > self._budget:
            victim = next((n for n in self._loaded if n != self._pinned), None)
            if victim is None:  # only the pinned one is left; the start check makes this unreachable
                raise PipelineError(f"{BUDGET_VARIABLE}: no room to load another DiT")
            self._evict(victim)

    def _evict(self, name: str) -> None:
        device = next(self._loaded[name][0].parameters()).device
        del self._loaded[name]
        if self._on_evict is not None:
            self._on_evict(name)
        if device.type == "cuda":
            torch.cuda.empty_cache()


__all__ = ["BUDGET_VARIABLE", "DitStore", "expected_bytes", "resident_bytes"]
