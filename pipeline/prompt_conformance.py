"""Conformance with the reference's prompts: `python -m pipeline.prompt_conformance FIXTURE_DIR`.

A fixture directory holds `prompts.json` (end-to-end `cases` and unit-case sections) and, optionally,
`constraints.json` (facts; its constants, GenerationParams defaults, LM-task sampling defaults and
max-token tables are checked too). Each end-to-end case runs through `plan_generation` with the LM
replaced by a stub that answers with the case's hand-written outputs and records every request; the
LM-task and API-glue cases run `pipeline.lm.tasks` over such a stub; each unit case runs through the
function it names. One line per case: PASS, FAIL, DEVIATION or SUPERSEDED, name, detail. Exit status
1 on any FAIL.

We follow the newest fixture (v2, upstream 6d467e4). Run on an older fixture (schema "... v1"),
an expectation that v2 changed (listed in SUPERSEDED_IN_V1, with the v2 change) reports SUPERSEDED
instead of FAIL; everything else in it is still checked.

Strings that reach a model are compared byte for byte, and every value with its JSON type. A field
of the fixture this runner does not know is a failure (so a newer fixture cannot pass unchecked),
except the 2026-02-08 cross-check values (`*_in_2026_02_08`: we follow 2026-04-16) and free text
(descriptions, notes). Where we deliberately differ on something that never reaches a model, the
field is listed in DEVIATIONS and the case reports DEVIATION instead of FAIL. Nothing here depends
on one fixture's case ids or counts.
"""

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline import contract
from pipeline import prompts as dit_prompts
from pipeline.lm import planner
from pipeline.lm import prompts as lm_prompts
from pipeline.lm import tasks as lm_tasks
from pipeline.lm.backend import CodesRequest, MetadataRequest, TextRequest

# field path (as the FAIL detail names it) -> why we differ from the reference there. Only fields
# that never reach a model may be listed. None is needed for the 2026-04-16 reference: the planner's
# own choices (see pipeline.lm.planner) lie outside what the fixtures exercise.
DEVIATIONS: dict[str, str] = {}

# Expectations of v1 fixtures that v2 replaced: field path pattern -> the v2 change.
_PHASE2_V2 = ("v2: phase-2 prompts no longer close the assistant turn (cot block + '\\n\\n'), and the "
              "phase-2 unconditional prompt is the raw negative prompt or NO USER INPUT")
SUPERSEDED_IN_V1: dict[str, str] = {
    r"lm\.phase2(\[\d+\])?\.(prompt|unconditional_prompt|chat_messages|unconditional_messages)": _PHASE2_V2,
    r"expected_phase2_(prompt|unconditional_prompt|prompt_with_empty_metadata)": _PHASE2_V2,
    r"(TASK_TYPES|TASK_TYPES_TURBO|TASK_TYPES_BASE|TASK_INSTRUCTIONS)": "v2 adds the task type cover-nofsq",
}
V1_SCHEMA = re.compile(r"\bv1$")

# What every CodesRequest implies: the backend's codes phase starts after '</think>', forces only
# audio codes and injects nothing.
CODES_PHASE_CONSTRAINTS = {"user_metadata_injected": None, "skip_caption": True, "skip_language": True, "stop_at_reasoning": False}
# What every MetadataRequest implies: the FSM is on and phase 1 stops at '</think>'.
METADATA_PHASE_CONSTRAINTS = {"enabled": True, "stop_at_reasoning": True}

_CROSS_CHECK = re.compile(r"_in_\d{4}_\d{2}_\d{2}$")
_FREE_TEXT = {"description", "notes", "note", "example_output_note", "handler_inputs_note", "cot_block_note",
              "generation_params_defaults_apply", "differences_in_2026_02_08_snapshot", "reason",
              "phase1_skipped_reason", "phase2_skipped_reason"}
_SOURCE_SECONDS = re.compile(r"_([0-9]+(?:\.[0-9]+)?)s\.\w+$")


@dataclass
class Outcome:
    status: str  # PASS, FAIL, DEVIATION or SUPERSEDED
    name: str
    detail: str = ""


class Checker:
    """Collects the differences of one case, by field path."""

    def __init__(self, superseded: dict[str, str] | None = None) -> None:
        self.diffs: list[tuple[str, str]] = []
        self.seen: set[str] = set()
        self.superseded = superseded or {}

    def eq(self, path: str, ours: Any, expected: Any) -> None:
        """Expected and ours must be equal with the same JSON types (strings byte for byte)."""
        self.seen.add(path)
        if not _same(_jsonable(ours), expected):
            self.diffs.append((path, _describe(ours, expected)))

    def fail(self, path: str, detail: str) -> None:
        self.seen.add(path)
        self.diffs.append((path, detail))

    def fields(self, path: str, section: dict, handled: set[str]) -> None:
        """Every key of `section` must be handled, cross-check data or free text."""
        for key in section:
            if key not in handled and key not in _FREE_TEXT and not _CROSS_CHECK.search(key):
                self.fail(f"{path}.{key}", "field not checked by this runner")

    def _superseded_by(self, path: str) -> str | None:
        return next((why for pattern, why in self.superseded.items() if re.fullmatch(pattern, path)), None)

    def outcome(self, name: str) -> Outcome:
        failures = [(path, detail) for path, detail in self.diffs
                    if path not in DEVIATIONS and self._superseded_by(path) is None]
        if failures:
            return Outcome("FAIL", name, "; ".join(f"{path}: {detail}" for path, detail in failures))
        superseded = [(path, why) for path, _ in self.diffs if (why := self._superseded_by(path)) is not None]
        if superseded:
            reasons = list(dict.fromkeys(why for _, why in superseded))
            paths = ", ".join(dict.fromkeys(path for path, _ in superseded))
            deviations = "".join(f"; {path}: {DEVIATIONS[path]}" for path, _ in self.diffs if path in DEVIATIONS)
            return Outcome("SUPERSEDED", name, f"{paths}: {'; '.join(reasons)}{deviations}")
        if self.diffs:
            return Outcome("DEVIATION", name, "; ".join(f"{path}: {DEVIATIONS[path]}" for path, _ in self.diffs))
        return Outcome("PASS", name)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    return value


