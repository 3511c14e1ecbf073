"""The `vllm` backend: the 5 Hz LM served by vllm's engine (paged KV cache, continuous batching, CUDA
graphs), with every token decided by our own logits processor, so that the prompts, constraints,
CFG and sampling are exactly those of the pt backend (`decoding.Decoder`).

How CFG works without a patched engine: each item is two vllm requests, the conditional prompt and
the unconditional one, tagged in `SamplingParams.extra_args` with one pair key. vllm (V1) gives a
batch-level logits processor the logits of every running request at once; ours finds both rows of
a pair at the same position, combines them (uncond + scale x (cond - uncond)), lets the pair's
Decoder choose the token, and then masks both rows down to that one token. vllm samples greedily
(temperature 0), so both sequences take exactly the chosen token and stay identical. vllm's own
penalties, top-k/top-p and seeds are left off: the Decoder applies the reference's.

Both rows must reach each position in the same step. The engine runs without chunked prefill (no
prompt is split over steps), the rows of a pair are submitted next to each other, and one
`generate` call holds no more prompt tokens than one step admits, so a pair is prefilled in one
step and then decodes in lockstep. If the rows still drift apart (a preemption under KV-cache
pressure), the leading row's tokens are decided from its own logits alone, the lagging row is
given the same tokens (the sequences never differ and every constraint holds), and the number of
unguided tokens is logged.

Progress and stopping: the engine runs in this process, so the processor sees each step. It
counts the tokens of every `generate` call with a `report` (`_CALLS`, keyed by the call's pair-key
prefix) and reports every chunk; once a report raises (the job was canceled), the processor
writes the end token into every row of that call, so its requests finish at the next step and
leave the engine clean, and the call then raises what the report raised.

vllm needs CUDA and is an optional (GPU extra) dependency; this module imports it only when an
engine starts. `loading` falls back to the pt backend with one warning when it cannot start."""

import dataclasses
import enum
import logging
import os
import threading
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.lm.backend import CodesRequest, MetadataRequest, Sampling, TextRequest, TokenProgress, TokenReport, most_tokens
from pipeline.lm.constrained import Vocabulary, load_vocabulary
from pipeline.lm.decoding import Decoder

log = logging.getLogger(__name__)

EXTRA_KEY = "acestep_lm"  # our entry in SamplingParams.extra_args
COND, UNCOND = "cond", "uncond"
STEP_TOKENS = 32768  # prompt tokens one engine step may prefill (max_num_batched_tokens)

try:  # vllm is optional: without it the processor is still importable (and testable) as a plain class
    from vllm.v1.sample.logits_processor import LogitsProcessor as _ProcessorBase
    from vllm.v1.sample.logits_processor import MoveDirectionality
except ImportError:  # pragma: no cover - depends on the install
    _ProcessorBase = object

    class MoveDirectionality(enum.Enum):  # vllm's, for running the processor without vllm
        UNIDIRECTIONAL = enum.auto()
        SWAP = enum.auto()


_KINDS = {"metadata": MetadataRequest, "codes": CodesRequest, "text": TextRequest}
LMRequest = MetadataRequest | CodesRequest | TextRequest


def cfg_scale_of(request: LMRequest) -> float:
    """The request's CFG scale; the LM's tasks (TextRequest) run without CFG."""
    return getattr(request, "cfg_scale", 1.0)


def request_to_args(request: LMRequest, pair: str, role: str) -> dict[str, Any]:
    """What one vllm request carries in `extra_args` (plain JSON: vllm ships it to its engine process)."""
    kind = next(name for name, cls in _KINDS.items() if isinstance(request, cls))
    body = dataclasses.asdict(request)
    body.pop("prompt"), body.pop("unconditional_prompt", None)  # the prompts travel as token ids, not twice
    return {EXTRA_KEY: {"pair": pair, "role": role, "kind": kind, "request": body}}


def request_from_args(args: dict[str, Any]) -> LMRequest:
    cls = _KINDS[args["kind"]]
    body = dict(args["request"], prompt="")
    if cls is not TextRequest:
        body["unconditional_prompt"] = ""
    body["sampling"] = Sampling(**body["sampling"])
    return cls(**body)


@dataclass
class _CallProgress:
    """One `generate` call's token count, reported as it grows; `stop` is what a report raised."""

    tokens: TokenProgress
    stop: Exception | None = None

    def update(self, done: int) -> None:
        if self.stop is not None:
            return
        try:
            self.tokens.update(done)
        except Exception as exc:  # noqa: BLE001 - re-raised by the call once its requests have ended
            self.stop = exc


_CALLS: dict[str, _CallProgress] = {}  # a generate call's key -> its progress, read by the processor


def _call_of(pair: str) -> str:
    """The generate call a pair key belongs to (pair keys are "<call>-<item>")."""
    return pair.rpartition("-")[0]


