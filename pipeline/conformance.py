"""Conformance with the reference DiT: `python -m pipeline.conformance FIXTURE_DIR`.

A fixture directory holds `config.json` + `model.safetensors` (a checkpoint in the reference's
layout), `fixture.safetensors` (tensors) and `manifest.json` (cases: which reference method, which
tensor is each argument and each expected output). The model is built from the config and loaded
strictly; each case runs through our code; one line per case gives the largest difference. Exit
status 1 if a float output is off by more than the tolerance (1e-4) or an integer/boolean output
differs at all. Nothing here depends on the sizes of one fixture."""

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.dit.load import load_dit
from pipeline.dit.model import AceStepDiT
from pipeline.sampler import generate_audio

TOLERANCE = 1e-4

# Scalar arguments of the reference's generate_audio that change nothing here: the noise is given
# (seed), the turbo schedule comes from shift (fix_nfe), the cross-attention cache is always used.
IGNORED_SCALARS = {"seed", "fix_nfe", "use_cache"}


@dataclass
class Outcome:
    name: str
    passed: bool
    detail: str


def _inputs(case: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {arg: tensors[spec["tensor"]] for arg, spec in case["inputs"].items()}


def _run_encoder(model: AceStepDiT, args: dict, scalars: dict) -> tuple:
    return model.encoder(
        args["text_hidden_states"], args["text_attention_mask"], args["lyric_hidden_states"],
        args["lyric_attention_mask"], args["refer_audio_acoustic_hidden_states_packed"], args["refer_audio_order_mask"],
    )


def _run_decoder(model: AceStepDiT, args: dict, scalars: dict) -> tuple:
    # attention_mask and encoder_attention_mask are accepted by the reference and ignored.
    velocity = model.decoder(
        args["hidden_states"], args["timestep"], args["timestep_r"], args["encoder_hidden_states"], args["context_latents"]
    )
    return (velocity,)


def _run_tokenize(model: AceStepDiT, args: dict, scalars: dict) -> tuple:
    return model.tokenize(args["x"], args["silence_latent"], args["attention_mask"])


def _run_detokenize(model: AceStepDiT, args: dict, scalars: dict) -> tuple:
    return (model.detokenize(args["quantized"]),)


def _run_codes(model: AceStepDiT, args: dict, scalars: dict) -> tuple:
    quantized = model.codes_to_quantized(args["indices"])
    return quantized, model.detokenize(quantized)


def _run_generate(model: AceStepDiT, args: dict, scalars: dict) -> tuple:
    args = dict(args)
    noise = args.pop("initial_noise")
    options = {k: v for k, v in scalars.items() if k not in IGNORED_SCALARS}
    unknown = set(options) - {
        "shift", "timesteps", "infer_method", "audio_cover_strength", "cover_noise_strength",
        "repaint_crossfade_frames", "repaint_injection_ratio",
    }
    if unknown:
        raise ValueError(f"unsupported scalar argument(s) {sorted(unknown)}")
    args.pop("attention_mask", None)  # only shapes the tokenizer's pooled mask, which generation never uses
    return (generate_audio(model, noise=noise, **args, **options),)


def runner_for(case: dict) -> Callable:
    method, target = case["reference_method"], case.get("called_on", "")
    if "get_output_from_indices" in method or "quantizer" in target:
        return _run_codes
    table = {
        ("forward", "model.encoder"): _run_encoder,
        ("forward", "model.decoder"): _run_decoder,
        ("tokenize", "model"): _run_tokenize,
        ("detokenize", "model"): _run_detokenize,
        ("generate_audio", "model"): _run_generate,
    }
    if (method, target) not in table:
        raise ValueError(f"no runner for {case['reference_class']}.{method} on {target!r}")
    return table[(method, target)]


def compare(name: str, ours: torch.Tensor, expected: torch.Tensor, tolerance: float) -> tuple[bool, str]:
    if tuple(ours.shape) != tuple(expected.shape):
        return False, f"{name}: shape {tuple(ours.shape)} != {tuple(expected.shape)}"
    if expected.dtype.is_floating_point:
        diff = (ours.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
        ok = diff <= tolerance and bool(torch.isfinite(ours).all())
        return ok, f"{name}: max |diff| {diff:.2e}"
    mismatches = int((ours.to(torch.int64) != expected.to(torch.int64)).sum())
    return mismatches == 0, f"{name}: {mismatches} of {expected.numel()} differ"


def run_case(model: AceStepDiT, name: str, case: dict, tensors: dict, tolerance: float) -> Outcome:
    try:
        with torch.inference_mode():
            results = runner_for(case)(model, _inputs(case, tensors), case.get("scalar_args", {}))
    except Exception as exc:  # one broken case must not hide the others
        return Outcome(name, False, f"error: {type(exc).__name__}: {exc}")
    expected = case["outputs"]
    if len(results) != len(expected):
        return Outcome(name, False, f"{len(results)} outputs, fixture has {len(expected)}")
    checks = [compare(out, result, tensors[spec["tensor"]], tolerance)
              for (out, spec), result in zip(expected.items(), results, strict=True)]
    return Outcome(name, all(ok for ok, _ in checks), "; ".join(text for _, text in checks))


def run(fixture_dir: Path, tolerance: float = TOLERANCE) -> list[Outcome]:
    manifest = json.loads((fixture_dir / "manifest.json").read_text())
    torch.manual_seed(0)
    model = load_dit(fixture_dir, dtype=torch.float32)
    tensors = load_file(str(fixture_dir / "fixture.safetensors"))
    return [run_case(model, name, case, tensors, tolerance) for name, case in manifest["cases"].items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.conformance", description=__doc__.splitlines()[0])
    parser.add_argument("fixture_dir", type=Path)
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="largest allowed float difference")
    options = parser.parse_args(argv)
    outcomes = run(options.fixture_dir, options.tolerance)
    width = max(len(o.name) for o in outcomes)
    for outcome in outcomes:
        print(f"{'PASS' if outcome.passed else 'FAIL'}  {outcome.name:<{width}}  {outcome.detail}")
    failed = sum(not o.passed for o in outcomes)
    print(f"{len(outcomes) - failed} of {len(outcomes)} cases pass (tolerance {options.tolerance:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
