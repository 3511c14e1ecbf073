"""What a job costs, learned from what finished jobs cost.

A job's seconds are the sum of its pipeline stages (`pipeline.contract.STAGES`), each priced per
model as `a + b * feature` on what drives that stage:

| stage | feature | runs when |
|---|---|---|
| claimed (claim to first report; load, queue pick-up) | - | always |
| preparing (source audio read and VAE-encoded) | VAE seconds of the source (cover, repaint, ...) | always |
| lm (`lm` line: text only, lm_mode 1) | - | the LM writes text only (metas, format, a sample) |
| lm (`lm_codes` line: lm_mode 2) | seconds x songs of audio codes | `thinking`: the LM writes its CoT and the codes |
| conditioning (text encoder) | songs | not an LM task |
| dit | seconds x songs x decoder passes (`dit_passes`) | not an LM task |
| vae | VAE seconds x songs (`vae_seconds`: the latents its tiles run over) | not an LM task |
| encoding | seconds x songs | not an LM task |
| uploading | songs | not an LM task |

Decoder passes per song (`dit_passes`, the jobs table's `dit_steps`): the schedule's steps (turbo:
min(inference_steps, 20); base/SFT: inference_steps; custom `timesteps`: turbo the non-zero values,
at most 20, base/SFT one step fewer than the values), doubled less one for Heun on turbo (a corrector
call on every step but the last), doubled for Heun on base/SFT (the last step too), and doubled again
on base/SFT with guidance (guidance_scale > 1: the decoder runs on the conditional and the null batch).

Each (model, stage) line is fitted on the stage times the worker records (a batched job's share of
its batch), robust to outliers (Huber weights), with neither coefficient below 0, and pulled toward
a prior (measured per device class by a benchmark run; `PRIORS`) with the weight of `PRIOR_WEIGHT`
jobs, so a few observations move it and many override it. The prior is first scaled to the device
the jobs ran on (`device_speed`: the median of recorded / priced per job), so a device several times
faster or slower than its class is priced right after a job or two. Seconds per song that the LM is still to
choose are priced at the median of what it chose lately (prior: `PRIORS[...]["expected_seconds"]`).

`Coefficients.sql_array` is the same formula in the shape the SQL function `acestep_job_seconds`
(migrations 0004, 0005, 0007, 0009) prices with, for queue sums done in the database.
"""

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from pipeline.contract import (LATENT_HZ, SOURCE_TASK_TYPES, STAGES, TURBO_MAX_STEPS, VAE_CHUNK_FRAMES,
                               VAE_OVERLAP_FRAMES, GenerationRequest, dit_kind, within_stage)

PRIOR_WEIGHT = 3.0  # how many jobs' worth of evidence the prior counts as
HUBER_K = 1.5
MIN_JOB_SECONDS = 0.1  # a job with work never costs 0 (the SQL function says the same)
# The order of acestep_job_seconds' coefficient array (migration 0004).
# k_lm_codes_a (migration 0007) is the lm_mode 2 intercept; arrays without it price as k_lm_a.
# k_vae (migration 0009) is the VAE's seconds per second of latents it runs over (vae_seconds), k_audio
# then the encoding's alone.
SQL_COEFFICIENTS = ("k0", "k_src", "k_lm_a", "k_lm_b", "k_dit", "k_audio", "k_items", "k_lm_task", "expected_seconds",
                    "k_lm_codes_a", "k_vae")
# The lines a model is priced with: one per stage, and the LM's own when it writes audio codes (its
# chain of thought and the codes make a run of another kind than a text-only one).
LINES = (*STAGES, "lm_codes")
SAMPLE_LIMIT = 500  # the most recent finished jobs the model learns from


@dataclass(frozen=True)
class Work:
    """A job's cost features (columns of the jobs table)."""

    model: str = ""
    task_type: str = "text2music"
    items: int = 1
    audio_seconds: float | None = None  # per song; None while the LM is to choose
    dit_steps: int = 8  # decoder passes per song (dit_passes)
    lm_mode: int = 0  # 0 no LM, 1 LM writes text only, 2 LM writes audio codes

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> "Work":
        return cls(
            model=row.get("model") or "", task_type=row.get("task_type") or "text2music",
            items=max(1, int(row.get("items") or 1)), audio_seconds=row.get("audio_seconds"),
            dit_steps=int(row.get("dit_steps") or 0), lm_mode=int(row.get("lm_mode") or 0),
        )

    @property
    def lm_task(self) -> bool:
        """One of the LM's own tasks (format, create_sample, ...): no audio."""
        return self.task_type.startswith("lm_")

    def stage_features(self, seconds: float) -> dict[str, float]:
        """The feature of every stage this job runs (stages it skips are absent); `seconds` per song."""
        if self.lm_task:
            return {"claimed": 0.0, "lm": 0.0}
        n = self.items
        features = {
            "claimed": 0.0,
            "preparing": vae_seconds(seconds) if self.task_type in SOURCE_TASK_TYPES else 0.0,
            "conditioning": float(n),
            "dit": seconds * n * self.dit_steps,
            "vae": vae_seconds(seconds) * n,
            "encoding": seconds * n,
            "uploading": float(n),
        }
        if self.lm_mode >= 1:
            features["lm"] = seconds * n if self.lm_mode == 2 else 0.0
        return {stage: features[stage] for stage in STAGES if stage in features}


