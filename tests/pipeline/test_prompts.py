"""The DiT-side strings against the reference prompt fixtures (every case of the dit_* sections)."""

import json
import os
import re
from pathlib import Path

import pytest

from pipeline.prompts import (
    DEFAULT_INSTRUCTION,
    LM_CODES_INSTRUCTION,
    TASK_TYPES,
    caption_prompt,
    extract_sft_caption,
    format_instruction,
    format_metas,
    instruction_for,
    lyric_prompt,
    metas_dict,
)

FIXTURE_DIR = Path(os.environ.get("ACESTEP_PROMPTS_FIXTURE", Path(__file__).parents[1] / "fixtures" / "prompts"))
MISSING = f"prompt fixtures not found at {FIXTURE_DIR / 'prompts.json'} (set ACESTEP_PROMPTS_FIXTURE to the folder)"


def _load() -> dict | None:
    path = FIXTURE_DIR / "prompts.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


FIXTURE = _load()


def cases(section: str, name_key: str = "name") -> list:
    if FIXTURE is None:
        return [pytest.param(None, marks=pytest.mark.skip(reason=MISSING), id="fixture-missing")]
    return [pytest.param(case, id=str(case.get(name_key)) or str(i)) for i, case in enumerate(FIXTURE[section])]


def dit_items() -> list:
    if FIXTURE is None:
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=MISSING), id="fixture-missing")]
    return [
        pytest.param(case, item, id=f"{case['id']}[{i}]")
        for case in FIXTURE["cases"]
        for i, item in enumerate(case["dit"]["items"])
    ]


@pytest.mark.parametrize("case", cases("dit_metas_cases"))
def test_metas(case: dict) -> None:
    inputs = case["inputs"] or {}
    assert format_metas(**inputs) == case["expected_metas_string"]
    if case["expected_metas_dict"] is not None:
        assert metas_dict(**inputs) == case["expected_metas_dict"]


@pytest.mark.parametrize("case", cases("dit_lyric_prompt_cases"))
def test_lyric_prompt(case: dict) -> None:
    assert lyric_prompt(case["lyrics"], case["language"]) == case["expected_lyric_prompt"]


@pytest.mark.parametrize("case", cases("sft_caption_extraction_cases"))
def test_sft_caption_extraction(case: dict) -> None:
    assert extract_sft_caption(case["caption"]) == case["expected"]


@pytest.mark.parametrize("case", cases("dit_instruction_cases", name_key="task_type"))
def test_instruction(case: dict) -> None:
    if case["task_type"] in TASK_TYPES:
        instruction = instruction_for(case["task_type"], case["track_name"], case["complete_track_classes"])
        assert instruction == case["handler_generate_instruction"]
        assert instruction == case["http_api_instruction_when_request_uses_default"]
    else:
        # A custom instruction: used as given, with the ':' the prompt builder appends.
        instruction = case["handler_generate_instruction"]
    assert format_instruction(instruction) == case["formatted_for_prompt"]


def _dit_duration(handler_inputs: dict) -> float | None:
    """The seconds the reference puts in the metas: the source file's length, else a positive request duration."""
    if handler_inputs["src_audio"]:
        # The fixture's stub audio reader serves silence of the length in the name (fake://src_30.0s.wav).
        return float(re.search(r"src_([0-9.]+)s\.", handler_inputs["src_audio"]).group(1))
    duration = handler_inputs["audio_duration"]
    return float(duration) if duration is not None and float(duration) > 0 else None


@pytest.mark.parametrize(("case", "item"), dit_items())
def test_end_to_end_dit_prompts(case: dict, item: dict) -> None:
    dit = case["dit"]
    inputs = dit["handler_inputs"]
    assert extract_sft_caption(inputs["captions"]) == dit["caption_after_sft_extraction"]
    metas = format_metas(inputs["bpm"], inputs["key_scale"], inputs["time_signature"], _dit_duration(inputs))
    assert metas == dit["metas_string"]
    # LM codes turn text2music into cover (the reference's determine_task_type).
    task = "cover" if inputs["audio_code_string"].strip() else inputs["task_type"]
    assert task == dit["task_type_effective"]
    assert instruction_for(task) == dit["instruction"]
    assert caption_prompt(dit["instruction"], dit["caption_after_sft_extraction"], dit["metas_string"]) == item["caption_prompt"]
    assert lyric_prompt(inputs["lyrics"], dit["vocal_language"]) == item["lyric_prompt"]
    assert item["caption_prompt_max_tokens"] == 256 and item["lyric_prompt_max_tokens"] == 2048
    if "non_cover_caption_prompt" in item:
        non_cover = caption_prompt(DEFAULT_INSTRUCTION, dit["caption_after_sft_extraction"], dit["metas_string"])
        assert non_cover == item["non_cover_caption_prompt"]


def test_codes_instruction_is_the_cover_instruction() -> None:
    assert LM_CODES_INSTRUCTION == "Generate audio semantic tokens based on the given conditions:"
    assert instruction_for("cover") == LM_CODES_INSTRUCTION


def test_unknown_task_type_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="text2music, repaint, cover, extract, lego, complete"):
        instruction_for("remix")


def test_caption_prompt_adds_missing_colon_once() -> None:
    prompt = caption_prompt("Make it louder", "Jazz", format_metas())
    assert prompt == (
        "# Instruction\nMake it louder:\n\n# Caption\nJazz\n\n# Metas\n"
        "- bpm: N/A\n- timesignature: N/A\n- keyscale: N/A\n- duration: 30 seconds\n<|endoftext|>\n"
    )
    assert caption_prompt("Done:", "x", "").startswith("# Instruction\nDone:\n\n")
