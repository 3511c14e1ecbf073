"""The DiT modules against the reference fixture, strict loading, the FSQ and the schedules."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import conformance
from pipeline.dit.config import ConfigError, DiTConfig
from pipeline.dit.load import WeightsError, load_dit
from pipeline.sampler import VALID_TURBO_TIMESTEPS, base_schedule, snap_timesteps, turbo_schedule
from pipeline.tiny import random_dit_state

FIXTURE = Path(__file__).parents[1] / "fixtures" / "dit-reference"


def test_conformance_runner_passes_every_reference_case(capsys):
    assert conformance.main([str(FIXTURE)]) == 0
    lines = capsys.readouterr().out.splitlines()
    cases = json.loads((FIXTURE / "manifest.json").read_text())["cases"]
    assert sum(line.startswith("PASS") for line in lines) == len(cases) == 11


def test_conformance_runner_fails_on_a_perturbed_weight(tmp_path, capsys):
    fixture = tmp_path / "fixture"
    shutil.copytree(FIXTURE, fixture)
    state = load_file(str(fixture / "model.safetensors"))
    state["decoder.layers.2.mlp.up_proj.weight"] += 1e-2  # reaches the DiT cases, not the encoder or tokenizer
    save_file(state, str(fixture / "model.safetensors"))
    assert conformance.main([str(fixture)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  B1_dit_step_r_eq_t" in out and "PASS  A_condition_encoder" in out and "PASS  C1_tokenize" in out


def _other_config() -> dict:
    raw = json.loads((FIXTURE / "config.json").read_text())
    raw.update(
        hidden_size=48, intermediate_size=80, head_dim=8, num_attention_heads=6, num_key_value_heads=3,
        num_hidden_layers=3, layer_types=["full_attention", "sliding_attention", "sliding_attention"], sliding_window=2,
        num_lyric_encoder_hidden_layers=3, num_timbre_encoder_hidden_layers=1, num_attention_pooler_hidden_layers=1,
        audio_acoustic_hidden_dim=6, in_channels=18, timbre_hidden_dim=6, text_hidden_dim=12,
        fsq_dim=48, fsq_input_levels=[4, 3, 5], fsq_input_num_quantizers=2, pool_window_size=3, patch_size=3,
    )
    return raw


def _record(model, case: str, inputs: dict, scalars: dict, outputs: dict, spec: dict, tensors: dict) -> None:
    entry = {"reference_class": "x", **spec, "inputs": {}, "scalar_args": scalars, "outputs": {}}
    for name, value in inputs.items():
        tensors[f"{case}.in.{name}"] = value
        entry["inputs"][name] = {"tensor": f"{case}.in.{name}"}
    for name, value in outputs.items():
        tensors[f"{case}.out.{name}"] = value
        entry["outputs"][name] = {"tensor": f"{case}.out.{name}"}
    return entry


def test_conformance_runner_takes_fixtures_of_other_sizes(tmp_path):
    """A fixture of the same format with another config (widths, layer counts, window, patch, pool
    window, FSQ levels and quantizers, batch 3, odd lengths) written from our model: the runner
    must load and run it without assuming the shared fixture's sizes."""
    raw = _other_config()
    config = DiTConfig.from_dict(raw)
    from pipeline.dit.model import AceStepDiT

    model = AceStepDiT(config)
    state = random_dit_state(model, seed=3)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    save_file(state, str(tmp_path / "model.safetensors"))
    model = load_dit(tmp_path)
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    b, frames, latent = 3, 23, 6
    cond = {
        "text_hidden_states": r(b, 5, 12), "text_attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]]),
        "lyric_hidden_states": r(b, 7, 12), "lyric_attention_mask": torch.tensor([[1] * 7, [1] * 2 + [0] * 5, [1] * 6 + [0]]),
        "refer_audio_acoustic_hidden_states_packed": r(4, 9, latent), "refer_audio_order_mask": torch.tensor([0, 1, 1, 2]),
    }
    silence = r(1, 30, latent)
    tensors, cases = {}, {}
    with torch.inference_mode():
        states, mask = model.encoder(*cond.values())
        cases["enc"] = _record(model, "enc", cond, {}, {"encoder_hidden_states": states, "encoder_attention_mask": mask},
                               {"reference_method": "forward", "called_on": "model.encoder"}, tensors)
        step = {"hidden_states": r(b, frames, latent), "timestep": torch.tensor([1.0, 0.5, 0.2]),
                "timestep_r": torch.tensor([1.0, 0.3, 0.2]), "encoder_hidden_states": states,
                "context_latents": r(b, frames, 2 * latent)}
        velocity = model.decoder(step["hidden_states"], step["timestep"], step["timestep_r"], states, step["context_latents"])
        cases["dit"] = _record(model, "dit", step, {"use_cache": False}, {"velocity": velocity},
                               {"reference_method": "forward", "called_on": "model.decoder"}, tensors)
        tok = {"x": r(b, frames, latent), "silence_latent": silence, "attention_mask": torch.ones(b, frames, dtype=torch.long)}
        quantized, indices, pooled = model.tokenize(*tok.values())
        cases["tok"] = _record(model, "tok", tok, {}, {"quantized": quantized, "indices": indices, "pooled_mask": pooled},
                               {"reference_method": "tokenize", "called_on": "model"}, tensors)
        codes = {"indices": indices.long()}
        cases["codes"] = _record(model, "codes", codes, {},
                                 {"quantized": model.codes_to_quantized(indices.long()), "hints": model.detokenize(quantized)},
                                 {"reference_method": "get_output_from_indices", "called_on": "model.tokenizer.quantizer"}, tensors)
        gen = {**cond, "silence_latent": silence, "src_latents": tok["x"], "chunk_masks": torch.ones(b, frames, latent, dtype=torch.bool),
               "is_covers": torch.tensor([True, False, True]), "initial_noise": r(b, frames, latent)}
        from pipeline.sampler import generate_audio

        args = {k: v for k, v in gen.items() if k != "initial_noise"}
        target = generate_audio(model, noise=gen["initial_noise"], shift=2.0, **args)
        cases["gen"] = _record(model, "gen", gen, {"seed": 1, "shift": 2.0, "infer_method": "ode"}, {"target_latents": target},
                               {"reference_method": "generate_audio", "called_on": "model"}, tensors)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(tmp_path / "fixture.safetensors"))
    (tmp_path / "manifest.json").write_text(json.dumps({"cases": cases}))
    outcomes = conformance.run(tmp_path)
    assert [o.name for o in outcomes if not o.passed] == [], [o.detail for o in outcomes]
    assert indices.shape == (b, -(-frames // 3), 2) and int(indices.max()) < 4 * 3 * 5


def _fixture_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "dit"
    folder.mkdir()
    shutil.copy(FIXTURE / "config.json", folder)
    shutil.copy(FIXTURE / "model.safetensors", folder)
    return folder


def test_missing_and_unexpected_weights_are_named(tmp_path):
    folder = _fixture_copy(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    del state["decoder.norm_out.weight"]
    state["decoder.extra.weight"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError) as error:
        load_dit(folder)
    assert "missing weight(s): decoder.norm_out.weight" in str(error.value)
    assert "unexpected weight(s): decoder.extra.weight" in str(error.value)


def test_wrong_shape_is_named(tmp_path):
    folder = _fixture_copy(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match=r"wrong shape\(s\): .*mlp.down_proj.weight \(64, 128\) != \(64, 96\)"):
        load_dit(folder)


def test_config_missing_field_is_named_and_extra_fields_are_accepted(tmp_path):
    folder = _fixture_copy(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    raw["auto_map"] = {"AutoModel": "modeling_acestep_v15_turbo.AceStepConditionGenerationModel"}
    raw["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(raw))
    assert load_dit(folder).config.hidden_size == 64
    del raw["pool_window_size"], raw["fsq_input_levels"]
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="missing required field.*pool_window_size.*fsq_input_levels|fsq_input_levels.*pool_window_size"):
        load_dit(folder)


def test_a_state_dict_saved_by_our_model_reloads_strictly(tmp_path):
    model = load_dit(FIXTURE)
    folder = tmp_path / "resaved"
    folder.mkdir()
    shutil.copy(FIXTURE / "config.json", folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    reloaded = load_dit(folder)
    original = load_file(str(FIXTURE / "model.safetensors"))
    assert set(reloaded.state_dict()) == set(original)
    assert all(torch.equal(reloaded.state_dict()[k], original[k]) for k in original)


def test_fsq_indices_round_trip():
    model = load_dit(FIXTURE)
    x = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        quantized, indices, _ = model.tokenize(x, torch.zeros(1, 5, 8), torch.ones(2, 20))
        assert torch.allclose(model.codes_to_quantized(indices.long()), quantized, atol=1e-6)
    assert indices.dtype == torch.int32 and 0 <= int(indices.min()) and int(indices.max()) < 64000


def test_turbo_schedules_are_the_reference_tables():
    assert turbo_schedule(1.0) == [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    assert turbo_schedule(2.0) == [1.0, 0.9333333333333333, 0.8571428571428571, 0.7692307692307693,
                                   0.6666666666666666, 0.5454545454545454, 0.4, 0.2222222222222222]
    assert turbo_schedule(3.0) == [1.0, 0.9545454545454546, 0.9, 0.8333333333333334, 0.75, 0.6428571428571429, 0.5, 0.3]
    assert turbo_schedule(2.6) == turbo_schedule(3.0) and turbo_schedule(0.2) == turbo_schedule(1.0)
    assert len(VALID_TURBO_TIMESTEPS) == 20


def test_custom_timesteps_snap_to_valid_values():
    assert snap_timesteps([0.97, 0.5, 0.31, 0.0, 0.0]) == [0.9545454545454546, 0.5, 0.3]
    assert len(snap_timesteps([0.5] * 30)) == 20
    with pytest.raises(ValueError):
        snap_timesteps([0.0])


def test_base_schedule_is_shifted_linspace():
    assert base_schedule(4, 1.0) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert base_schedule(4, 3.0)[1] == pytest.approx(3 * 0.75 / (1 + 2 * 0.75))


def test_turbo_honours_steps_and_any_shift():
    """Upstream main: with inference_steps the turbo schedule has min(steps, 20) entries and takes
    any shift; without, the fixed table of the nearest of 1, 2, 3."""
    assert turbo_schedule(1.0, 4) == [1.0, 0.75, 0.5, 0.25]
    assert turbo_schedule(2.5, 8)[1] == pytest.approx(2.5 * 0.875 / (1 + 1.5 * 0.875))
    assert turbo_schedule(2.5) == turbo_schedule(2.0)  # snapped: a tie goes to the first of 1, 2, 3
    assert len(turbo_schedule(3.0, 50)) == 20


NEW_FIXTURES = [FIXTURE.parent / "dit-turbo-v2", FIXTURE.parent / "dit-base"]


@pytest.mark.parametrize("fixture", NEW_FIXTURES, ids=lambda p: p.name)
def test_newest_upstream_fixtures_pass(fixture, capsys):
    """Every case of the newest upstream's turbo and base fixtures (sampler options, guidance, the
    conditioning builder, DCW, repaint helpers) through the generic runner."""
    assert conformance.main([str(fixture)]) == 0, capsys.readouterr().out


def _copy_fixture(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    for path in target.iterdir():
        path.chmod(0o644)
    return target


@pytest.mark.parametrize("fixture, case, scalar, value", [
    ("dit-base", "G03_text2music_adg", "cfg_interval_start", 0.5),
    ("dit-base", "G09_text2music_heun", "diffusion_guidance_scale", 6.5),
    ("dit-turbo-v2", "T01_text2music_default", "dcw_high_scaler", 0.03),
    ("dit-turbo-v2", "T24_text2music_velocity_tweaks", "velocity_ema_factor", 0.2),
    ("dit-turbo-v2", "M06_repaint_auto_6d467e4", "repainting_end", [0.9, 0.5]),
])
def test_runner_fails_on_a_wrong_scalar(tmp_path, fixture, case, scalar, value):
    folder = _copy_fixture(FIXTURE.parent / fixture, tmp_path / fixture)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert scalar in manifest["cases"][case]["scalar_args"]
    manifest["cases"][case]["scalar_args"][scalar] = value
    (folder / "manifest.json").write_text(json.dumps(manifest))
    outcomes = {o.name: o for o in conformance.run(folder)}
    assert not outcomes[case].passed, outcomes[case].detail
    assert sum(not o.passed for o in outcomes.values()) == 1


def test_runner_fails_on_a_perturbed_weight_of_the_base_model(tmp_path):
    folder = _copy_fixture(FIXTURE.parent / "dit-base", tmp_path / "dit-base")
    weights = load_file(str(folder / "model.safetensors"))
    name = next(k for k in weights if k.startswith("decoder.") and k.endswith("weight") and weights[k].ndim == 2)
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(folder / "model.safetensors"))
    outcomes = conformance.run(folder)
    failed = {o.name for o in outcomes if not o.passed}
    assert {o.name for o in outcomes if o.name.startswith("G")} <= failed
    assert not any(name.startswith(("M", "U")) for name in failed)  # no model in those