def vae_seconds(seconds: float) -> float:
    """The seconds of latents the VAE runs over for a song of `seconds`: its tiles' windows, overlap
    included (pipeline.vae.tiles): a song over one chunk is cut into cores of chunk - 2 x overlap
    frames, each run with up to `overlap` frames of context per side."""
    frames = max(0.0, seconds) * LATENT_HZ
    if frames <= VAE_CHUNK_FRAMES:
        return seconds
    stride = VAE_CHUNK_FRAMES - 2 * VAE_OVERLAP_FRAMES
    n = math.ceil(frames / stride)
    last_core = frames - (n - 1) * stride
    return (frames + VAE_OVERLAP_FRAMES * (2 * n - 3) + min(VAE_OVERLAP_FRAMES, last_core)) / LATENT_HZ


NO_DURATION_SECONDS = 30.0  # what the DiT makes with no duration, no LM to choose one and no source


def dit_passes(request: GenerationRequest, model: str) -> int:
    """Decoder passes over one song's latents (see the module docstring): steps x Heun x guidance."""
    try:
        turbo = dit_kind(model) == "turbo"
    except ValueError:
        turbo = "turbo" in model.lower()
    if request.timesteps is not None:
        steps = (min(TURBO_MAX_STEPS, sum(1 for t in request.timesteps if t > 0)) if turbo
                 else len(request.timesteps) - 1)
    else:
        steps = min(request.inference_steps, TURBO_MAX_STEPS) if turbo else request.inference_steps
    steps = max(1, steps)
    if request.sampler_mode == "heun":
        steps = 2 * steps - 1 if turbo else 2 * steps
    if not turbo and request.guidance_scale > 1:
        steps *= 2
    return steps


def work_of(request: GenerationRequest, model: str, *, source_seconds: float | None = None,
            lm_task: bool = False) -> Work:
    """The cost features of a request as submitted (`source_seconds`: an uploaded source's length)."""
    if lm_task:
        return Work(model=model, task_type="lm_task", lm_mode=1)
    if request.audio_duration is not None:
        seconds = float(request.audio_duration)
    elif request.task_type in SOURCE_TASK_TYPES:
        seconds = source_seconds  # the source's length; None: unknown until the worker reads it
    else:
        seconds = None if request.thinking else NO_DURATION_SECONDS
    # Without thinking the LM still writes text: formatting, a sample, or the metas a request lacks.
    metas_missing = request.bpm is None or not request.key_scale or not request.time_signature or request.audio_duration is None
    lm_text = request.use_format or request.sample_mode or metas_missing
    return Work(
        model=model, task_type=request.task_type, items=request.items, audio_seconds=seconds,
        dit_steps=dit_passes(request, model),
        lm_mode=2 if request.thinking else 1 if lm_text else 0,
    )


@dataclass(frozen=True)
class StageCost:
    a: float  # seconds per run of the stage
    b: float = 0.0  # seconds per unit of its feature

    def seconds(self, feature: float) -> float:
        return self.a + self.b * feature


