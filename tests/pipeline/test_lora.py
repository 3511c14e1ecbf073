"""LoRA / LoKr adapters made with PEFT on the tiny DiT: generation with an adapter active equals
generation on a copy whose weights were merged by hand; scale 0 equals no adapter; two adapters;
LRU eviction; the DiT is itself again after the block; the upload checks."""

import copy
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.dit.load import load_dit
from pipeline.lora import (AdapterCache, AdapterError, PEFT_PREFIX, _tuner_layers, check_safetensors_header, job_adapters,
                           read_adapter_config)
from pipeline.sampler import generate_audio

peft = pytest.importorskip("peft")

FIXTURE = Path(__file__).parents[1] / "fixtures" / "dit-reference"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def dit():
    return load_dit(FIXTURE)


def make_adapter(dit, folder: Path, *, seed: int, kind: str = "lora", r: int = 4, alpha: int = 8,
                 targets=TARGETS, on_decoder: bool = True) -> Path:
    """An adapter trained nowhere: PEFT's layers on a copy of the DiT (its decoder, as upstream
    trains, or the whole model), random non-zero weights, saved as a PEFT folder."""
    torch.manual_seed(seed)
    plain = dit_plain(dit)  # without the PEFT layers earlier tests left on the shared DiT
    base = plain.decoder if on_decoder else plain
    if kind == "lora":
        config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.1)
    else:
        config = peft.LoKrConfig(r=r, alpha=alpha, target_modules=targets, init_weights=False)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                param.normal_(std=0.05)
    model.save_pretrained(str(folder))
    return folder


def merge_by_hand(dit, folder: Path, scale: float):
    """A copy of `dit` whose adapted weights are W + scale * alpha / r * B @ A (a LoRA folder
    saved from the decoder). Any PEFT layer on `dit` is left out of the copy."""
    merged = dit_plain(dit)
    config = json.loads((folder / "adapter_config.json").read_text())
    factor = scale * config["lora_alpha"] / config["r"]
    state = load_file(str(folder / "adapter_model.safetensors"))
    with torch.no_grad():
        for key, a in state.items():
            if not key.endswith("lora_A.weight"):
                continue
            path = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            b = state[key.replace("lora_A", "lora_B")]
            module = merged.decoder.get_submodule(path)
            module.weight += factor * (b @ a)
    return merged


def inputs(dit, frames: int = 24, seed: int = 0) -> dict:
    config = dit.config
    g = torch.Generator().manual_seed(seed)
    latent = config.audio_acoustic_hidden_dim
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return {
        "text_hidden_states": r(1, 6, config.text_hidden_dim), "text_attention_mask": torch.ones(1, 6, dtype=torch.long),
        "lyric_hidden_states": r(1, 5, config.text_hidden_dim), "lyric_attention_mask": torch.ones(1, 5, dtype=torch.long),
        "refer_audio_acoustic_hidden_states_packed": r(1, 10, config.timbre_hidden_dim),
        "refer_audio_order_mask": torch.tensor([0]),
        "silence_latent": r(1, frames, latent), "src_latents": r(1, frames, latent),
        "chunk_masks": torch.ones(1, frames, latent, dtype=torch.bool), "is_covers": torch.tensor([False]),
        "noise": r(1, frames, latent),
    }


def generate(dit, args) -> torch.Tensor:
    with torch.inference_mode():
        return generate_audio(dit, infer_steps=4, shift=3.0, **args)


def test_lora_equals_weights_merged_by_hand(dit, tmp_path):
    folder = make_adapter(dit, tmp_path / "a", seed=1)
    args = inputs(dit)
    plain = generate(dit, args)
    cache = AdapterCache()
    for scale in (1.0, 0.5, 1.7):
        with cache.activate(dit, [{"name": "a", "path": str(folder), "scale": scale}]):
            adapted = generate(dit, args)
        expected = generate(merge_by_hand(dit, folder, scale), args)
        diff = (adapted - expected).abs().max().item()
        print(f"scale {scale}: max |LoRA - merged by hand| = {diff:.3e}, vs plain {(adapted - plain).abs().max().item():.3e}")
        assert diff < 1e-5
        assert (adapted - plain).abs().max().item() > 1e-3  # the adapter does change the output
    assert torch.equal(generate(dit, args), plain)  # after the block: the plain DiT, exactly


