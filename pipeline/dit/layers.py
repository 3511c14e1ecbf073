"""Building blocks shared by every stack of the ACE-Step 1.5 DiT checkpoint.

Parameter names follow the reference state dict (`self_attn.q_proj`, `mlp.gate_proj`,
`input_layernorm`, ...) so a real `model.safetensors` loads strictly. The arithmetic follows the
reference as run with the transformers "sdpa" path: RMSNorm in float32, per-head q/k RMSNorm before
RoPE, half-split RoPE, grouped-query attention, additive masks holding the most negative finite
value (so a query whose every key is masked attends uniformly, as in the reference)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.dit.config import DiTConfig


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class GatedMLP(nn.Module):
    def __init__(self, width: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(width, inner, bias=False)
        self.up_proj = nn.Linear(width, inner, bias=False)
        self.down_proj = nn.Linear(inner, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotary_tables(length: int, head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim] for positions 0..length-1, computed in float32."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D]; the second half of each head rotates against the first."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


def window_mask(length: int, window: int | None, key_padding: torch.Tensor | None, dtype, device) -> torch.Tensor | None:
    """Additive mask [B or 1, 1, L, L]: 0 where |i - j| <= window and the key is valid, else the most
    negative finite value. None when nothing is masked (full attention, no padding)."""
    if window is None and key_padding is None:
        return None
    allowed = torch.ones(length, length, dtype=torch.bool, device=device)
    if window is not None:
        index = torch.arange(length, device=device)
        allowed = (index[:, None] - index[None, :]).abs() <= window
    allowed = allowed[None, None]
    if key_padding is not None:
        allowed = allowed & key_padding.bool()[:, None, None, :]
    mask = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=device)
    return mask.masked_fill(allowed, 0.0)


class Attention(nn.Module):
    """Self- or cross-attention with q/k RMSNorm; RoPE on self-attention only."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.dim_per_head
        bias = config.attention_bias
        width = config.hidden_size
        self.q_proj = nn.Linear(width, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, width, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (normalised) and values [B, kv_heads, L, head_dim] of `source`; no RoPE (cross-attention)."""
        return self.k_norm(self._split(self.k_proj(source))), self._split(self.v_proj(source))

    def forward(
        self,
        x: torch.Tensor,
        *,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        q = self.q_norm(self._split(self.q_proj(x)))
        if kv is None:  # self-attention
            k, v = self.keys_values(x)
            if rotary is not None:
                q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        else:
            k, v = kv
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.head_dim ** -0.5, enable_gqa=self.heads != self.kv_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1))


class EncoderLayer(nn.Module):
    """Pre-norm bidirectional transformer layer (lyric/timbre encoders, pooler, detokenizer)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, rotary, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary=rotary, mask=mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class EncoderStack(nn.Module):
    """`layers` + final `norm`; layer i attends within `layer_types[i]`'s window. Only the first
    `active_layers` layers run (the reference's lyric/timbre encoders stop at num_hidden_layers)."""

    def __init__(self, config: DiTConfig, num_layers: int, active_layers: int | None = None):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.active_layers = num_layers if active_layers is None else min(active_layers, num_layers)

    def run_layers(self, x: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        config = self.config
        length = x.shape[1]
        rotary = rotary_tables(length, config.dim_per_head, config.rope_theta, x.device, x.dtype)
        masks: dict[int | None, torch.Tensor | None] = {}
        for index in range(self.active_layers):
            window = config.window_for(index)
            if window not in masks:
                masks[window] = window_mask(length, window, key_padding, x.dtype, x.device)
            x = self.layers[index](x, rotary, masks[window])
        return self.norm(x)


class TimestepEmbedding(nn.Module):
    """Sinusoid of 1000 t (256 wide, cosine half first) -> linear, SiLU, linear (the embedding), then
    SiLU and a linear to 6 x hidden (the modulation)."""

    FREQUENCY_DIM = 256

    def __init__(self, width: int):
        super().__init__()
        self.linear_1 = nn.Linear(self.FREQUENCY_DIM, width)
        self.linear_2 = nn.Linear(width, width)
        self.time_proj = nn.Linear(width, width * 6)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.FREQUENCY_DIM // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = (t * 1000)[:, None].float() * freqs[None]
        sinusoid = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)
        temb = self.linear_2(F.silu(self.linear_1(sinusoid)))
        return temb, self.time_proj(F.silu(temb)).unflatten(1, (6, -1))


class DiTLayer(nn.Module):
    """AdaLN-modulated self-attention, plain cross-attention, AdaLN-modulated gated MLP."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        width = config.hidden_size
        self.self_attn_norm = RMSNorm(width, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.cross_attn_norm = RMSNorm(width, config.rms_norm_eps)
        self.cross_attn = Attention(config)
        self.mlp_norm = RMSNorm(width, config.rms_norm_eps)
        self.mlp = GatedMLP(width, config.intermediate_size)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 6, width))

    def forward(self, x, rotary, mask, modulation: torch.Tensor, cross_kv, cross_mask=None) -> torch.Tensor:
        shift, scale, gate, mlp_shift, mlp_scale, mlp_gate = (self.scale_shift_table + modulation).chunk(6, dim=1)
        h = self.self_attn_norm(x) * (1 + scale) + shift
        x = x + self.self_attn(h.to(x.dtype), rotary=rotary, mask=mask) * gate
        x = x + self.cross_attn(self.cross_attn_norm(x), kv=cross_kv, mask=cross_mask)
        h = self.mlp_norm(x) * (1 + mlp_scale) + mlp_shift
        return x + self.mlp(h.to(x.dtype)) * mlp_gate