def _same(ours: Any, expected: Any) -> bool:
    if isinstance(expected, dict):
        return isinstance(ours, dict) and ours.keys() == expected.keys() and all(_same(ours[k], expected[k]) for k in expected)
    if isinstance(expected, list):
        return isinstance(ours, list) and len(ours) == len(expected) and all(map(_same, ours, expected))
    return type(ours) is type(expected) and ours == expected


def _describe(ours: Any, expected: Any) -> str:
    if isinstance(ours, str) and isinstance(expected, str):
        at = next((i for i, (a, b) in enumerate(zip(ours, expected, strict=False)) if a != b), min(len(ours), len(expected)))
        return (f"strings differ at character {at} (lengths {len(ours)} vs {len(expected)}): "
                f"ours {ours[max(at - 20, 0):at + 20]!r}, expected {expected[max(at - 20, 0):at + 20]!r}")
    return f"ours {ours!r} ({type(ours).__name__}), expected {expected!r} ({type(expected).__name__})"


# ---- end-to-end cases --------------------------------------------------------------------------


class RecordingBackend:
    """The LM replaced by the case's hand-written outputs; every request is recorded."""

    name = "prompt-fixture-stub"
    backend = "stub"

    def __init__(self, metadata_output: str, codes_output: str) -> None:
        self.metadata_output, self.codes_output = metadata_output, codes_output
        self.metadata_requests: list[MetadataRequest] = []
        self.codes_calls: list[list[CodesRequest]] = []

    def generate_metadata(self, request: MetadataRequest) -> str:
        self.metadata_requests.append(request)
        return self.metadata_output

    def generate_codes(self, requests: list[CodesRequest]) -> list[str]:
        self.codes_calls.append(list(requests))
        return [self.codes_output] * len(requests)

    def generate_text(self, request: TextRequest) -> str:
        raise AssertionError("the generation flow never runs the LM's own tasks")


class TaskBackend:
    """The LM of the task cases: answers every TextRequest with `outputs[mode]` (the runner sets
    `mode` before each task) and records the requests."""

    name = "prompt-fixture-task-stub"
    backend = "stub"

    def __init__(self, outputs: dict[str, str], mode: str = "") -> None:
        self.outputs, self.mode = outputs, mode
        self.requests: list[TextRequest] = []
        self.other_calls = 0

    def generate_text(self, request: TextRequest) -> str:
        self.requests.append(request)
        return self.outputs[self.mode]

    def generate_metadata(self, request: MetadataRequest) -> str:
        self.other_calls += 1
        return ""

    def generate_codes(self, requests: list[CodesRequest]) -> list[str]:
        self.other_calls += 1
        return [""] * len(requests)


def source_seconds(src_audio: Any) -> float | None:
    """The fixture's stand-in source files carry their length in the name (fake://src_30.0s.wav)."""
    match = _SOURCE_SECONDS.search(src_audio) if isinstance(src_audio, str) else None
    return float(match.group(1)) if match else None


def _check_messages(check: Checker, path: str, phase: dict, key: str, ours: list[dict], prompt_key: str) -> None:
    """The fixture's messages equal ours, and render (with its kwargs) to its prompt."""
    check.eq(f"{path}.{key}", ours, phase[key])
    kwargs = phase["chat_template_kwargs"]
    if set(kwargs) - {"tokenize", "add_generation_prompt"} or kwargs.get("tokenize") is not False:
        check.fail(f"{path}.chat_template_kwargs", f"unsupported template arguments {kwargs!r}")
        return
    rendered = lm_prompts.render_chat(phase[key], add_generation_prompt=kwargs["add_generation_prompt"])
    if not kwargs["add_generation_prompt"] and not rendered.endswith("\n"):
        rendered += "\n"
    check.eq(f"{path}.{key} rendered", rendered, phase[prompt_key])


def _check_phase1(check: Checker, phase: dict, params: dict, stub: RecordingBackend) -> None:
    path = "lm.phase1"
    if len(stub.metadata_requests) != 1:
        check.fail(path, f"{len(stub.metadata_requests)} metadata requests, expected 1")
        return
    request = stub.metadata_requests[0]
    caption, lyrics, negative = params["caption"], params["lyrics"], params["lm_negative_prompt"]
    _check_messages(check, path, phase, "chat_messages", lm_prompts.phase1_messages(caption, lyrics), "prompt")
    _check_messages(check, path, phase, "unconditional_messages",
                    lm_prompts.phase1_unconditional_messages(lyrics, negative), "unconditional_prompt")
    check.eq(f"{path}.prompt", request.prompt, phase["prompt"])
    check.eq(f"{path}.unconditional_prompt", request.unconditional_prompt, phase["unconditional_prompt"])
    check.eq(f"{path}.cfg_scale_used", request.cfg_scale, phase["cfg_scale_used"])
    check.eq(f"{path}.unconditional_prompt_used", request.cfg_scale > 1.0, phase["unconditional_prompt_used"])
    check.eq(f"{path}.sampling", asdict(request.sampling), phase["sampling"])
    constraints = phase["constrained_decoding"]
    ours = {
        **METADATA_PHASE_CONSTRAINTS, "user_metadata_injected": request.user_metadata, "skip_caption": request.skip_caption,
        "skip_language": request.skip_language, "skip_genres": request.skip_genres, "target_duration": request.target_duration,
    }
    check.eq(f"{path}.constrained_decoding", ours, constraints)
    check.eq(f"{path}.max_new_tokens", request.max_new_tokens, phase["max_new_tokens"])
    check.eq(f"{path}.parsed_metadata", lm_prompts.parse_lm_output(phase["example_output"])[0], phase["parsed_metadata"])
    check.fields(path, phase, {
        "chat_messages", "unconditional_messages", "chat_template_kwargs", "prompt", "unconditional_prompt", "cfg_scale_used",
        "unconditional_prompt_used", "sampling", "constrained_decoding", "max_new_tokens", "example_output", "parsed_metadata",
    })


