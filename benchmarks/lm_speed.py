"""5 Hz LM speed: a random-weight Qwen3 of the real 0.6B/1.7B size (bf16 on CUDA), the tokenizer with
the 64 000 audio-code tokens, codes for N seconds of audio with CFG, on the pt or the vllm backend.

    python benchmarks/lm_speed.py                        # pt, 1.7B size, codes for 60 s (300 codes), CFG 2.0
    python benchmarks/lm_speed.py --backend vllm         # the same through a vllm engine (GPU extra, CUDA)
    python benchmarks/lm_speed.py --size tiny --seconds 10   # the tiny test model, to check the script

Prints seconds and tokens per second (codes per second of wall time; with CFG each step runs two
rows), median of --repeat runs after a warm-up."""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from pipeline.lm.backend import CodesRequest, Sampling
from pipeline.lm.constrained import Vocabulary
from pipeline.lm.pt_backend import PtBackend
from pipeline.lm.vllm_backend import VllmBackend
from pipeline.tiny_text import build_tokenizer

SIZES = {  # the Qwen3 shapes the ACE-Step LMs were fine-tuned from
    "0.6B": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8),
    "1.7B": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}


def build(size: str, device, dtype) -> PtBackend:
    tokenizer = build_tokenizer(audio_code_tokens=64000)
    config = Qwen3Config(vocab_size=len(tokenizer), head_dim=128 if size != "tiny" else 8, tie_word_embeddings=True,
                         max_position_embeddings=40960, rope_theta=1000000, **SIZES[size])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return PtBackend(f"random-{size}", model, Vocabulary(tokenizer))


def as_vllm(backend: PtBackend, folder: Path) -> VllmBackend:
    """The same random model saved as a checkpoint folder and served by a vllm engine."""
    backend.model.save_pretrained(folder)
    backend.tokenizer.save_pretrained(folder)
    del backend.model
    torch.cuda.empty_cache()
    return VllmBackend.start(folder, gpu_memory_utilization=0.5, max_model_len=4096)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1.7B")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", choices=("pt", "vllm"), default="pt")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backend = build(args.size, device, dtype)
    if args.backend == "vllm":
        backend = as_vllm(backend, Path(tempfile.mkdtemp(prefix="lm-speed-")))
    n = int(args.seconds * 5)
    prompt = "<|im_start|>system\n# Instruction\nGenerate audio semantic tokens based on the given conditions:\n\n<|im_end|>\n" \
             "<|im_start|>user\n# Caption\nupbeat pop song\n\n# Lyric\nHello world\n<|im_end|>\n<|im_start|>assistant\n" \
             "<think>\nbpm: 120\nduration: 60\nkeyscale: C major\ntimesignature: 4\n</think>\n\n<|im_end|>\n"
    requests = [CodesRequest(prompt, prompt, cfg_scale=args.cfg, n_codes=n, max_new_tokens=n + 10, seed=i,
                             sampling=Sampling()) for i in range(args.batch)]
    times = []
    for run in range(args.repeat + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        backend.generate_codes(requests)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if run:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{args.size} LM (random weights), {dtype}, {name}, {args.backend} backend, CFG {args.cfg}, batch {args.batch}")
    print(f"codes for {args.seconds:g} s of audio ({n} codes per item): {seconds:.2f} s, {n * args.batch / seconds:.1f} codes/s")


if __name__ == "__main__":
    main()
