"""The prompt-conformance runner on the reference fixtures, and the planner's semantics with a stub LM."""

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.contract import GenerationRequest
from pipeline import prompt_conformance
from pipeline.lm import planner
from pipeline.lm import prompts as lm_prompts
from pipeline.lm.backend import CodesRequest, MetadataRequest

FIXTURE_DIR = Path(os.environ.get("ACESTEP_PROMPTS_FIXTURE", Path(__file__).parents[1] / "fixtures" / "prompts"))
needs_fixture = pytest.mark.skipif(not (FIXTURE_DIR / "prompts.json").is_file(), reason=f"no prompt fixtures at {FIXTURE_DIR}")
V2_DIR = Path(__file__).parents[1] / "fixtures" / "prompts-v2"

LM_METADATA = (
    "<think>\nbpm: 120\ncaption: An LM caption with driving drums\nduration: 60\n"
    "keyscale: A minor\nlanguage: en\ntimesignature: 4\n<|im_end|>"
)
LM_CODES = "<|audio_code_1|><|audio_code_2|><|audio_code_3|><|im_end|>"
ALL_FOUR = {"bpm": 96, "key_scale": "G major", "time_signature": "3/4", "audio_duration": 30.0}


class StubLM:
    """Answers every phase with fixed text and records what it was asked."""

    name = "stub"

    def __init__(self, metadata: str = LM_METADATA, codes: str = LM_CODES) -> None:
        self.metadata, self.codes = metadata, codes
        self.metadata_requests: list[MetadataRequest] = []
        self.codes_calls: list[list[CodesRequest]] = []

    def generate_metadata(self, request: MetadataRequest) -> str:
        self.metadata_requests.append(request)
        return self.metadata

    def generate_codes(self, requests: list[CodesRequest]) -> list[str]:
        self.codes_calls.append(list(requests))
        return [self.codes] * len(requests)


def api_plan(backend, batch_size: int = 1, src_audio_duration: float | None = None, **request):
    request = {"caption": "calm piano", "lyrics": "[Verse]\nla la", **request}
    return planner.plan_generation(
        planner.params_from_request(GenerationRequest(**request)), backend, batch_size=batch_size, src_audio_duration=src_audio_duration
    )


# ---- the runner --------------------------------------------------------------------------------


@needs_fixture
def test_runner_passes_the_v1_fixture_with_v2_changes_marked_superseded(capsys) -> None:
    assert prompt_conformance.main([str(FIXTURE_DIR)]) == 0
    lines = capsys.readouterr().out.splitlines()
    fixture = json.loads((FIXTURE_DIR / "prompts.json").read_text(encoding="utf-8"))
    for case in fixture["cases"]:
        # Every end-to-end case with a codes phase has the v1 phase-2 prompts; the rest must pass.
        status = "SUPERSEDED" if "phase2" in case["lm"] else "PASS"
        (line,) = [line for line in lines if line.split(" ", 2)[1].rstrip(":") == case["id"]]
        assert line.startswith(f"{status} {case['id']}")
        if status == "SUPERSEDED":
            assert "phase-2 prompts no longer close the assistant turn" in line
    for section in prompt_conformance.UNIT_SECTIONS:
        listed = [line for line in lines if line.split(" ", 1)[1].startswith(f"{section}[")]
        assert len(listed) == len(fixture.get(section, []))
    superseded = [line for line in lines if line.startswith("SUPERSEDED")]
    assert {line.split(" ", 2)[1].rstrip(":") for line in superseded} >= {
        "lm_prompt_builder_cases[0]", "constraints.constants"}
    assert not any(line.startswith(("FAIL", "DEVIATION")) for line in lines)
    assert lines[-1].endswith("0 FAIL")


@pytest.mark.skipif(not (V2_DIR / "prompts.json").is_file(), reason="no v2 prompt fixtures")
def test_runner_passes_every_v2_case(capsys) -> None:
    assert prompt_conformance.main([str(V2_DIR)]) == 0
    lines = capsys.readouterr().out.splitlines()
    fixture = json.loads((V2_DIR / "prompts.json").read_text(encoding="utf-8"))
    sections = [key for key, value in fixture.items() if isinstance(value, list)]
    assert set(sections) <= set(prompt_conformance.UNIT_SECTIONS)
    for section in sections:
        listed = [line for line in lines if line.split(" ", 1)[1].startswith(f"{section}[")]
        assert len(listed) == len(fixture[section]) and all(line.startswith("PASS ") for line in listed)
    for name in ("constraints.constants", "constraints.generation_params_defaults", "constraints.lm_task_sampling_defaults"):
        assert f"PASS {name}" in lines
    assert not any(line.startswith(("FAIL", "DEVIATION", "SUPERSEDED")) for line in lines[:-1])