def _check_phase2(check: Checker, phase: dict, params: dict, plan: planner.GenerationPlan, stub: RecordingBackend,
                  metadata: dict | None) -> None:
    path = "lm.phase2"
    if len(stub.codes_calls) != 1 or len(stub.codes_calls[0]) != len(plan.items):
        check.fail(path, f"codes calls {[len(call) for call in stub.codes_calls]}, expected one call of {len(plan.items)}")
        return
    caption, lyrics, negative = params["caption"], params["lyrics"], params["lm_negative_prompt"]
    check.eq(f"{path}.cot_block", plan.lm.cot_block, phase["cot_block"])
    if metadata is not None:
        check.eq(f"{path}.cot_block from metadata_after_phase1", lm_prompts.format_cot_block(metadata), phase["cot_block"])
    _check_messages(check, path, phase, "chat_messages", lm_prompts.phase2_messages(caption, lyrics), "prompt")
    _check_messages(check, path, phase, "unconditional_messages",
                    lm_prompts.phase2_unconditional_messages(caption, lyrics, negative), "unconditional_prompt")
    check.eq(f"{path}.target_duration", plan.lm.target_duration, phase["target_duration"])
    check.eq(f"{path}.constrained_decoding", CODES_PHASE_CONSTRAINTS, phase["constrained_decoding"])
    for index, request in enumerate(stub.codes_calls[0]):
        item = f"{path}[{index}]"
        check.eq(f"{item}.prompt", request.prompt, phase["prompt"])
        check.eq(f"{item}.unconditional_prompt", request.unconditional_prompt, phase["unconditional_prompt"])
        check.eq(f"{item}.cfg_scale_used", request.cfg_scale, phase["cfg_scale_used"])
        check.eq(f"{item}.unconditional_prompt_used", request.cfg_scale > 1.0, phase["unconditional_prompt_used"])
        check.eq(f"{item}.sampling", asdict(request.sampling), phase["sampling"])
        check.eq(f"{item}.eos_blocked_until_codes", request.n_codes, phase["eos_blocked_until_codes"])
        check.eq(f"{item}.max_new_tokens", request.max_new_tokens, phase["max_new_tokens"])
        check.eq(f"{item}.parsed_audio_codes_string", plan.items[index].audio_code_string, phase["parsed_audio_codes_string"])
    check.eq(f"{path}.parsed_audio_codes_string", lm_prompts.extract_audio_code_string(phase["example_output"]),
             phase["parsed_audio_codes_string"])
    check.eq(f"{path}.parsed_codes", lm_prompts.parse_audio_codes(phase["example_output"]), phase["parsed_codes"])
    check.fields(path, phase, {
        "cot_block", "chat_messages", "unconditional_messages", "chat_template_kwargs", "prompt", "unconditional_prompt",
        "cfg_scale_used", "unconditional_prompt_used", "sampling", "target_duration", "eos_blocked_until_codes",
        "max_new_tokens", "constrained_decoding", "example_output", "parsed_audio_codes_string", "parsed_codes",
    })


def _check_lm(check: Checker, lm: dict, params: dict, plan: planner.GenerationPlan, stub: RecordingBackend) -> None:
    check.eq("lm.invoked", plan.lm.invoked, lm["invoked"])
    if "phase1" in lm:
        _check_phase1(check, lm["phase1"], params, stub)
    elif stub.metadata_requests:
        check.fail("lm.phase1", f"the fixture runs no phase 1; we sent {len(stub.metadata_requests)} metadata request(s)")
    if "metadata_after_phase1" in lm:
        check.eq("lm.metadata_after_phase1", plan.lm.metadata, lm["metadata_after_phase1"])
    if "phase2" in lm:
        _check_phase2(check, lm["phase2"], params, plan, stub, lm.get("metadata_after_phase1"))
    elif stub.codes_calls:
        check.fail("lm.phase2", f"the fixture runs no phase 2; we made {len(stub.codes_calls)} codes call(s)")
    check.fields("lm", lm, {"invoked", "phase1", "metadata_after_phase1", "phase2"})


def _handler_inputs(params: dict, plan: planner.GenerationPlan) -> dict[str, Any]:
    """Our values for the reference's DiT handler arguments: the merged metadata, the item codes,
    and the request's own values passed through."""
    codes = [item.audio_code_string for item in plan.items]
    # The reference hands the DiT a list when the LM wrote codes for a batch, else the request's value.
    listed = (bool(plan.lm.codes_outputs) and len(codes) > 1) or not isinstance(params["audio_codes"], str)
    return {
        "captions": plan.metadata["caption"],
        "global_caption": params["global_caption"],
        "lyrics": plan.lyrics,
        "bpm": plan.metadata["bpm"],
        "key_scale": plan.metadata["keyscale"],
        "time_signature": plan.metadata["timesignature"],
        "vocal_language": plan.vocal_language,
        "audio_duration": plan.metadata["duration"],
        "batch_size": len(plan.items),
        "src_audio": None if params["task_type"] == "text2music" else params["src_audio"],
        "audio_code_string": codes if listed else codes[0],
        "repainting_start": params["repainting_start"],
        "repainting_end": params["repainting_end"],
        "instruction": params["instruction"],
        "audio_cover_strength": params["audio_cover_strength"],
        "task_type": params["task_type"],
    }


