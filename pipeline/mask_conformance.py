"""Conformance of the handler's chunk masks and source latents (the fixture cases whose
``reference_method`` is ``_build_chunk_masks_and_src_latents``).

``run_mask_case(case, tensors)`` calls :func:`pipeline.conditioning.build_chunk_masks_and_src_latents`
with the case's inputs and scalar arguments as the manifest records them and returns our outputs in
the order of ``case["outputs"]``. An output the reference returned as None (``repaint_mask`` outside
repaint/lego) is recorded in the manifest as a key whose value is null; our value is returned at that
position all the same (None when we agree), and :func:`check_mask_outputs` treats "both None" as a
match. The PR #1290 behaviour (float32 mask, 2.0 for auto items) is used when the case's
``reference_file`` names commit eae40da. ``check_spans`` compares the returned spans with
``expected_spans`` exactly."""

import torch

from pipeline.conditioning import build_chunk_masks_and_src_latents

MASK_METHOD = "_build_chunk_masks_and_src_latents"
PR1290_COMMIT = "eae40da"
FLOAT_TOLERANCE = 1e-6
OUTPUT_NAMES = ("chunk_masks", "spans", "is_covers", "src_latents", "repaint_mask")


def is_mask_case(case: dict) -> bool:
    return case.get("reference_method") == MASK_METHOD


def uses_pr1290(case: dict) -> bool:
    return PR1290_COMMIT in str(case.get("reference_file", ""))


def resolve_input(spec, tensors: dict[str, torch.Tensor]):
    """``{"tensor": name}`` or ``{"tensor": name, "index": k}`` (element k of the first axis)."""
    if spec is None:
        return None
    tensor = tensors[spec["tensor"]]
    index = spec.get("index")
    return tensor if index is None else tensor[index]


def build_for_case(case: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """All five results of the builder for a case, by name."""
    inputs = {arg: resolve_input(spec, tensors) for arg, spec in case["inputs"].items()}
    scalars = dict(case.get("scalar_args", {}))
    results = build_chunk_masks_and_src_latents(**inputs, **scalars, auto_sentinel=uses_pr1290(case))
    return dict(zip(OUTPUT_NAMES, results, strict=True))


def run_mask_case(case: dict, tensors: dict[str, torch.Tensor]) -> tuple:
    """Our outputs, in the order of ``case["outputs"]`` (``spans`` go to :func:`check_spans`)."""
    results = build_for_case(case, tensors)
    unknown = [name for name in case["outputs"] if name not in results]
    if unknown:
        raise ValueError(f"the builder has no output named {unknown}")
    return tuple(results[name] for name in case["outputs"])


def run_mask_case_with_spans(case: dict, tensors: dict[str, torch.Tensor]) -> tuple[tuple, list]:
    """``(outputs in the order of case["outputs"], spans)`` from one call."""
    results = build_for_case(case, tensors)
    return tuple(results[name] for name in case["outputs"]), results["spans"]


def _normal_spans(spans) -> list[list]:
    return [[str(kind), int(start), int(end)] for kind, start, end in spans]


def check_spans(case: dict, spans) -> tuple[bool, str]:
    expected = case.get("expected_spans")
    if expected is None:
        return True, "spans: none recorded"
    ours, theirs = _normal_spans(spans), _normal_spans(expected)
    if ours == theirs:
        return True, "spans: equal"
    return False, f"spans: {ours} != {theirs}"


def check_output(name: str, ours, spec, tensors: dict[str, torch.Tensor],
                 tolerance: float = FLOAT_TOLERANCE) -> tuple[bool, str]:
    """One output against the fixture: None against null; dtype as recorded; bool/int exact; floats
    within ``tolerance``."""
    if spec is None:
        return (ours is None), f"{name}: {'None as recorded' if ours is None else 'expected None, got a tensor'}"
    if ours is None:
        return False, f"{name}: got None, fixture has {spec['tensor']}"
    from pipeline.conformance import compare

    return compare(name, ours.detach().cpu(), tensors[spec["tensor"]], tolerance, exact_dtype=True)


def check_mask_outputs(case: dict, results: tuple, tensors: dict[str, torch.Tensor],
                       tolerance: float = FLOAT_TOLERANCE) -> tuple[bool, str]:
    """Every output of :func:`run_mask_case` against the fixture (see :func:`check_output`)."""
    specs = case["outputs"]
    if len(results) != len(specs):
        return False, f"{len(results)} outputs, fixture has {len(specs)}"
    checks = [check_output(name, ours, spec, tensors, tolerance)
              for (name, spec), ours in zip(specs.items(), results, strict=True)]
    return all(ok for ok, _ in checks), "; ".join(text for _, text in checks)


def check_mask_case(case: dict, tensors: dict[str, torch.Tensor],
                    tolerance: float = FLOAT_TOLERANCE) -> tuple[bool, str]:
    """Outputs and spans of one case, from one call."""
    results, spans = run_mask_case_with_spans(case, tensors)
    ok_out, text_out = check_mask_outputs(case, results, tensors, tolerance)
    ok_spans, text_spans = check_spans(case, spans)
    return ok_out and ok_spans, f"{text_out}; {text_spans}"
