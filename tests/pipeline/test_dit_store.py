"""DiTs under a memory budget (issue 18): with ACESTEP_DIT_MEMORY_BUDGET_GB a worker loads its default
DiT at start and the other DiTs it serves on first use, evicting the least recently used when the
next would not fit; a job gives the same audio whether its DiT was loaded at start, lazily, or
again after an eviction. A budget too small for the default DiT beside another is refused at start."""

import gc
import weakref

import numpy as np
import pytest

from handler.settings import Settings
from pipeline.contract import PipelineOptions
from pipeline.dit_store import BUDGET_VARIABLE, GIB, expected_bytes, resident_bytes
from pipeline.interface import PipelineError
from pipeline.service import load_pipeline
from pipeline.tiny import TINY_DITS
from tests.pipeline.test_service import request

TURBO, BASE, SFT = TINY_DITS
QUIET = lambda *_, **__: None  # noqa: E731


@pytest.fixture(scope="module")
def eager(tiny_checkpoints):
    return load_pipeline(tiny_checkpoints, PipelineOptions(dit_models=(BASE, SFT)))


@pytest.fixture(scope="module")
def one_dit_bytes(eager) -> int:
    return resident_bytes(eager.dits[TURBO])


def lazy(tiny_checkpoints, budget_bytes: float):
    return load_pipeline(tiny_checkpoints, PipelineOptions(dit_models=(BASE, SFT), dit_memory_budget_gb=budget_bytes / GIB))


def job(model: str, seed: int):
    return request(caption="calm piano", model=model, inference_steps=3 if model != TURBO else 8, seed=seed)


def test_without_a_budget_every_dit_is_loaded_at_start(eager):
    assert set(eager.dits.loaded()) == {TURBO, BASE, SFT} and eager.dits.loads == 3


def test_the_header_estimate_is_what_a_load_takes(tiny_checkpoints, eager, one_dit_bytes):
    silence = eager.dits[BASE][1]
    estimate = expected_bytes(tiny_checkpoints / BASE, eager.dtype)
    assert estimate == pytest.approx(resident_bytes(eager.dits[BASE]) - silence.numel() * silence.element_size(), rel=0.01)


def test_under_a_budget_for_two_dits_the_least_recently_used_is_evicted_and_outputs_do_not_change(
        tiny_checkpoints, eager, one_dit_bytes):
    pipe = lazy(tiny_checkpoints, 2.5 * one_dit_bytes)
    assert set(pipe.dits.loaded()) == {TURBO} and pipe.dits.loads == 1
    assert list(pipe.dits) == [TURBO, BASE, SFT] and pipe.models[:3] == [TURBO, BASE, SFT]  # served, loaded or not

    base_first = pipe.run(job(BASE, 4), QUIET)
    assert set(pipe.dits.loaded()) == {TURBO, BASE}
    evicted = weakref.ref(pipe.dits[BASE][0])
    sft = pipe.run(job(SFT, 5), QUIET)
    assert set(pipe.dits.loaded()) == {TURBO, SFT}  # base went: the least recently used that is not the default
    gc.collect()
    assert evicted() is None, "an evicted DiT must be freed"
    base_again = pipe.run(job(BASE, 4), QUIET)
    assert set(pipe.dits.loaded()) == {TURBO, BASE} and pipe.dits.loads == 4
    turbo = pipe.run(job(TURBO, 6), QUIET)
    assert set(pipe.dits.loaded()) == {TURBO, BASE} and pipe.dits.resident() <= 2.5 * one_dit_bytes

    worst = 0.0
    for made, model, seed in ((base_first, BASE, 4), (sft, SFT, 5), (base_again, BASE, 4), (turbo, TURBO, 6)):
        reference = eager.run(job(model, seed), QUIET)
        for a, b in zip(made.audios, reference.audios, strict=True):
            worst = max(worst, float(np.max(np.abs(np.asarray(a) - np.asarray(b)))))
    print(f"largest difference, lazy against loaded at start: {worst:.3g}")
    assert worst == 0.0


def test_a_batch_of_jobs_loads_its_dit_once(tiny_checkpoints, one_dit_bytes):
    pipe = lazy(tiny_checkpoints, 2.5 * one_dit_bytes)
    made = pipe.run_batch([job(SFT, 1), job(SFT, 2)], QUIET)
    assert all(not isinstance(m, Exception) for m in made)
    assert set(pipe.dits.loaded()) == {TURBO, SFT} and pipe.dits.loads == 2


def test_a_budget_with_no_room_beside_the_default_dit_is_refused_at_start(tiny_checkpoints, one_dit_bytes):
    with pytest.raises(PipelineError, match=BUDGET_VARIABLE) as refused:
        lazy(tiny_checkpoints, 1.5 * one_dit_bytes)
    assert BASE in str(refused.value) and "raise the budget" in str(refused.value)


def test_the_setting_reaches_the_pipeline_options():
    options = Settings(dit_memory_budget_gb=40, dit_models="acestep-v15-base").pipeline_options()
    assert options.dit_memory_budget_gb == 40
    with pytest.raises(ValueError, match="dit_memory_budget_gb"):
        Settings(dit_memory_budget_gb=0)


def test_the_least_recently_used_of_several_goes_first(tmp_path):
    """Four DiTs of 1 000 float32 weights each (4 000 bytes; a silence latent of 4 bytes), room for three."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    from pipeline.dit_store import DitStore

    folders = {}
    for name in "abcd":
        folder = tmp_path / name
        folder.mkdir()
        save_file({"weight": torch.zeros(1000)}, str(folder / "model.safetensors"))
        folders[name] = folder
    made, evicted = [], []

    def load(name, folder):
        made.append(name)
        module = nn.Module()
        module.weight = nn.Parameter(torch.zeros(1000))
        return module, torch.zeros(1)

    store = DitStore(folders, load, pinned="a", budget_bytes=3 * 4004, on_evict=evicted.append)
    store["b"], store["c"]
    store["b"]  # b used after c: c is now the least recently used
    store["d"]
    assert evicted == ["c"] and set(store.loaded()) == {"a", "b", "d"}
    store["c"]
    assert evicted == ["c", "b"] and made == ["a", "b", "c", "d", "c"]
    with pytest.raises(KeyError):
        store["e"]
