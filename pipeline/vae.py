"""The ACE-Step 1.5 VAE (diffusers `AutoencoderOobleck`): stereo 48 kHz audio <-> 64-dim latents at
25 frames/s (hop 1920 samples), loaded strictly from `<root>/vae/` and run in overlapping tiles so
that memory stays bounded for 10-minute songs.

Tiling is overlap-discard, with the reference's meaning of the numbers: `chunk_frames` is the
whole window, so the sequence is cut into cores of `chunk_frames - 2 * overlap_frames` latent frames
(384 with the defaults 512 and 64), each core is run with up to `overlap_frames` of real context on
either side, and only the core of the result is kept. The Oobleck convs see a finite neighbourhood
(measured: about 8 latent frames for the decoder, 6-7 for the encoder), so once the overlap covers
it every kept sample is what a single pass would give, up to float rounding. Windows are whole
latent frames (multiples of the hop in samples), so encoder and decoder frames line up exactly with
the single-pass ones."""

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderOobleck
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.contract import VAE_CHUNK_FRAMES, VAE_OVERLAP_FRAMES

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
REQUIRED_FIELDS = (
    "audio_channels",
    "sampling_rate",
    "encoder_hidden_size",
    "downsampling_ratios",
    "channel_multiples",
    "decoder_channels",
    "decoder_input_channels",
)
TINY_CONFIG = {
    "audio_channels": 2,
    "sampling_rate": 48000,
    "encoder_hidden_size": 16,  # the encoder emits mean and scale, so this is twice the latent width
    "downsampling_ratios": [2, 4, 4, 6, 10],  # the real ratios: hop 1920, 25 frames/s
    "channel_multiples": [1, 2, 2, 2, 2],
    "decoder_channels": 8,
    "decoder_input_channels": 8,
}
NAMES_SHOWN = 10


class VaeError(Exception):
    """The VAE checkpoint cannot be loaded as it is: a missing file or config field, or weights that
    do not match the model the config describes."""


@dataclass(frozen=True)
class Tile:
    """One overlap-discard step, in latent frames: the model runs on [window_start, window_end) and
    the result's [core_start, core_end) part is kept."""

    window_start: int
    window_end: int
    core_start: int
    core_end: int

    def core_in_window(self, scale: int = 1) -> slice:
        """Where the core lies in the window's output, at `scale` output steps per latent frame."""
        offset = self.core_start - self.window_start
        return slice(offset * scale, (offset + self.core_end - self.core_start) * scale)

    def core_in_whole(self, scale: int = 1) -> slice:
        """Where the core lies in the whole output, at `scale` output steps per latent frame."""
        return slice(self.core_start * scale, self.core_end * scale)


def tiles(frames: int, chunk_frames: int, overlap_frames: int) -> Iterator[Tile]:
    """Cover `frames` with cores of `chunk_frames - 2 * overlap_frames`, each with up to
    `overlap_frames` of context per side; a sequence that fits in one chunk is one tile."""
    if overlap_frames < 0 or chunk_frames <= 2 * overlap_frames:
        raise ValueError(f"need chunk_frames > 2 * overlap_frames >= 0, got chunk {chunk_frames}, overlap {overlap_frames}")
    if frames <= chunk_frames:
        yield Tile(0, frames, 0, frames)
        return
    stride = chunk_frames - 2 * overlap_frames
    for core_start in range(0, frames, stride):
        core_end = min(core_start + stride, frames)
        yield Tile(max(0, core_start - overlap_frames), min(frames, core_end + overlap_frames), core_start, core_end)


