"""NVFP4 weight -> per-channel INT8 (the W4A8 weight), as one gather-free XLA fusion.

  nvfp4_to_int8(layer) -> s8[N, K]  ==  qlinear_xla.weight_as_int8(layer), bit for bit

The reference decodes e2m1 codes through a 16-entry table (an XLA gather that does not fuse
and materialises f32 [N, K]). Here the e2m1 value is built from the code's bits instead:
for magnitude code c = 2e + m (e in 0..3, m in 0..1), value = 0.5 m if e == 0, else
(1 + m/2) 2^(e-1), i.e. the f32 bit pattern ((e + 126) << 23) | (m << 22), plus the sign.
The remaining arithmetic is the reference's, in the same order:
round(((e2m1 * f32(s_block)) * g) / w_int8_scale[n]), clipped to +-127.
Reads 0.5625 B and writes 1 B per weight element.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mpqjax import formats, qlinear_xla


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
  """No tunables: a single elementwise fusion."""


def e2m1_decode_bits(code: jax.Array) -> jax.Array:
  """uint8 e2m1 codes (low nibble) -> float32, without a table lookup."""
  c = code.astype(jnp.uint32) & 0xF
  e, m = (c >> 1) & 3, c & 1
  normal = ((e + 126) << 23) | (m << 22)
  bits = jnp.where(e > 0, normal, m * jnp.uint32(126 << 23))
  bits = bits | ((c >> 3) << 31)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def nvfp4_to_int8(layer) -> jax.Array:
  """s8[N, K] for an nvfp4-format QuantizedLinear (int8-format: its own values)."""
  if layer.weight_format == "int8":
    return layer.weight.values
  t = layer.weight
  with jax.named_scope("nvfp4_to_int8"):
    vals = e2m1_decode_bits(formats.unpack_nibbles(t.codes))
    vals = vals.reshape(*vals.shape[:-1], -1, formats.NVFP4_BLOCK)
    w = (vals * t.scales.astype(jnp.float32)[..., None]).reshape(t.shape)
    w = w * t.global_scale
    return jnp.clip(jnp.round(w / layer.w_int8_scale), -127, 127).astype(jnp.int8)


reference = qlinear_xla.weight_as_int8