def _check_dit(check: Checker, dit: dict, params: dict, plan: planner.GenerationPlan) -> None:
    ours = _handler_inputs(params, plan)
    for key, expected in dit["handler_inputs"].items():
        if key in ours:
            check.eq(f"dit.handler_inputs.{key}", ours[key], expected)
        else:
            check.fail(f"dit.handler_inputs.{key}", "field not checked by this runner")
    check.eq("dit.task_type_effective", plan.task_type, dit["task_type_effective"])
    check.eq("dit.instruction", plan.instruction, dit["instruction"])
    check.eq("dit.metas_string", plan.metas, dit["metas_string"])
    check.eq("dit.caption_after_sft_extraction", plan.caption, dit["caption_after_sft_extraction"])
    check.eq("dit.vocal_language", plan.vocal_language, dit["vocal_language"])
    check.eq("dit.batch_size", len(plan.items), dit["batch_size"])
    if len(dit["items"]) != len(plan.items):
        check.fail("dit.items", f"{len(plan.items)} items, expected {len(dit['items'])}")
    for index, (item, expected) in enumerate(zip(plan.items, dit["items"], strict=False)):
        path = f"dit.items[{index}]"
        check.eq(f"{path}.caption_prompt", item.caption_prompt, expected["caption_prompt"])
        check.eq(f"{path}.caption_prompt_max_tokens", dit_prompts.CAPTION_MAX_TOKENS, expected["caption_prompt_max_tokens"])
        check.eq(f"{path}.lyric_prompt", item.lyric_prompt, expected["lyric_prompt"])
        check.eq(f"{path}.lyric_prompt_max_tokens", dit_prompts.LYRIC_MAX_TOKENS, expected["lyric_prompt_max_tokens"])
        check.eq(f"{path}.non_cover_caption_prompt", item.non_cover_caption_prompt, expected.get("non_cover_caption_prompt"))
        if "non_cover_caption_prompt_max_tokens" in expected:
            check.eq(f"{path}.non_cover_caption_prompt_max_tokens", dit_prompts.CAPTION_MAX_TOKENS,
                     expected["non_cover_caption_prompt_max_tokens"])
        check.eq(f"{path}.audio_codes_parsed", item.audio_codes, dit["audio_codes_parsed"])
        check.fields(path, expected, {
            "caption_prompt", "caption_prompt_max_tokens", "lyric_prompt", "lyric_prompt_max_tokens",
            "non_cover_caption_prompt", "non_cover_caption_prompt_max_tokens",
        })
    check.fields("dit", dit, {
        "handler_inputs", "task_type_effective", "instruction", "metas_string", "caption_after_sft_extraction",
        "vocal_language", "batch_size", "items", "audio_codes_parsed",
    })


def _check_code_string_example(check: Checker, example: dict) -> None:
    check.eq("code_string_example.expected_lm_audio_codes_string", lm_prompts.extract_audio_code_string(example["input"]),
             example["expected_lm_audio_codes_string"])
    check.eq("code_string_example.expected_codes", lm_prompts.parse_audio_codes(example["input"]), example["expected_codes"])
    check.fields("code_string_example", example, {"input", "expected_lm_audio_codes_string", "expected_codes"})


def run_case(case: dict, superseded: dict[str, str] | None = None) -> Outcome:
    """One end-to-end case: plan it with the stub LM, then compare the LM and DiT sides."""
    check = Checker(superseded)
    name = str(case.get("id", "?"))
    lm = case.get("lm", {})
    stub = RecordingBackend(lm.get("phase1", {}).get("example_output", ""), lm.get("phase2", {}).get("example_output", ""))
    inputs = case["inputs"]
    config = dict(inputs.get("config") or {})
    batch_size = config.pop("batch_size", 1)
    if config:
        return Outcome("FAIL", name, f"unsupported config field(s) {sorted(config)}")
    try:
        params = planner.resolve_params(inputs["params"])
        plan = planner.plan_generation(params, stub, batch_size=batch_size, src_audio_duration=source_seconds(params["src_audio"]))
    except Exception as exc:  # a case our planner refuses is a failure, not a crash of the runner
        return Outcome("FAIL", name, f"plan_generation raised {type(exc).__name__}: {exc}")
    _check_lm(check, lm, params, plan, stub)
    if "code_string_example" in case:
        _check_code_string_example(check, case["code_string_example"])
    _check_dit(check, case["dit"], params, plan)
    check.fields("case", case, {"id", "inputs", "lm", "code_string_example", "dit"})
    check.fields("inputs", inputs, {"params", "config"})
    return check.outcome(name)


# ---- unit-case sections ------------------------------------------------------------------------


def _cot_parse(check: Checker, case: dict) -> None:
    metadata, codes = lm_prompts.parse_lm_output(case["input"])
    check.eq("expected_metadata", metadata, case["expected_metadata"])
    check.eq("expected_audio_codes_string", codes, case["expected_audio_codes_string"])
    check.eq("expected_phase2_cot_block", lm_prompts.format_cot_block(metadata), case["expected_phase2_cot_block"])
    check.fields("case", case, {"name", "input", "expected_metadata", "expected_audio_codes_string", "expected_phase2_cot_block"})


def _code_parse(check: Checker, case: dict) -> None:
    check.eq("expected_lm_audio_codes_string", lm_prompts.extract_audio_code_string(case["input"]),
             case["expected_lm_audio_codes_string"])
    check.eq("expected_codes", lm_prompts.parse_audio_codes(case["input"]), case["expected_codes"])
    check.fields("case", case, {"name", "input", "expected_lm_audio_codes_string", "expected_codes"})


def _cot_format(check: Checker, case: dict) -> None:
    try:
        block = lm_prompts.format_cot_block(case["metadata"])
    except Exception as exc:
        if case.get("expected_error") is None:
            check.fail("expected_cot_block", f"raised {type(exc).__name__}: {exc}")
    else:
        if case.get("expected_error") is not None:
            check.fail("expected_error", f"no error raised (the reference raises {case['expected_error']!r}); ours {block!r}")
        else:
            check.eq("expected_cot_block", block, case["expected_cot_block"])
    check.fields("case", case, {"name", "metadata", "expected_cot_block", "expected_error"})


