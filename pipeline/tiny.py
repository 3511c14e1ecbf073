"""`acestep-serverless make-tiny-checkpoints DIR`: every component of the real checkpoint layout with
tiny random weights, built offline, loaded by the very same code as the real checkpoints. The audio
such a set produces is noise: it exists for tests and for trying the service on a laptop.

    DIR/acestep-v15-turbo/      config.json (the reference's field names), model.safetensors, silence_latent.pt
    DIR/acestep-v15-base/       the same with is_turbo false, model_version "base" (CFG, the base-only tasks)
    DIR/acestep-v15-sft/        the same with is_turbo false, model_version "sft"
    DIR/vae/                    AutoencoderOobleck with the real hop (1920 samples, 25 frames/s)
    DIR/Qwen3-Embedding-0.6B/   tiny Qwen3 + byte-level BPE tokenizer
    DIR/acestep-5Hz-lm-0.6B/    tiny Qwen3 causal LM, tokenizer with the <|audio_code_N|> tokens"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.checkpoints import TEXT_ENCODER_DIR, VAE_DIR
from pipeline.dit.config import DiTConfig
from pipeline.dit.layers import RMSNorm
from pipeline.dit.model import AceStepDiT
from pipeline.tiny_text import build_tiny_lm, build_tiny_text_encoder
from pipeline.vae import Vae, build_tiny_vae

TINY_DIT = "acestep-v15-turbo"
# Every DiT a tiny set holds, the default (turbo) first; each has its own weights (seeds differ).
TINY_DITS = ("acestep-v15-turbo", "acestep-v15-base", "acestep-v15-sft")
_TINY_VERSIONS = {"acestep-v15-turbo": "turbo", "acestep-v15-base": "base", "acestep-v15-sft": "sft"}
TINY_LM = "acestep-5Hz-lm-0.6B"
TEXT_HIDDEN = 32
# The tiny DiT's silence latent covers 2 s (50 frames): the pipeline repeats it to whatever length it
# needs (AceStepPipeline.silence_frames: the song, the 30 s timbre window), and encoding 30 s of
# silence made every tiny build ~3 s slower on a CPU.
SILENCE_SECONDS = 2


def tiny_dit_config(latent_dim: int, text_hidden_dim: int, *, turbo: bool = True, version: str | None = None) -> dict:
    """A config.json in the reference's layout with small widths and the real structure (alternating
    sliding/full layers, the real FSQ levels, pool window 5, patch 2, 30 s timbre window). `version`
    ("turbo", "base", "sft") sets model_version, and is_turbo with it; by default it follows `turbo`."""
    layers = 4
    version = version or ("turbo" if turbo else "base")
    return {
        "architectures": ["AceStepConditionGenerationModel"],
        "model_type": "acestep",
        "model_version": version,
        "is_turbo": version == "turbo",
        "hidden_size": 64, "intermediate_size": 128, "head_dim": 16,
        "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": layers, "num_audio_decoder_hidden_layers": layers,
        "layer_types": ["sliding_attention", "full_attention"] * (layers // 2),
        "use_sliding_window": True, "sliding_window": 16,
        "num_lyric_encoder_hidden_layers": 2, "num_timbre_encoder_hidden_layers": 2,
        "num_attention_pooler_hidden_layers": 2,
        "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_scaling": None, "max_position_embeddings": 32768,
        "in_channels": 3 * latent_dim, "audio_acoustic_hidden_dim": latent_dim, "patch_size": 2,
        "text_hidden_dim": text_hidden_dim, "timbre_hidden_dim": latent_dim, "timbre_fix_frame": 750,
        "pool_window_size": 5, "fsq_dim": 64, "fsq_input_levels": [8, 8, 8, 5, 5, 5], "fsq_input_num_quantizers": 1,
        "vocab_size": 64003, "initializer_range": 0.02, "timestep_mu": -0.4, "timestep_sigma": 1.0,
        "data_proportion": 0.5, "use_cache": True,
    }


def random_dit_state(model: AceStepDiT, seed: int) -> dict[str, torch.Tensor]:
    """Weights drawn like the reference's initialisation: linear N(0, 0.02) with zero bias, norms 1,
    modulation tables N(0, 1/hidden), learned tokens N(0, 0.02^2), convolutions torch's default."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
            module.reset_parameters()
    for name, param in model.named_parameters():
        if name.endswith("scale_shift_table"):
            nn.init.normal_(param, std=param.shape[-1] ** -0.5)
        elif name.endswith(("special_token", "special_tokens", "null_condition_emb")):
            nn.init.normal_(param, std=0.02)
    return {name: t.detach().contiguous() for name, t in model.state_dict().items()}


