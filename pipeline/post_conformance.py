"""Conformance of pipeline.postprocess with the reference's audio post-processing (fixture audio-post).

The fixture directory holds `manifest.json` (cases) and `fixture.safetensors` (waveforms); there is no
model. Each case is dispatched on the reference function it names and run through the matching
function of pipeline.postprocess with the manifest's scalar arguments (an argument this runner does
not know fails the case). Tensor outputs (and debug intermediates) must agree within the tolerance;
table cases (items/rows) must agree row by row: booleans, integers, strings, lists and None exactly
(with their JSON type), floats within the tolerance. One Outcome per case.
"""

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from pipeline import postprocess as pp
from pipeline.conformance import Outcome, compare

TOLERANCE = 1e-6

# Shape of the probe latents for the L case's expected errors (the all-NaN message records [1, 3, 4]).
ERROR_PROBE_SHAPE = (1, 3, 4)


class CaseError(Exception):
    """The case cannot be run as the manifest describes it."""


def _scalars(case: dict, known: set[str]) -> dict:
    scalars = case.get("scalar_args", {})
    unknown = set(scalars) - known
    if unknown:
        raise CaseError(f"unsupported scalar argument(s) {sorted(unknown)}")
    return scalars


def _tensor(tensors: dict[str, torch.Tensor], spec: dict) -> torch.Tensor:
    name = spec["tensor"]
    if name not in tensors:
        raise CaseError(f"tensor {name!r} not in fixture.safetensors")
    return tensors[name]


