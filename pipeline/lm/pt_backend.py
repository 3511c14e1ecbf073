"""The `pt` backend: the 5 Hz LM on transformers with our own token loop: a KV cache, classifier-free
guidance over a paired unconditional sequence (both in one batch), and the decisions of
`decoding.Decoder` (constraints and sampling, shared with the vllm backend)."""

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from pipeline.lm.backend import CodesRequest, MetadataRequest, TextRequest, TokenProgress, TokenReport, most_tokens
from pipeline.lm.constrained import Vocabulary, load_vocabulary
from pipeline.lm.decoding import Decoder, guided

log = logging.getLogger(__name__)


class Session:
    """Sequences decoded together with one KV cache: [conditional items..., unconditional items...]
    when CFG is on. Prompts are left-padded; each step feeds one token (or a forced run) per row."""

    def __init__(self, model, prompts: list[list[int]], pad_id: int):
        self.model = model
        device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        self.device = device
        self.mask = mask.to(device)
        self.cache = DynamicCache()
        self.last = self._forward(ids.to(device))

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [rows, k] appended to every row; the logits after the last one [rows, V]."""
        tokens = tokens.to(self.device)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=1)
        self.last = self._forward(tokens)
        return self.last


class PtBackend:
    """LMBackend on transformers (`lm_backend: "pt"`)."""

    backend = "pt"

    def __init__(self, name: str, model, vocabulary: Vocabulary, path: Path | None = None):
        self.name = name
        self.path = path  # the checkpoint folder (a vllm engine for the same LM loads it from there)
        self.model = model.eval()
        self.vocabulary = vocabulary
        self.tokenizer = vocabulary.tokenizer
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.vocabulary.end_id

    @classmethod
    def load(cls, path: Path, *, device: torch.device, dtype: torch.dtype) -> "PtBackend":
        """The LM checkpoint folder (Qwen3 causal LM + tokenizer with the audio-code tokens), local only."""
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).to(device)
        return cls(Path(path).name, model, load_vocabulary(str(path)), Path(path))

    def _session(self, prompts: list[str], unconditional: list[str], cfg_scale: float) -> Session:
        texts = prompts + (unconditional if cfg_scale != 1.0 else [])
        return Session(self.model, [self.vocabulary.encode(t) for t in texts], self.pad_id)

    @torch.inference_mode()
    def generate_metadata(self, request: MetadataRequest, report: TokenReport | None = None) -> str:
        return self._decode_one(request, request.unconditional_prompt, request.cfg_scale, report)

    @torch.inference_mode()
    def generate_text(self, request: TextRequest, report: TokenReport | None = None) -> str:
        """The LM's tasks: one sequence, no CFG."""
        return self._decode_one(request, "", 1.0, report)

    def _decode_one(self, request: MetadataRequest | TextRequest, unconditional: str, cfg_scale: float,
                    report: TokenReport | None) -> str:
        session = self._session([request.prompt], [unconditional], cfg_scale)
        rows = session.last.shape[0]
        decoder = Decoder.for_request(self.vocabulary, request)
        progress = TokenProgress(report, most_tokens(request))
        while not decoder.done:
            run = decoder.forced_run()  # field names and user values: one forward for the whole run
            if run:
                session.feed(torch.tensor([run] * rows))
            else:
                token = decoder.decide(guided(session.last, 1, cfg_scale)[0])
                session.feed(torch.tensor([[token]] * rows))
            progress.update(len(decoder.tokens))
        return self.tokenizer.decode(decoder.tokens, skip_special_tokens=False)

    @torch.inference_mode()
    def generate_codes(self, requests: list[CodesRequest], report: TokenReport | None = None) -> list[str]:
        """Every item's codes in one batch (plus the unconditional rows when CFG is on)."""
        if not requests:
            return []
        cfg = requests[0].cfg_scale
        if any(r.cfg_scale != cfg for r in requests):
            raise ValueError("one batch of code requests shares one cfg_scale")
        session = self._session([r.prompt for r in requests], [r.unconditional_prompt for r in requests], cfg)
        items = len(requests)
        decoders = [Decoder.for_request(self.vocabulary, r) for r in requests]
        progress = TokenProgress(report, max(most_tokens(r) for r in requests))
        while not all(d.done for d in decoders):
            logits = guided(session.last, items, cfg)
            step = [self.pad_id if d.done else d.decide(logits[i]) for i, d in enumerate(decoders)]
            session.feed(torch.tensor(step * (session.last.shape[0] // items))[:, None])
            progress.update(max(len(d.tokens) for d in decoders))
        return [self.tokenizer.decode(d.tokens, skip_special_tokens=False) for d in decoders]