@dataclass
class _Pair:
    decoder: Decoder
    cfg_scale: float
    rows: int = 0  # rows of this pair in the batch
    unpaired: int = 0  # tokens decided while the partner row was not in the step


@dataclass
class _Row:
    pair: str
    role: str
    output: list[int]  # vllm's live list of this request's output token ids


@dataclass
class _Batch:
    pairs: dict[str, _Pair] = field(default_factory=dict)
    rows: dict[int, _Row] = field(default_factory=dict)


class PairedCfgLogitsProcessor(_ProcessorBase):
    """vllm V1 logits processor: CFG over request pairs and our constrained decisions (see module doc)."""

    def __init__(self, vllm_config=None, device=None, is_pin_memory: bool = False, *, vocabulary: Vocabulary | None = None):
        self.vocabulary = vocabulary or load_vocabulary(vllm_config.model_config.tokenizer)
        self.batch = _Batch()

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        args = (getattr(sampling_params, "extra_args", None) or {}).get(EXTRA_KEY)
        if args is None:
            return
        if args.get("role") not in (COND, UNCOND) or not args.get("pair"):
            raise ValueError(f"extra_args[{EXTRA_KEY!r}] needs a pair key and a role ({COND} or {UNCOND})")
        request_from_args(args)
        if getattr(sampling_params, "temperature", 0.0) != 0.0:
            raise ValueError("acestep LM requests sample greedily in vllm: the processor decides each token")

    def is_argmax_invariant(self) -> bool:
        return False

    # ---- the persistent batch ---------------------------------------------------------------------

    def _drop(self, index: int) -> None:
        row = self.batch.rows.pop(index, None)
        if row is None:
            return
        pair = self.batch.pairs[row.pair]
        pair.rows -= 1
        if pair.rows == 0:
            if pair.unpaired:
                log.warning("LM request %s: %d token(s) decided without the paired CFG row in the step",
                            row.pair, pair.unpaired)
            del self.batch.pairs[row.pair]

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._drop(index)
        for index, params, _prompt, output in batch_update.added:
            self._drop(index)
            args = (getattr(params, "extra_args", None) or {}).get(EXTRA_KEY)
            if args is None:
                continue  # not ours: left alone
            key = args["pair"]
            if key not in self.batch.pairs:
                request = request_from_args(args)
                self.batch.pairs[key] = _Pair(Decoder.for_request(self.vocabulary, request), cfg_scale_of(request))
            self.batch.pairs[key].rows += 1
            self.batch.rows[index] = _Row(key, args["role"], output)
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                row_a, row_b = self.batch.rows.pop(a, None), self.batch.rows.pop(b, None)
                if row_b is not None:
                    self.batch.rows[a] = row_b
            else:  # one way: whatever was at b is gone
                self._drop(b)
                row_a = self.batch.rows.pop(a, None)
            if row_a is not None:
                self.batch.rows[b] = row_a

    # ---- one step ---------------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        present: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)  # pair -> role -> (row, position)
        for index, row in self.batch.rows.items():
            if index < logits.shape[0]:
                present[row.pair][row.role] = (index, len(row.output))
        chosen: dict[int, int] = {}
        counts: dict[str, int] = {}  # generate call -> the most tokens any of its pairs has decided
        for key, members in present.items():
            pair = self.batch.pairs[key]
            call = _CALLS.get(_call_of(key))
            if call is not None and call.stop is not None:  # stopping: every row ends now
                chosen.update({index: self.vocabulary.end_id for index, _ in members.values()})
                continue
            tokens = pair.decoder.tokens
            for position in sorted({p for _, p in members.values()}):
                here = {role: index for role, (index, p) in members.items() if p == position}
                if position > len(tokens):
                    raise RuntimeError(f"LM request {key}: a row is at position {position}, past the "
                                       f"{len(tokens)} tokens decided")
                if position == len(tokens):
                    if pair.decoder.done:
                        token = self.vocabulary.end_id
                    elif not pair.decoder.wants_logits:
                        token = pair.decoder.decide(None)  # a forced token
                    else:
                        token = pair.decoder.decide(self._guided(logits, here, pair))
                else:
                    token = tokens[position]
                for index in here.values():
                    chosen[index] = token
            if call is not None:
                counts[_call_of(key)] = max(counts.get(_call_of(key), 0), len(tokens))
        for name, done in counts.items():
            _CALLS[name].update(done)
        if chosen:
            rows = torch.tensor(list(chosen), device=logits.device)
            logits[rows] = float("-inf")
            logits[rows, torch.tensor(list(chosen.values()), device=logits.device)] = 0.0
        return logits

    @staticmethod
    def _guided(logits: torch.Tensor, here: dict[str, int], pair: _Pair) -> torch.Tensor:
        if pair.cfg_scale == 1.0:
            return logits[here[COND]].float() if COND in here else logits[here[UNCOND]].float()
        if COND in here and UNCOND in here:
            cond, uncond = logits[here[COND]].float(), logits[here[UNCOND]].float()
            return uncond + pair.cfg_scale * (cond - uncond)
        pair.unpaired += 1
        return logits[next(iter(here.values()))].float()


