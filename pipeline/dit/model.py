"""The ACE-Step 1.5 DiT checkpoint as modules: `decoder` (the diffusion transformer), `encoder`
(text projection, lyric encoder, timbre encoder, packing), `tokenizer` (25 Hz latents -> 5 Hz FSQ
codes) and `detokenizer` (codes -> 25 Hz hints), with the reference's state-dict names."""

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.dit.config import DiTConfig
from pipeline.dit.fsq import ResidualFSQ
from pipeline.dit.layers import DiTLayer, EncoderStack, RMSNorm, TimestepEmbedding, rotary_tables, window_mask


def pack_sequences(first: torch.Tensor, second: torch.Tensor, first_mask: torch.Tensor, second_mask: torch.Tensor):
    """Concatenate two padded sequences and move valid positions to the front (stable), so padded
    positions follow in their original order. Returns the states and the new boolean mask."""
    states = torch.cat([first, second], dim=1)
    mask = torch.cat([first_mask, second_mask], dim=1)
    order = mask.argsort(dim=1, descending=True, stable=True)
    states = torch.gather(states, 1, order[..., None].expand_as(states))
    lengths = mask.sum(dim=1)
    new_mask = torch.arange(states.shape[1], device=states.device)[None] < lengths[:, None]
    return states, new_mask


class LyricEncoder(EncoderStack):
    def __init__(self, config: DiTConfig):
        super().__init__(config, config.num_lyric_encoder_hidden_layers, active_layers=config.num_hidden_layers)
        self.embed_tokens = nn.Linear(config.text_hidden_dim, config.hidden_size)

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.run_layers(self.embed_tokens(embeddings), key_padding=mask)


class TimbreEncoder(EncoderStack):
    """Reference latents -> one vector per reference (the output at its first frame), regrouped per
    batch item. `special_token` is in the checkpoint but unused by the reference's forward."""

    def __init__(self, config: DiTConfig):
        super().__init__(config, config.num_timbre_encoder_hidden_layers, active_layers=config.num_hidden_layers)
        self.embed_tokens = nn.Linear(config.timbre_hidden_dim, config.hidden_size)
        self.special_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, packed: torch.Tensor, order: torch.Tensor, batch_size: int):
        vectors = self.run_layers(self.embed_tokens(packed))[:, 0]
        counts = torch.bincount(order, minlength=batch_size)
        slots = int(counts.max())
        grouped = vectors.new_zeros(batch_size, slots, vectors.shape[-1])
        mask = torch.zeros(batch_size, slots, dtype=torch.long, device=vectors.device)
        seen = [0] * batch_size
        for n, item in enumerate(order.tolist()):
            grouped[item, seen[item]] = vectors[n]
            mask[item, seen[item]] = 1
            seen[item] += 1
        return grouped, mask