@dataclass(frozen=True)
class Coefficients:
    """One model's price list: a StageCost per stage, and the seconds per song the LM chooses."""

    stages: Mapping[str, StageCost]
    expected_seconds: float

    def stage_seconds(self, work: Work) -> dict[str, float]:
        seconds = self.song_seconds(work)
        return {stage: self.stages[line_of(stage, work)].seconds(f) for stage, f in work.stage_features(seconds).items()}

    def song_seconds(self, work: Work) -> float:
        return work.audio_seconds if work.audio_seconds is not None else self.expected_seconds

    def seconds(self, work: Work) -> float:
        """What the job costs from claim to finish."""
        return max(MIN_JOB_SECONDS, sum(self.stage_seconds(work).values()))

    def remaining(self, work: Work, stage: str | None, progress: float | None) -> float:
        """What a running job still costs, from the stage it reported and its progress in it."""
        costs = self.stage_seconds(work)
        if stage not in STAGES:
            return sum(costs.values()) * (1.0 - (progress or 0.0))
        left = 0.0
        for name in STAGES[STAGES.index(stage):]:
            cost = costs.get(name, 0.0)
            left += cost * (1.0 - within_stage(stage, progress)) if name == stage else cost
        return left

    def collapsed(self) -> dict[str, float]:
        """These coefficients as the SQL function acestep_job_seconds reads them."""
        s = {stage: self.stages[stage] for stage in STAGES if stage in self.stages}
        zero = StageCost(0.0)
        audio_stages = [s.get("conditioning", zero), s.get("dit", zero), s.get("vae", zero),
                        s.get("encoding", zero), s.get("uploading", zero)]
        return {
            "k0": s["claimed"].a + s["preparing"].a + sum(c.a for c in audio_stages),
            "k_src": s["preparing"].b,
            "k_lm_a": s["lm"].a,
            "k_lm_b": self.stages["lm_codes"].b,
            "k_dit": s["dit"].b,
            "k_audio": s["encoding"].b,
            "k_items": s["conditioning"].b + s["uploading"].b,
            "k_lm_task": s["claimed"].a + s["lm"].a,
            "expected_seconds": self.expected_seconds,
            "k_lm_codes_a": self.stages["lm_codes"].a,
            "k_vae": s["vae"].b,
        }

    def sql_array(self) -> list[float]:
        collapsed = self.collapsed()
        return [collapsed[name] for name in SQL_COEFFICIENTS]


def line_of(stage: str, work: Work) -> str:
    """The line a stage of this job is priced on."""
    return "lm_codes" if stage == "lm" and work.lm_mode == 2 and not work.lm_task else stage


def _prior(stages: dict[str, tuple[float, float]], expected_seconds: float) -> Coefficients:
    return Coefficients({line: StageCost(*stages[line]) for line in LINES}, expected_seconds)


# Priors per device class, from benchmark runs (benchmarks/README.md): `gpu` from the full-size
# DiT+VAE and 1.7B LM (pt backend) on an H200 at 60 s (DiT 8 steps 0.250 s, VAE 0.138 s over its
# 75.4 tiled seconds, LM 7.6 s); `cpu-tiny` from `benchmarks/stage_costs.py` (tiny random checkpoints,
# one CPU core and one torch thread of this project's 2-core machine, 2026-12-06; its VAE line refitted
# on the tiled feature from the same run's stage times).
# A worker reads the source audio in `preparing`: priced as a VAE pass over it.
PRIORS: dict[str, Coefficients] = {
    "gpu": _prior({
        "claimed": (0.05, 0.0), "preparing": (0.05, 0.003), "lm": (1.0, 0.0), "lm_codes": (1.0, 0.127),
        "conditioning": (0.05, 0.01),
        "dit": (0.02, 0.00052), "vae": (0.02, 0.0018), "encoding": (0.02, 0.004), "uploading": (0.05, 0.02),
    }, expected_seconds=120.0),
    "cpu-tiny": _prior({
        "claimed": (0.05, 0.0), "preparing": (0.05, 0.048), "lm": (0.3, 0.0), "lm_codes": (1.0, 0.15),
        "conditioning": (0.02, 0.015), "dit": (0.05, 0.00075), "vae": (0.4, 0.048), "encoding": (0.1, 0.05),
        "uploading": (0.02, 0.02),
    }, expected_seconds=30.0),
}


@dataclass(frozen=True)
class CostModel:
    """Coefficients per model, and those for a model nobody has run yet."""

    models: Mapping[str, Coefficients]
    default: Coefficients

    def of(self, model: str) -> Coefficients:
        return self.models.get(model, self.default)

    def seconds(self, work: Work) -> float:
        return self.of(work.model).seconds(work)

    def remaining(self, row: Mapping[str, Any]) -> float:
        """A running row's remaining seconds."""
        work = Work.of(row)
        return self.of(work.model).remaining(work, row.get("stage"), row.get("progress"))

    def sql_costs(self) -> tuple[dict[str, list[float]], list[float]]:
        """(per model, default) coefficient arrays, as the queue queries price with them."""
        return {model: c.sql_array() for model, c in self.models.items()}, self.default.sql_array()


def sample_stages(sample: Mapping[str, Any]) -> dict[str, float]:
    """A finished job's stage seconds: its share of what it recorded, the rest of its time between
    claim and finish (claim, completion writes) counted as `claimed`."""
    timings = sample.get("timings") or {}
    stages = {k: float(v) for k, v in (timings.get("stages") or {}).items() if k in STAGES}
    total = sample.get("seconds")
    if total is not None:
        share = float(total) / max(1, int(timings.get("batch_jobs") or 1))
        stages["claimed"] = stages.get("claimed", 0.0) + max(0.0, share - sum(stages.values()))
    return stages


