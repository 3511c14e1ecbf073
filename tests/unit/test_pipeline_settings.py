"""Every setting the pipeline is configured by comes from Settings (the pipeline reads no
environment); a bad value stops the worker at start, before anything loads, naming the variable."""

import pytest

from handler.cli import main
from handler.settings import Settings
from pipeline.contract import PipelineOptions

BAD_VALUES = {
    "ACESTEP_DEVICE": "gpu-zero",
    "ACESTEP_DIT_MODEL": "turbo",
    "ACESTEP_DIT_MODELS": "acestep-v15-base,sft",
    "ACESTEP_LM_MODELS": "acestep-5Hz-lm-1.7B,qwen3",
    "ACESTEP_LM_MODEL": "the-big-one",
    "ACESTEP_LM_MAX_DURATION": "ten-minutes",
    "ACESTEP_VLLM": "perhaps",
    "ACESTEP_VLLM_GPU_MEMORY_UTILIZATION": "1.5",
    "ACESTEP_DIT_MEMORY_BUDGET_GB": "-2",
}


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for name in [n for n in os.environ if n.startswith("ACESTEP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ACESTEP_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/never")  # never reached
    return monkeypatch


def test_every_pipeline_option_has_a_variable_in_settings():
    names = {f"ACESTEP_{name.upper()}" for name in PipelineOptions.__dataclass_fields__}
    assert names == set(PipelineOptions.variables.values()) == set(BAD_VALUES)


@pytest.mark.parametrize("variable", sorted(BAD_VALUES))
def test_a_bad_value_stops_the_worker_naming_the_variable(clean_env, variable):
    clean_env.setenv(variable, BAD_VALUES[variable])
    with pytest.raises(SystemExit) as stopped:
        main(["worker"])
    assert str(stopped.value).startswith("bad configuration: ") and f"{variable}:" in str(stopped.value)


def test_the_default_lm_must_be_among_the_loaded_ones(clean_env):
    clean_env.setenv("ACESTEP_LM_MODELS", "acestep-5Hz-lm-0.6B")
    clean_env.setenv("ACESTEP_LM_MODEL", "acestep-5Hz-lm-1.7B")
    with pytest.raises(SystemExit, match="ACESTEP_LM_MODEL .* must be one of ACESTEP_LM_MODELS"):
        main(["worker"])


def test_settings_become_the_pipeline_options(clean_env):
    for name, value in {"ACESTEP_DEVICE": "cuda:1", "ACESTEP_DIT_MODEL": "acestep-v15-base",
                        "ACESTEP_DIT_MODELS": "acestep-v15-sft, acestep-v15-base,acestep-v15-xl-turbo",
                        "ACESTEP_LM_MODELS": " acestep-5Hz-lm-0.6B, acestep-5Hz-lm-1.7B ",
                        "ACESTEP_LM_MODEL": "acestep-5Hz-lm-0.6B", "ACESTEP_LM_MAX_DURATION": "240",
                        "ACESTEP_VLLM": "0", "ACESTEP_VLLM_GPU_MEMORY_UTILIZATION": "0.5"}.items():
        clean_env.setenv(name, value)
    assert Settings().pipeline_options() == PipelineOptions(
        device="cuda:1", dit_model="acestep-v15-base", dit_models=("acestep-v15-sft", "acestep-v15-xl-turbo"),
        lm_models=("acestep-5Hz-lm-0.6B", "acestep-5Hz-lm-1.7B"),
        lm_model="acestep-5Hz-lm-0.6B", lm_max_duration=240, vllm=False, vllm_gpu_memory_utilization=0.5,
    )


def test_the_old_name_of_the_dit_setting_still_works(clean_env):
    clean_env.setenv("ACESTEP_DEFAULT_MODEL", "acestep-v15-sft")
    assert Settings().dit_model == "acestep-v15-sft" == Settings().pipeline_options().dit_model
