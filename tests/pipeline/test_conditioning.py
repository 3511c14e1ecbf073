"""The handler's chunk masks and source latents against the M cases of the dit-base and dit-turbo-v2
fixtures (reference method `_build_chunk_masks_and_src_latents`), plus controls showing that a changed
argument makes a case fail."""

import copy
import json
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.conditioning import build_chunk_masks_and_src_latents, span_frames
from pipeline.mask_conformance import (
    check_mask_case,
    check_mask_outputs,
    check_spans,
    is_mask_case,
    run_mask_case,
    run_mask_case_with_spans,
    uses_pr1290,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURE_NAMES = ("dit-base", "dit-turbo-v2")


@cache
def _manifest(name: str) -> dict:
    return json.loads((FIXTURES / name / "manifest.json").read_text())


@cache
def _tensors(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / name / "fixture.safetensors"))


def _mask_cases() -> list:
    return [pytest.param(fixture, case_name, id=f"{fixture}:{case_name}")
            for fixture in FIXTURE_NAMES
            for case_name, case in _manifest(fixture)["cases"].items() if is_mask_case(case)]


MASK_CASES = _mask_cases()


def _case(fixture: str, case_name: str) -> dict:
    return copy.deepcopy(_manifest(fixture)["cases"][case_name])


def test_every_expected_case_is_collected():
    names = {(p.values[0], p.values[1][:3]) for p in MASK_CASES}
    assert names == {("dit-turbo-v2", f"M0{i}") for i in range(1, 9)} | \
        {("dit-base", f"M{i:02d}") for i in range(1, 14)}


@pytest.mark.parametrize(("fixture", "case_name"), MASK_CASES)
def test_mask_case_matches_fixture(fixture, case_name):
    case, tensors = _case(fixture, case_name), _tensors(fixture)
    results, spans = run_mask_case_with_spans(case, tensors)
    assert len(results) == len(case["outputs"])
    for (name, spec), ours in zip(case["outputs"].items(), results, strict=True):
        if spec is None:
            assert ours is None, f"{name}: the reference returned None"
            continue
        expected = tensors[spec["tensor"]]
        assert ours.dtype == expected.dtype, name
        assert str(ours.dtype).removeprefix("torch.") == spec["dtype"], name
        assert tuple(ours.shape) == tuple(expected.shape) == tuple(spec["shape"]), name
        if expected.dtype.is_floating_point:
            assert (ours.double() - expected.double()).abs().max().item() <= 1e-6, name
        else:
            assert torch.equal(ours, expected), name
    ok, detail = check_spans(case, spans)
    assert ok, detail
    assert [list(s) for s in spans] == case["expected_spans"]
    # The helpers the conformance runner uses agree.
    ok, detail = check_mask_outputs(case, run_mask_case(case, tensors), tensors)
    assert ok, detail
    assert check_mask_case(case, tensors)[0]


@pytest.mark.parametrize(("fixture", "case_name"), MASK_CASES)
def test_flipping_chunk_mask_modes_fails_where_the_control_says_so(fixture, case_name):
    case = _case(fixture, case_name)
    [control] = [c for c in case["controls"] if "chunk_mask_elements_changed" in c]
    flipped = "explicit" if "explicit" in control["change"] else "auto"
    assert control["change"] == f"chunk_mask_modes all {flipped}"
    tensors = _tensors(fixture)
    before = run_mask_case(case, tensors)[list(case["outputs"]).index("chunk_masks")]
    case["scalar_args"]["chunk_mask_modes"] = [flipped] * case["scalar_args"]["batch_size"]
    after = run_mask_case(case, tensors)[list(case["outputs"]).index("chunk_masks")]
    changed = int((before.double() != after.double()).sum())
    assert changed == control["chunk_mask_elements_changed"]
    assert check_mask_case(case, tensors)[0] == (changed == 0)


@pytest.mark.parametrize(("fixture", "case_name"), [
    ("dit-base", "M03_repaint_auto_6d467e4"), ("dit-base", "M05_repaint_explicit"),
    ("dit-base", "M08_lego_explicit"), ("dit-turbo-v2", "M08_repaint_explicit"),
])
def test_changed_repainting_end_fails(fixture, case_name):
    case, tensors = _case(fixture, case_name), _tensors(fixture)
    case["scalar_args"]["repainting_end"] = [end + 0.1 for end in case["scalar_args"]["repainting_end"]]
    ok, detail = check_mask_case(case, tensors)
    assert not ok
    assert "spans:" in detail and "!=" in detail


def test_pr1290_reference_file_selects_the_sentinel():
    cases = _manifest("dit-base")["cases"]
    assert uses_pr1290(cases["M02_text2music_auto_pr1290"])
    assert not uses_pr1290(cases["M01_text2music_auto_6d467e4"])
    case, tensors = _case("dit-base", "M04_repaint_auto_pr1290"), _tensors("dit-base")
    case["reference_file"] = case["reference_file"].replace("eae40dac", "6d467e4")
    ok, detail = check_mask_case(case, tensors)
    assert not ok and "dtype torch.bool != torch.float32" in detail


def test_changed_task_or_silence_fails():
    tensors = dict(_tensors("dit-base"))
    lego = _case("dit-base", "M06_lego_auto_6d467e4")
    lego["scalar_args"]["task_type"] = "repaint"  # would blank the span in src
    assert "src_latents: max |diff|" in check_mask_case(lego, tensors)[1]
    assert not check_mask_case(lego, tensors)[0]
    cover = _case("dit-base", "M11_cover_auto_6d467e4")
    cover["scalar_args"]["task_type"] = "cover-nofsq"
    assert not check_mask_case(cover, tensors)[0]
    mixed = _case("dit-base", "M13_mixed_silent_item")
    tensors["loud"] = torch.full_like(tensors[mixed["inputs"]["target_wavs"]["tensor"]], 0.25)
    mixed["inputs"]["target_wavs"] = {"tensor": "loud"}
    assert not check_mask_case(mixed, tensors)[0]