def _dit_metas(check: Checker, case: dict) -> None:
    inputs = case["inputs"] or {}
    check.eq("expected_metas_string", dit_prompts.format_metas(**inputs), case["expected_metas_string"])
    if case["expected_metas_dict"] is not None:
        check.eq("expected_metas_dict", dit_prompts.metas_dict(**inputs), case["expected_metas_dict"])
    check.fields("case", case, {"name", "inputs", "expected_metas_dict", "expected_metas_string"})


def _dit_lyric_prompt(check: Checker, case: dict) -> None:
    check.eq("expected_lyric_prompt", dit_prompts.lyric_prompt(case["lyrics"], case["language"]), case["expected_lyric_prompt"])
    check.fields("case", case, {"name", "lyrics", "language", "expected_lyric_prompt"})


def _sft_caption(check: Checker, case: dict) -> None:
    check.eq("expected", dit_prompts.extract_sft_caption(case["caption"]), case["expected"])
    check.fields("case", case, {"name", "caption", "expected"})


def _lm_prompt_builders(check: Checker, case: dict) -> None:
    caption, lyrics, negative = case["caption"], case["lyrics"], case["negative_prompt"]
    check.eq("expected_phase1_prompt", lm_prompts.phase1_prompt(caption, lyrics), case["expected_phase1_prompt"])
    check.eq("expected_phase1_unconditional_prompt", lm_prompts.phase1_unconditional_prompt(lyrics, negative),
             case["expected_phase1_unconditional_prompt"])
    check.eq("expected_phase2_prompt", lm_prompts.phase2_prompt(caption, lyrics, case["cot_block_for_phase2"]),
             case["expected_phase2_prompt"])
    check.eq("expected_phase2_unconditional_prompt", lm_prompts.phase2_unconditional_prompt(caption, lyrics, negative),
             case["expected_phase2_unconditional_prompt"])
    check.eq("expected_phase2_prompt_with_empty_metadata",
             lm_prompts.phase2_prompt(caption, lyrics, lm_prompts.format_cot_block({})),
             case["expected_phase2_prompt_with_empty_metadata"])
    check.fields("case", case, {
        "caption", "lyrics", "negative_prompt", "cot_block_for_phase2", "expected_phase1_prompt",
        "expected_phase1_unconditional_prompt", "expected_phase2_prompt", "expected_phase2_unconditional_prompt",
        "expected_phase2_prompt_with_empty_metadata",
    })


def _dit_instruction(check: Checker, case: dict) -> None:
    task, track, classes = case["task_type"], case["track_name"], case["complete_track_classes"]
    instruction = case["handler_generate_instruction"]
    if task in dit_prompts.TASK_TYPES:
        check.eq("handler_generate_instruction", dit_prompts.instruction_for(task, track, classes), instruction)
    if case["http_api_instruction_when_request_uses_default"] is not None:
        check.eq("http_api_instruction_when_request_uses_default",
                 planner.api_instruction(task, dit_prompts.DEFAULT_INSTRUCTION, track, classes),
                 case["http_api_instruction_when_request_uses_default"])
    # A task type we do not know stands for a custom instruction, which the handler uses as given.
    check.eq("formatted_for_prompt", dit_prompts.format_instruction(instruction), case["formatted_for_prompt"])
    check.fields("case", case, {
        "task_type", "track_name", "complete_track_classes", "handler_generate_instruction",
        "http_api_instruction_when_request_uses_default", "formatted_for_prompt",
    })


_OTHER_BUILDERS: dict[str, tuple[Callable[..., str], Callable[..., str]]] = {
    "build_formatted_prompt_for_understanding": (lm_prompts.understanding_prompt, lm_prompts.understanding_unconditional_prompt),
    "build_formatted_prompt_for_inspiration": (lm_prompts.inspiration_prompt, lm_prompts.inspiration_unconditional_prompt),
    "build_formatted_prompt_for_format": (lm_prompts.format_prompt, lm_prompts.format_unconditional_prompt),
}


def _other_lm_prompt(check: Checker, case: dict) -> None:
    if case["builder"] not in _OTHER_BUILDERS:
        check.fail("builder", f"no builder for {case['builder']!r}")
        return
    build, build_unconditional = _OTHER_BUILDERS[case["builder"]]
    check.eq("prompt", build(**case["args"]), case["prompt"])
    if case["uncond_prompt"] is not None:
        check.eq("uncond_prompt", build_unconditional(), case["uncond_prompt"])
    check.fields("case", case, {"builder", "args", "prompt", "uncond_prompt"})


def _legacy_cfg_builders(check: Checker, case: dict) -> None:
    caption, lyrics, negative = case["caption"], case["lyrics"], case["negative_prompt"]
    check.eq("expected_phase2_prompt", lm_prompts.phase2_prompt(caption, lyrics, case["cot_block_for_phase2"]),
             case["expected_phase2_prompt"])
    check.eq("expected_phase2_unconditional_prompt",
             lm_prompts.phase2_unconditional_prompt(caption, lyrics, negative, legacy=True),
             case["expected_phase2_unconditional_prompt"])
    check.fields("case", case, {"caption", "lyrics", "negative_prompt", "cot_block_for_phase2", "expected_phase2_prompt",
                                "expected_phase2_unconditional_prompt"})


def _unconditional_prompt(check: Checker, case: dict) -> None:
    # cot_text is an argument of the reference's builder that no unconditional prompt uses.
    ours = lm_prompts.unconditional_prompt(case["caption"], case["lyrics"], case["negative_prompt"],
                                           generation_phase=case["generation_phase"], is_batch=case["is_batch"])
    check.eq("expected", ours, case["expected"])
    check.fields("case", case, {"caption", "lyrics", "cot_text", "generation_phase", "is_batch", "negative_prompt", "expected"})