def _inputs(case: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {arg: _tensor(tensors, spec) for arg, spec in case.get("inputs", {}).items()}


def _same(ours: Any, expected: Any, tensors: dict, tolerance: float) -> str | None:
    """None when equal, else why not. Floats within tolerance, everything else exactly with its type."""
    if isinstance(expected, dict) and "tensor" in expected:
        if not isinstance(ours, torch.Tensor):
            return f"expected a tensor, got {type(ours).__name__}"
        ok, text = compare("tensor", ours, _tensor(tensors, expected), tolerance)
        return None if ok else text
    if isinstance(expected, dict):
        if not isinstance(ours, dict) or set(ours) != set(expected):
            return f"keys {sorted(ours) if isinstance(ours, dict) else ours!r} != {sorted(expected)}"
        for key, value in expected.items():
            why = _same(ours[key], value, tensors, tolerance)
            if why:
                return f"{key}: {why}"
        return None
    if expected is None or isinstance(expected, (bool, str)):
        same = ours is None if expected is None else (type(ours) is type(expected) and ours == expected)
        return None if same else f"{ours!r} != {expected!r}"
    if isinstance(expected, int):
        same = isinstance(ours, int) and not isinstance(ours, bool) and ours == expected
        return None if same else f"{ours!r} != {expected!r}"
    if isinstance(expected, float):
        if not isinstance(ours, float):  # a JSON float needs a float, not an int
            return f"{ours!r} != {expected!r}"
        diff = abs(float(ours) - expected)
        if diff <= tolerance and math.isfinite(ours):
            return None
        return f"{ours!r} != {expected!r} (|diff| {diff:.2e})"
    if isinstance(expected, list):
        if not isinstance(ours, (list, tuple)) or len(ours) != len(expected):
            return f"{ours!r} != {expected!r}"
        for i, (a, b) in enumerate(zip(ours, expected)):
            why = _same(a, b, tensors, tolerance)
            if why:
                return f"[{i}]: {why}"
        return None
    raise CaseError(f"cannot compare a {type(expected).__name__} expectation")


# ---- tensor cases: each returns {output name: tensor} (outputs and debug intermediates by name)

def _run_splice(case: dict, tensors: dict) -> dict[str, torch.Tensor]:
    s = _scalars(case, {"repainting_starts", "repainting_ends", "sample_rate", "crossfade_duration"})
    args = _inputs(case, tensors)
    call = (args["pred_wavs"], args["src_wavs"], s["repainting_starts"], s["repainting_ends"],
            s["sample_rate"], s["crossfade_duration"])
    return {"spliced": pp.repaint_splice(*call), "per_item_mask": pp.repaint_masks(*call)}


def _run_normalize(case: dict, tensors: dict) -> dict[str, torch.Tensor]:
    s = _scalars(case, {"target_db"})
    return {"audio": pp.normalize_peak(_inputs(case, tensors)["audio"], s["target_db"])}


def _run_clip_guard(case: dict, tensors: dict) -> dict[str, torch.Tensor]:
    _scalars(case, set())
    return {"pred_wavs": pp.clip_guard(_inputs(case, tensors)["vae_output"])}


def _run_latents(case: dict, tensors: dict) -> dict[str, torch.Tensor]:
    s = _scalars(case, {"latent_shift", "latent_rescale"})
    latents = _inputs(case, tensors)["latents"]
    return {"latents": pp.postprocess_latents(latents, s["latent_shift"], s["latent_rescale"])}


def _run_fade(case: dict, tensors: dict) -> dict[str, torch.Tensor]:
    s = _scalars(case, {"fade_in_duration", "fade_out_duration", "sample_rate", "fade_in_samples", "fade_out_samples"})
    for side in ("in", "out"):
        if f"fade_{side}_duration" in s:
            n = pp.fade_samples(s[f"fade_{side}_duration"], s["sample_rate"])
            if n != s[f"fade_{side}_samples"]:
                raise CaseError(f"fade_samples({s[f'fade_{side}_duration']}, {s['sample_rate']}) = {n}, "
                                f"fixture has fade_{side}_samples {s[f'fade_{side}_samples']}")
    return {"audio": pp.apply_fade(_inputs(case, tensors)["audio"], s["fade_in_samples"], s["fade_out_samples"])}


_PROBES: dict[str, Callable[[], torch.Tensor]] = {
    "all_nan_latents": lambda: torch.full(ERROR_PROBE_SHAPE, float("nan")),
    "all_zero_latents": lambda: torch.zeros(ERROR_PROBE_SHAPE),
}


def _check_latent_errors(case: dict) -> list[str]:
    problems = []
    for key, message in case.get("expected_errors", {}).items():
        if key not in _PROBES:
            problems.append(f"{key}: no probe for this expected error")
            continue
        try:
            pp.postprocess_latents(_PROBES[key](), 0.0, 1.0)
        except Exception as exc:  # noqa: BLE001 - the message is what is checked
            got = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if got != message:
                problems.append(f"{key}: {got!r} != {message!r}")
        else:
            problems.append(f"{key}: no error raised")
    return problems


def _tensor_case(runner: Callable) -> Callable:
    def run_case(name: str, case: dict, tensors: dict, tolerance: float) -> Outcome:
        results = runner(case, tensors)
        checks = []
        for section, label in (("outputs", ""), ("debug_intermediates", " (debug)")):
            for out, spec in case.get(section, {}).items():
                if out not in results:
                    checks.append((False, f"{out}{label}: not produced"))
                    continue
                ok, text = compare(out, results[out], _tensor(tensors, spec), tolerance)
                checks.append((ok, text.replace(":", label + ":", 1)))
        if not case.get("outputs"):
            checks.append((False, "no outputs in the manifest"))
        if runner is _run_latents:
            problems = _check_latent_errors(case)
            checks += [(False, p) for p in problems]
            if case.get("expected_errors") and not problems:
                checks.append((True, f"{len(case['expected_errors'])} expected errors match"))
        return Outcome(name, all(ok for ok, _ in checks), "; ".join(text for _, text in checks))
    return run_case


# ---- table cases

def _table_case(rows_key: str, row_result: Callable, describe: Callable) -> Callable:
    def run_case(name: str, case: dict, tensors: dict, tolerance: float) -> Outcome:
        rows = case.get(rows_key)
        if not rows:
            raise CaseError(f"no {rows_key} in the manifest")
        for i, row in enumerate(rows):
            got, expected = row_result(case, row, tensors)
            why = _same(got, expected, tensors, tolerance)
            if why:
                return Outcome(name, False, f"{rows_key[:-1]} {i} ({describe(row)}): {why}")
        return Outcome(name, True, f"{len(rows)} {rows_key}: all match")
    return run_case


def _called_as_int(case: dict, pattern: str, what: str) -> int:
    match = re.search(pattern, case.get("called_as", ""))
    if not match:
        raise CaseError(f"cannot read {what} from called_as {case.get('called_as')!r}")
    return int(match.group(1))


def _silence_row(case: dict, item: dict, tensors: dict) -> tuple[Any, Any]:
    return pp.is_silence(_tensor(tensors, item["audio"])), item["expected"]


def _stereo_row(case: dict, item: dict, tensors: dict) -> tuple[Any, Any]:
    sr = _called_as_int(case, r",\s*(\d+)\s*\)\s*$", "the sample rate")
    return pp.to_stereo_48k(_tensor(tensors, item["audio"]), sr), item["expected"]


def _padding_row(case: dict, row: dict, tensors: dict) -> tuple[Any, Any]:
    batch = _called_as_int(case, r"prepare_padding_info\(\s*(\d+)\s*,", "the batch size")
    src = _tensor(tensors, case["inputs"]["src_audio"])
    unknown = set(row) - {"repainting_start", "repainting_end", "expected_repainting_start_batch",
                          "expected_repainting_end_batch", "expected_target_wavs"}
    if unknown:
        raise CaseError(f"unknown row field(s) {sorted(unknown)}")
    wavs, starts, ends = pp.padding_info(batch, src, row["repainting_start"], row["repainting_end"])
    got = {"repainting_start_batch": starts, "repainting_end_batch": ends, "target_wavs": wavs}
    expected = {k[len("expected_"):]: v for k, v in row.items() if k.startswith("expected_")}
    return got, expected


def _repaint_config_row(case: dict, row: dict, tensors: dict) -> tuple[Any, Any]:
    ratio, frames, seconds = pp.repaint_config(row["repaint_mode"], row["repaint_strength"])
    got = {"injection_ratio": ratio, "latent_crossfade_frames": frames, "wav_crossfade_sec": seconds}
    return got, row["expected"]


def _label(row: dict) -> str:
    return str(row.get("label", "?"))


def _args(*keys: str) -> Callable[[dict], str]:
    return lambda row: ", ".join(f"{k}={row.get(k)!r}" for k in keys)


# reference function name -> runner(name, case, tensors, tolerance) -> Outcome
RUNNERS: dict[str, Callable] = {
    "apply_repaint_waveform_splice": _tensor_case(_run_splice),
    "normalize_audio": _tensor_case(_run_normalize),
    "GenerateMusicDecodeMixin._decode_generate_music_pred_latents": _tensor_case(_run_clip_guard),
    "GenerateMusicDecodeMixin._prepare_generate_music_decode_state": _tensor_case(_run_latents),
    "apply_fade": _tensor_case(_run_fade),
    "MemoryUtilsMixin.is_silence": _table_case("items", _silence_row, _label),
    "IoAudioMixin._normalize_audio_to_stereo_48k": _table_case("items", _stereo_row, _label),
    "PaddingMixin.prepare_padding_info": _table_case("rows", _padding_row, _args("repainting_start", "repainting_end")),
    "_resolve_repaint_config": _table_case("rows", _repaint_config_row, _args("repaint_mode", "repaint_strength")),
}


def reference_name(case: dict) -> str:
    """'path/file.py: Class.method (note)' -> 'Class.method'."""
    text = case.get("reference_function", "")
    text = text.split(": ", 1)[1] if ": " in text else text
    return text.split()[0] if text.split() else ""


def run_case(name: str, case: dict, tensors: dict, tolerance: float) -> Outcome:
    function = reference_name(case)
    runner = RUNNERS.get(function)
    if runner is None:
        reference = case.get("reference_function", "(no reference_function)")
        return Outcome(name, False, f"error: no runner for {reference!r}")
    try:
        with torch.inference_mode():
            return runner(name, case, tensors, tolerance)
    except Exception as exc:  # one broken case must not hide the others
        return Outcome(name, False, f"error: {type(exc).__name__}: {exc}")


def run(fixture_dir: Path, tolerance: float = TOLERANCE) -> list[Outcome]:
    """One Outcome per case of the audio-post fixture in fixture_dir."""
    fixture_dir = Path(fixture_dir)
    manifest = json.loads((fixture_dir / "manifest.json").read_text())
    tensors = load_file(str(fixture_dir / "fixture.safetensors"))
    return [run_case(name, case, tensors, tolerance) for name, case in manifest["cases"].items()]