@needs_fixture
def test_a_one_character_change_in_an_expected_prompt_fails_that_case(tmp_path, capsys) -> None:
    shutil.copytree(FIXTURE_DIR, tmp_path / "fixture")
    path = tmp_path / "fixture" / "prompts.json"
    fixture = json.loads(path.read_text(encoding="utf-8"))
    case = next(case for case in fixture["cases"] if "phase1" in case["lm"])
    prompt = case["lm"]["phase1"]["prompt"]
    case["lm"]["phase1"]["prompt"] = prompt[:-2] + ("x" if prompt[-2] != "x" else "y") + prompt[-1]
    path.write_text(json.dumps(fixture, ensure_ascii=False), encoding="utf-8")

    assert prompt_conformance.main([str(tmp_path / "fixture")]) == 1
    failures = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    # a failure outside the superseded fields is a FAIL even in a case that also has superseded ones
    assert len(failures) == 1 and failures[0].startswith(f"FAIL {case['id']}: ") and "lm.phase1" in failures[0]


@pytest.mark.skipif(not (V2_DIR / "prompts.json").is_file(), reason="no v2 prompt fixtures")
@pytest.mark.parametrize("section, key", [
    ("lm_prompt_builder_cases", "expected_phase2_prompt"),
    ("unconditional_prompt_cases", "expected"),
    ("lm_task_cases", None),
    ("api_llm_input_cases", None),
    ("dit_caption_prompt_cases", "expected_text_input_for_logging"),
])
def test_v2_changes_are_failures_not_superseded(tmp_path, capsys, section, key) -> None:
    shutil.copytree(V2_DIR, tmp_path / "fixture")
    path = tmp_path / "fixture" / "prompts.json"
    fixture = json.loads(path.read_text(encoding="utf-8"))
    case = fixture[section][0]
    if section == "lm_task_cases":
        case["lm"]["generate_from_formatted_prompt_cfg"]["skip_genres"] = True
    elif section == "api_llm_input_cases":
        case["lm_prompts_in_order"][0] += " "
    else:
        case[key] = case[key][:-1] + "#"
    path.write_text(json.dumps(fixture, ensure_ascii=False), encoding="utf-8")

    assert prompt_conformance.main([str(tmp_path / "fixture")]) == 1
    failures = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 1 and failures[0].startswith(f"FAIL {section}[0]")


