"""Fake pipelines for worker tests, loaded by the worker through ACESTEP_PIPELINE like the real one.
Behaviour is chosen by the factory; FAKE_STAGE_SECONDS sets how long each of the 4 stages takes."""

import os
import signal
import time

import numpy as np

from pipeline.audio_io import SAMPLE_RATE
from pipeline.contract import stage_progress
from pipeline.interface import GeneratedAudio, OutOfMemory, PipelineError

STAGES = ("lm", "dit", "vae", "done")


def _tone(seconds: float = 0.5) -> np.ndarray:
    t = np.linspace(0, seconds, int(SAMPLE_RATE * seconds), endpoint=False)
    wave = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return np.stack([wave, wave])


class Fake:
    """Behaves as its factory says, or as a caption "fake:<behaviour>" says for that one job."""

    def __init__(self, behaviour: str):
        self.default = behaviour
        self.stage_seconds = float(os.environ.get("FAKE_STAGE_SECONDS", "0.05"))

    def run(self, request, progress):
        caption = request.caption
        self.behaviour = caption.removeprefix("fake:") if caption.startswith("fake:") else self.default
        for stage in STAGES[:-1]:
            progress(stage, stage_progress(stage, 0.0))
            if self.behaviour == "raise" and stage == "dit":
                raise ValueError("the DiT exploded")
            if self.behaviour == "exit" and stage == "dit":
                os._exit(3)
            if self.behaviour == "sigkill" and stage == "dit":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.behaviour == "hang" and stage == "dit":
                time.sleep(3600)
            if self.behaviour == "oom" and request.items > 1:
                raise OutOfMemory("CUDA out of memory")
            time.sleep(self.stage_seconds)
        batch = request.items
        seconds = 0.01 if self.default == "noop" else 0.5
        info = {"seed_value": ",".join(str(7 + i) for i in range(batch))}
        if self.behaviour == "nul":  # what a random LM may write into its metadata
            info |= {"genres": "po\x00p", "metas": {"caption": "a\x00b", "bpm": 90}}
        return GeneratedAudio([_tone(seconds) for _ in range(batch)], info=info)


    def run_lm_task(self, task, params, progress):
        """The LM's own tasks, answered from the params in the real pipeline's shape (deterministic)."""
        from pipeline.interface import PipelineError

        if task not in ("format", "create_sample", "understand"):
            raise PipelineError(f"unknown LM task {task!r}")
        progress("lm", stage_progress("lm", 0.5))
        time.sleep(self.stage_seconds)
        if task == "format":
            caption = params.get("caption") or params.get("prompt") or ""
            answer = {"caption": f"formatted: {caption}", "lyrics": params.get("lyrics") or "[Instrumental]",
                      "bpm": params.get("bpm") or 120, "duration": float(params.get("audio_duration") or 60.0),
                      "key_scale": params.get("key_scale") or "C major", "time_signature": params.get("time_signature") or "4",
                      "vocal_language": params.get("vocal_language") or "en"}
        elif task == "create_sample":
            query = params.get("query") or "NO USER INPUT"
            instrumental = bool(params.get("instrumental", False))
            answer = {"caption": f"sample: {query}", "lyrics": "[Instrumental]" if instrumental else f"[Verse]\n{query}",
                      "bpm": 100, "duration": 60.0, "key_scale": "A minor", "time_signature": "4",
                      "vocal_language": params.get("vocal_language") or "en", "instrumental": instrumental}
        else:
            codes = params.get("audio_code_string") or ""
            answer = {"caption": f"understood {codes.count('<|audio_code_')} codes", "lyrics": "[Instrumental]", "bpm": 90,
                      "duration": codes.count("<|audio_code_") / 5 or None, "key_scale": "E minor", "time_signature": "4",
                      "vocal_language": "unknown"}
        return answer | {"status_message": f"fake {task} done", "lm_model": "acestep-5Hz-lm-fake", "lm_backend": "fake"}


class BatchingFake(Fake):
    """Runs compatible jobs as one batch and says so in each job's generation_info."""

    def run_batch(self, requests, progress):
        """A request whose caption says "bad input" fails on its own (its PipelineError in its place)."""
        results = [self.run(requests[0], progress)]  # the stages run once, for all of them
        for request in requests[1:]:
            results.append(GeneratedAudio([_tone() for _ in range(request.items)], info=dict(results[0].info)))
        for result in results:
            result.info["generation_info"] = f"one batch of {len(requests)} jobs"
        return [PipelineError(f"bad input in {r.caption!r}") if "bad input" in r.caption else result
                for r, result in zip(requests, results, strict=True)]


class EchoFake(Fake):
    """Says in generation_info every field of the request it ran (the typed request, as received)."""

    def run(self, request, progress):
        result = super().run(request, progress)
        result.info["generation_info"] = request.model_dump_json()
        return result


def echo(checkpoint_dir=None, options=None):
    return EchoFake("ok")


def batching(checkpoint_dir=None, options=None):
    return BatchingFake("ok")


def noop(checkpoint_dir=None, options=None):
    """No stage time, 10 ms of audio: what is left is the system's own overhead."""
    fake = Fake("noop")
    fake.stage_seconds = 0.0
    return fake


def ok(checkpoint_dir=None, options=None):
    return Fake("ok")


def raises(checkpoint_dir=None, options=None):
    return Fake("raise")


def exits(checkpoint_dir=None, options=None):
    return Fake("exit")


def sigkill(checkpoint_dir=None, options=None):
    return Fake("sigkill")


def hangs(checkpoint_dir=None, options=None):
    return Fake("hang")


def oom_when_batched(checkpoint_dir=None, options=None):
    return Fake("oom")


def broken_setup(checkpoint_dir=None, options=None):
    raise RuntimeError("no checkpoints in /nowhere")


def slow_setup(checkpoint_dir=None, options=None):
    """A model load that takes FAKE_SETUP_SECONDS (default 60); touches FAKE_SETUP_MARKER when it starts."""
    if os.environ.get("FAKE_SETUP_MARKER"):
        open(os.environ["FAKE_SETUP_MARKER"], "w").close()
    time.sleep(float(os.environ.get("FAKE_SETUP_SECONDS", "60")))
    return Fake("ok")
