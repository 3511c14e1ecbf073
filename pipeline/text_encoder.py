"""The DiT's text side: Qwen3-Embedding-0.6B for caption prompts, its embedding table for lyric prompts.

What the reference does (`acestep/core/generation/handler/conditioning_text.py` and
`conditioning_embed.py`; the older monolithic `acestep/handler.py` alike), and what this matches:

* Tokenizer and model come from the `Qwen3-Embedding-0.6B/` folder with plain
  `AutoTokenizer.from_pretrained` / `AutoModel.from_pretrained` (a `Qwen3Model`; no remote code).
* Each prompt is tokenized on its own with `truncation=True, max_length=256` (captions) or 2048
  (lyrics), so the tokenizer's `padding_side` never comes into play; the per-item ids are then padded
  on the RIGHT with `pad_token_id` (`<|endoftext|>`) to the longest item, the attention mask with 0.
  Here the batch is tokenized in one call with the tokenizer's `padding_side` set to "right"
  whatever its config says, which gives the same ids and mask.
* Truncation uses the tokenizer's own `truncation_side` (transformers' default "right": the start is
  kept, a truncated prompt loses its trailing `<|endoftext|>`). Tokens the tokenizer's post-processor
  adds count towards the limit: Qwen/Qwen3-Embedding-0.6B's tokenizer.json appends `<|endoftext|>` to
  every sequence since its June 2025 revision (QwenLM/Qwen3-Embedding#54), so a caption prompt then
  ends `<|endoftext|>`, `\\n`, `<|endoftext|>` (not verified for the copy in ACE-Step's main repo).
* Captions: full forward, `last_hidden_state`. The reference passes no attention mask to the model;
  with causal attention and right padding the valid positions never see padding, so their hidden
  states are the same either way. Neither is the mask passed here.
* Lyrics: only `embed_tokens` (the input embedding table), no transformer layers.
"""

from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.prompts import CAPTION_MAX_TOKENS, LYRIC_MAX_TOKENS


class TextEncoder:
    """Qwen3-Embedding-0.6B with its tokenizer; `encode_text` for captions, `embed_lyrics` for lyrics."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        if tokenizer.pad_token_id is None:
            raise ValueError("the text tokenizer has no pad token; Qwen3-Embedding pads with <|endoftext|>")
        tokenizer.padding_side = "right"
        self.model = model.eval()
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, path: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "TextEncoder":
        """Load model and tokenizer from a local Qwen3-Embedding-0.6B folder; nothing is downloaded."""
        model = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        return cls(model.to(device=device, dtype=dtype), tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    def tokenize(self, prompts: list[str], max_tokens: int) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask, both [B, T] int64 on the model's device, right-padded, truncated to max_tokens."""
        if not prompts:
            raise ValueError("prompts must hold at least one prompt")
        batch = self.tokenizer(prompts, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device, torch.int64)

    @torch.inference_mode()
    def encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Caption prompts -> last_hidden_state [B, T, hidden] and attention mask [B, T] (int64), at most 256 tokens."""
        input_ids, mask = self.tokenize(prompts, CAPTION_MAX_TOKENS)
        return self.model(input_ids=input_ids).last_hidden_state, mask

    @torch.inference_mode()
    def embed_lyrics(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Lyric prompts -> input embeddings only [B, T, hidden] and attention mask [B, T] (int64), at most 2048 tokens."""
        input_ids, mask = self.tokenize(prompts, LYRIC_MAX_TOKENS)
        return self.model.get_input_embeddings()(input_ids), mask