def test_scale_zero_and_empty_equal_no_adapter(dit, tmp_path):
    folder = make_adapter(dit, tmp_path / "a", seed=2)
    args = inputs(dit, seed=1)
    plain = generate(dit, args)
    cache = AdapterCache()
    with cache.activate(dit, [{"name": "a", "path": str(folder), "scale": 1.0}]):
        pass  # loaded once
    with cache.activate(dit, [{"name": "a", "path": str(folder), "scale": 0.0}]):
        assert torch.equal(generate(dit, args), plain)
    with cache.activate(dit, []):
        assert torch.equal(generate(dit, args), plain)


def test_two_adapters_add_up(dit, tmp_path):
    one = make_adapter(dit, tmp_path / "one", seed=3)
    two = make_adapter(dit, tmp_path / "two", seed=4, targets=["q_proj", "v_proj"], r=2, alpha=2)
    args = inputs(dit, seed=2)
    cache = AdapterCache()
    with cache.activate(dit, [{"name": "one", "path": str(one), "scale": 0.8}, {"name": "two", "path": str(two), "scale": 1.2}]):
        both = generate(dit, args)
    expected = generate(merge_by_hand(merge_by_hand(dit, one, 0.8), two, 1.2), args)
    diff = (both - expected).abs().max().item()
    print(f"two adapters: max |LoRA - merged by hand| = {diff:.3e}")
    assert diff < 1e-5
    with cache.activate(dit, [{"name": "two", "path": str(two), "scale": 1.2}]):  # only `two` now
        alone = generate(dit, args)
    assert (alone - generate(merge_by_hand(dit, two, 1.2), args)).abs().max().item() < 1e-5


def test_adapter_saved_from_the_whole_model_loads(dit, tmp_path):
    folder = make_adapter(dit, tmp_path / "whole", seed=5, targets=["decoder.layers.0.self_attn.q_proj"], on_decoder=False)
    assert all(k.startswith(PEFT_PREFIX + "decoder.") for k in load_file(str(folder / "adapter_model.safetensors")))
    args = inputs(dit, seed=3)
    with AdapterCache().activate(dit, [{"name": "whole", "path": str(folder), "scale": 1.0}]):
        adapted = generate(dit, args)
    assert (adapted - generate(dit, args)).abs().max().item() > 0


def test_lru_eviction(tmp_path):
    dit = load_dit(FIXTURE)
    folders = [make_adapter(dit, tmp_path / f"a{i}", seed=10 + i, targets=["q_proj"]) for i in range(3)]
    args = inputs(dit, seed=4)
    cache = AdapterCache(max_loaded=2)
    outputs = []
    for folder in folders[:2]:
        with cache.activate(dit, [{"name": folder.name, "path": str(folder)}]):
            outputs.append(generate(dit, args))
    with cache.activate(dit, [{"name": "a0", "path": str(folders[0])}]):  # a0 used again: a1 is now the oldest
        assert torch.equal(generate(dit, args), outputs[0])
    with cache.activate(dit, [{"name": "a2", "path": str(folders[2])}]):
        third = generate(dit, args)
    assert cache.loaded(dit) == [str(folders[0].resolve()), str(folders[2].resolve())]
    internal = {name for _, layer in _tuner_layers(dit) for name in layer.scaling}
    assert len(internal) == 2  # the evicted adapter's weights are gone from the layers
    with cache.activate(dit, [{"name": "a1", "path": str(folders[1])}]):  # loads again, evicting a0
        assert torch.equal(generate(dit, args), outputs[1])
    assert cache.loaded(dit) == [str(folders[2].resolve()), str(folders[1].resolve())]
    assert not torch.equal(third, outputs[0])


def test_lokr_loads_and_changes_the_output(dit, tmp_path):
    folder = make_adapter(dit, tmp_path / "lokr", seed=6, kind="lokr", r=4, alpha=4)
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LOKR"
    args = inputs(dit, seed=5)
    plain = generate(dit, args)
    cache = AdapterCache()
    with cache.activate(dit, [{"name": "lokr", "path": str(folder), "scale": 1.0}]):
        adapted = generate(dit, args)
    print(f"LoKr: max |adapted - plain| = {(adapted - plain).abs().max().item():.3e}")
    assert (adapted - plain).abs().max().item() > 1e-4
    assert torch.equal(generate(dit, args), plain)
    lora = make_adapter(dit, tmp_path / "lora", seed=7)
    with pytest.raises(AdapterError, match="combine"):
        with cache.activate(dit, [{"name": "lokr", "path": str(folder)}, {"name": "lora", "path": str(lora)}]):
            pass
    with cache.activate(dit, [{"name": "lora", "path": str(lora)}]):  # another kind: the DiT is unwrapped first
        assert torch.allclose(generate(dit, args), generate(merge_by_hand(dit, lora, 1.0), args), atol=1e-5)
    assert torch.equal(generate(dit, args), plain)