class VllmBackend:
    """LMBackend on a vllm `LLM` engine (`lm_backend: "vllm"`)."""

    backend = "vllm"

    def __init__(self, name: str, llm, vocabulary: Vocabulary, sampling_params=None, step_tokens: int = STEP_TOKENS):
        self.name = name
        self.step_tokens = step_tokens  # the engine's max_num_batched_tokens
        self.llm = llm
        self.vocabulary = vocabulary
        self.tokenizer = vocabulary.tokenizer
        if sampling_params is None:
            from vllm import SamplingParams as sampling_params
        self._params = sampling_params
        self._lock = threading.Lock()  # one engine, one caller at a time

    @classmethod
    def start(cls, path: Path, *, gpu_memory_utilization: float, max_model_len: int) -> "VllmBackend":
        """An engine for the LM checkpoint folder, local files only, bf16, our logits processor.

        The engine runs in this process (no engine-core or executor subprocesses): the worker runs the
        pipeline in a daemon child process, which may not start processes of its own."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from vllm import LLM

        llm = LLM(
            model=str(path), tokenizer=str(path), dtype="bfloat16", seed=0,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, STEP_TOKENS),
            logits_processors=[PairedCfgLogitsProcessor], distributed_executor_backend="uni",
        )
        return cls(Path(path).name, llm, load_vocabulary(str(path)))

    def generate_metadata(self, request: MetadataRequest, report: TokenReport | None = None) -> str:
        return self._run([request], report)[0]

    def generate_codes(self, requests: list[CodesRequest], report: TokenReport | None = None) -> list[str]:
        return self._run(requests, report)

    def generate_text(self, request: TextRequest, report: TokenReport | None = None) -> str:
        return self._run([request], report)[0]

    def _run(self, requests: list[LMRequest], report: TokenReport | None) -> list[str]:
        """Each request as its row(s); calls sized so that every prompt of one call is prefilled in
        its first step (see the module doc). Calls split this way report one after another."""
        texts: list[str] = []
        chunk: list[tuple[LMRequest, list[tuple[list[int], str]]]] = []
        chunks = []
        tokens = 0
        for request in requests:
            rows = [(self.vocabulary.encode(request.prompt), COND)]
            if cfg_scale_of(request) != 1.0:
                rows.append((self.vocabulary.encode(request.unconditional_prompt), UNCOND))
            size = sum(len(ids) for ids, _ in rows)
            if chunk and tokens + size > self.step_tokens:
                chunks.append(chunk)
                chunk, tokens = [], 0
            chunk.append((request, rows))
            tokens += size
        if chunk:
            chunks.append(chunk)
        total = sum(max(most_tokens(request) for request, _ in c) for c in chunks)
        before = 0
        for c in chunks:
            texts += self._generate(c, _shifted(report, before, total))
            before += max(most_tokens(request) for request, _ in c)
        return texts

    def _generate(self, chunk, report: TokenReport | None) -> list[str]:
        prompts, params = [], []
        batch = uuid.uuid4().hex
        for i, (request, rows) in enumerate(chunk):
            for ids, role in rows:
                prompts.append({"prompt_token_ids": ids})
                params.append(self._params(
                    temperature=0.0, max_tokens=request.max_new_tokens, ignore_eos=True,
                    stop_token_ids=[self.vocabulary.end_id], skip_special_tokens=False,
                    extra_args=request_to_args(request, f"{batch}-{i}", role),
                ))
        call = _CallProgress(TokenProgress(report, max(most_tokens(request) for request, _ in chunk)))
        if report is not None:
            _CALLS[batch] = call
        try:
            with self._lock:
                outputs = self.llm.generate(prompts, params, use_tqdm=False)
        finally:
            _CALLS.pop(batch, None)
        if call.stop is not None:
            raise call.stop
        texts, position = [], 0
        for _request, rows in chunk:
            out = outputs[position].outputs[0]  # the conditional row's
            position += len(rows)
            ids = list(out.token_ids)
            if out.finish_reason == "stop" and (not ids or ids[-1] != self.vocabulary.end_id):
                ids.append(self.vocabulary.end_id)  # a stop token vllm left out of the ids
            texts.append(self.tokenizer.decode(ids, skip_special_tokens=False))
        return texts


def _shifted(report: TokenReport | None, before: int, total: int) -> TokenReport | None:
    """`report` for one of the calls a request list was split into: its tokens counted after the
    `before` tokens of the calls ahead of it, out of the `total` of them all."""
    if report is None:
        return None
    return lambda done, _most: report(before + done, total)
