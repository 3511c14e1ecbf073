"""The cost model: per-stage lines learned robustly from recorded stage times, never negative, from
priors toward observations; the features a request is priced on; slots scheduling."""

import random

import pytest

from handler.http.cost_model import (
    PRIORS,
    StageCost,
    Work,
    fit_cost_model,
    fit_line,
    sample_stages,
    vae_seconds,
    work_of,
)
from handler.http.eta import finish_time
from pipeline.contract import LATENT_HZ, STAGES, VAE_CHUNK_FRAMES, VAE_OVERLAP_FRAMES, GenerationRequest, stage_progress


def sample(model="turbo", items=1, seconds=60.0, steps=8, lm_mode=0, task="text2music", stages=None,
           given=True, batch_jobs=1, total=None):
    stages = stages or {}
    return {"model": model, "task_type": task, "items": items, "audio_seconds": seconds, "dit_steps": steps,
            "lm_mode": lm_mode, "duration_given": given,
            "seconds": total if total is not None else sum(stages.values()),
            "timings": {"stages": stages, "audio_seconds": seconds, "batch_jobs": batch_jobs}}


def test_each_stage_line_is_learned_and_outliers_do_not_drag_it():
    rng = random.Random(1)
    samples = []
    for i in range(300):
        seconds, items = rng.uniform(10, 240), rng.randint(1, 4)
        dit = 0.3 + 0.001 * seconds * items * 8
        vae = 0.1 + 0.01 * vae_seconds(seconds) * items  # per second of latents its tiles run over
        if i % 10 == 0:
            dit *= 20  # a stalled run now and then
        samples.append(sample(items=items, seconds=seconds, stages={"dit": dit * rng.uniform(0.95, 1.05), "vae": vae}))
    learned = fit_cost_model(samples, PRIORS["gpu"]).of("turbo")
    assert learned.stages["dit"].b == pytest.approx(0.001, rel=0.05)
    assert learned.stages["dit"].a == pytest.approx(0.3, abs=0.15)
    assert learned.stages["vae"].b == pytest.approx(0.01, rel=0.03)


def test_a_line_never_goes_negative_and_a_job_never_costs_zero():
    # Small jobs are nearly free and big ones costly: least squares would give a negative intercept.
    points = [(f, max(0.0, -5.0 + 0.1 * f)) for f in range(0, 400, 10)]
    line = fit_line(points, StageCost(0.0, 0.0), weight=0.0)
    assert line.a >= 0 and line.b > 0
    model = fit_cost_model([sample(seconds=s, stages={"dit": max(0.0, -5 + 0.01 * s * 8)}) for s in range(10, 240, 5)])
    assert model.seconds(Work(model="turbo", audio_seconds=10.0)) > 0
    assert model.seconds(Work(model="turbo", task_type="lm_format", lm_mode=1)) > 0


def test_priors_price_jobs_before_any_finished_and_observations_take_over():
    prior = PRIORS["gpu"]
    empty = fit_cost_model([], prior)
    work = Work(model="turbo", audio_seconds=60.0, items=2)
    assert empty.seconds(work) == pytest.approx(prior.seconds(work))
    observed = lambda n: fit_cost_model([sample(seconds=60.0, items=2, stages={"vae": 3.0})] * n, prior)  # noqa: E731
    feature = work.stage_features(60.0)["vae"]
    vae_prior = prior.stages["vae"].seconds(feature)
    one, many = observed(1).of("turbo").stages["vae"].seconds(feature), observed(200).of("turbo").stages["vae"].seconds(feature)
    assert vae_prior < one < 3.0  # one job moves it part of the way
    assert many == pytest.approx(3.0, rel=0.03)  # many override the prior
    assert observed(5).of("unseen-model").seconds(work) == pytest.approx(prior.seconds(work))


