"""The DiT's `config.json`, read into a typed object.

The file is the one the reference's configuration class writes (real checkpoints and the conformance
fixture alike). Every field the modules need is required and named when missing; fields we do not
use (`auto_map`, `transformers_version`, `architectures`, ...) are accepted and ignored."""

import json
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """The DiT config.json is missing a field or holds a value we cannot build from."""


@dataclass(frozen=True)
class DiTConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    layer_types: tuple[str, ...]
    sliding_window: int | None
    use_sliding_window: bool
    in_channels: int
    patch_size: int
    audio_acoustic_hidden_dim: int
    text_hidden_dim: int
    timbre_hidden_dim: int
    num_lyric_encoder_hidden_layers: int
    num_timbre_encoder_hidden_layers: int
    num_attention_pooler_hidden_layers: int
    pool_window_size: int
    fsq_dim: int
    fsq_input_levels: tuple[int, ...]
    fsq_input_num_quantizers: int
    head_dim: int | None = None
    attention_bias: bool = False
    # The XL variants run the condition encoder, tokenizer and detokenizer at a smaller width.
    encoder_hidden_size: int | None = None
    encoder_intermediate_size: int | None = None
    encoder_num_attention_heads: int | None = None
    encoder_num_key_value_heads: int | None = None
    rope_scaling: dict | None = None
    model_version: str | None = None
    is_turbo: bool | None = None
    timbre_fix_frame: int = 750

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def turbo(self) -> bool:
        """Turbo (distilled, CFG-free, fixed 8-step schedules) versus base/SFT checkpoints."""
        if self.is_turbo is not None:
            return bool(self.is_turbo)
        return (self.model_version or "turbo") == "turbo"

    def window_for(self, layer_index: int) -> int | None:
        """The bidirectional window of layer `layer_index` of any stack, or None for full attention."""
        if self.layer_types[layer_index] == "sliding_attention" and self.use_sliding_window:
            return self.sliding_window
        return None

    def encoder_config(self) -> "DiTConfig":
        """The config the condition encoder, tokenizer and detokenizer are built with."""
        width = self.encoder_hidden_size or self.hidden_size
        if width == self.hidden_size:
            return self
        return replace(
            self,
            hidden_size=width,
            intermediate_size=self.encoder_intermediate_size or self.intermediate_size,
            num_attention_heads=self.encoder_num_attention_heads or self.num_attention_heads,
            num_key_value_heads=self.encoder_num_key_value_heads or self.num_key_value_heads,
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> "DiTConfig":
        known = {f.name: f for f in fields(cls)}
        required = [name for name, f in known.items() if f.default is MISSING]
        missing = [name for name in required if raw.get(name) is None and not _optional_null(name, raw)]
        if missing:
            raise ConfigError(f"{source} is missing required field(s): {', '.join(missing)}")
        values = {name: raw[name] for name in known if name in raw}
        values["layer_types"] = tuple(raw["layer_types"])
        values["fsq_input_levels"] = tuple(int(v) for v in raw["fsq_input_levels"])
        config = cls(**values)
        config._validate(source)
        return config

    @classmethod
    def from_file(cls, path: Path) -> "DiTConfig":
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"{path} does not exist") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc})") from exc
        return cls.from_dict(raw, source=str(path))

    def _validate(self, source: str) -> None:
        encoder = self.encoder_config()
        stacks = {
            "num_hidden_layers": self.num_hidden_layers,
            "num_lyric_encoder_hidden_layers": min(self.num_lyric_encoder_hidden_layers, self.num_hidden_layers),
            "num_timbre_encoder_hidden_layers": min(self.num_timbre_encoder_hidden_layers, self.num_hidden_layers),
            "num_attention_pooler_hidden_layers": self.num_attention_pooler_hidden_layers,
        }
        for name, count in stacks.items():
            if count > len(self.layer_types):
                raise ConfigError(f"{source}: layer_types has {len(self.layer_types)} entries but {name} needs {count}")
        unknown = sorted(set(self.layer_types) - {"sliding_attention", "full_attention"})
        if unknown:
            raise ConfigError(f"{source}: unknown layer_types value(s) {unknown}")
        if self.use_sliding_window and "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ConfigError(f"{source}: sliding_window must be set when use_sliding_window is true")
        for cfg in (self, encoder):
            if cfg.num_attention_heads % cfg.num_key_value_heads:
                raise ConfigError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
        if self.in_channels != 3 * self.audio_acoustic_hidden_dim:
            raise ConfigError(f"{source}: in_channels must be 3 x audio_acoustic_hidden_dim (src | chunk mask | x_t)")
        if self.dim_per_head % 2:
            raise ConfigError(f"{source}: head_dim must be even for rotary embeddings")
        if self.rope_scaling and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) not in (None, "default"):
            raise ConfigError(f"{source}: rope_scaling {self.rope_scaling} is not supported")


def _optional_null(name: str, raw: dict) -> bool:
    """`sliding_window` may be null when no layer slides."""
    return name == "sliding_window" and name in raw and not raw.get("use_sliding_window", True)
