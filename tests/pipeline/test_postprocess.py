"""pipeline.postprocess against the audio-post fixture (via pipeline.post_conformance) and its serving order."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import post_conformance
from pipeline import postprocess as pp

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "audio-post"
MINUS_1_DB = 10.0 ** (-1.0 / 20.0)


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((FIXTURE / "manifest.json").read_text())


def _outcomes(fixture_dir: Path) -> dict[str, post_conformance.Outcome]:
    return {o.name: o for o in post_conformance.run(fixture_dir)}


def test_every_fixture_case_passes(manifest):
    outcomes = post_conformance.run(FIXTURE)
    assert [o.name for o in outcomes] == list(manifest["cases"])
    failed = [f"{o.name}: {o.detail}" for o in outcomes if not o.passed]
    assert not failed, failed
    tensor_cases = [o for o in outcomes if "max |diff|" in o.detail]
    assert len(tensor_cases) >= 14


def _copy_fixture(tmp_path: Path, manifest: dict, tensors: dict | None = None) -> Path:
    out = tmp_path / "audio-post"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps(manifest))
    if tensors is None:
        shutil.copy(FIXTURE / "fixture.safetensors", out / "fixture.safetensors")
    else:
        save_file(tensors, str(out / "fixture.safetensors"))
    return out


def _edit(manifest: dict, case: str, path: list, value) -> dict:
    edited = copy.deepcopy(manifest)
    node = edited["cases"][case]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return edited


S01 = "S01_repaint_waveform_splice_balanced_default"
N01 = "N01_normalize_audio_peak_1.7"


@pytest.mark.parametrize(("case", "path", "value"), [
    (N01, ["scalar_args", "target_db"], -2.0),
    (S01, ["scalar_args", "crossfade_duration"], 0.03),
    (S01, ["scalar_args", "repainting_starts"], [0.022, 0.0]),
    (S01, ["scalar_args", "sample_rate"], 44100),
    ("L01_latent_shift_rescale", ["scalar_args", "latent_shift"], 0.06),
    ("L01_latent_shift_rescale", ["expected_errors", "all_zero_latents"], "RuntimeError: something else"),
    ("F01_apply_fade_0.01_0.02", ["scalar_args", "fade_in_samples"], 481),
    ("F01_apply_fade_0.01_0.02", ["scalar_args", "fade_out_duration"], 0.03),
    ("P01_prepare_padding_info_repaint", ["rows", 0, "repainting_start"], -0.02),
    ("Q01_is_silence", ["items", 2, "expected"], True),
    ("R01_resolve_repaint_config", ["rows", 3, "expected", "latent_crossfade_frames"], 17),
    ("R01_resolve_repaint_config", ["rows", 3, "expected", "latent_crossfade_frames"], 18.0),
    (N01, ["scalar_args", "unknown_knob"], 1),
])
def test_changed_manifest_fails_only_that_case(tmp_path, manifest, case, path, value):
    outcomes = _outcomes(_copy_fixture(tmp_path, _edit(manifest, case, path, value)))
    assert not outcomes[case].passed, outcomes[case].detail
    assert all(o.passed for name, o in outcomes.items() if name != case)


def test_unknown_reference_function_fails(tmp_path, manifest):
    edited = _edit(manifest, N01, ["reference_function"], "acestep/x.py: something_new")
    outcome = _outcomes(_copy_fixture(tmp_path, edited))[N01]
    assert not outcome.passed
    assert outcome.detail.startswith("error: no runner for")


@pytest.mark.parametrize(("tensor", "case"), [
    (f"{N01}.in.audio", N01),
    (f"{S01}.in.src_wavs", S01),
    ("C01_handler_clip_guard.in.vae_output", "C01_handler_clip_guard"),
    ("Q02_to_stereo.in.mono", "Q02_normalize_audio_to_stereo_48k"),
])
def test_perturbed_input_tensor_fails(tmp_path, manifest, tensor, case):
    tensors = load_file(str(FIXTURE / "fixture.safetensors"))
    changed = tensors[tensor].clone()
    changed[..., 5] += 1e-3
    tensors[tensor] = changed
    outcomes = _outcomes(_copy_fixture(tmp_path, manifest, tensors))
    assert not outcomes[case].passed, outcomes[case].detail


# ---- serving order (postprocess_audio)

def _batch(seed: int = 0, peak: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 2, 4800, generator=g) * 2 - 1
    return x / x.abs().amax(dim=(1, 2), keepdim=True) * peak


def test_splice_then_normalise_rescales_the_source_too():
    pred, src = _batch(0, 0.5), _batch(1, 0.25)
    starts, ends = [0.02, 0.03], [0.05, 0.06]
    out = pp.postprocess_audio(pred, repaint=(src, starts, ends, 0.0))
    spliced = pp.repaint_splice(pred, src, starts, ends, 48000, 0.0)
    for b in range(2):
        gain = MINUS_1_DB / spliced[b].abs().max()
        torch.testing.assert_close(out[b], spliced[b] * gain)
        # outside the span the (rescaled) source, not the source as it was
        torch.testing.assert_close(out[b, :, :100], src[b, :, :100] * gain)
        assert not torch.allclose(out[b, :, :100], src[b, :, :100])
        assert out[b].abs().max().item() == pytest.approx(MINUS_1_DB, abs=1e-6)


def test_normalize_false_or_positive_db_leaves_peak():
    wavs = _batch(2, 0.5)
    torch.testing.assert_close(pp.postprocess_audio(wavs, normalize=False), wavs)
    torch.testing.assert_close(pp.postprocess_audio(wavs, normalization_db=0.5), wavs)
    assert pp.postprocess_audio(wavs).abs().amax(dim=(1, 2)).tolist() == pytest.approx([MINUS_1_DB] * 2, abs=1e-6)


def test_clip_guard_first_then_each_item_normalised_on_its_own():
    wavs = torch.cat([_batch(3, 2.0)[:1], _batch(4, 0.1)[:1]])
    guarded = pp.clip_guard(wavs)
    assert guarded[0].abs().max().item() == pytest.approx(1.0)
    assert guarded[1].abs().max().item() == pytest.approx(0.1)  # divided by max(peak, 1) = 1
    out = pp.postprocess_audio(wavs)
    assert out.abs().amax(dim=(1, 2)).tolist() == pytest.approx([MINUS_1_DB] * 2, abs=1e-6)


def test_fades_applied_last():
    wavs = _batch(5, 0.3)
    wavs[:, :, 10] = 0.9  # the peak lies inside the fade-in
    out = pp.postprocess_audio(wavs, fade_in=0.01, fade_out=0.02)
    n_in, n_out = pp.fade_samples(0.01, 48000), pp.fade_samples(0.02, 48000)
    assert (n_in, n_out) == (480, 960)
    expected = torch.stack([pp.apply_fade(pp.normalize_peak(w, -1.0), n_in, n_out) for w in wavs])
    torch.testing.assert_close(out, expected)
    wrong_order = torch.stack([pp.normalize_peak(pp.apply_fade(w, n_in, n_out), -1.0) for w in wavs])
    assert not torch.allclose(out, wrong_order)
    assert out[:, :, 0].abs().max().item() == 0.0 and out[:, :, -1].abs().max().item() == 0.0


def test_splice_crossfade_from_repaint_config():
    ratio, frames, seconds = pp.repaint_config("balanced", 0.5)
    assert (ratio, frames, seconds) == (0.5, 12, 0.025)
    assert pp.repaint_config("aggressive", 0.2) == (0.0, 0, 0.0)
    mask = pp.repaint_masks(_batch(), _batch(1), [0.05], [0.06], 48000, seconds)[0]
    assert mask[2400:2880].eq(1).all() and mask[2400 - 1200:2400].gt(0).all() and mask[2400 - 1201] == 0


def test_latent_errors_and_stereo_resample():
    with pytest.raises(RuntimeError, match="zero latents"):
        pp.postprocess_latents(torch.zeros(1, 2, 3))
    with pytest.raises(RuntimeError, match="inf=1"):
        pp.postprocess_latents(torch.tensor([[1.0, float("inf")]]))
    out = pp.to_stereo_48k(torch.ones(1, 441) * 2, 44100)
    assert out.shape == (2, 480) and out.max().item() == 1.0
