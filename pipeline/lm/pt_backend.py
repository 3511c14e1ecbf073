"""The `pt` backend: the 5 Hz LM on transformers with our own token loop (KV cache, classifier-free
guidance over a paired unconditional sequence, constrained decoding, and the sampling order of the
reference: CFG, constraint mask, repetition penalty, top-k, top-p, temperature)."""

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from pipeline.lm.backend import CodesRequest, MetadataRequest, Sampling
from pipeline.lm.constrained import (
    FIELD_ORDER, MAX_CAPTION_TOKENS, Choice, Vocabulary, field_values, user_value_text,
)

log = logging.getLogger(__name__)


def sample_token(logits: torch.Tensor, allowed: torch.Tensor | None, sampling: Sampling, history: list[int],
                 generator: torch.Generator | None) -> int:
    """One token from `logits` [V] (float32), restricted to `allowed` (a bool mask or ids)."""
    logits = logits.float().clone()
    if allowed is not None:
        mask = torch.full_like(logits, float("-inf"))
        mask[allowed] = 0.0
        logits = logits + mask
    if sampling.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), device=logits.device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / sampling.repetition_penalty, values * sampling.repetition_penalty)
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and 0 < sampling.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative > sampling.top_p
        drop[1:] = drop[:-1].clone()
        drop[0] = False  # the most likely token always stays
        logits[order[drop]] = float("-inf")
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = (logits / sampling.temperature).softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())


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


def guided(logits: torch.Tensor, items: int, cfg_scale: float) -> torch.Tensor:
    """[2 x items, V] -> [items, V]: uncond + scale (cond - uncond); [items, V] as is without CFG."""
    if logits.shape[0] == items:
        return logits
    cond, uncond = logits[:items], logits[items:]
    return uncond + cfg_scale * (cond - uncond)


class PtBackend:
    """LMBackend on transformers (`lm_backend: "pt"`)."""

    def __init__(self, name: str, model, tokenizer):
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vocabulary = Vocabulary(tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.vocabulary.end_id

    @classmethod
    def load(cls, path: Path, *, device: torch.device, dtype: torch.dtype) -> "PtBackend":
        """The LM checkpoint folder (Qwen3 causal LM + tokenizer with the audio-code tokens), local only."""
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).to(device)
        return cls(Path(path).name, model, tokenizer)

    def _session(self, prompts: list[str], unconditional: list[str], cfg_scale: float) -> Session:
        texts = prompts + (unconditional if cfg_scale != 1.0 else [])
        return Session(self.model, [self.vocabulary.encode(t) for t in texts], self.pad_id)

    @torch.inference_mode()
    def generate_metadata(self, request: MetadataRequest) -> str:
        vocab = self.vocabulary
        session = self._session([request.prompt], [request.unconditional_prompt], request.cfg_scale)
        rows = session.last.shape[0]
        generator = torch.Generator().manual_seed(request.seed) if request.seed is not None else None
        written: list[int] = []

        def force(text: str) -> None:
            ids = vocab.encode(text)
            written.extend(ids)
            session.feed(torch.tensor([ids] * rows))

        def pick(allowed) -> int:
            token = sample_token(guided(session.last, 1, request.cfg_scale)[0], allowed, request.sampling, written, generator)
            written.append(token)
            session.feed(torch.tensor([[token]] * rows))
            return token

        force("<think>\n")
        user = request.user_metadata or {}
        skipped = {"caption": request.skip_caption, "language": request.skip_language, "genres": request.skip_genres}
        for name in FIELD_ORDER:
            if skipped.get(name):
                continue
            if user.get(name) is not None:
                force(user_value_text(name, user[name]))
                continue
            force(f"{name}:")
            values = field_values(name, request.max_duration)
            if values is not None:
                choice = Choice(vocab, values)
                while not choice.take(pick(choice.allowed())):
                    pass
            else:
                self._free_text(session, pick, generator, request, written, max_lines=None if name == "caption" else 1)
        written.append(vocab.end_id)  # where the reference would begin `</think>`, the end is forced
        return self.tokenizer.decode(written, skip_special_tokens=False)

    def _free_text(self, session: Session, pick, generator, request: MetadataRequest, written: list[int], max_lines) -> None:
        """Free text after `field:` up to a newline that the model does not continue with a space."""
        vocab = self.vocabulary
        lines, count = 0, 0
        while True:
            if count >= MAX_CAPTION_TOKENS:
                pick(torch.tensor(vocab.newline_ids))
                return
            token = pick(vocab.free_text)
            count += 1
            if vocab.token_bytes[token] != b"\n":
                continue
            lines += 1
            best = int(guided(session.last, 1, request.cfg_scale)[0].argmax())
            if (max_lines is not None and lines >= max_lines) or best not in vocab.continues_line:
                return

    @torch.inference_mode()
    def generate_codes(self, requests: list[CodesRequest]) -> list[str]:
        """Every item's codes in one batch (plus the unconditional rows when CFG is on)."""
        if not requests:
            return []
        vocab = self.vocabulary
        cfg = requests[0].cfg_scale
        if any(r.cfg_scale != cfg for r in requests):
            raise ValueError("one batch of code requests shares one cfg_scale")
        session = self._session([r.prompt for r in requests], [r.unconditional_prompt for r in requests], cfg)
        items = len(requests)
        generators = [torch.Generator().manual_seed(r.seed) if r.seed is not None else None for r in requests]
        outputs: list[list[int]] = [[] for _ in requests]
        codes = vocab.code_ids.to(session.device)
        end = torch.tensor([vocab.end_id], device=session.device)
        done = [False] * items
        while not all(done):
            logits = guided(session.last, items, cfg)
            step = []
            for i, request in enumerate(requests):
                if done[i]:
                    step.append(self.pad_id)
                    continue
                allowed = codes if len(outputs[i]) < request.n_codes else end
                token = sample_token(logits[i], allowed, request.sampling, outputs[i], generators[i])
                outputs[i].append(token)
                done[i] = token == vocab.end_id or len(outputs[i]) >= request.max_new_tokens
                step.append(token)
            session.feed(torch.tensor(step * (session.last.shape[0] // items))[:, None])
        return [self.tokenizer.decode(out, skip_special_tokens=False) for out in outputs]
