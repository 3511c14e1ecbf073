"""The vllm backend's logits processor (CFG over request pairs, our constrained decisions) and the
backend around it, run through `fake_vllm.FakeLLM` (vllm's V1 batch protocol on CPU, a tiny random
LM): it must produce the pt backend's tokens, keep both rows of a pair identical whatever the
batch does, and leave requests that are not ours alone. Backend choice and fallback to pt too."""

import logging
import re

import pytest

from pipeline.lm import decoding, loading
from pipeline.lm.backend import CodesRequest, MetadataRequest, Sampling
from pipeline.lm.constrained import VALID_KEYSCALES
from pipeline.lm.pt_backend import PtBackend
from pipeline.lm.vllm_backend import EXTRA_KEY, PairedCfgLogitsProcessor, VllmBackend, request_to_args
from tests.pipeline.fake_vllm import FakeLLM, SamplingParams

PROMPT = "<|im_start|>user\n# Caption\nslow jazz\n<|im_end|>\n<|im_start|>assistant\n"
UNCOND = "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture
def pt(tiny_pt_lm):
    return tiny_pt_lm


@pytest.fixture(autouse=True)
def short_captions(monkeypatch):
    monkeypatch.setattr(decoding, "MAX_CAPTION_TOKENS", 12)  # random weights rarely end a line on their own


def vllm_on_fake(pt: PtBackend, **engine) -> tuple[VllmBackend, FakeLLM]:
    processor = PairedCfgLogitsProcessor(vocabulary=pt.vocabulary)
    llm = FakeLLM(pt.model, processor, pt.pad_id, **engine)
    return VllmBackend(pt.name, llm, pt.vocabulary, sampling_params=SamplingParams), llm


def codes_requests(cfg: float = 2.5) -> list[CodesRequest]:
    return [CodesRequest(PROMPT + "<think>\n</think>\n\n", UNCOND + "<think>\n</think>\n\n", cfg_scale=cfg, n_codes=n,
                         max_new_tokens=n + 10, seed=s, sampling=Sampling(top_k=50, repetition_penalty=1.3))
            for n, s in ((9, 1), (5, 2), (7, 3))]


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_metadata_through_vllm_is_the_pt_output(pt, cfg):
    request = MetadataRequest(PROMPT, UNCOND, cfg_scale=cfg, max_new_tokens=400, seed=4, user_metadata={"bpm": 96},
                              sampling=Sampling(temperature=1.3, top_p=0.95, repetition_penalty=1.1))
    backend, llm = vllm_on_fake(pt)
    out = backend.generate_metadata(request)
    assert out == pt.generate_metadata(request)
    assert out.startswith("<think>\nbpm: 96\ncaption:") and out.endswith("<|im_end|>")
    assert re.search(r"^keyscale: (.*)$", out, re.M).group(1) in VALID_KEYSCALES


def test_codes_batch_with_cfg_through_vllm_is_the_pt_output(pt):
    requests = codes_requests()
    backend, llm = vllm_on_fake(pt)
    outs = backend.generate_codes(requests)
    assert outs == pt.generate_codes(requests)
    for out, request in zip(outs, requests, strict=True):
        assert len(re.findall(r"<\|audio_code_\d+\|>", out)) == request.n_codes and out.endswith("<|im_end|>")


def test_rows_moved_swapped_and_foreign_requests_left_alone(pt):
    """Swaps every other step, condensing moves as pairs finish at different lengths, and a request
    without our extra_args in the same batch: same tokens as pt, the foreign row untouched."""
    requests = codes_requests()
    backend, llm = vllm_on_fake(pt, swap_every=2)
    original = llm.generate

    def with_a_foreign_request(prompts, params, use_tqdm=False):
        prompts = [{"prompt_token_ids": pt.vocabulary.encode(PROMPT)}, *prompts]
        params = [SamplingParams(temperature=0.0, max_tokens=6), *params]
        outputs = original(prompts, params)
        foreign = outputs[0].outputs[0].token_ids
        assert foreign == llm.raw_argmax[0][:6]  # greedy on its own logits: the processor did not touch it
        return outputs[1:]

    llm.generate = with_a_foreign_request
    assert backend.generate_codes(requests) == pt.generate_codes(requests)


def test_a_late_partner_row_still_gets_the_same_tokens(pt, caplog):
    """The unconditional row of item 0 joins 3 steps late (as after a preemption): its sequence is
    still the conditional one and the codes stay valid; the pair stays 3 positions apart, so every
    code of item 0 was decided without guidance, and the log says how many."""
    requests = codes_requests()
    processor = PairedCfgLogitsProcessor(vocabulary=pt.vocabulary)
    llm = FakeLLM(pt.model, processor, pt.pad_id, admit_at={1: 3})  # request 1 = item 0's unconditional row
    params = [SamplingParams(temperature=0.0, max_tokens=r.max_new_tokens, stop_token_ids=[pt.vocabulary.end_id],
                             extra_args=request_to_args(r, f"p{i}", role))
              for i, r in enumerate(requests) for role in ("cond", "uncond")]
    prompts = [{"prompt_token_ids": pt.vocabulary.encode(text)} for r in requests for text in (r.prompt, r.unconditional_prompt)]
    with caplog.at_level(logging.WARNING, logger="pipeline.lm.vllm_backend"):
        outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    for i, request in enumerate(requests):
        cond, uncond = outputs[2 * i], outputs[2 * i + 1]
        assert cond == uncond
        assert len(cond) == request.n_codes + 1 and cond[-1] == pt.vocabulary.end_id
        assert set(cond[:-1]) <= set(pt.vocabulary.code_ids.tolist())
    assert f"p0: {requests[0].n_codes} token(s) decided without the paired CFG row" in caplog.text
    assert "p1:" not in caplog.text and not processor.batch.pairs and not processor.batch.rows  # all released