def test_a_device_faster_than_its_prior_is_priced_right_after_a_few_jobs():
    # Every stage runs 5x faster than the cpu-tiny prior says (a job recorded here: prior price / 5).
    prior = PRIORS["cpu-tiny"]
    def run(seconds, items):
        work = Work(model="turbo", audio_seconds=seconds, items=items)
        stages = {stage: cost / 5 for stage, cost in prior.stage_seconds(work).items()}
        return work, sample(seconds=seconds, items=items, stages=stages)
    samples = [run(240.0, 1)[1], run(10.0, 2)[1], run(60.0, 3)[1]]
    work, truth = run(30.0, 2)
    priced = fit_cost_model(samples, prior).seconds(work)
    assert priced == pytest.approx(truth["seconds"], rel=0.35)  # the prior alone says 5x
    assert fit_cost_model([], prior).seconds(work) == pytest.approx(5 * truth["seconds"], rel=0.01)


def test_a_batched_job_is_charged_its_share_of_the_batch():
    # Two jobs shared a 10 s batch: each recorded 4 s of stages; the rest of its half is claim/finish.
    stages = sample_stages(sample(stages={"dit": 3.0, "vae": 1.0}, batch_jobs=2, total=10.0))
    assert stages == {"dit": 3.0, "vae": 1.0, "claimed": pytest.approx(1.0)}


def test_the_seconds_the_lm_chooses_are_learned_for_jobs_without_a_duration():
    prior = PRIORS["cpu-tiny"]
    chose = [sample(seconds=s, lm_mode=2, given=False, stages={"lm": 1.0}) for s in (50.0, 55.0, 60.0) * 10]
    model = fit_cost_model(chose, prior)
    assert prior.expected_seconds < model.default.expected_seconds <= 55.0
    assert model.default.expected_seconds == pytest.approx(55.0, rel=0.05)
    unknown, known = Work(model="turbo", lm_mode=2), Work(model="turbo", lm_mode=2, audio_seconds=55.0)
    assert model.seconds(unknown) == pytest.approx(model.seconds(known), rel=0.05)


def test_the_features_follow_what_drives_each_stage():
    turbo, base = "acestep-v15-turbo", "acestep-v15-base"
    request = GenerationRequest(audio_duration=42, inference_steps=50, batch_size=3)
    assert work_of(request, turbo).dit_steps == 20  # turbo runs min(inference_steps, 20) steps
    assert work_of(request, base).dit_steps == 100  # guidance (7.0) doubles the batch
    assert work_of(request.model_copy(update={"guidance_scale": 1.0}), base).dit_steps == 50
    assert (work_of(request, turbo).items, work_of(request, turbo).audio_seconds) == (3, 42.0)
    assert work_of(GenerationRequest(thinking=True), turbo).audio_seconds is None  # the LM will choose
    assert work_of(GenerationRequest(thinking=True), turbo).lm_mode == 2
    assert work_of(GenerationRequest(), turbo).audio_seconds == 30.0  # no duration, no LM: 30 s
    assert work_of(GenerationRequest(use_format=True), turbo).lm_mode == 1
    assert work_of(GenerationRequest(audio_duration=30), turbo).lm_mode == 1  # the LM fills bpm, key, metre
    every_meta = GenerationRequest(audio_duration=30, bpm=120, key_scale="C major", time_signature="4")
    assert work_of(every_meta, turbo).lm_mode == 0
    cover = GenerationRequest(task_type="cover", src_audio_path="/x.wav")
    assert work_of(cover, turbo, source_seconds=12.5).audio_seconds == 12.5
    assert work_of(cover, turbo).audio_seconds is None
    assert work_of(GenerationRequest(), turbo, lm_task=True).lm_task
    assert Work(task_type="cover", audio_seconds=10.0).stage_features(10.0)["preparing"] == 10.0
    assert "lm" not in Work(audio_seconds=10.0).stage_features(10.0)


