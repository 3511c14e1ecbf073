"""What each pipeline stage costs on this machine: the ETA's prior for a device class.

Runs the real pipeline (tiny random checkpoints unless --checkpoint-dir) in this process on a mix of
requests, times every stage from the pipeline's own progress reports (and the audio encoding), fits
each stage's line a + b * feature (handler/http/cost_model.py) and prints it in the shape of
`cost_model.PRIORS`.

    python benchmarks/stage_costs.py [--checkpoint-dir DIR] [--device cpu|cuda] [--format mp3]

On a CPU, run it as a device of its own (one core, one torch thread), as `eta_accuracy.py --pin-cpus`
runs each worker slot: `OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/stage_costs.py`.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handler.http.cost_model import LINES, StageCost, fit_line, line_of, work_of  # noqa: E402
from pipeline.audio_io import encode_audio  # noqa: E402
from pipeline.contract import GenerationRequest, PipelineOptions  # noqa: E402
from pipeline.service import load_pipeline  # noqa: E402

MIX = [  # (audio_duration, batch_size, thinking)
    (10, 1, False), (60, 1, False), (120, 1, False), (240, 1, False), (30, 4, False), (60, 2, False),
    (20, 1, True), (40, 2, True), (60, 1, True),
]


def timed_run(pipeline, request: GenerationRequest, fmt: str, out: Path) -> dict[str, float]:
    marks: list[tuple[str, float]] = []

    def progress(stage: str, fraction: float, **facts) -> None:
        if not marks or marks[-1][0] != stage:
            marks.append((stage, time.perf_counter()))

    start = time.perf_counter()
    audio = pipeline.run(request, progress)
    marks.append(("encoding", time.perf_counter()))
    for i, samples in enumerate(audio.audios):
        encode_audio(np.asarray(samples), audio.sample_rate, fmt, out / f"{i}.{fmt}")
    end = time.perf_counter()
    stages = {"claimed": marks[0][1] - start if marks else 0.0}
    for (stage, at), (_, until) in zip(marks, marks[1:] + [("end", end)]):
        stages[stage] = stages.get(stage, 0.0) + until - at
    return stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-dir", type=Path, help="real checkpoints (default: tiny random ones)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--format", default="mp3")
    parser.add_argument("--model", default="acestep-v15-turbo")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = args.checkpoint_dir
        if checkpoints is None:
            from pipeline.tiny import build_tiny_checkpoints

            checkpoints = build_tiny_checkpoints(Path(tmp) / "ckpt")
        pipeline = load_pipeline(checkpoints, PipelineOptions(device=args.device, vllm=False))
        points: dict[str, list[tuple[float, float]]] = {line: [] for line in LINES}
        for duration, batch, thinking in MIX:
            request = GenerationRequest(audio_duration=duration, batch_size=batch, thinking=thinking,
                                        caption="upbeat pop song", lyrics="[verse]\nHello world", seed=1)
            stages = timed_run(pipeline, request, args.format, Path(tmp))
            work = work_of(request, args.model)
            features = work.stage_features(float(duration))
            print(f"{duration:>4} s x{batch} thinking={thinking!s:<5} " +
                  " ".join(f"{k} {v:.3f}" for k, v in stages.items()), flush=True)
            for stage, feature in features.items():
                points[line_of(stage, work)].append((feature, stages.get(stage, 0.0)))
        lines = {stage: fit_line(p, StageCost(0.0), weight=0.0) for stage, p in points.items()}
        print("prior = {" + ", ".join(f'"{s}": ({c.a:.3g}, {c.b:.3g})' for s, c in lines.items()) + "}")


if __name__ == "__main__":
    main()