class Vae:
    """An `AutoencoderOobleck` with the pipeline's layouts: audio [B, channels, samples] float32,
    latents time-major [B, frames, latent_dim] as the DiT consumes them."""

    def __init__(self, model: AutoencoderOobleck):
        self.model = model

    @classmethod
    def load(cls, path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "Vae":
        """Build the model from `path/config.json` and load `path/diffusion_pytorch_model.safetensors`
        strictly, from local files only. The model is built on the CPU in float32 (the checkpoint is
        copied into it there) and then moved to `device` and `dtype`."""
        path = Path(path)
        model = AutoencoderOobleck.from_config(read_config(path / CONFIG_FILE))
        load_weights(model, path / WEIGHTS_FILE)
        # nn.Module.to, not ModelMixin.to: the latter only adds a spurious "modules that should be kept
        # in float32: []" warning whenever a dtype is given (AutoencoderOobleck has no such modules).
        return cls(torch.nn.Module.to(model, device=device, dtype=dtype).eval())

    @property
    def hop_length(self) -> int:
        """Audio samples per latent frame (1920 for ACE-Step: 48000 / 1920 = 25 frames/s)."""
        return math.prod(self.model.config.downsampling_ratios)

    @property
    def latent_dim(self) -> int:
        return self.model.config.decoder_input_channels

    @property
    def sample_rate(self) -> int:
        return self.model.config.sampling_rate

    @property
    def audio_channels(self) -> int:
        return self.model.config.audio_channels

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def encode(self, audio: torch.Tensor, *, chunk_frames: int = VAE_CHUNK_FRAMES,
               overlap_frames: int = VAE_OVERLAP_FRAMES) -> torch.Tensor:
        """Audio [B, channels, S] in [-1, 1] at `sample_rate`, on any device, to latents
        [B, ceil(S / hop), latent_dim] float32 on the model's device; the end is padded with zeros
        to a whole frame. Only one window of audio is on the model's device at a time.

        The latent is the posterior's mean (its mode), not a sample from it. The reference serving
        code calls `latent_dist.sample()`, which adds Gaussian noise of the posterior's std
        (softplus(scale) + 1e-4) to every frame, so the same source audio encodes differently on
        every call. The mean is deterministic: the same source audio always gives the same
        latents, so a cover/repaint request with a fixed seed can be reproduced; the sampled noise
        is a training-time regulariser, not something inference needs."""
        if audio.dim() != 3 or audio.shape[1] != self.audio_channels or audio.numel() == 0:
            raise ValueError(f"audio must be a non-empty [B, {self.audio_channels}, samples] tensor, got {tuple(audio.shape)}")
        batch, _, samples = audio.shape
        frames = math.ceil(samples / self.hop_length)
        latents = torch.empty(batch, frames, self.latent_dim, dtype=torch.float32, device=self.device)
        for tile in tiles(frames, chunk_frames, overlap_frames):
            with torch.inference_mode():
                window = self._audio_window(audio, tile.window_start, tile.window_end)
                mean = self.model.encoder(window)[:, : self.latent_dim]
                latents[:, tile.core_in_whole()].copy_(mean[:, :, tile.core_in_window()].transpose(1, 2))
        return latents

    def decode(self, latents: torch.Tensor, *, chunk_frames: int = VAE_CHUNK_FRAMES, overlap_frames: int = VAE_OVERLAP_FRAMES,
               progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Latents [B, T, latent_dim], on any device, to audio [B, channels, T * hop] float32 on the
        CPU. Each window's core is copied to the CPU as soon as it is decoded, so the model's device
        holds one window of audio at a time. `progress(done, total)` after each upsampling block of
        each tile (a forward hook: the computation is untouched; what it raises stops the decode there)."""
        if latents.dim() != 3 or latents.shape[2] != self.latent_dim or latents.numel() == 0:
            raise ValueError(f"latents must be a non-empty [B, frames, {self.latent_dim}] tensor, got {tuple(latents.shape)}")
        batch, frames, _ = latents.shape
        hop = self.hop_length
        audio = torch.empty(batch, self.audio_channels, frames * hop, dtype=torch.float32)
        windows = list(tiles(frames, chunk_frames, overlap_frames))
        hooks = self._report_blocks(progress, len(windows)) if progress is not None else []
        try:
            for tile in windows:
                with torch.inference_mode():
                    window = latents[:, tile.window_start : tile.window_end].transpose(1, 2).to(self.device, self.dtype)
                    decoded = self.model.decoder(window)
                    audio[:, :, tile.core_in_whole(hop)].copy_(decoded[:, :, tile.core_in_window(hop)])
        finally:
            for hook in hooks:
                hook.remove()
        return audio

    def _report_blocks(self, progress: Callable[[int, int], None], tiles_count: int) -> list:
        """Forward hooks that call `progress(blocks run, blocks in all tiles)` after each decoder block."""
        blocks = list(self.model.decoder.block)
        total, done = tiles_count * len(blocks), 0

        def after_block(*_) -> None:
            nonlocal done
            done += 1
            progress(done, total)

        return [block.register_forward_hook(after_block) for block in blocks]

    def _audio_window(self, audio: torch.Tensor, start_frame: int, end_frame: int) -> torch.Tensor:
        """Samples of frames [start_frame, end_frame) on the model's device and dtype; the last
        window is zero-padded to a whole frame."""
        start, end = start_frame * self.hop_length, end_frame * self.hop_length
        window = audio[:, :, start:end].to(self.device, self.dtype)
        return F.pad(window, (0, end - start - window.shape[-1]))


def read_config(path: Path) -> dict:
    """The config as a dict, refusing one that would make diffusers fall back to its defaults (44.1 kHz,
    another hop) or build an encoder whose latent width the decoder cannot take."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise VaeError(f"{path} is missing") from None
    except json.JSONDecodeError as exc:
        raise VaeError(f"{path} is not valid JSON ({exc})") from None
    missing = [name for name in REQUIRED_FIELDS if name not in config]
    if missing:
        raise VaeError(f"{path} lacks required field(s): {', '.join(missing)}")
    if config.get("_class_name", AutoencoderOobleck.__name__) != AutoencoderOobleck.__name__:
        raise VaeError(f"{path} describes a {config['_class_name']}, not an {AutoencoderOobleck.__name__}")
    if config["encoder_hidden_size"] != 2 * config["decoder_input_channels"]:
        raise VaeError(f"{path}: encoder_hidden_size ({config['encoder_hidden_size']}) must be twice "
                       f"decoder_input_channels ({config['decoder_input_channels']}): the encoder emits mean and scale")
    if len(config["channel_multiples"]) != len(config["downsampling_ratios"]):
        raise VaeError(f"{path}: channel_multiples and downsampling_ratios must have the same length")
    return config


def load_weights(model: AutoencoderOobleck, path: Path) -> None:
    """Copy the safetensors file into `model`, refusing missing, unexpected or misshapen tensors by name."""
    try:
        state = load_file(path)
    except FileNotFoundError:
        raise VaeError(f"{path} is missing") from None
    except SafetensorError as exc:
        raise VaeError(f"{path} is not a readable safetensors file ({exc})") from None
    expected = model.state_dict()
    problems = [
        _named("missing weight(s)", sorted(expected.keys() - state.keys())),
        _named("unexpected weight(s)", sorted(state.keys() - expected.keys())),
        _named("misshapen weight(s)", [f"{key} {tuple(state[key].shape)} != {tuple(value.shape)}"
                                       for key, value in expected.items() if key in state and state[key].shape != value.shape]),
    ]
    problems = [problem for problem in problems if problem]
    if problems:
        raise VaeError(f"{path} does not match the config: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def _named(what: str, names: list[str]) -> str:
    """'what: a, b, ... (N in all)', or '' when there are none."""
    if not names:
        return ""
    shown = ", ".join(names[:NAMES_SHOWN])
    return f"{what}: {shown}" + (f", ... ({len(names)} in all)" if len(names) > NAMES_SHOWN else "")


def build_tiny_vae(path: Path, seed: int = 0) -> None:
    """Write a small random `AutoencoderOobleck` to `path` in the real checkpoint layout (config.json
    as diffusers writes it, diffusion_pytorch_model.safetensors). The widths are tiny, so a 10 s decode takes a
    fraction of a second on a CPU, but the downsampling ratios are the real ones, so hop 1920 and
    25 frames/s hold. The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderOobleck(**TINY_CONFIG)
    model.save_pretrained(Path(path), safe_serialization=True)