# The reference's task functions -> ours, the reference handler method each calls, and how the stub is addressed.
_TASK_FUNCTIONS: dict[str, tuple[Callable[..., Any], str]] = {
    "acestep.inference.format_sample": (lm_tasks.format_sample, "LLMHandler.format_sample_from_input"),
    "acestep.inference.create_sample": (lm_tasks.create_sample, "LLMHandler.create_sample_from_query"),
    "acestep.inference.understand_music": (lm_tasks.understand_music, "LLMHandler.understand_audio_from_codes"),
}
# Every TextRequest is constrained: our backends always decode under the FSM (False is refused).
TASK_USES_CONSTRAINED_DECODING = True


def _task_cfg(request: TextRequest) -> dict[str, Any]:
    """Our request as the reference's cfg dict. The tasks run without CFG, so the unconditional
    prompt's context (caption, lyrics) is empty and there is no cfg_scale."""
    return {
        "temperature": request.sampling.temperature, "top_k": request.sampling.top_k, "top_p": request.sampling.top_p,
        "repetition_penalty": request.sampling.repetition_penalty, "target_duration": request.target_duration,
        "user_metadata": request.user_metadata, "skip_caption": request.skip_caption,
        "skip_language": request.skip_language, "skip_genres": request.skip_genres,
        "generation_phase": request.generation_phase, "caption": "", "lyrics": "",
    }


def _rendered(check: Checker, path: str, section: dict) -> None:
    """The fixture's messages, through the template with its kwargs, give its prompt."""
    kwargs = section["chat_template_kwargs"]
    if set(kwargs) != {"tokenize", "add_generation_prompt"} or kwargs["tokenize"] is not False:
        check.fail(f"{path}.chat_template_kwargs", f"unsupported template arguments {kwargs!r}")
        return
    rendered = lm_prompts.render_chat(section["chat_messages"], add_generation_prompt=kwargs["add_generation_prompt"])
    check.eq(f"{path}.chat_messages rendered", rendered, section["prompt"])


def _lm_task(check: Checker, case: dict) -> None:
    inputs, lm = case["inputs"], case["lm"]
    if inputs["function"] not in _TASK_FUNCTIONS:
        check.fail("inputs.function", f"no task for {inputs['function']!r}")
        return
    function, handler_method = _TASK_FUNCTIONS[inputs["function"]]
    stub = TaskBackend({"task": lm["example_output"]}, mode="task")
    result = function(stub, **inputs["args"])
    check.eq("lm.handler_method", handler_method, lm["handler_method"])
    if len(stub.requests) != 1 or stub.other_calls:
        check.fail("lm", f"{len(stub.requests)} task request(s) and {stub.other_calls} other call(s); expected one task request")
        return
    request = stub.requests[0]
    _rendered(check, "lm", lm)
    check.eq("lm.prompt", request.prompt, lm["prompt"])
    check.eq("lm.generate_from_formatted_prompt_cfg", _task_cfg(request), lm["generate_from_formatted_prompt_cfg"])
    check.eq("lm.use_constrained_decoding", TASK_USES_CONSTRAINED_DECODING, lm["use_constrained_decoding"])
    check.eq("lm.stop_at_reasoning", request.stop_at_reasoning, lm["stop_at_reasoning"])
    metadata, codes = lm_prompts.parse_lm_output(lm["example_output"])
    check.eq("lm.parse_lm_output", {"metadata": metadata, "audio_codes_string": codes}, lm["parse_lm_output"])
    check.eq("lm.extracted_lyrics", lm_tasks.extract_lyrics(lm["example_output"]), lm["extracted_lyrics"])
    check.eq("expected_result", result.to_dict(), case["expected_result"])
    check.fields("case", case, {"id", "inputs", "lm", "expected_result"})
    check.fields("inputs", inputs, {"function", "args"})
    check.fields("lm", lm, {
        "handler_method", "chat_messages", "chat_template_kwargs", "prompt", "generate_from_formatted_prompt_cfg",
        "use_constrained_decoding", "stop_at_reasoning", "example_output", "parse_lm_output", "extracted_lyrics",
    })


def _lyrics_extraction(check: Checker, case: dict) -> None:
    check.eq("expected_lyrics", lm_tasks.extract_lyrics(case["input"]), case["expected_lyrics"])
    check.fields("case", case, {"input", "expected_lyrics"})


def _description_hints(check: Checker, case: dict) -> None:
    check.eq("expected", list(lm_tasks.parse_description_hints(case["description"])), case["expected"])
    check.fields("case", case, {"description", "expected"})


