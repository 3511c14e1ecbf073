"""Residual finite scalar quantization, as the reference's audio tokenizer runs it at inference.

Projection to len(levels) values (with bias); a soft clamp c * tanh(z / c) with c = L / (L - 1) per
dimension; then per quantizer q (scale (L - 1)^-q) a hard clamp to [-1, 1] and symmetric rounding to
L levels: level = floor((L - 1) * (z + 1) / 2 + 0.5), code = 2 level / (L - 1) - 1. The index is the
mixed-radix number of the levels, first dimension least significant. Codes are summed over the
quantizers and projected back (with bias). Quantization always runs in float32: one bf16 ulp at a
cell edge would flip a code."""

import torch
import torch.nn.functional as F
from torch import nn


class ResidualFSQ(nn.Module):
    def __init__(self, dim: int, levels: tuple[int, ...], num_quantizers: int):
        super().__init__()
        self.levels = tuple(levels)
        self.num_quantizers = num_quantizers
        self.project_in = nn.Linear(dim, len(levels))
        self.project_out = nn.Linear(len(levels), dim)

    @property
    def codebook_size(self) -> int:
        size = 1
        for level in self.levels:
            size *= level
        return size

    def _constants(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        levels = torch.tensor(self.levels, dtype=torch.float32, device=device)
        basis = torch.cumprod(torch.tensor((1,) + self.levels[:-1], dtype=torch.int64, device=device), dim=0)
        return levels, basis

    def _linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), layer.weight.float(), layer.bias.float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., dim] -> (quantized [..., dim] in x's dtype, indices [..., num_quantizers] int32)."""
        levels, basis = self._constants(x.device)
        z = self._linear(self.project_in, x)
        clamp = 1 + 1 / (levels - 1)
        residual = torch.tanh(z / clamp) * clamp
        total = torch.zeros_like(residual)
        all_indices = []
        for q in range(self.num_quantizers):
            scale = (levels - 1) ** -q
            bounded = (residual / scale).clamp(-1.0, 1.0)
            level_index = torch.floor((levels - 1) * (bounded + 1) / 2.0 + 0.5)
            code = (2.0 / (levels - 1)) * level_index - 1.0
            quantized = code * scale
            residual = residual - quantized
            total = total + quantized
            all_indices.append((level_index.long() * basis).sum(-1))
        out = self._linear(self.project_out, total).to(x.dtype)
        return out, torch.stack(all_indices, dim=-1).to(torch.int32)

    def from_indices(self, indices: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """indices [..., num_quantizers] (codes from the 5 Hz LM) -> quantized [..., dim]."""
        levels, basis = self._constants(indices.device)
        total = 0.0
        for q in range(indices.shape[-1]):
            level_index = (indices[..., q, None].long() // basis) % levels.long()
            total = total + ((2.0 / (levels - 1)) * level_index.float() - 1.0) * (levels - 1) ** -q
        return self._linear(self.project_out, total).to(dtype)