class ConditionEncoder(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.text_projector = nn.Linear(config.text_hidden_dim, config.hidden_size, bias=False)
        self.lyric_encoder = LyricEncoder(config)
        self.timbre_encoder = TimbreEncoder(config)

    def forward(
        self,
        text_hidden_states,
        text_attention_mask,
        lyric_hidden_states,
        lyric_attention_mask,
        refer_audio_acoustic_hidden_states_packed,
        refer_audio_order_mask,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed [lyrics | timbre | text] states for cross-attention, valid positions first."""
        text = self.text_projector(text_hidden_states)
        lyrics = self.lyric_encoder(lyric_hidden_states, lyric_attention_mask)
        timbre, timbre_mask = self.timbre_encoder(
            refer_audio_acoustic_hidden_states_packed, refer_audio_order_mask, text.shape[0]
        )
        states, mask = pack_sequences(lyrics, timbre, lyric_attention_mask, timbre_mask)
        return pack_sequences(states, text, mask, text_attention_mask)


class AttentionPooler(EncoderStack):
    """Each window of frames, with a learned token in front, through a small transformer; the output
    at the learned token is the window's vector."""

    def __init__(self, config: DiTConfig):
        super().__init__(config, config.num_attention_pooler_hidden_layers)
        self.embed_tokens = nn.Linear(config.hidden_size, config.hidden_size)
        self.special_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        batch, count, size, width = windows.shape
        x = self.embed_tokens(windows)
        x = torch.cat([self.special_token.expand(batch, count, 1, width).to(x.dtype), x], dim=2)
        x = self.run_layers(x.reshape(batch * count, size + 1, width))
        return x[:, 0].reshape(batch, count, width)


class AudioTokenizer(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.audio_acoustic_proj = nn.Linear(config.audio_acoustic_hidden_dim, config.hidden_size)
        self.attention_pooler = AttentionPooler(config)
        self.quantizer = ResidualFSQ(config.fsq_dim, config.fsq_input_levels, config.fsq_input_num_quantizers)

    def forward(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.quantizer(self.attention_pooler(self.audio_acoustic_proj(windows)))


class AudioDetokenizer(EncoderStack):
    """Each 5 Hz vector repeated over a window, plus learned per-position vectors, through a small
    transformer and projected to latent frames."""

    def __init__(self, config: DiTConfig):
        super().__init__(config, config.num_attention_pooler_hidden_layers)
        self.window = config.pool_window_size
        self.embed_tokens = nn.Linear(config.hidden_size, config.hidden_size)
        self.special_tokens = nn.Parameter(torch.zeros(1, config.pool_window_size, config.hidden_size))
        self.proj_out = nn.Linear(config.hidden_size, config.audio_acoustic_hidden_dim)

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        batch, count, width = quantized.shape
        x = self.embed_tokens(quantized)[:, :, None] + self.special_tokens[:, None].to(quantized.dtype)
        x = self.run_layers(x.reshape(batch * count, self.window, width))
        return self.proj_out(x).reshape(batch, count * self.window, -1)


class Patchify(nn.Module):
    """[B, T, C] -> strided Conv1d -> [B, T / patch, hidden] (state-dict index 1, as the reference's
    Sequential(transpose, conv, transpose))."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.add_module("1", conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, "1")(x.transpose(1, 2)).transpose(1, 2)


class CrossAttentionCache:
    """The condition states after `condition_embedder` and every layer's cross-attention keys and
    values: computed once per condition and reused by every sampler step."""

    def __init__(self, states: torch.Tensor, keys_values: list[tuple[torch.Tensor, torch.Tensor]],
                 mask: torch.Tensor | None = None):
        self.states = states
        self.keys_values = keys_values
        self.mask = mask  # additive [B, 1, 1, L] over the condition positions, or None: every one is seen


class DiTDecoder(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.patch_size = config.patch_size
        self.layers = nn.ModuleList(DiTLayer(config) for _ in range(config.num_hidden_layers))
        self.proj_in = Patchify(nn.Conv1d(config.in_channels, width, config.patch_size, stride=config.patch_size))
        self.time_embed = TimestepEmbedding(width)
        self.time_embed_r = TimestepEmbedding(width)
        self.condition_embedder = nn.Linear(config.encoder_hidden_size or width, width)
        self.norm_out = RMSNorm(width, config.rms_norm_eps)
        self.proj_out = Patchify(
            nn.ConvTranspose1d(width, config.audio_acoustic_hidden_dim, config.patch_size, stride=config.patch_size)
        )
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 2, width))

    def cross_cache(self, encoder_hidden_states: torch.Tensor, key_mask: torch.Tensor | None = None) -> CrossAttentionCache:
        """`key_mask` [B, L] (True: attend) hides condition positions from cross-attention: only the
        padding a batch of several jobs adds (one job alone sees all of its own, as the reference)."""
        states = self.condition_embedder(encoder_hidden_states)
        mask = None
        if key_mask is not None and not bool(key_mask.all()):
            mask = window_mask(key_mask.shape[1], None, key_mask, states.dtype, states.device)[:, :, :1]
        return CrossAttentionCache(states, [layer.cross_attn.keys_values(states) for layer in self.layers], mask)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        timestep_r: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        context_latents: torch.Tensor,
        cache: CrossAttentionCache | None = None,
        row_frames: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity [B, T, latent] for x_t `hidden_states` [B, T, latent]. Cross-attention sees every
        condition position (padding included) and self-attention has no padding mask: the reference
        accepts both masks and ignores them. `row_frames` [B] is only for rows of several lengths in one
        call (each row zero beyond its own length): self-attention then hides each row's patches past
        its length, so a row gets what it gets alone (`pipeline.dit_batch`)."""
        if cache is None:
            cache = self.cross_cache(encoder_hidden_states)
        temb_t, proj_t = self.time_embed(timestep)
        temb_r, proj_r = self.time_embed_r(timestep - timestep_r)
        temb, modulation = temb_t + temb_r, proj_t + proj_r

        x = torch.cat([context_latents, hidden_states], dim=-1)
        frames = x.shape[1]
        if frames % self.patch_size:
            x = F.pad(x, (0, 0, 0, self.patch_size - frames % self.patch_size))
        x = self.proj_in(x)
        length = x.shape[1]
        config = self.config
        rotary = rotary_tables(length, config.dim_per_head, config.rope_theta, x.device, x.dtype)
        keys = None
        if row_frames is not None:  # the patches of each row's own frames (its last one zero-padded, as alone)
            patches = torch.div(row_frames.to(x.device) + self.patch_size - 1, self.patch_size, rounding_mode="floor")
            keys = torch.arange(length, device=x.device)[None, :] < patches[:, None]
        masks: dict[int | None, torch.Tensor | None] = {}
        for index, layer in enumerate(self.layers):
            window = config.window_for(index)
            if window not in masks:
                masks[window] = window_mask(length, window, keys, x.dtype, x.device)
            x = layer(x, rotary, masks[window], modulation, cache.keys_values[index], cache.mask)
        shift, scale = (self.scale_shift_table + temb[:, None]).chunk(2, dim=1)
        x = (self.norm_out(x) * (1 + scale) + shift).to(x.dtype)
        return self.proj_out(x)[:, :frames]


class AceStepDiT(nn.Module):
    """The whole checkpoint (`AceStepConditionGenerationModel` in the reference)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        encoder_config = config.encoder_config()
        self.decoder = DiTDecoder(config)
        self.encoder = ConditionEncoder(encoder_config)
        self.tokenizer = AudioTokenizer(encoder_config)
        self.detokenizer = AudioDetokenizer(encoder_config)
        # Training-time CFG dropout embedding; kept so the checkpoint loads strictly.
        self.null_condition_emb = nn.Parameter(torch.zeros(1, 1, encoder_config.hidden_size))

    def tokenize(self, x: torch.Tensor, silence_latent: torch.Tensor, attention_mask: torch.Tensor):
        """25 Hz latents [B, T, C] -> (quantized [B, ceil(T/w), hidden], indices int32, pooled mask).
        The tail is padded to a whole window with the first frames of the silence latent."""
        window = self.config.pool_window_size
        remainder = x.shape[1] % window
        if remainder:
            pad = window - remainder
            x = torch.cat([x, silence_latent[:1, :pad].to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
            attention_mask = F.pad(attention_mask, (0, pad), value=0)
        batch, frames, channels = x.shape
        windows = x.reshape(batch, frames // window, window, channels)
        pooled_mask = attention_mask.to(x.dtype).reshape(batch, frames // window, window).amax(dim=-1)
        quantized, indices = self.tokenizer(windows)
        return quantized, indices, pooled_mask

    def detokenize(self, quantized: torch.Tensor) -> torch.Tensor:
        return self.detokenizer(quantized)

    def codes_to_quantized(self, indices: torch.Tensor) -> torch.Tensor:
        """FSQ codes [B, T5, num_quantizers] (or [B, T5]) -> quantized [B, T5, hidden]."""
        if indices.dim() == 2:
            indices = indices[..., None]
        return self.tokenizer.quantizer.from_indices(indices, dtype=self.null_condition_emb.dtype)

    def codes_to_hints(self, indices: torch.Tensor) -> torch.Tensor:
        return self.detokenize(self.codes_to_quantized(indices))