def fit_line(points: list[tuple[float, float]], prior: StageCost, weight: float = PRIOR_WEIGHT) -> StageCost:
    """y ~ a + b f with a, b >= 0: Huber-weighted least squares pulled toward `prior` with the weight
    of `weight` points (at the points' typical feature, for b)."""
    if not points:
        return prior
    f2 = sum(f * f for f, _ in points) / len(points)
    lam_a, lam_b = weight, weight * f2 if f2 > 0 else weight
    w = [1.0] * len(points)
    a, b = prior.a, prior.b
    for _ in range(8):
        sw = sum(w) + lam_a
        swf = sum(wi * f for wi, (f, _) in zip(w, points))
        swff = sum(wi * f * f for wi, (f, _) in zip(w, points)) + lam_b
        swy = sum(wi * y for wi, (_, y) in zip(w, points)) + lam_a * prior.a
        swfy = sum(wi * f * y for wi, (f, y) in zip(w, points)) + lam_b * prior.b
        det = sw * swff - swf * swf
        a, b = ((swy * swff - swf * swfy) / det, (sw * swfy - swf * swy) / det) if det > 0 else (swy / sw, prior.b)
        if b < 0:
            b, a = 0.0, swy / sw
        if a < 0:
            a, b = 0.0, max(0.0, swfy / swff)
        residuals = [abs(y - a - b * f) for f, y in points]
        scale = max(1.4826 * statistics.median(residuals), 0.05 * statistics.median(abs(y) for _, y in points), 1e-3)
        w = [1.0 if r <= HUBER_K * scale else HUBER_K * scale / r for r in residuals]
    return StageCost(a, b)


def fit_cost_model(samples: Iterable[Mapping[str, Any]], prior: Coefficients = PRIORS["gpu"]) -> CostModel:
    """Per model and stage from finished jobs' timings (cost_samples rows), on top of `prior`."""
    samples = list(samples)
    expected = _expected_seconds(samples, prior.expected_seconds)
    default = Coefficients(prior.stages, expected)
    models = {}
    for model in sorted({s["model"] or "" for s in samples}):
        points: dict[str, list[tuple[float, float]]] = {line: [] for line in LINES}
        runs: list[tuple[Work, float]] = []
        for sample in (s for s in samples if (s["model"] or "") == model):
            work = replace(Work.of(sample), audio_seconds=_made_seconds(sample, expected))
            recorded = sample_stages(sample)
            runs.append((work, sum(recorded.values())))
            for stage, feature in work.stage_features(work.audio_seconds).items():
                points[line_of(stage, work)].append((feature, recorded.get(stage, 0.0)))
        scaled = device_speed(runs, prior)
        models[model] = Coefficients({line: fit_line(points[line], scaled.stages[line]) for line in LINES}, expected)
    return CostModel(models, default)


def device_speed(runs: list[tuple[Work, float]], prior: Coefficients) -> Coefficients:
    """The prior scaled to the device the jobs ran on (`runs`: each job's work at the seconds it made,
    and its recorded seconds): by the median of recorded over the prior's price, pulled toward 1
    (geometrically, as one more job at 1), so a device much faster or slower than the prior's class
    is priced right after a job or two, and each stage's line is then fitted around that."""
    ratios = [recorded / priced for work, recorded in runs
              if (priced := prior.seconds(work)) > 0 and recorded > 0]
    if not ratios:
        return prior
    factor = math.exp(math.log(statistics.median(ratios)) * len(ratios) / (len(ratios) + 1))
    factor = min(20.0, max(0.05, factor))
    return Coefficients({stage: StageCost(c.a * factor, c.b * factor) for stage, c in prior.stages.items()},
                        prior.expected_seconds)


def _made_seconds(sample: Mapping[str, Any], expected: float) -> float:
    made = (sample.get("timings") or {}).get("audio_seconds")
    if made is None:
        made = sample.get("audio_seconds")
    return float(made) if made is not None and math.isfinite(float(made)) else expected


def _expected_seconds(samples: list[Mapping[str, Any]], prior: float) -> float:
    """The seconds per song jobs without a duration ended up with: their median, pulled toward the
    prior with PRIOR_WEIGHT."""
    chosen = [float(s["audio_seconds"]) for s in samples
              if s.get("duration_given") is False and s.get("audio_seconds") is not None
              and not str(s.get("task_type") or "").startswith("lm_")]
    if not chosen:
        return prior
    n = len(chosen)
    return (statistics.median(chosen) * n + prior * PRIOR_WEIGHT) / (n + PRIOR_WEIGHT)