def test_a_running_jobs_remaining_work_shrinks_with_its_stage_and_progress():
    prior = PRIORS["gpu"]
    work = Work(model="turbo", audio_seconds=120.0, items=2, lm_mode=2)
    points = [(stage, stage_progress(stage, within)) for stage in STAGES for within in (0.0, 0.5, 1.0)]
    left = [prior.remaining(work, stage, progress) for stage, progress in points]
    assert left[0] == pytest.approx(prior.seconds(work))
    assert all(a >= b for a, b in zip(left, left[1:]))
    assert left[-1] == pytest.approx(0.0, abs=1e-9)
    lm = prior.stage_seconds(work)["lm"]
    assert prior.remaining(work, "lm", stage_progress("lm", 0.5)) == pytest.approx(
        lm / 2 + sum(v for k, v in prior.stage_seconds(work).items() if STAGES.index(k) > STAGES.index("lm")))


def test_jobs_take_the_first_free_slot_in_claim_order():
    assert finish_time(1, [], [], 5.0) == 5.0
    assert finish_time(1, [3.0], [2.0], 5.0) == 10.0
    assert finish_time(2, [3.0], [], 5.0) == 5.0  # a slot is free now
    assert finish_time(2, [3.0], [10.0], 5.0) == 8.0  # after the running job, not the long one ahead
    assert finish_time(2, [3.0, 4.0], [1.0, 1.0], 2.0) == 6.0


def test_the_lm_of_thinking_jobs_is_priced_apart_from_text_only_runs():
    # A text-only LM run (metas) costs 1 s; a thinking run writes its CoT (6 s) and 0.05 s per second of codes.
    samples = []
    for seconds in (10.0, 30.0, 60.0, 120.0, 240.0) * 20:
        samples.append(sample(seconds=seconds, lm_mode=1, stages={"lm": 1.0, "dit": 0.01 * seconds}))
        samples.append(sample(seconds=seconds, lm_mode=2, stages={"lm": 6.0 + 0.05 * seconds, "dit": 0.01 * seconds}))
    model = fit_cost_model(samples, PRIORS["cpu-tiny"])
    for seconds in (20.0, 200.0):
        priced = model.of("turbo").stage_seconds(Work(model="turbo", audio_seconds=seconds, lm_mode=2))["lm"]
        assert priced == pytest.approx(6.0 + 0.05 * seconds, rel=0.1)
        text = model.of("turbo").stage_seconds(Work(model="turbo", audio_seconds=seconds, lm_mode=1))["lm"]
        assert text == pytest.approx(1.0, rel=0.1)


def test_the_vae_is_priced_on_the_latents_its_tiles_run_over():
    """A song over one 512-frame chunk is decoded in tiles with 64 frames of context a side: the
    feature counts those frames (pipeline.vae.tiles), so a VAE of constant cost per decoded frame is
    priced right at every length from a few lengths' samples."""
    from pipeline.vae import tiles

    for frames in (1, 250, 512, 513, 767, 768, 769, 1500, 6000, 15000):
        decoded = sum(t.window_end - t.window_start for t in tiles(frames, VAE_CHUNK_FRAMES, VAE_OVERLAP_FRAMES))
        assert vae_seconds(frames / LATENT_HZ) * LATENT_HZ == pytest.approx(decoded, abs=1e-9)
    assert vae_seconds(240.0) / 240.0 == pytest.approx(1.32, abs=0.01)
    per_frame = 0.05 / LATENT_HZ
    cost = lambda s: per_frame * sum(t.window_end - t.window_start for t in tiles(round(s * LATENT_HZ), 512, 64))  # noqa: E731
    model = fit_cost_model([sample(seconds=s, stages={"vae": cost(s)}) for s in (10.0, 20.0, 30.0, 60.0) * 50],
                           PRIORS["cpu-tiny"])
    for seconds in (15.0, 120.0, 240.0):
        priced = model.of("turbo").stage_seconds(Work(model="turbo", audio_seconds=seconds))["vae"]
        assert priced == pytest.approx(cost(seconds), rel=0.05)

