"""Progress that moves and a cancel that stops: the pipeline reports every LM token chunk, DiT step
and VAE decoder block through `stage_progress`, says the seconds per song once, and stops at the report after
a cancel; the LM backends (pt, and vllm through its CPU stand-in) report and stop the same way."""

import math

import pytest
import torch

from pipeline.contract import STAGE_SPANS, STAGES, GenerationRequest, PipelineOptions
from pipeline.interface import Canceled
from pipeline.lm import backend, decoding, loading
from pipeline.lm.backend import TOKEN_CHUNK, CodesRequest, Sampling, TokenProgress
from pipeline.lm.vllm_backend import _CALLS, PairedCfgLogitsProcessor, VllmBackend
from pipeline.service import load_pipeline
from pipeline.vae import Vae
from tests.pipeline.fake_vllm import FakeLLM, SamplingParams

PROMPT = "<|im_start|>user\n# Caption\nslow jazz\n<|im_end|>\n<|im_start|>assistant\n<think>\n</think>\n\n"
UNCOND = "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<think>\n</think>\n\n"
SECONDS = 25.0  # 625 latent frames: two VAE tiles, 125 codes


@pytest.fixture(autouse=True)
def short_captions(monkeypatch):
    monkeypatch.setattr(decoding, "MAX_CAPTION_TOKENS", 16)  # random weights rarely end a line on their own


@pytest.fixture(scope="module")
def pipe(tiny_checkpoints, tmp_path_factory):
    import shutil

    from pipeline.tiny import TINY_LM
    from pipeline.tiny_text import build_tiny_lm

    root = tmp_path_factory.mktemp("progress")
    shutil.copytree(tiny_checkpoints, root, dirs_exist_ok=True)
    build_tiny_lm(root / TINY_LM)
    return load_pipeline(root, PipelineOptions(lm_max_duration=30))


def thinking_request(**overrides) -> GenerationRequest:
    base = dict(caption="slow jazz", lyrics="[inst]", batch_size=1, audio_duration=SECONDS, use_random_seed=False,
                seed=3, inference_steps=8, thinking=True, lm_backend="pt", audio_format="wav")
    return GenerationRequest.model_construct(**(GenerationRequest().model_dump() | base | overrides))


class Recorder:
    """A progress callback that records every call and raises Canceled at the call `cancel_at` picks."""

    def __init__(self, cancel_at=None):
        self.calls: list[tuple[str, float, dict]] = []
        self.cancel_at = cancel_at

    def __call__(self, stage: str, fraction: float, **facts) -> None:
        self.calls.append((stage, fraction, facts))
        if self.cancel_at is not None and self.cancel_at(self.calls):
            raise Canceled()

    def stages(self, name: str) -> list[float]:
        return [fraction for stage, fraction, _ in self.calls if stage == name]


def test_a_run_reports_lm_chunks_dit_steps_and_vae_tiles_in_order(pipe):
    progress = Recorder()
    out = pipe.run(thinking_request(), progress)
    order = [stage for stage, _, _ in progress.calls]
    assert [s for i, s in enumerate(order) if i == 0 or order[i - 1] != s] == ["preparing", "lm", "conditioning", "dit", "vae"]
    fractions = [fraction for _, fraction, _ in progress.calls]
    assert fractions == sorted(fractions)  # a poll never sees progress go back
    for stage, fraction, _ in progress.calls:
        lo, hi = STAGE_SPANS[stage]
        assert lo <= fraction <= hi, (stage, fraction)
    assert len(progress.stages("lm")) >= 125 // TOKEN_CHUNK  # the codes alone come in that many chunks
    assert len(progress.stages("dit")) == 2 + 8 and progress.stages("dit")[-1] == STAGE_SPANS["dit"][1]  # start, conditions ready, steps
    blocks = len(pipe.vae.model.decoder.block)  # the decoder's upsampling blocks report, in each of the 2 tiles
    assert len(progress.stages("vae")) == 1 + 2 * blocks and progress.stages("vae")[-1] == STAGE_SPANS["vae"][1]
    facts = [facts for _, _, facts in progress.calls if facts]
    assert facts == [{"audio_seconds": SECONDS}] and out.info["duration"] == SECONDS


