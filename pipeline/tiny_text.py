"""Tiny random text models in the real Hugging Face layout, built offline.

`build_tiny_text_encoder` lays out a folder like `Qwen3-Embedding-0.6B/` and `build_tiny_lm` one like
`acestep-5Hz-lm-1.7B/`: config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
chat_template.jinja. They load through exactly the code that loads the real ones
(`TextEncoder.load`, `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained`), so tests exercise
the real path without downloading anything.

The tokenizer is a small byte-level BPE with Qwen2's normaliser (NFC), pre-tokeniser and decoder,
trained in milliseconds on the built-in corpus below. Being byte-level it encodes any text (Chinese
lyrics, emoji) without unknown tokens. Its ids differ from the real Qwen vocabulary; only the
special tokens and their behaviour are the same.
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import GenerationConfig, Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM, Qwen3Model

CHAT_TEMPLATE_PATH = Path(__file__).parent / "data" / "qwen3_chat_template.jinja"

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
QWEN_SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)
# Real Qwen3 tokenizers add <think> and </think> as plain (not special) added tokens: decoding with
# skip_special_tokens keeps them.
QWEN_THINK_TOKENS = ("<think>", "</think>")
MODEL_MAX_LENGTH = 131072

# Qwen2/Qwen3's pre-tokenisation regex (the one transformers' Qwen2Tokenizer rebuilds on load).
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_BPE_MERGES = 400

_CORPUS = (
    "# Instruction\nFill the audio semantic mask based on the given conditions:\n\n",
    "# Instruction\nGenerate audio semantic tokens based on the given conditions:\n\n",
    "# Instruction\nRepaint the mask area based on the given conditions:\n\n",
    "# Caption\nAn upbeat synthwave track with driving analog bass, punchy retro drum machine and dreamy pads.\n\n",
    "# Caption\nA calm ambient piano piece with gentle sustain, soft rain and a slow evolving pad.\n\n",
    "# Caption\nA funky house groove with a four-on-the-floor kick, chopped vocal samples and slap bass.\n\n",
    "# Caption\nAn epic stadium rock anthem with distorted guitars, thunderous drums and a soaring male vocal.\n\n",
    "# Caption\nA tender ballad with soft piano, warm strings and an intimate female vocal.\n\n",
    "# Metas\n- bpm: 120\n- timesignature: 4\n- keyscale: C major\n- duration: 180 seconds\n",
    "# Metas\n- bpm: 96\n- timesignature: 3/4\n- keyscale: G minor\n- duration: 30 seconds\n",
    "# Languages\nen\n\n# Lyric\n[Verse 1]\nWalking down the empty street\nNeon lights beneath my feet\n\n",
    "[Chorus]\nWe are the night, we are the sound\nHold me close, don't let me down\n\n",
    "[Verse 2]\nThe city hums a song of endless light and rain\nI'll be waiting, calling out your name\n\n",
    "[Bridge]\nOh oh oh, la la la, the rhythm of the heart\n[Outro]\n[Instrumental]\n[inst]\n",
    "<think>\nbpm: 73\ncaption: A calm piano melody\nduration: 273\ngenres: pop, rock, jazz, electronic\n",
    "keyscale: G major\nlanguage: en\ntimesignature: 4\n</think>\n",
    "# Languages\nzh\n\n# Lyric\n[Verse 1]\n月光洒在窗台上\n思念像风一样长\n我在等你回来\n等到花儿都开\n\n",
    "# Languages\nja\n\n# Lyric\n[Verse]\n夜空に光る星のように\n君の声が聞こえる\nずっと一緒にいたい\n\n",
)


def chat_template() -> str:
    """The Qwen3 chat template (the later, 89-line revision with `message.content is string` guards)."""
    return CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")


def _train_bpe() -> Tokenizer:
    tokenizer = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + _BPE_MERGES, initial_alphabet=alphabet, show_progress=False, special_tokens=[]
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer


def build_tokenizer(
    special_tokens: Sequence[str] = QWEN_SPECIAL_TOKENS,
    audio_code_tokens: int = 0,
    *,
    added_tokens: Sequence[str] = QWEN_THINK_TOKENS,
    append_end_of_text: bool = False,
) -> Qwen2TokenizerFast:
    """A small byte-level BPE tokenizer with the Qwen special tokens and the Qwen3 chat template.

    `special_tokens` become special added tokens (the first ones get the lowest ids), then the plain
    `added_tokens`, then `<|audio_code_0|>` … `<|audio_code_{N-1}|>` (special) when
    `audio_code_tokens` is N > 0. eos is `<|im_end|>` and pad `<|endoftext|>`, as in the real Qwen3
    and Qwen3-Embedding tokenizers. `append_end_of_text` appends `<|endoftext|>` to every encoded
    sequence, as the current Qwen3-Embedding tokenizer.json's TemplateProcessing does.
    """
    if audio_code_tokens < 0:
        raise ValueError(f"audio_code_tokens must be >= 0; got {audio_code_tokens}")
    tokenizer = _train_bpe()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added_tokens])
    tokenizer.add_special_tokens(
        [AddedToken(f"<|audio_code_{i}|>", special=True, normalized=False) for i in range(audio_code_tokens)]
    )
    if append_end_of_text:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {END_OF_TEXT}:0",
            pair=f"$A:0 {END_OF_TEXT}:0 $B:1 {END_OF_TEXT}:1",
            special_tokens=[(END_OF_TEXT, tokenizer.token_to_id(END_OF_TEXT))],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    wrapped = Qwen2TokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        unk_token=None,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
    )
    wrapped.chat_template = chat_template()
    return wrapped


def _qwen3_config(vocab_size: int, hidden_size: int, max_position_embeddings: int, bos: int, eos: int) -> Qwen3Config:
    """2 layers, 4 query / 2 key-value heads; everything else as in the real Qwen3 small models."""
    if hidden_size % 4:
        raise ValueError(f"hidden_size must be a multiple of 4 (4 attention heads); got {hidden_size}")
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=max_position_embeddings,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        architectures=["Qwen3ForCausalLM"],
        dtype="float32",
    )


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})


def build_tiny_text_encoder(path: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """A tiny random Qwen3-Embedding-0.6B lookalike in `path`, loadable by `TextEncoder.load`.

    Like the real checkpoint, the weights are a bare Qwen3Model (`embed_tokens.weight`,
    `layers.N.…`, `norm.weight`: no `model.` prefix, no lm_head) while config.json names
    Qwen3ForCausalLM, and the tokenizer appends `<|endoftext|>` to every sequence.
    """
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(QWEN_SPECIAL_TOKENS, append_end_of_text=True)
    end_of_text = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    config = _qwen3_config(len(tokenizer), hidden_size, 32768, bos=end_of_text, eos=end_of_text)
    torch.manual_seed(seed)
    model = Qwen3Model(config)
    config.save_pretrained(path)
    _save_weights(model.state_dict(), path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_lm(path: Path, seed: int = 0, audio_code_tokens: int = 64000, hidden_size: int = 32) -> Path:
    """A tiny random 5 Hz LM lookalike (Qwen3ForCausalLM + `<|audio_code_N|>` tokenizer) in `path`.

    The lm_head is tied to the embedding (`tie_word_embeddings` true, as in Qwen3-0.6B/1.7B), so
    model.safetensors holds no `lm_head.weight`. The vocabulary is the tokenizer's size.
    """
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(QWEN_SPECIAL_TOKENS, audio_code_tokens)
    end_of_text, im_end = tokenizer.convert_tokens_to_ids([END_OF_TEXT, IM_END])
    config = _qwen3_config(len(tokenizer), hidden_size, 40960, bos=end_of_text, eos=im_end)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    config.save_pretrained(path)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    _save_weights(state, path)
    generation = GenerationConfig(bos_token_id=end_of_text, eos_token_id=[im_end, end_of_text], pad_token_id=end_of_text)
    generation.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
