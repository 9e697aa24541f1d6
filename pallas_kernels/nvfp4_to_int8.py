"""NVFP4 weight -> per-channel INT8 (the W4A8 weight), as one gather-free XLA fusion.

  nvfp4_to_int8(layer) -> s8[N, K]  ==  qlinear_xla.weight_as_int8(layer), up to exact .5 ties
  (bit-equal on the H200 at every benchmarked shape, benchmarks/kernels.py conv_fast_mismatch_frac)

The arithmetic is the reference's, in the same order (formats' gather-free e2m1 decode):
round(((e2m1 * f32(s_block)) * g) / w_int8_scale[n]), clipped to +-127. It differs only in
the division, a plain one here that XLA may rewrite as a reciprocal multiply, where the
reference's formats.exact_div materialises the broadcast divisor to keep it exact.
Reads 0.5625 B and writes 1 B per weight element; both nibbles of a byte are converted
together and written as one uint16.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mpqjax import formats, qlinear_xla


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
  """No tunables: a single elementwise fusion."""


def nvfp4_to_int8(layer) -> jax.Array:
  """s8[N, K] for an nvfp4-format QuantizedLinear (int8-format: its own values)."""
  if layer.weight_format == "int8":
    return layer.weight.values
  t = layer.weight
  with jax.named_scope("nvfp4_to_int8"):
    # both elements of a packed byte go into one uint16 bitcast to the int8 pair (XLA:GPU
    # ran the interleave of two decoded halves at ~0.6 TB/s)
    def q(w):
      w = jnp.clip(jnp.round(w * t.global_scale / layer.w_int8_scale), -127, 127)
      return jax.lax.bitcast_convert_type(w.astype(jnp.int8), jnp.uint8).astype(jnp.uint16)
    low, high = formats.nvfp4_nibble_values(t)
    pair = (q(high) << 8) | q(low)
    return jax.lax.bitcast_convert_type(pair, jnp.int8).reshape(t.shape)


reference = qlinear_xla.weight_as_int8