def test_the_duration_the_lm_picks_is_reported_once(pipe):
    progress = Recorder()
    out = pipe.run(thinking_request(audio_duration=None, thinking=False, bpm=None), progress)
    assert [facts for _, _, facts in progress.calls if facts] == [{"audio_seconds": out.info["duration"]}]
    assert progress.stages("lm")  # the LM filled the metas (and picked the duration)


WITHOUT_LM = dict(thinking=False, use_cot_caption=False, use_cot_language=False, bpm=90, key_scale="C major",
                  time_signature="4")


@pytest.mark.parametrize("stage, after, lm", [("lm", 2, True), ("dit", 3, False), ("vae", 1, False)])
def test_a_cancel_stops_the_run_at_the_next_report_of_any_stage(pipe, stage, after, lm):
    """Canceled `after` reports into `stage`: nothing runs past that report."""
    progress = Recorder(cancel_at=lambda calls: [s for s, _, _ in calls].count(stage) == 1 + after)
    with pytest.raises(Canceled):
        pipe.run(thinking_request(**({} if lm else WITHOUT_LM)), progress)
    assert progress.calls[-1][0] == stage and len(progress.stages(stage)) == 1 + after
    assert STAGES.index(progress.calls[-1][0]) == max(STAGES.index(s) for s, _, _ in progress.calls)


def test_vae_decode_reports_each_block_of_each_tile_and_decodes_as_before(tiny_checkpoints):
    vae = Vae.load(tiny_checkpoints / "vae")
    latents = torch.randn(1, 120, vae.latent_dim, generator=torch.Generator().manual_seed(0))
    reports = []
    audio = vae.decode(latents, chunk_frames=64, overlap_frames=8, progress=lambda done, total: reports.append((done, total)))
    units = 3 * len(vae.model.decoder.block)  # 3 tiles
    assert reports == [(done, units) for done in range(1, units + 1)]
    assert torch.equal(audio, vae.decode(latents, chunk_frames=64, overlap_frames=8))
    with pytest.raises(Canceled):
        vae.decode(latents, chunk_frames=64, overlap_frames=8, progress=lambda done, total: _cancel())
    assert torch.equal(audio, vae.decode(latents, chunk_frames=64, overlap_frames=8))  # no hook is left behind


def _cancel():
    raise Canceled()


# ---- the LM backends ---------------------------------------------------------------------------


@pytest.fixture
def chunks_only(monkeypatch):
    """Reports at whole chunks only, however slowly this machine decodes."""
    monkeypatch.setattr(backend, "REPORT_SECONDS", math.inf)


def test_tokens_are_reported_every_chunk_or_sooner_on_a_slow_device():
    now = [0.0]
    reports = []
    progress = TokenProgress(lambda done, total: reports.append((done, total)), 100, clock=lambda: now[0])
    for done in range(1, TOKEN_CHUNK + 1):
        progress.update(done)
    assert reports == [(TOKEN_CHUNK, 100)]
    now[0] += backend.REPORT_SECONDS  # a slow token
    progress.update(TOKEN_CHUNK + 1)
    progress.update(TOKEN_CHUNK + 2)
    assert reports == [(TOKEN_CHUNK, 100), (TOKEN_CHUNK + 1, 100)]


def codes_requests(cfg: float = 2.0) -> list[CodesRequest]:
    return [CodesRequest(PROMPT, UNCOND, cfg_scale=cfg, n_codes=n, max_new_tokens=n + 10, seed=s,
                         sampling=Sampling(top_k=50)) for n, s in ((33, 1), (30, 2))]


