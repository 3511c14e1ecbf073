"""DCW: a correction in the wavelet domain applied after every sampler step (upstream's
`acestep/models/common/dcw_correction.py`, on by default in the serving path since spring 2026).

After a step from x (at t) to x_next, the predicted clean latents are denoised = x - v t. Both are
split by a one-level Haar transform along time (latents [B, T, C]; an odd T gets one zero frame):
low = (a + b) / sqrt 2, high = (a - b) / sqrt 2 for each pair of frames (a, b). The bands of x_next
are then pushed away from those of denoised:

* "low":    low  += t * scaler * (low_x - low_denoised)
* "high":   high += (1 - t) * scaler * (high_x - high_denoised)
* "double": both, the low band with t * scaler and the high band with (1 - t) * high_scaler
* "pix":    x_next + scaler * (x_next - denoised), no transform and no t

The inverse transform is cropped back to T frames and cast to the input dtype. The arithmetic runs
in float32, as the reference's does. Only the Haar wavelet is implemented (the serving default)."""

import math
from dataclasses import dataclass

import torch

MODES = ("double", "low", "high", "pix")
WAVELETS = ("haar",)
_ROOT_HALF = 1.0 / math.sqrt(2.0)


def haar_forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, C] -> (low, high) [B, ceil(T/2), C]: one Haar level along time, zero-padded to even T."""
    if x.shape[1] % 2:
        x = torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)
    even, odd = x[:, 0::2], x[:, 1::2]
    return (even + odd) * _ROOT_HALF, (even - odd) * _ROOT_HALF


def haar_inverse(low: torch.Tensor, high: torch.Tensor, frames: int) -> torch.Tensor:
    """The inverse of `haar_forward`, cropped to `frames`."""
    even, odd = (low + high) * _ROOT_HALF, (low - high) * _ROOT_HALF
    return torch.stack([even, odd], dim=2).flatten(1, 2)[:, :frames]


@dataclass(frozen=True)
class DCW:
    mode: str = "double"
    scaler: float = 0.05
    high_scaler: float = 0.02
    wavelet: str = "haar"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"dcw_mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.wavelet not in WAVELETS:
            raise ValueError(f"dcw_wavelet {self.wavelet!r} is not implemented (only {', '.join(WAVELETS)})")

    def apply(self, x_next: torch.Tensor, denoised: torch.Tensor, t: float) -> torch.Tensor:
        dtype = x_next.dtype
        x, y = x_next.float(), denoised.float()
        if self.mode == "pix":
            return (x + self.scaler * (x - y)).to(dtype)
        x_low, x_high = haar_forward(x)
        y_low, y_high = haar_forward(y)
        if self.mode in ("low", "double"):
            x_low = x_low + (t * self.scaler) * (x_low - y_low)
        if self.mode == "high":
            x_high = x_high + ((1 - t) * self.scaler) * (x_high - y_high)
        elif self.mode == "double":
            x_high = x_high + ((1 - t) * self.high_scaler) * (x_high - y_high)
        return haar_inverse(x_low, x_high, x.shape[1]).to(dtype)
