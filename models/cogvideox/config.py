"""CogVideoXConfig: the fields of diffusers' CogVideoXTransformer3DModel config (0.42).

Field names, meanings and defaults are diffusers' own, so a diffusers `config.json` loads
with `CogVideoXConfig.from_json(path)`. Unknown fields, missing critical fields and
unsupported features are rejected with a UserInputError naming the field.

Unsupported (rejected, with the reason): CogVideoX 1.5's `patch_size_t` (temporal patching)
and `ofs_embed_dim` (the 1.5 I2V "ofs" embedding), `patch_bias=False`, feed-forward
activations other than gelu/gelu-approximate.

Presets follow the released diffusers configs of THUDM/CogVideoX-2b and THUDM/CogVideoX-5b
(transformer/config.json): both have 64-dim heads, time_embed_dim 512, text_embed_dim 4096
(T5-XXL), 16 latent channels, patch 2, 226 text tokens, sample 60x90 latents / 49 frames,
spatial interpolation 1.875, gelu-approximate FFN (4x), biases everywhere, LayerNorm eps 1e-5.
  cogvideox-2b: 30 layers x 30 heads (1920 wide), 3D sin-cos positional embedding.
  cogvideox-5b: 42 layers x 48 heads (3072 wide), 3D RoPE (use_rotary_positional_embeddings).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from mpqjax.errors import UserInputError
from mpqjax.jsonio import read_json_object

# Fields diffusers writes into config.json that carry no model structure.
_IGNORED_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")
# Fields without which a config is ambiguous (diffusers' defaults would silently apply).
CRITICAL_FIELDS = ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers",
                   "text_embed_dim", "time_embed_dim", "patch_size")
FF_ACTIVATIONS = ("gelu-approximate", "gelu")
TIMESTEP_ACTIVATIONS = ("silu", "swish", "gelu", "relu", "mish")


@dataclasses.dataclass(frozen=True)
class CogVideoXConfig:
  num_attention_heads: int = 30
  attention_head_dim: int = 64
  in_channels: int = 16
  out_channels: int | None = 16
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  time_embed_dim: int = 512
  ofs_embed_dim: int | None = None
  text_embed_dim: int = 4096
  num_layers: int = 30
  dropout: float = 0.0
  attention_bias: bool = True
  sample_width: int = 90
  sample_height: int = 60
  sample_frames: int = 49
  patch_size: int = 2
  patch_size_t: int | None = None
  temporal_compression_ratio: int = 4
  max_text_seq_length: int = 226
  activation_fn: str = "gelu-approximate"
  timestep_activation_fn: str = "silu"
  norm_elementwise_affine: bool = True
  norm_eps: float = 1e-5
  spatial_interpolation_scale: float = 1.875
  temporal_interpolation_scale: float = 1.0
  use_rotary_positional_embeddings: bool = False
  use_learned_positional_embeddings: bool = False
  patch_bias: bool = True

  def __post_init__(self):
    def bad(field, why):
      raise UserInputError(f"CogVideoXConfig.{field}={getattr(self, field)!r}: {why}")
    for f in ("num_attention_heads", "attention_head_dim", "in_channels", "time_embed_dim",
              "text_embed_dim", "num_layers", "patch_size", "temporal_compression_ratio",
              "sample_width", "sample_height", "sample_frames"):
      v = getattr(self, f)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        bad(f, "must be a positive integer")
    if self.max_text_seq_length is None or self.max_text_seq_length < 0:
      bad("max_text_seq_length", "must be a non-negative integer")
    if self.out_channels is not None and self.out_channels <= 0:
      bad("out_channels", "must be a positive integer or None (= in_channels)")
    if self.patch_size_t is not None:
      bad("patch_size_t", "CogVideoX 1.5 temporal patching is not supported by this port "
          "(only CogVideoX 1.0 checkpoints: 2B and 5B); it must be null")
    if self.ofs_embed_dim:
      bad("ofs_embed_dim", "the CogVideoX 1.5 I2V 'ofs' embedding is not supported; it must "
          "be null")
    if not self.patch_bias:
      bad("patch_bias", "only patch_bias=true (all released checkpoints) is supported")
    if self.activation_fn not in FF_ACTIVATIONS:
      bad("activation_fn", f"supported: {FF_ACTIVATIONS}")
    if self.timestep_activation_fn not in TIMESTEP_ACTIVATIONS:
      bad("timestep_activation_fn", f"supported: {TIMESTEP_ACTIVATIONS}")
    if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
      bad("use_learned_positional_embeddings", "diffusers refuses learned positional "
          "embeddings without rotary embeddings; no such checkpoint exists")
    if not self.use_rotary_positional_embeddings and self.inner_dim % 16:
      bad("num_attention_heads", f"the 3D sin-cos embedding needs inner_dim "
          f"({self.inner_dim}) divisible by 16")
    if self.use_rotary_positional_embeddings and self.attention_head_dim % 8:
      bad("attention_head_dim", "3D RoPE needs attention_head_dim divisible by 8")

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def out_dim(self) -> int:
    """Output channels per latent pixel (out_channels, or in_channels when None)."""
    return self.out_channels if self.out_channels is not None else self.in_channels

  @property
  def ff_inner_dim(self) -> int:
    return 4 * self.inner_dim

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], *, source: str = "config") -> "CogVideoXConfig":
    """From a diffusers config dict. Unknown keys or missing critical keys: UserInputError."""
    if not isinstance(d, Mapping):
      raise UserInputError(f"{source}: expected a JSON object, got {type(d).__name__}")
    cls_name = d.get("_class_name")
    if cls_name not in (None, "CogVideoXTransformer3DModel"):
      raise UserInputError(f"{source}: _class_name is {cls_name!r}, expected "
                           "'CogVideoXTransformer3DModel' (pass the transformer/ subfolder)")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in names and k not in _IGNORED_KEYS)
    if unknown:
      raise UserInputError(f"{source}: unknown CogVideoX config field(s): {', '.join(unknown)}")
    missing = [k for k in CRITICAL_FIELDS if k not in d]
    if missing:
      raise UserInputError(f"{source}: missing required config field(s): {', '.join(missing)}")
    return cls(**{k: v for k, v in d.items() if k in names})

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> "CogVideoXConfig":
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config not found: {path}")
    return cls.from_dict(read_json_object(path), source=path)

  def to_dict(self) -> dict[str, Any]:
    """diffusers-style config dict (round-trips through from_dict)."""
    return {"_class_name": "CogVideoXTransformer3DModel", **dataclasses.asdict(self)}

  def replace(self, **kw) -> "CogVideoXConfig":
    return dataclasses.replace(self, **kw)


PRESETS: dict[str, CogVideoXConfig] = {
    "cogvideox-2b": CogVideoXConfig(num_attention_heads=30, num_layers=30,
                                    use_rotary_positional_embeddings=False),
    "cogvideox-5b": CogVideoXConfig(num_attention_heads=48, num_layers=42,
                                    use_rotary_positional_embeddings=True),
}
