"""DiT + VAE speed and memory at full model size with random weights (no real weights needed).

    python benchmarks/pipeline_speed.py                      # full size, bf16 on CUDA (float32 on CPU)
    python benchmarks/pipeline_speed.py --seconds 60 240 --batch 1 8
    python benchmarks/pipeline_speed.py --size tiny          # the tiny test config, to check the script
    python benchmarks/pipeline_speed.py --dcw on off         # DCW's cost: the same runs with it on and off

Per (seconds, batch, DCW): the 8-step turbo sampling (condition encoder + 8 DiT forwards with the
serving defaults: infer_steps 8, shift 3, DCW on unless --dcw off, the path the service runs), the
tiled VAE decode, their sum, and the peak device memory. Timings are medians of
--repeat runs after one warm-up run; CUDA work is synchronised before each clock read."""

import argparse
import statistics
import time

import torch
from diffusers import AutoencoderOobleck

from pipeline.dit.config import DiTConfig
from pipeline.dit.model import AceStepDiT
from pipeline.dcw import DCW
from pipeline.sampler import Sampling, generate_audio
from pipeline.tiny import FULL_SIZE_VAE_CONFIG, full_size_dit_config, random_dit_state, tiny_dit_config
from pipeline.vae import TINY_CONFIG as TINY_VAE_CONFIG
from pipeline.vae import Vae

TEXT_TOKENS, LYRIC_TOKENS = 128, 512


def build(size: str, device, dtype):
    if size == "full":
        raw, vae_config = full_size_dit_config(), FULL_SIZE_VAE_CONFIG
    else:
        raw, vae_config = tiny_dit_config(TINY_VAE_CONFIG["decoder_input_channels"], 32), TINY_VAE_CONFIG
    config = DiTConfig.from_dict(raw)
    dit = AceStepDiT(config)
    dit.load_state_dict(random_dit_state(dit, seed=0))
    dit = dit.to(device=device, dtype=dtype).eval()
    vae = Vae(torch.nn.Module.to(AutoencoderOobleck(**vae_config).eval(), device=device, dtype=dtype))
    return dit, vae


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(dit, vae, seconds: float, batch: int, device, dtype, repeat: int, dcw: bool = True) -> dict:
    config = dit.config
    frames = round(seconds * 25)
    latent, text_dim = config.audio_acoustic_hidden_dim, config.text_hidden_dim
    g = torch.Generator(device).manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=dtype)  # noqa: E731
    args = dict(
        text_hidden_states=r(batch, TEXT_TOKENS, text_dim),
        text_attention_mask=torch.ones(batch, TEXT_TOKENS, dtype=torch.long, device=device),
        lyric_hidden_states=r(batch, LYRIC_TOKENS, text_dim),
        lyric_attention_mask=torch.ones(batch, LYRIC_TOKENS, dtype=torch.long, device=device),
        refer_audio_acoustic_hidden_states_packed=r(batch, config.timbre_fix_frame, config.timbre_hidden_dim),
        refer_audio_order_mask=torch.arange(batch, device=device),
        silence_latent=r(1, frames, latent), src_latents=r(batch, frames, latent),
        chunk_masks=torch.ones(batch, frames, latent, dtype=torch.bool, device=device),
        is_covers=torch.zeros(batch, dtype=torch.bool, device=device),
    )
    dit_times, vae_times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        for run in range(repeat + 1):
            sync(device)
            start = time.perf_counter()
            latents = generate_audio(dit, noise=r(batch, frames, latent), infer_steps=8,
                                     sampling=Sampling(dcw=DCW() if dcw else None), **args)
            sync(device)
            middle = time.perf_counter()
            vae.decode(latents)
            sync(device)
            end = time.perf_counter()
            if run:  # the first run warms up kernels and allocators
                dit_times.append(middle - start)
                vae_times.append(end - middle)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    dit_s, vae_s = statistics.median(dit_times), statistics.median(vae_times)
    return {"seconds": seconds, "batch": batch, "dit_s": dit_s, "vae_s": vae_s, "total_s": dit_s + vae_s, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--seconds", type=float, nargs="+", default=[60.0, 240.0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dcw", choices=("on", "off"), nargs="+", default=["on"],
                        help="DCW after each step (the serving default is on); 'on off' measures both")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dit, vae = build(args.size, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    params = sum(p.numel() for p in dit.parameters()) / 1e9
    print(f"{args.size} DiT ({params:.2f} B parameters) + VAE, {dtype}, {name}, torch {torch.__version__}")
    print(f"{'audio s':>8} {'batch':>5} {'DCW':>4} {'DiT 8 steps s':>14} {'VAE decode s':>13} {'total s':>8} "
          f"{'s/song':>7} {'peak GiB':>9}")
    for seconds in args.seconds:
        for batch in args.batch:
            for dcw in args.dcw:
                row = measure(dit, vae, seconds, batch, device, dtype, args.repeat, dcw == "on")
                print(f"{seconds:>8g} {batch:>5} {dcw:>4} {row['dit_s']:>14.3f} {row['vae_s']:>13.3f} "
                      f"{row['total_s']:>8.3f} {row['total_s'] / batch:>7.3f} {row['peak_gib']:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
