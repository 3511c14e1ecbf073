"""Conformance with the reference: `python -m pipeline.conformance FIXTURE_DIR`.

A DiT fixture directory holds `config.json` + `model.safetensors` (a checkpoint in the reference's
layout), `fixture.safetensors` (tensors) and `manifest.json` (cases: which reference method, which
tensor is each argument, the scalar arguments, each expected output). The model is built from the
config and loaded strictly; each case runs through our code (the model's modules, the sampler's
`generate_audio` with every scalar mapped onto our options, the sampler's helpers, the handler's
conditioning builder in `pipeline.mask_conformance`); one line per case gives the largest
difference. Exit status 1 if a float output is off by more than the tolerance (1e-4; the helpers'
unit cases 1e-5) or an integer/boolean output (or a chunk mask's dtype) differs at all; a scalar
argument this runner does not know fails its case. A folder without `config.json` is the
audio post-processing fixture (`pipeline.post_conformance`, 1e-6). Nothing here depends on the
sizes of one fixture."""

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
from pipeline.dcw import DCW
from pipeline.sampler import (
    Guidance,
    MomentumBuffer,
    Sampling,
    adg,
    apg,
    generate_audio,
    repaint_blend,
    repaint_injection,
)

TOLERANCE = 1e-4

# Scalar arguments of the reference's generate_audio that change nothing here: the noises are given
# (seed, retake_seed), the turbo schedule comes from shift / infer_steps (fix_nfe), the
# cross-attention cache is always used, no progress bar.
IGNORED_SCALARS = {"seed", "retake_seed", "fix_nfe", "use_cache", "use_progress_bar"}
SAMPLING_SCALARS = {"infer_method", "sampler_mode", "velocity_norm_threshold", "velocity_ema_factor"}
DCW_SCALARS = {"dcw_enabled": "enabled", "dcw_mode": "mode", "dcw_scaler": "scaler", "dcw_high_scaler": "high_scaler",
               "dcw_wavelet": "wavelet"}
GUIDANCE_SCALARS = {"diffusion_guidance_scale": "scale", "use_adg": "use_adg", "cfg_interval_start": "interval_start",
                    "cfg_interval_end": "interval_end"}
GENERATE_SCALARS = {"shift", "infer_steps", "audio_cover_strength", "cover_noise_strength", "repaint_crossfade_frames",
                    "repaint_injection_ratio", "retake_variance"}
# The unit cases (one helper of the sampler) pass within this (their READMEs).
UNIT_TOLERANCE = 1e-5
MASK_METHOD = "_build_chunk_masks_and_src_latents"
# audio-post: elementwise operations on waveforms; the reference agrees with itself exactly.
POST_TOLERANCE = 1e-6
UNIT_METHODS = {"DCWCorrector.apply", "_repaint_boundary_blend", "_repaint_step_injection", "apg_forward", "adg_forward"}



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
    """generate_audio: scalars are mapped onto Sampling / DCW / Guidance; a scalar this runner
    does not know fails the case (it might change the numbers). DCW is off unless the case turns
    it on (the fixtures before it existed name no dcw_* argument)."""
    args = dict(args)
    noise = args.pop("initial_noise")
    args.pop("attention_mask", None)  # only shapes the tokenizer's pooled mask, which generation never uses
    sde_noise = args.pop("sde_renoise_noise", None)
    if "timesteps" in args:
        args["timesteps"] = args["timesteps"].tolist()
    unknown = set(scalars) - IGNORED_SCALARS - SAMPLING_SCALARS - set(DCW_SCALARS) - set(GUIDANCE_SCALARS) - GENERATE_SCALARS
    if unknown:
        raise ValueError(f"unsupported scalar argument(s) {sorted(unknown)}")
    dcw = {DCW_SCALARS[k]: v for k, v in scalars.items() if k in DCW_SCALARS}
    sampling = Sampling(
        **{k: v for k, v in scalars.items() if k in SAMPLING_SCALARS},
        dcw=DCW(**{k: v for k, v in dcw.items() if k != "enabled"}) if dcw.get("enabled") else None,
    )
    guidance = None
    if not model.config.turbo:  # turbo ignores guidance (the reference's handler forces 1.0)
        guidance = Guidance(**{GUIDANCE_SCALARS[k]: v for k, v in scalars.items() if k in GUIDANCE_SCALARS})
    options = {k: v for k, v in scalars.items() if k in GENERATE_SCALARS}
    return (generate_audio(model, noise=noise, sampling=sampling, guidance=guidance, sde_noise=sde_noise,
                           **args, **options),)


