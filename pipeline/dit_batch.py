"""One DiT decoder call for jobs of several lengths (issue 18): `run_batch` samples each length's jobs
in a thread of its own, as it would alone (schedule, guidance, DCW, repaint, SDE draws, every per-step
operation on its own tensor), with a model whose decoder goes through a `DecoderBarrier`: each step's
decoder call waits until every group still sampling has made its own, then one call runs the rows of
all of them, zero-padded to the longest with each row's self-attention kept to its own frames and its
cross-attention to its own condition (`DiTDecoder.forward(row_frames=...)`), and each group gets its rows
back, cut to its length. The decoder is the step's cost; the rest stays per group."""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.dit.model import CrossAttentionCache
from pipeline.rendezvous import Rendezvous


@dataclass(eq=False)
class _Call:
    x: torch.Tensor
    t: torch.Tensor
    t_r: torch.Tensor
    context: torch.Tensor
    cache: CrossAttentionCache
    result: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


def _pad_frames(tensor: torch.Tensor, frames: int) -> torch.Tensor:
    return F.pad(tensor, (0, 0, 0, frames - tensor.shape[1])) if tensor.shape[1] < frames else tensor


def merge_caches(caches: list[CrossAttentionCache]) -> CrossAttentionCache:
    """The groups' cross-attention caches as one: keys and values zero-padded to the longest
    condition, each row masked to its own positions."""
    if len(caches) == 1:
        return caches[0]
    longest = max(c.keys_values[0][0].shape[2] for c in caches)
    valid = []
    for c in caches:
        rows, length = c.keys_values[0][0].shape[0], c.keys_values[0][0].shape[2]
        own = torch.ones(rows, length, dtype=torch.bool, device=c.states.device) if c.mask is None else c.mask[:, 0, 0, :] == 0
        valid.append(F.pad(own, (0, longest - length), value=False))
    keys = torch.cat(valid)
    dtype = caches[0].states.dtype
    mask = torch.full(keys.shape, torch.finfo(dtype).min, dtype=dtype, device=keys.device).masked_fill(keys, 0.0)[:, None, None, :]

    def padded(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, 0, 0, longest - t.shape[2]))

    layers = [(torch.cat([padded(c.keys_values[i][0]) for c in caches]), torch.cat([padded(c.keys_values[i][1]) for c in caches]))
              for i in range(len(caches[0].keys_values))]
    states = torch.cat([F.pad(c.states, (0, 0, 0, longest - c.states.shape[1])) for c in caches])
    return CrossAttentionCache(states, layers, mask)


class DecoderBarrier(Rendezvous):
    """The decoder calls of `participants` sampling threads (`pipeline.rendezvous`), merged step by step."""

    def __init__(self, decoder: Any, participants: int):
        super().__init__(participants)
        self.decoder = decoder
        self.calls: list[int] = []  # rows of every merged call (tests, benchmarks)
        self._merged: dict[tuple, CrossAttentionCache] = {}

    def model(self, model: Any) -> "_ModelProxy":
        return _ModelProxy(model, _DecoderProxy(self))

    def call(self, x, t, t_r, context, cache) -> torch.Tensor:
        return self.submit(_Call(x, t, t_r, context, cache))

    def run_together(self, pending: list[_Call]) -> None:
        if len(pending) == 1:
            only = pending[0]
            only.result = self.decoder(only.x, only.t, only.t_r, None, only.context, cache=only.cache)
        else:
            self._merged_call(pending)

    def _merged_call(self, pending: list[_Call]) -> None:
        longest = max(e.x.shape[1] for e in pending)
        key = tuple(id(e.cache) for e in pending)
        cache = self._merged.get(key)
        if cache is None:
            cache = self._merged[key] = merge_caches([e.cache for e in pending])
            if len(self._merged) > 8:  # the phases of the current caches only
                self._merged.pop(next(iter(self._merged)))
        frames = torch.cat([torch.full((e.x.shape[0],), e.x.shape[1], dtype=torch.long) for e in pending])
        out = self.decoder(torch.cat([_pad_frames(e.x, longest) for e in pending]),
                           torch.cat([e.t for e in pending]), torch.cat([e.t_r for e in pending]), None,
                           torch.cat([_pad_frames(e.context, longest) for e in pending]), cache=cache, row_frames=frames)
        self.calls.append(out.shape[0])
        start = 0
        for entry in pending:
            rows = entry.x.shape[0]
            entry.result, start = out[start:start + rows, :entry.x.shape[1]], start + rows


class _DecoderProxy:
    def __init__(self, barrier: DecoderBarrier):
        self._barrier = barrier

    def __call__(self, hidden_states, timestep, timestep_r, encoder_hidden_states, context_latents, cache=None):
        if cache is None:
            cache = self._barrier.decoder.cross_cache(encoder_hidden_states)
        return self._barrier.call(hidden_states, timestep, timestep_r, context_latents, cache)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._barrier.decoder, name)


class _ModelProxy:
    def __init__(self, model: Any, decoder: _DecoderProxy):
        self._model, self.decoder = model, decoder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


__all__ = ["DecoderBarrier", "merge_caches"]