@pytest.mark.skipif(not (V2_DIR / "prompts.json").is_file(), reason="no v2 prompt fixtures")
def test_an_unknown_field_in_a_new_section_fails(tmp_path, capsys) -> None:
    shutil.copytree(V2_DIR, tmp_path / "fixture")
    path = tmp_path / "fixture" / "prompts.json"
    fixture = json.loads(path.read_text(encoding="utf-8"))
    fixture["lm_task_cases"][0]["lm"]["cfg_scale"] = 2.0
    path.write_text(json.dumps(fixture, ensure_ascii=False), encoding="utf-8")
    assert prompt_conformance.main([str(tmp_path / "fixture")]) == 1
    failures = [line for line in capsys.readouterr().out.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 1 and "lm.cfg_scale: field not checked by this runner" in failures[0]


@needs_fixture
def test_a_listed_deviation_is_reported_as_such_and_does_not_fail(tmp_path, capsys, monkeypatch) -> None:
    shutil.copytree(FIXTURE_DIR, tmp_path / "fixture")
    path = tmp_path / "fixture" / "prompts.json"
    fixture = json.loads(path.read_text(encoding="utf-8"))
    case = next(case for case in fixture["cases"] if "phase2" not in case["lm"])  # nothing superseded in it
    case["dit"]["handler_inputs"]["global_caption"] += "!"
    path.write_text(json.dumps(fixture, ensure_ascii=False), encoding="utf-8")
    monkeypatch.setitem(prompt_conformance.DEVIATIONS, "dit.handler_inputs.global_caption", "not used by this DiT")

    assert prompt_conformance.main([str(tmp_path / "fixture")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"DEVIATION {case['id']}: dit.handler_inputs.global_caption: not used by this DiT" in lines


# ---- planner semantics -------------------------------------------------------------------------


def test_thinking_false_with_nothing_missing_makes_no_lm_call() -> None:
    lm = StubLM()
    plan = api_plan(lm, thinking=False, **ALL_FOUR)
    assert not lm.metadata_requests and not lm.codes_calls
    assert plan.task_type == "text2music" and plan.items[0].audio_codes is None
    assert plan.metas == "- bpm: 96\n- timesignature: 3/4\n- keyscale: G major\n- duration: 30 seconds\n"


def test_thinking_false_fills_only_missing_fields_and_user_values_win() -> None:
    lm = StubLM()
    plan = api_plan(lm, thinking=False, bpm=72, audio_code_string="<|audio_code_5|>")
    (request,) = lm.metadata_requests
    assert request.user_metadata == {"bpm": 72}
    assert request.skip_caption and request.skip_language  # the LM only fills the four fields
    assert not lm.codes_calls
    assert plan.metadata["bpm"] == 72 and plan.metadata["keyscale"] == "A minor"
    assert plan.metadata["timesignature"] == "4" and plan.metadata["duration"] == 60.0
    assert plan.caption == "calm piano"  # not the LM's caption
    assert plan.metas == "- bpm: 72\n- timesignature: 4\n- keyscale: A minor\n- duration: 60 seconds\n"
    # the request's own codes are used whatever `thinking` says: text2music with codes runs as cover
    assert plan.task_type == "cover" and plan.items[0].audio_codes == [5]
    assert plan.instruction == "Generate audio semantic tokens based on the given conditions:"


@pytest.mark.parametrize("task", ["cover", "repaint"])
def test_cover_and_repaint_skip_the_lm(task) -> None:
    lm = StubLM()
    plan = api_plan(lm, thinking=True, task_type=task, src_audio_path="/in/song.wav", bpm=110, src_audio_duration=45.3)
    plan_without_lm = api_plan(None, thinking=True, task_type=task, src_audio_path="/in/song.wav", src_audio_duration=45.3)
    assert not lm.metadata_requests and not lm.codes_calls
    assert not plan.lm.invoked and not plan_without_lm.lm.invoked
    assert plan.task_type == task and plan.instruction == planner.dit_prompts.instruction_for(task)
    assert plan.metas == "- bpm: 110\n- timesignature: N/A\n- keyscale: N/A\n- duration: 45 seconds\n"
    assert plan_without_lm.metas.endswith("- duration: 45 seconds\n") and plan_without_lm.duration == 45.3


def test_thinking_true_with_all_four_metas_skips_phase_1() -> None:
    lm = StubLM()
    plan = api_plan(lm, thinking=True, **ALL_FOUR)
    assert not lm.metadata_requests
    (call,) = lm.codes_calls
    assert plan.lm.cot_block == "<think>\nbpm: 96\nduration: 30\nkeyscale: G major\ntimesignature: 3\n</think>"
    assert call[0].prompt.endswith("<|im_start|>assistant\n" + plan.lm.cot_block + "\n\n")  # the turn stays open
    assert call[0].n_codes == 150
    assert plan.task_type == "cover" and plan.items[0].audio_codes == [1, 2, 3]
    assert plan.instruction == "Generate audio semantic tokens based on the given conditions:"


def test_batch_runs_phase_1_once_and_phase_2_once_per_item_in_one_call() -> None:
    lm = StubLM()
    plan = planner.plan_generation(
        planner.params_from_request(GenerationRequest(caption="x", thinking=True)), lm, batch_size=3, seeds=[7, 8, 9]
    )
    assert len(lm.metadata_requests) == 1 and lm.metadata_requests[0].seed == 7
    (call,) = lm.codes_calls
    assert [request.seed for request in call] == [7, 8, 9]
    assert len({request.prompt for request in call}) == 1
    assert all(request.n_codes == 300 and request.max_new_tokens == 310 for request in call)  # 60 s from the LM
    assert len(plan.items) == 3 and all(item.audio_codes == [1, 2, 3] for item in plan.items)
    assert plan.caption == "An LM caption with driving drums"  # thinking=true: the LM's caption


def test_cfg_negative_prompt_and_sampling_reach_the_requests() -> None:
    lm = StubLM()
    api_plan(lm, thinking=True, lm_cfg_scale=3.5, lm_negative_prompt="harsh noise", lm_temperature=0.7,
             lm_top_k=40, lm_top_p=0.95, lm_repetition_penalty=1.1)
    (metadata,) = lm.metadata_requests
    (codes,) = lm.codes_calls[0]
    assert metadata.cfg_scale == planner.PHASE1_CFG_SCALE == 1.0  # phase 1 runs without CFG
    assert codes.cfg_scale == 3.5
    assert "<|im_start|>user\n# Caption\nharsh noise\n\n# Lyric\n[Verse]\nla la\n<|im_end|>" in metadata.unconditional_prompt
    # phase 2's CFG branch is the raw negative prompt, with an empty think block
    assert codes.unconditional_prompt.endswith("<|im_start|>user\nharsh noise<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    for request in (metadata, codes):
        assert (request.sampling.temperature, request.sampling.top_k, request.sampling.top_p) == (0.7, 40, 0.95)
        assert request.sampling.repetition_penalty == 1.1


def test_api_defaults_reach_the_requests() -> None:
    lm = StubLM()
    api_plan(lm, thinking=True)
    (metadata,) = lm.metadata_requests
    (codes,) = lm.codes_calls[0]
    assert codes.cfg_scale == GenerationRequest.model_fields["lm_cfg_scale"].default == 2.0
    assert metadata.sampling.top_k is None and metadata.sampling.top_p == 0.9 and metadata.sampling.temperature == 0.85
    assert metadata.unconditional_prompt.endswith("<|im_start|>user\n# Lyric\n[Verse]\nla la\n<|im_end|>\n<|im_start|>assistant\n")
    assert metadata.max_new_tokens == 3500 and not metadata.skip_caption and not metadata.skip_language


def test_without_an_lm_thinking_fails_and_metadata_falls_back_to_the_documented_defaults() -> None:
    with pytest.raises(planner.LMUnavailableError):
        api_plan(None, thinking=True)
    plan = api_plan(None, thinking=False, bpm=100)
    assert plan.metas == "- bpm: 100\n- timesignature: N/A\n- keyscale: N/A\n- duration: 30 seconds\n"
    assert plan.duration == planner.FALLBACK_DURATION_S == 30.0
    assert planner.FALLBACK_METAS_VALUE == "N/A" and not plan.lm.invoked


def test_user_codes_with_thinking_run_phase_1_only_and_switch_to_cover() -> None:
    lm = StubLM()
    plan = api_plan(lm, thinking=True, audio_code_string=["<|audio_code_9|>", "<|audio_code_70000|>"], batch_size=2)
    assert len(lm.metadata_requests) == 1 and not lm.codes_calls
    assert [item.audio_codes for item in plan.items] == [[9], [63999]]
    assert plan.task_type == "cover" and plan.metadata["duration"] == 60.0


def test_phase_2_without_any_duration_asks_for_the_fallback_length() -> None:
    lm = StubLM(metadata="<think>\nbpm: 120\n<|im_end|>")
    plan = api_plan(lm, thinking=True)
    (request,) = lm.codes_calls[0]
    assert plan.lm.target_duration == 30.0 and request.n_codes == 150


def test_unknown_and_unsupported_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown generation parameter"):
        planner.plan_generation({"captoin": "x"}, StubLM())
    with pytest.raises(ValueError, match="use_constrained_decoding"):
        planner.plan_generation({"use_constrained_decoding": False}, StubLM())


def test_user_metadata_follows_the_phase_1_skip_rule() -> None:
    assert lm_prompts.user_metadata("99.6", " C major ", "n/a", 95.5) == {"bpm": 99, "keyscale": "C major", "duration": 95}
    assert lm_prompts.user_metadata(0, "", "  ", -1) == {}
    assert lm_prompts.has_all_metas({"bpm": 1, "keyscale": "C major", "timesignature": "4/4", "duration": 30})