def chunk_reports(backend, requests, cancel_after: int | None = None) -> tuple[list[tuple[int, int]], list[str] | None]:
    reports = []

    def report(done: int, total: int) -> None:
        reports.append((done, total))
        if cancel_after is not None and len(reports) == cancel_after:
            raise Canceled()

    try:
        return reports, backend.generate_codes(requests, report)
    except Canceled:
        return reports, None


def vllm_on_fake(pt) -> tuple[VllmBackend, FakeLLM, PairedCfgLogitsProcessor]:
    processor = PairedCfgLogitsProcessor(vocabulary=pt.vocabulary)
    llm = FakeLLM(pt.model, processor, pt.pad_id)
    return VllmBackend(pt.name, llm, pt.vocabulary, sampling_params=SamplingParams), llm, processor


def test_pt_backend_reports_every_chunk_of_tokens(tiny_pt_lm, chunks_only):
    requests = codes_requests()
    reports, outs = chunk_reports(tiny_pt_lm, requests)
    assert outs == tiny_pt_lm.generate_codes(requests)  # reporting changes no token
    assert [done for done, _ in reports] == list(range(TOKEN_CHUNK, 34 + 1, TOKEN_CHUNK))
    assert {total for _, total in reports} == {34}  # the longest item's codes and its end token


def test_pt_backend_stops_at_the_chunk_whose_report_raises(tiny_pt_lm, chunks_only):
    reports, outs = chunk_reports(tiny_pt_lm, codes_requests(), cancel_after=1)
    assert outs is None and reports == [(TOKEN_CHUNK, 34)]


def test_vllm_backend_reports_every_chunk_and_writes_the_same_tokens(tiny_pt_lm, chunks_only):
    requests = codes_requests()
    backend, _, _ = vllm_on_fake(tiny_pt_lm)
    reports, outs = chunk_reports(backend, requests)
    assert outs == tiny_pt_lm.generate_codes(requests)
    assert [done for done, _ in reports] == list(range(TOKEN_CHUNK, 34 + 1, TOKEN_CHUNK))


def test_a_canceled_vllm_call_ends_its_requests_at_the_next_step_and_leaves_the_engine_clean(tiny_pt_lm, chunks_only):
    requests = codes_requests()
    backend, llm, processor = vllm_on_fake(tiny_pt_lm)
    reports, outs = chunk_reports(backend, requests, cancel_after=1)
    assert outs is None and reports == [(TOKEN_CHUNK, 34)]
    assert llm.steps == TOKEN_CHUNK + 1  # the step after the report wrote the end token everywhere
    assert not processor.batch.pairs and not processor.batch.rows and not _CALLS
    assert backend.generate_codes(requests) == tiny_pt_lm.generate_codes(requests)  # the engine runs on


class _StubEngine:
    backend = "vllm"

    def __init__(self, raises: Exception | None = None):
        self.raises = raises

    def _answer(self, request, report=None):
        if self.raises is not None:
            raise self.raises
        return "from vllm"

    generate_text = generate_metadata = _answer


def test_a_cancel_through_vllm_is_not_an_engine_failure(tiny_pt_lm):
    engines = loading.VllmEngines(starter=lambda backend: _StubEngine(Canceled()))
    lms = {tiny_pt_lm.name: tiny_pt_lm}
    chosen = loading.select_lm(lms, None, "vllm", engines)
    with pytest.raises(Canceled):
        chosen.generate_metadata(None)
    assert chosen.backend == "vllm" and loading.select_lm(lms, None, "vllm", engines) is not tiny_pt_lm  # not retired


def test_the_lm_tasks_run_on_vllm_too(tiny_pt_lm):
    engines = loading.VllmEngines(starter=lambda backend: _StubEngine())
    chosen = loading.select_lm({tiny_pt_lm.name: tiny_pt_lm}, None, "vllm", engines)
    assert chosen.generate_text(None) == "from vllm" and chosen.backend == "vllm"
