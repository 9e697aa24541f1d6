"""The parameter pytree of the CogVideoX port: names, shapes, random init, quantization.

Layout: a nested dict keyed by the diffusers state-dict names split at dots, e.g.
diffusers "patch_embed.proj.weight" -> params["patch_embed"]["proj"]["weight"]. The
`num_layers` transformer blocks are stacked along a leading layer axis under
params["transformer_blocks"]: diffusers "transformer_blocks.{i}.attn1.to_q.weight" [N, K] is
row i of params["transformer_blocks"]["attn1"]["to_q"]["weight"] [L, N, K].

A block linear (see model.LINEAR_NAMES) is either {"weight": [L, N, K], "bias": [L, N]} (bias
absent when the checkpoint has none) or a stacked QuantizedLinear stored under the same
name, e.g. params["transformer_blocks"]["attn1"]["to_q"] = QuantizedLinear(...) with a leading
L axis on every array. Weights keep PyTorch's [out, in] layout (patch_embed.proj: [D, C, p, p]).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from models.cogvideox.config import CogVideoXConfig
from mpqjax.qlinear import QuantizedLinear, pick_hadamard_block, quantize_linear

BLOCKS = "transformer_blocks"
# The 8 linears of one block, in the fixed order used by modes[L, 8] and the stats.
LINEAR_NAMES = ("norm1.linear", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "norm2.linear", "ff.net.0.proj", "ff.net.2")
# Indices of the adaptive-norm modulation linears: input is one row per sample, so they
# always run in Mode.BF16 (W4A16) when quantized.
MODULATION_LINEARS = (0, 5)


def block_param_shapes(config: CogVideoXConfig) -> dict[str, tuple[int, ...]]:
  """Per-block diffusers names (without "transformer_blocks.{i}.") -> shape."""
  d, dh, ted, ff = config.inner_dim, config.attention_head_dim, config.time_embed_dim, \
      config.ff_inner_dim
  s: dict[str, tuple[int, ...]] = {}
  for n in ("norm1", "norm2"):
    s[f"{n}.linear.weight"] = (6 * d, ted)
    s[f"{n}.linear.bias"] = (6 * d,)
    if config.norm_elementwise_affine:
      s[f"{n}.norm.weight"] = (d,)
      s[f"{n}.norm.bias"] = (d,)
  for n in ("norm_q", "norm_k"):  # diffusers Attention: affine qk LayerNorm, always
    s[f"attn1.{n}.weight"] = (dh,)
    s[f"attn1.{n}.bias"] = (dh,)
  for n in ("to_q", "to_k", "to_v"):
    s[f"attn1.{n}.weight"] = (d, d)
    if config.attention_bias:
      s[f"attn1.{n}.bias"] = (d,)
  s["attn1.to_out.0.weight"] = (d, d)
  s["attn1.to_out.0.bias"] = (d,)
  s["ff.net.0.proj.weight"] = (ff, d)
  s["ff.net.0.proj.bias"] = (ff,)
  s["ff.net.2.weight"] = (d, ff)
  s["ff.net.2.bias"] = (d,)
  return s


def num_video_patches(config: CogVideoXConfig) -> int:
  """Video tokens at the config's sample size (the learned positional table's length)."""
  p = config.patch_size
  frames = (config.sample_frames - 1) // config.temporal_compression_ratio + 1
  return (config.sample_height // p) * (config.sample_width // p) * frames


def outer_param_shapes(config: CogVideoXConfig) -> dict[str, tuple[int, ...]]:
  """Diffusers names -> shape for everything outside the transformer blocks."""
  d, ted, p = config.inner_dim, config.time_embed_dim, config.patch_size
  s: dict[str, tuple[int, ...]] = {
      "patch_embed.proj.weight": (d, config.in_channels, p, p),
      "patch_embed.proj.bias": (d,),
      "patch_embed.text_proj.weight": (d, config.text_embed_dim),
      "patch_embed.text_proj.bias": (d,),
      "time_embedding.linear_1.weight": (ted, d),
      "time_embedding.linear_1.bias": (ted,),
      "time_embedding.linear_2.weight": (ted, ted),
      "time_embedding.linear_2.bias": (ted,),
      "norm_out.linear.weight": (2 * d, ted),
      "norm_out.linear.bias": (2 * d,),
      "proj_out.weight": (p * p * config.out_dim, d),
      "proj_out.bias": (p * p * config.out_dim,),
  }
  if config.use_learned_positional_embeddings:
    s["patch_embed.pos_embedding"] = (1, config.max_text_seq_length + num_video_patches(config), d)
  if config.norm_elementwise_affine:
    for n in ("norm_final", "norm_out.norm"):
      s[f"{n}.weight"] = (d,)
      s[f"{n}.bias"] = (d,)
  return s


def checkpoint_shapes(config: CogVideoXConfig) -> dict[str, tuple[int, ...]]:
  """Every tensor a diffusers checkpoint of this config holds: name -> shape."""
  s = dict(outer_param_shapes(config))
  for i in range(config.num_layers):
    for k, v in block_param_shapes(config).items():
      s[f"{BLOCKS}.{i}.{k}"] = v
  return s


def is_block_linear_weight(block_key: str) -> bool:
  return block_key.endswith(".weight") and block_key[:-len(".weight")] in LINEAR_NAMES


def get_path(tree: dict, dotted: str) -> Any:
  for part in dotted.split("."):
    tree = tree[part]
  return tree


def set_path(tree: dict, dotted: str, value: Any) -> None:
  parts = dotted.split(".")
  for part in parts[:-1]:
    tree = tree.setdefault(part, {})
  tree[parts[-1]] = value


def flatten(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted name, leaf) pairs; a QuantizedLinear counts as one leaf."""
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, dict):
      yield from flatten(v, name + ".")
    else:
      yield name, v