def test_missing_repaint_mask_is_recorded_as_null_and_returned_as_none():
    case, tensors = _case("dit-base", "M01_text2music_auto_6d467e4"), _tensors("dit-base")
    assert "repaint_mask" in case["outputs"] and case["outputs"]["repaint_mask"] is None
    results = run_mask_case(case, tensors)
    assert results[list(case["outputs"]).index("repaint_mask")] is None
    # A tensor where the reference had None is a failure.
    repaint = _case("dit-base", "M03_repaint_auto_6d467e4")
    repaint["outputs"]["repaint_mask"] = None
    assert not check_mask_case(repaint, tensors)[0]


def test_span_frames():
    assert span_frames(0.33, 0.8, 37) == (8, 20)
    assert span_frames(0.0, 0.5, 37) == (0, 12)
    assert span_frames(0.33, 1.2, 37) == (8, 30)
    assert span_frames(0.0, 1.48, 37) == (0, 37)
    assert span_frames(0.0, 5.0, 37) == (0, 37)  # end clamped to T
    assert span_frames(2.0, 3.0, 37) == (36, 37)  # start clamped to T-1, end to >= start+1
    assert span_frames(0.5, 0.5, 37) == (12, 13)
    assert span_frames(-1.0, None, 37) == (0, 37)
    assert span_frames(0.4, -1, 37) == (10, 37)  # -1: to the end


def _inputs(batch=2, frames=6, channels=3, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(batch, frames, channels, generator=generator).to(dtype) + 5
    silence = torch.randn(frames + 4, channels, generator=generator).to(dtype)
    wavs = torch.ones(batch, 2, 10)
    return wavs, source, silence


def test_per_item_task_types_and_hints():
    wavs, source, silence = _inputs(batch=3)
    wavs[2] = 0
    chunk, spans, covers, src, repaint = build_chunk_masks_and_src_latents(
        wavs, source, silence, batch_size=3, max_latent_length=6,
        task_type=["repaint", "cover", "lego"], repainting_start=[0.04, None, 0.0], repainting_end=[0.12, None, 0.08],
        chunk_mask_modes=["explicit", "auto", "explicit"], audio_code_hints=[None, None, [1, 2]])
    assert spans == [("repainting", 1, 3), ("full", 0, 6), ("repainting", 0, 2)]
    assert chunk.dtype == torch.bool
    assert chunk.tolist() == [[False, True, True, False, False, False], [True] * 6,
                              [True, True, False, False, False, False]]
    assert covers.tolist() == [False, True, True]  # cover task; precomputed hints
    assert torch.equal(src[0, 1:3], silence[1:3]) and torch.equal(src[0, 3:], source[0, 3:])
    assert torch.equal(src[1], source[1])
    assert torch.equal(src[2], silence[:6])  # silent item
    assert repaint.tolist()[1] == [True] * 6  # no range: all regenerated
    assert repaint.tolist()[0] == chunk.tolist()[0]


def test_sentinel_mask_and_dtype_agnostic():
    wavs, source, silence = _inputs(dtype=torch.bfloat16)
    chunk, spans, covers, src, repaint = build_chunk_masks_and_src_latents(
        wavs, source, silence, batch_size=2, max_latent_length=6, task_type="repaint",
        repainting_start=0.04, repainting_end=0.12, chunk_mask_modes=["auto", "explicit"], auto_sentinel=True)
    assert chunk.dtype == torch.float32
    assert chunk.tolist() == [[2.0] * 6, [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]]
    assert src.dtype == torch.bfloat16 and src.device == source.device
    assert torch.equal(src[:, 1:3], silence[1:3].expand(2, -1, -1))
    assert repaint.dtype == torch.bool and covers.dtype == torch.bool


def test_text2music_without_source_and_longer_latents():
    _, source, silence = _inputs(frames=8)
    chunk, spans, covers, src, repaint = build_chunk_masks_and_src_latents(
        None, None, silence, batch_size=2, max_latent_length=6, task_type="text2music",
        repainting_start=None, repainting_end=None, chunk_mask_modes=None)
    assert torch.equal(src, silence[:6].expand(2, -1, -1)) and repaint is None and bool(chunk.all())
    _, _, _, src, _ = build_chunk_masks_and_src_latents(
        torch.ones(2, 4), source, silence, batch_size=2, max_latent_length=6, task_type="extract",
        repainting_start=None, repainting_end=None, chunk_mask_modes="auto")
    assert torch.equal(src, source[:, :6])


@pytest.mark.parametrize("kwargs", [
    {"task_type": "remix"}, {"chunk_mask_modes": ["auto"]}, {"chunk_mask_modes": "bogus"},
    {"repainting_start": [0.0, 0.1, 0.2]},
])
def test_rejects_bad_arguments(kwargs):
    wavs, source, silence = _inputs()
    args = {"batch_size": 2, "max_latent_length": 6, "task_type": "repaint", "repainting_start": 0.0,
            "repainting_end": 0.1, "chunk_mask_modes": "auto"} | kwargs
    with pytest.raises(ValueError):
        build_chunk_masks_and_src_latents(wavs, source, silence, **args)