def _run_dcw(model: AceStepDiT, args: dict, scalars: dict) -> tuple:
    """DCWCorrector.apply once per row of `settings`, stacked."""
    rows = [DCW(mode=s["mode"], scaler=s["scaler"], high_scaler=s["high_scaler"], wavelet=s["wavelet"])
            .apply(args["x_next"], args["denoised"], s["t_curr"]) for s in scalars["settings"]]
    return (torch.stack(rows),)


def _run_blend(model: AceStepDiT, args: dict, scalars: dict) -> tuple:
    rows = [repaint_blend(args["x"], args["clean_src_latents"], args["repaint_mask"], frames)
            for frames in scalars["cf_frames"]]
    return (torch.stack(rows),)


def _run_injection(model: AceStepDiT, args: dict, scalars: dict) -> tuple:
    return (repaint_injection(args["x"], args["clean_src_latents"], args["repaint_mask"], scalars["t_next"], args["noise"]),)


def _run_apg(model: AceStepDiT, args: dict, scalars: dict) -> tuple:
    """apg_forward called once per leading index with one momentum buffer (dims [1]: time)."""
    if scalars.get("dims", [1]) != [1]:
        raise ValueError(f"apg over dims {scalars['dims']} (only the time axis, [1], is used)")
    buffer = MomentumBuffer(scalars["momentum"])
    rows = [apg(cond, uncond, scalars["guidance_scale"], buffer, scalars["norm_threshold"], scalars["eta"])
            for cond, uncond in zip(args["pred_cond"], args["pred_uncond"], strict=True)]
    return (torch.stack(rows),)


def _run_adg(model: AceStepDiT, args: dict, scalars: dict) -> tuple:
    if scalars.get("apply_norm") or not scalars.get("apply_clip", True):
        raise ValueError("only ADG with the angle clip and without the norm (the sampler's) is implemented")
    cond, uncond = args["noise_pred_cond"], args["noise_pred_uncond"]
    if cond.shape != args["latents"].shape:  # the case gives a stack of predictions and uses the first
        cond, uncond = cond[0], uncond[0]
    return (adg(args["latents"], cond, uncond, scalars["sigma"], scalars["guidance_scale"], scalars["angle_clip"]),)


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
        ("DCWCorrector.apply", ""): _run_dcw,
        ("_repaint_boundary_blend", ""): _run_blend,
        ("_repaint_step_injection", ""): _run_injection,
        ("apg_forward", ""): _run_apg,
        ("adg_forward", ""): _run_adg,
    }
    if method in UNIT_METHODS:
        target = ""
    if (method, target) not in table:
        raise ValueError(f"no runner for {case['reference_class']}.{method} on {target!r}")
    return table[(method, target)]


def compare(name: str, ours: torch.Tensor, expected: torch.Tensor, tolerance: float,
            exact_dtype: bool = False) -> tuple[bool, str]:
    if tuple(ours.shape) != tuple(expected.shape):
        return False, f"{name}: shape {tuple(ours.shape)} != {tuple(expected.shape)}"
    if exact_dtype and ours.dtype != expected.dtype:
        return False, f"{name}: dtype {ours.dtype} != {expected.dtype}"
    if expected.dtype.is_floating_point:
        diff = (ours.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
        ok = diff <= tolerance and bool(torch.isfinite(ours).all())
        return ok, f"{name}: max |diff| {diff:.2e}"
    mismatches = int((ours.to(torch.int64) != expected.to(torch.int64)).sum())
    return mismatches == 0, f"{name}: {mismatches} of {expected.numel()} differ"


def run_case(model: AceStepDiT, name: str, case: dict, tensors: dict, tolerance: float) -> Outcome:
    method = case["reference_method"]
    if method in UNIT_METHODS:
        tolerance = min(tolerance, UNIT_TOLERANCE)
    try:
        with torch.inference_mode():
            if method == MASK_METHOD:  # the handler's conditioning builder: outputs (null ones too) and spans
                from pipeline.mask_conformance import check_mask_case

                return Outcome(name, *check_mask_case(case, tensors, tolerance))
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
    if not (fixture_dir / "config.json").is_file():  # no model: the audio post-processing fixture
        from pipeline.post_conformance import run as run_post

        return run_post(fixture_dir, min(tolerance, POST_TOLERANCE))
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
    post = not (options.fixture_dir / "config.json").is_file()
    limits = (f"tolerance {min(options.tolerance, POST_TOLERANCE):g}" if post else
              f"tolerance {options.tolerance:g}, unit cases {min(options.tolerance, UNIT_TOLERANCE):g}")
    print(f"{len(outcomes) - failed} of {len(outcomes)} cases pass ({limits})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