def tiny_silence_latent(vae: Vae) -> torch.Tensor:
    """What silence_latent.pt holds: the VAE latent of digital silence, stored [1, C, T]."""
    with torch.inference_mode():
        silence = vae.encode(torch.zeros(1, vae.audio_channels, SILENCE_SECONDS * vae.sample_rate))
    return silence.transpose(1, 2).contiguous()


def build_tiny_dit(path: Path, vae: Vae, *, seed: int = 0, turbo: bool = True, version: str | None = None,
                   silence: torch.Tensor | None = None) -> None:
    """A tiny DiT folder; `silence` (tiny_silence_latent's) saves encoding it again for each DiT."""
    path.mkdir(parents=True, exist_ok=True)
    raw = tiny_dit_config(vae.latent_dim, TEXT_HIDDEN, turbo=turbo, version=version)
    (path / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    model = AceStepDiT(DiTConfig.from_dict(raw))
    save_file(random_dit_state(model, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    torch.save(tiny_silence_latent(vae) if silence is None else silence, path / "silence_latent.pt")


def build_tiny_checkpoints(root: Path, *, seed: int = 0, with_lm: bool = True) -> Path:
    """Every tiny component under `root`: the DiTs of TINY_DITS (turbo with `seed`, base and sft with the
    seeds after it, so that no two share weights), the VAE, the text encoder and (`with_lm`) the LM."""
    root.mkdir(parents=True, exist_ok=True)
    build_tiny_vae(root / VAE_DIR, seed=seed)
    vae = Vae.load(root / VAE_DIR)
    silence = tiny_silence_latent(vae)
    for offset, name in enumerate(TINY_DITS):
        build_tiny_dit(root / name, vae, seed=seed + offset, version=_TINY_VERSIONS[name], silence=silence)
    build_tiny_text_encoder(root / TEXT_ENCODER_DIR, seed=seed, hidden_size=TEXT_HIDDEN)
    if with_lm:
        build_tiny_lm(root / TINY_LM, seed=seed)
    return root




def full_size_dit_config(*, turbo: bool = True) -> dict:
    """The real acestep-v15-turbo config.json values (ACE-Step 1.5, 2 B parameters), for random-weight
    speed and memory measurements where the real weights are not at hand."""
    raw = tiny_dit_config(64, 1024, turbo=turbo)
    layers = 24
    raw.update(
        hidden_size=2048, intermediate_size=6144, head_dim=128, num_attention_heads=16, num_key_value_heads=8,
        num_hidden_layers=layers, num_audio_decoder_hidden_layers=layers,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2), sliding_window=128,
        num_lyric_encoder_hidden_layers=8, num_timbre_encoder_hidden_layers=4, fsq_dim=2048,
    )
    return raw


FULL_SIZE_VAE_CONFIG = {
    "audio_channels": 2, "sampling_rate": 48000, "encoder_hidden_size": 128, "downsampling_ratios": [2, 4, 4, 6, 10],
    "channel_multiples": [1, 2, 4, 8, 16], "decoder_channels": 128, "decoder_input_channels": 64,
}