def _api_llm_inputs(check: Checker, case: dict) -> None:
    request = case["request"]
    unknown = sorted(set(request) - set(lm_tasks.lm_input_fields(_AnyRequest())))
    if unknown:
        check.fail("request", f"field(s) prepare_llm_inputs does not read: {unknown}")
    stub = TaskBackend(case["stub_outputs"])
    calls: list[dict[str, Any]] = []

    def recorded(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(backend: Any, **kwargs: Any) -> Any:
            calls.append({f"{name}_kwargs": kwargs})
            stub.mode = name
            return function(backend, **kwargs)
        return call

    prepared = lm_tasks.prepare_llm_inputs(request, stub, create_sample_fn=recorded("create_sample", lm_tasks.create_sample),
                                           format_sample_fn=recorded("format_sample", lm_tasks.format_sample))
    check.eq("lm_calls_in_order", calls, case["lm_calls_in_order"])
    check.eq("lm_prompts_in_order", [r.prompt for r in stub.requests], case["lm_prompts_in_order"])
    check.eq("expected_prepared_inputs", prepared.reference_dict(), case["expected_prepared_inputs"])
    if stub.other_calls:
        check.fail("lm", f"{stub.other_calls} generation-flow call(s); the API glue runs only the LM's tasks")
    check.fields("case", case, {"id", "request", "lm_calls_in_order", "lm_prompts_in_order", "stub_outputs",
                                "expected_prepared_inputs"})


class _AnyRequest:
    """Stands in for a GenerationRequest to list the fields `lm_input_fields` maps."""

    def __getattr__(self, name: str) -> None:
        return None


# The lyrics and language of every dit_caption_prompt_cases case: the fixture records them only in
# its expected lyric prompts (its README lists the other inputs).
DIT_CAPTION_CASE_LYRICS = "[Verse]\nla la"
DIT_CAPTION_CASE_LANGUAGE = "en"


def _dit_caption_prompt(check: Checker, case: dict) -> None:
    task, args, instruction = case["task_type"], case["args"], case["instruction"]
    if task in dit_prompts.TASK_TYPES:
        unknown = set(args) - {"track_name", "complete_track_classes"}
        if unknown:
            check.fail("args", f"unknown instruction argument(s) {sorted(unknown)}")
        ours = dit_prompts.instruction_for(task, args.get("track_name"), args.get("complete_track_classes"))
        check.eq("instruction", ours, instruction)
    else:  # a task type we do not know stands for a custom instruction
        check.eq("instruction", args.get("instruction"), instruction)
        if set(args) - {"instruction"}:
            check.fail("args", f"unknown argument(s) {sorted(set(args) - {'instruction'})}")
    lego = {"is_lego_sft": case["is_lego_sft"], "global_caption": case["global_caption"],
            "chunk_mask_mode": case["chunk_mask_mode"]}
    caption = dit_prompts.caption_prompt(instruction, dit_prompts.dit_caption(case["caption"], instruction, **lego), case["metas"])
    lyric = dit_prompts.lyric_prompt(DIT_CAPTION_CASE_LYRICS, DIT_CAPTION_CASE_LANGUAGE)
    calls = [{"text": caption, "max_length": dit_prompts.CAPTION_MAX_TOKENS, "truncation": True},
             {"text": lyric, "max_length": dit_prompts.LYRIC_MAX_TOKENS, "truncation": True}]
    if case["audio_cover_strength"] < 1.0:
        default = dit_prompts.DEFAULT_INSTRUCTION
        non_cover = dit_prompts.caption_prompt(default, dit_prompts.dit_caption(case["caption"], default, **lego), case["metas"])
        calls.append({"text": non_cover, "max_length": dit_prompts.CAPTION_MAX_TOKENS, "truncation": True})
    check.eq("expected_tokenizer_calls", calls, case["expected_tokenizer_calls"])
    check.eq("expected_text_input_for_logging", dit_prompts.text_input_for_logging(caption, lyric),
             case["expected_text_input_for_logging"])
    check.fields("case", case, {
        "task_type", "args", "instruction", "is_lego_sft", "chunk_mask_mode", "global_caption", "caption", "metas",
        "audio_cover_strength", "expected_tokenizer_calls", "expected_text_input_for_logging",
    })


UNIT_SECTIONS: dict[str, Callable[[Checker, dict], None]] = {
    "cot_parse_cases": _cot_parse,
    "code_parse_cases": _code_parse,
    "cot_format_cases": _cot_format,
    "dit_metas_cases": _dit_metas,
    "dit_lyric_prompt_cases": _dit_lyric_prompt,
    "sft_caption_extraction_cases": _sft_caption,
    "lm_prompt_builder_cases": _lm_prompt_builders,
    "dit_instruction_cases": _dit_instruction,
    "other_lm_prompts": _other_lm_prompt,
    "lm_prompt_builder_legacy_cfg_cases": _legacy_cfg_builders,
    "unconditional_prompt_cases": _unconditional_prompt,
    "lm_task_cases": _lm_task,
    "lyrics_extraction_cases": _lyrics_extraction,
    "api_description_hint_cases": _description_hints,
    "api_llm_input_cases": _api_llm_inputs,
    "dit_caption_prompt_cases": _dit_caption_prompt,
}
_NAME_KEYS = ("name", "id", "builder", "task_type")


def _unit_name(section: str, index: int, case: dict) -> str:
    label = next((str(case[key]) for key in _NAME_KEYS if isinstance(case.get(key), str)), "")
    return f"{section}[{index}]" + (f" {label}" if label else "")


def run_unit_case(section: str, index: int, case: dict, superseded: dict[str, str] | None = None) -> Outcome:
    check = Checker(superseded)
    name = _unit_name(section, index, case)
    try:
        UNIT_SECTIONS[section](check, case)
    except Exception as exc:
        return Outcome("FAIL", name, f"raised {type(exc).__name__}: {exc}")
    return check.outcome(name)


# ---- constraints.json --------------------------------------------------------------------------


def check_defaults(defaults: dict) -> Outcome:
    """Our GenerationParams defaults equal the fixture's, field by field."""
    check = Checker()
    for key, expected in defaults.items():
        if key in planner.GENERATION_PARAMS_DEFAULTS:
            check.eq(key, planner.GENERATION_PARAMS_DEFAULTS[key], expected)
        else:
            check.fail(key, "GenerationParams field unknown to the planner")
    return check.outcome("constraints.generation_params_defaults")


def check_max_tokens_table(name: str, rows: list[dict]) -> Outcome:
    """A table of token budgets (columns like cot_max_model_len_4096) for the unlimited tier."""
    check = Checker()
    for row in rows:
        for column, expected in row.items():
            match = re.fullmatch(r"(cot|codes)_max_model_len_(\d+)", column)
            if match:
                ours = lm_prompts.max_new_tokens(row["target_duration"], match.group(1), max_model_len=int(match.group(2)))
                check.eq(f"target_duration={row['target_duration']} {column}", ours, expected)
            elif column != "target_duration":
                check.fail(column, "column not understood")
    return check.outcome(f"constraints.max_tokens.{name}")


def _sft_gen_prompt_with_slots() -> str:
    return dit_prompts.SFT_GEN_PROMPT.format(instruction="{}", caption="{}", metas="{}")


# constraints.json constants -> our value (in the fixture's JSON form).
OUR_CONSTANTS: dict[str, Callable[[], Any]] = {
    "VALID_LANGUAGES": lambda: list(contract.LANGUAGES),
    "KEYSCALE_NOTES": lambda: list(contract.KEY_NOTES),
    "KEYSCALE_ACCIDENTALS": lambda: list(contract.KEY_ACCIDENTALS),
    "KEYSCALE_MODES": lambda: list(contract.KEY_MODES),
    "VALID_KEYSCALES_sorted": lambda: sorted(contract.KEY_SCALES),
    "BPM_MIN": lambda: contract.BPM_MIN,
    "BPM_MAX": lambda: contract.BPM_MAX,
    "DURATION_MIN": lambda: lm_prompts.DURATION_MIN,
    "DURATION_MAX": lambda: lm_prompts.DURATION_MAX,
    "VALID_TIME_SIGNATURES": lambda: [int(beats) for beats in contract.TIME_SIGNATURE_BEATS],
    "TASK_TYPES": lambda: list(dit_prompts.TASK_TYPES),
    "TASK_TYPES_TURBO": lambda: list(dit_prompts.TASK_TYPES_TURBO),
    "TASK_TYPES_BASE": lambda: list(dit_prompts.TASK_TYPES_BASE),
    "DEFAULT_DIT_INSTRUCTION": lambda: dit_prompts.DEFAULT_INSTRUCTION,
    "DEFAULT_LM_INSTRUCTION": lambda: lm_prompts.LM_INSTRUCTION,
    "DEFAULT_LM_UNDERSTAND_INSTRUCTION": lambda: lm_prompts.UNDERSTAND_INSTRUCTION,
    "DEFAULT_LM_INSPIRED_INSTRUCTION": lambda: lm_prompts.INSPIRATION_INSTRUCTION,
    "DEFAULT_LM_REWRITE_INSTRUCTION": lambda: lm_prompts.FORMAT_INSTRUCTION,
    "TASK_INSTRUCTIONS": lambda: dict(dit_prompts.TASK_INSTRUCTIONS),
    "TRACK_NAMES": lambda: list(dit_prompts.TRACK_NAMES),
    "SFT_GEN_PROMPT": _sft_gen_prompt_with_slots,
    "MAX_AUDIO_CODE": lambda: lm_prompts.MAX_AUDIO_CODE,
}
# lm_task_sampling_defaults keys -> our default temperature.
OUR_TASK_TEMPERATURES: dict[str, float] = {
    "format_sample": lm_tasks.DEFAULT_TEMPERATURE,
    "create_sample": lm_tasks.DEFAULT_TEMPERATURE,
    "understand_music (inference wrapper)": lm_tasks.DEFAULT_TEMPERATURE,
    "LLMHandler.understand_audio_from_codes": lm_tasks.UNDERSTAND_HANDLER_TEMPERATURE,
}


def check_constants(constants: dict, superseded: dict[str, str] | None = None) -> Outcome:
    check = Checker(superseded)
    for key, expected in constants.items():
        if key in OUR_CONSTANTS:
            check.eq(key, OUR_CONSTANTS[key](), expected)
        else:
            check.fail(key, "constant unknown to this runner")
    return check.outcome("constraints.constants")


def check_task_sampling_defaults(defaults: dict) -> Outcome:
    """Each task's default sampling (only temperature is recorded); the tasks never use CFG."""
    check = Checker()
    for key, expected in defaults.items():
        if key in _FREE_TEXT:
            continue
        if key not in OUR_TASK_TEMPERATURES:
            check.fail(key, "LM task unknown to this runner")
            continue
        check.eq(key, {"temperature": OUR_TASK_TEMPERATURES[key]}, expected)
    return check.outcome("constraints.lm_task_sampling_defaults")


def constraint_checks(constraints: dict, superseded: dict[str, str] | None = None) -> Iterator[Outcome]:
    if "constants" in constraints:
        yield check_constants(constraints["constants"], superseded)
    if "generation_params_defaults" in constraints:
        yield check_defaults(constraints["generation_params_defaults"])
    if "lm_task_sampling_defaults" in constraints:
        yield check_task_sampling_defaults(constraints["lm_task_sampling_defaults"])
    for key, rows in constraints.get("max_tokens", {}).items():
        # Tables for a GPU tier with a duration cap would need that cap; only the unlimited one is checked.
        if key.startswith("table_unlimited_tier"):
            yield check_max_tokens_table(key, rows)


# ---- running -----------------------------------------------------------------------------------


def run(fixture_dir: Path) -> list[Outcome]:
    """Every case of the fixture directory, in file order."""
    fixture = json.loads((fixture_dir / "prompts.json").read_text(encoding="utf-8"))
    superseded = SUPERSEDED_IN_V1 if V1_SCHEMA.search(str(fixture.get("schema", ""))) else None
    outcomes = []
    for section, cases in fixture.items():
        if section == "cases":
            outcomes.extend(run_case(case, superseded) for case in cases)
        elif section in UNIT_SECTIONS:
            outcomes.extend(run_unit_case(section, index, case, superseded) for index, case in enumerate(cases))
        elif isinstance(cases, list):
            outcomes.append(Outcome("FAIL", section, "unit-case section unknown to this runner"))
    constraints_path = fixture_dir / "constraints.json"
    if constraints_path.is_file():
        outcomes.extend(constraint_checks(json.loads(constraints_path.read_text(encoding="utf-8")), superseded))
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fixture_dir", type=Path, help="folder holding prompts.json (and constraints.json)")
    args = parser.parse_args(argv)
    outcomes = run(args.fixture_dir)
    for outcome in outcomes:
        print(f"{outcome.status} {outcome.name}" + (f": {outcome.detail}" if outcome.detail else ""))
    counts = {status: sum(o.status == status for o in outcomes) for status in ("PASS", "DEVIATION", "SUPERSEDED", "FAIL")}
    print(f"{len(outcomes)} cases: " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    return 1 if counts["FAIL"] or not outcomes else 0


if __name__ == "__main__":
    sys.exit(main())