def is_quantized(params: dict) -> bool:
  return isinstance(get_path(params[BLOCKS], LINEAR_NAMES[1]), QuantizedLinear)


def init_params(config: CogVideoXConfig, seed: int | np.random.Generator = 0,
                dtype=jnp.float32) -> dict:
  """Random parameters (for tests and tiny configs): weights ~ N(0, 1/fan_in), biases and
  the learned positional table ~ N(0, 0.02^2), norm scales ~ 1 + N(0, 0.1^2). Blocks stacked
  [L, ...]. Drawn with numpy (fast, no per-op dispatch), returned as jax arrays of `dtype`."""
  rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
  shapes = dict(outer_param_shapes(config))
  for k, v in block_param_shapes(config).items():
    shapes[f"{BLOCKS}.{k}"] = (config.num_layers, *v)
  params: dict = {}
  for name, shape in sorted(shapes.items()):
    x = rng.standard_normal(shape, dtype=np.float32)
    core = shape[1:] if name.startswith(BLOCKS + ".") else shape
    if "norm" in name and "linear" not in name and name.endswith(".weight"):
      x = 1.0 + 0.1 * x
    elif name.endswith(".bias") or name.endswith("pos_embedding"):
      x = 0.02 * x
    else:
      x = x / np.sqrt(np.prod(core[1:]))
    set_path(params, name, jnp.asarray(x, dtype))
  return params


def quantize_block_linear(weight: np.ndarray, bias: np.ndarray | None, *, weight_format: str,
                          name: str) -> QuantizedLinear:
  """One [N, K] block linear -> QuantizedLinear (Hadamard block picked from K)."""
  return quantize_linear(weight, bias, hadamard=pick_hadamard_block(weight.shape[-1]),
                         weight_format=weight_format, name=name)


def stack_layers(layers: list) -> Any:
  """Per-layer pytrees (QuantizedLinear or arrays) -> one with a leading layer axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


def quantize_blocks(params: dict, *, weight_format: str = "nvfp4",
                    linears: tuple[str, ...] = LINEAR_NAMES,
                    on_layer: Callable[[str, int], None] | None = None) -> dict:
  """Copy of `params` with the named block linears replaced by stacked QuantizedLinears."""
  out = jax.tree.map(lambda x: x, params, is_leaf=lambda x: isinstance(x, QuantizedLinear))
  blocks = out[BLOCKS]
  for name in linears:
    lin = get_path(blocks, name)
    if isinstance(lin, QuantizedLinear):
      continue
    w, b = lin["weight"], lin.get("bias")
    layers = []
    for i in range(w.shape[0]):
      layers.append(quantize_block_linear(w[i], None if b is None else b[i],
                                          weight_format=weight_format,
                                          name=f"{BLOCKS}.{i}.{name}.weight"))
      if on_layer:
        on_layer(name, i)
    set_path(blocks, name, stack_layers(layers))
  return out
