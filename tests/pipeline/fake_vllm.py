"""A stand-in for vllm V1's engine loop, for running `PairedCfgLogitsProcessor` on CPU (vllm has no
CPU build). It keeps what the processor depends on: a persistent batch whose changes arrive as a
BatchUpdate (removed, then added with a live output list, then moved: one-way condensing moves
and swaps), the logits of every request in the batch in one [rows, V] tensor per step, greedy
sampling after the processors, stop token ids and max_tokens. The model is a real transformers LM
recomputed over each row's whole sequence every step (no cache: slow, but nothing shared)."""

from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.lm.vllm_backend import MoveDirectionality


@dataclass
class SamplingParams:  # the fields of vllm.SamplingParams our backend sets
    temperature: float = 1.0
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    skip_special_tokens: bool = True
    extra_args: dict[str, Any] | None = None


@dataclass(frozen=True)
class BatchUpdate:
    batch_size: int
    removed: list
    added: list
    moved: list


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str


@dataclass
class RequestOutput:
    outputs: list[Completion]


@dataclass
class _Running:
    number: int
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)


class FakeLLM:
    """`generate(prompts, params)` like vllm.LLM. `admit_at` holds request number -> first step it may
    join the batch; `swap_every` swaps the first and last rows every that many steps;
    `stop_token_in_ids` says whether a stop token stays in the returned ids."""

    def __init__(self, model, processor, pad_id: int, *, admit_at: dict[int, int] | None = None,
                 swap_every: int = 0, stop_token_in_ids: bool = True):
        self.model, self.processor, self.pad_id = model, processor, pad_id
        self.admit_at = admit_at or {}
        self.swap_every = swap_every
        self.stop_token_in_ids = stop_token_in_ids
        self.steps = 0
        self.raw_argmax: dict[int, list[int]] = {}  # request number -> argmax of its logits before the processor

    def _logits(self, rows: list[_Running]) -> torch.Tensor:
        seqs = [r.prompt + r.output for r in rows]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, width - len(seq):] = torch.tensor(seq)
            mask[i, width - len(seq):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions)
        return out.logits[:, -1].float()

    @torch.inference_mode()  # as vllm's model runner
    def generate(self, prompts, params, use_tqdm: bool = False) -> list[RequestOutput]:
        for p in params:
            self.processor.validate_params(p)
        waiting = [_Running(n, list(prompt["prompt_token_ids"]), p) for n, (prompt, p) in enumerate(zip(prompts, params, strict=True))]
        batch: list[_Running] = []
        done: dict[int, Completion] = {}
        step = 0
        while waiting or batch:
            added, moved = [], []
            for request in [w for w in waiting if self.admit_at.get(w.number, 0) <= step]:
                waiting.remove(request)
                added.append((len(batch), request.params, request.prompt, request.output))
                batch.append(request)
            if self.swap_every and step % self.swap_every == self.swap_every - 1 and len(batch) > 1:
                batch[0], batch[-1] = batch[-1], batch[0]
                moved.append((0, len(batch) - 1, MoveDirectionality.SWAP))
            self.processor.update_state(BatchUpdate(len(batch), [], added, moved) if added or moved else None)
            if not batch:
                step += 1
                continue
            logits = self._logits(batch)
            for request, best in zip(batch, logits.argmax(-1).tolist(), strict=True):
                self.raw_argmax.setdefault(request.number, []).append(best)
            logits = self.processor.apply(logits)
            tokens = logits.argmax(-1).tolist()  # params.temperature is 0: greedy
            finished = []
            for index, (request, token) in enumerate(zip(batch, tokens, strict=True)):
                request.output.append(token)
                stop = token in request.params.stop_token_ids
                if stop or len(request.output) >= request.params.max_tokens:
                    ids = request.output if (self.stop_token_in_ids or not stop) else request.output[:-1]
                    done[request.number] = Completion(list(ids), "stop" if stop else "length")
                    finished.append(index)
            # vllm drops finished requests and condenses the batch: the last rows move into the holes
            slots: list[_Running | None] = [None if i in finished else r for i, r in enumerate(batch)]
            moves = []
            for hole in sorted(finished):
                while slots and slots[-1] is None:
                    slots.pop()
                if hole >= len(slots):
                    break
                moves.append((len(slots) - 1, hole, MoveDirectionality.UNIDIRECTIONAL))
                slots[hole] = slots.pop()
            while slots and slots[-1] is None:
                slots.pop()
            batch = slots
            if finished:
                self.processor.update_state(BatchUpdate(len(batch), finished, [], moves))
            step += 1
        self.steps = step
        return [RequestOutput([done[n]]) for n in range(len(prompts))]