def dit_plain(dit):
    """A copy of `dit` without any PEFT layer."""
    from pipeline.lora import unwrap

    clone = copy.deepcopy(dit)
    unwrap(clone)
    return clone


def test_bad_adapters_are_refused(dit, tmp_path):
    folder = make_adapter(dit, tmp_path / "ok", seed=8)
    args = inputs(dit, seed=6)
    plain = generate(dit, args)
    cache = AdapterCache()
    with pytest.raises(AdapterError, match="not a PEFT adapter folder"):
        with cache.activate(dit, [{"name": "none", "path": str(tmp_path / "missing")}]):
            pass
    wide = make_adapter(load_dit(FIXTURE), tmp_path / "wide", seed=9)
    state = load_file(str(wide / "adapter_model.safetensors"))
    from safetensors.torch import save_file

    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 3)  # does not fit the layer
    save_file(state, str(wide / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="does not fit"):
        with cache.activate(dit, [{"name": "wide", "path": str(wide)}]):
            pass
    with cache.activate(dit, [{"name": "ok", "path": str(folder), "scale": 0.0}]):
        assert torch.equal(generate(dit, args), plain)  # nothing half-loaded stays active


def test_upload_checks():
    assert read_adapter_config(b'{"peft_type": "LORA", "r": 8}')["r"] == 8
    for raw, why in [(b"{", "not valid JSON"), (b"[]", "JSON object"), (b'{"peft_type": "IA3", "r": 1}', "not supported"),
                     (b'{"peft_type": "LORA", "r": 0}', "positive integer")]:
        with pytest.raises(AdapterError, match=why):
            read_adapter_config(raw)
    header = json.dumps({"x.lora_A.weight": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]}}).encode()
    blob = struct.pack("<Q", len(header)) + header + b"\0" * 8
    assert set(check_safetensors_header(blob, len(blob), "LORA")) == {"x.lora_A.weight"}
    with pytest.raises(AdapterError, match="does not end"):
        check_safetensors_header(blob + b"\0", len(blob) + 1)
    with pytest.raises(AdapterError, match="no LOKR parameters"):
        check_safetensors_header(blob, len(blob), "LOKR")
    with pytest.raises(AdapterError, match="too short"):
        check_safetensors_header(b"abc", 3)
    assert job_adapters([{"name": "a", "scale": 0.5, "path": "/x"}]) == [{"name": "a", "path": "/x", "scale": 0.5}]


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]),
])
def test_bfloat16(device, tmp_path):
    """bf16 weights (the GPU's dtype): the adapter's layers take the DiT's dtype and device, the
    output moves as merging by hand moves it (up to bf16 rounding), and is the plain DiT's after."""
    dit32 = load_dit(FIXTURE)
    folder = make_adapter(dit32, tmp_path / "a", seed=21)
    dit = load_dit(FIXTURE, device=device, dtype=torch.bfloat16)
    merged = merge_by_hand(dit32, folder, 1.0).to(device=device, dtype=torch.bfloat16)
    args = {k: v.to(device=device, dtype=torch.bfloat16) if v.is_floating_point() else v.to(device)
            for k, v in inputs(dit32, seed=7).items()}
    plain = generate(dit, args)
    with AdapterCache().activate(dit, [{"name": "a", "path": str(folder), "scale": 1.0}]):
        adapted = generate(dit, args)
        layer = dit.decoder.layers[0].self_attn.q_proj
        assert {p.dtype for p in layer.lora_A.parameters()} == {torch.bfloat16}
        assert {p.device.type for p in layer.lora_A.parameters()} == {device}
    expected = generate(merged, args)
    effect = (expected - plain).float().abs().max().item()
    diff = (adapted - expected).float().abs().max().item()
    print(f"bf16 on {device}: max |LoRA - merged by hand| = {diff:.3e}, the adapter's effect {effect:.3e}")
    assert effect > 1e-2 and diff < 0.5 * effect  # a LoRA not applied would be off by the whole effect
    assert torch.equal(generate(dit, args), plain)