def test_stop_token_left_out_of_the_ids_is_put_back(pt):
    requests = codes_requests(cfg=1.0)
    backend, _ = vllm_on_fake(pt, stop_token_in_ids=False)
    assert backend.generate_codes(requests) == pt.generate_codes(requests)


def test_parameters_are_checked():
    request = codes_requests()[0]
    good = SamplingParams(temperature=0.0, extra_args=request_to_args(request, "k", "cond"))
    PairedCfgLogitsProcessor.validate_params(good)
    PairedCfgLogitsProcessor.validate_params(SamplingParams(temperature=0.7))  # not ours
    with pytest.raises(ValueError, match="role"):
        PairedCfgLogitsProcessor.validate_params(SamplingParams(temperature=0.0, extra_args={EXTRA_KEY: {"pair": "k", "role": "x"}}))
    with pytest.raises(ValueError, match="greedily"):
        PairedCfgLogitsProcessor.validate_params(SamplingParams(temperature=0.7, extra_args=good.extra_args))


# ---- which backend a request gets ---------------------------------------------------------------


class _Engine:
    backend = "vllm"

    def __init__(self, fail: bool = False):
        self.fail, self.calls = fail, 0

    def generate_codes(self, requests, report=None):
        self.calls += 1
        if self.fail:
            raise RuntimeError("engine died")
        return ["from vllm"] * len(requests)

    generate_metadata = None


def test_vllm_that_cannot_start_means_pt_with_one_warning(pt, caplog):
    starts = []

    def starter(backend):
        starts.append(backend.name)
        raise RuntimeError("no CUDA here")

    engines = loading.VllmEngines(starter=starter)
    lms = {pt.name: pt}
    with caplog.at_level(logging.WARNING, logger="pipeline.lm.loading"):
        assert loading.select_lm(lms, None, "vllm", engines) is pt
        assert loading.select_lm(lms, None, "vllm", engines) is pt
    assert starts == [pt.name]
    assert caplog.text.count("vllm cannot start (no CUDA here); using the pt backend") == 1
    assert loading.select_lm(lms, None, "pt", engines) is pt


def test_vllm_engine_used_and_retired_on_failure(pt, caplog):
    engine = _Engine()
    engines = loading.VllmEngines(starter=lambda backend: engine)
    lms = {pt.name: pt}
    requests = codes_requests()[:1]
    chosen = loading.select_lm(lms, None, "vllm", engines)
    assert chosen.generate_codes(requests) == ["from vllm"] and chosen.backend == "vllm"
    engine.fail = True
    with caplog.at_level(logging.WARNING, logger="pipeline.lm.loading"):
        chosen = loading.select_lm(lms, None, "vllm", engines)
        assert chosen.generate_codes(requests) == pt.generate_codes(requests)  # redone on pt
        assert chosen.backend == "pt"
        assert loading.select_lm(lms, None, "vllm", engines) is pt  # retired
    assert engine.calls == 2 and caplog.text.count("the vllm engine failed (engine died)") == 1


def test_vllm_turned_off_means_pt(pt):
    assert loading.select_lm({pt.name: pt}, None, "vllm", None) is pt  # ACESTEP_VLLM=0: the pipeline has no engines


def test_start_vllm_says_why_not(pt, monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="vllm is not installed"):
        loading.start_vllm(pt)
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        loading.start_vllm(pt)


def test_calls_are_split_so_each_prefills_in_one_step(pt):
    requests = codes_requests()
    backend, llm = vllm_on_fake(pt)
    sizes = []
    original = llm.generate

    def recording(prompts, params, use_tqdm=False):
        sizes.append(sum(len(p["prompt_token_ids"]) for p in prompts))
        return original(prompts, params)

    llm.generate = recording
    one_item = sum(len(pt.vocabulary.encode(t)) for t in (requests[0].prompt, requests[0].unconditional_prompt))
    backend.step_tokens = 2 * one_item  # room for two pairs per call
    assert backend.generate_codes(requests) == pt.generate_codes(requests)
    assert sizes == [2 * one_item, one_item]


def test_processor_fits_vllms_own_interface():
    """Where vllm is installed (the gpu extra): vllm loads our class as a custom logits processor and
    its SamplingParams carry and validate our extra_args."""
    lp = pytest.importorskip("vllm.v1.sample.logits_processor")
    from vllm import SamplingParams as VllmSamplingParams

    from pipeline.lm import vllm_backend

    assert issubclass(PairedCfgLogitsProcessor, lp.LogitsProcessor)
    assert vllm_backend.MoveDirectionality is lp.MoveDirectionality
    assert lp._load_custom_logitsprocs(["pipeline.lm.vllm_backend:PairedCfgLogitsProcessor"]) == [PairedCfgLogitsProcessor]
    params = VllmSamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[7],
                                extra_args=request_to_args(codes_requests()[0], "k-0", "cond"))
    lp.validate_logits_processors_parameters([PairedCfgLogitsProcessor], params)
    with pytest.raises(Exception, match="greedily"):  # vllm re-raises it as its VLLMValidationError
        lp.validate_logits_processors_parameters(
            [PairedCfgLogitsProcessor], VllmSamplingParams(temperature=0.5, extra_args=params.extra_args))
