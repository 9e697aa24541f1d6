"""NVFP4 activation quantizer for the W4A4 kernel, emitting QDQ bf16 (one XLA fusion chain).

  quantize_qdq(x[M, K], config) -> (v bf16[M, K], g f32[])
  v = formats.nvfp4_block_values(formats.quantize_nvfp4(rotate(x)))   e2m1 * f32(s), exact in bf16
  g = the tensor scale, applied by the matmul's epilogue

W4A4 on Hopper multiplies bf16 anyway (no FP4 tensor cores), so the matmul can take the
activation already decoded: v is bit-identical to decoding the packed codes (the codes, the
block scales and g come from the same formats.quantize_nvfp4 call, and e2m1 x e4m3 has at most
6 significant bits), which tests/test_kernels_nvfp4.py checks bit for bit; the W4A4 product
is then the W4A16 kernel with g folded into its epilogue scale. This trades the packed
path's smaller activation read (0.56 vs 2 B per element) for no in-kernel activation decode
(B must come from shared memory, so a decoded copy would have to be written back there).

The rotation is int8_quant.hadamard_tc (bf16 x +-1 on the tensor cores, f32 accumulation),
equal to formats.hadamard up to f32 summation order.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mpqjax import formats
from pallas_kernels import int8_quant


@dataclasses.dataclass(frozen=True)
class NVFP4QuantConfig:
  """hadamard_block: 0 for none, else a power of two dividing K (128 in mpqjax)."""
  hadamard_block: int = 0


def rotate(x: jax.Array, hadamard_block: int) -> jax.Array:
  """The online Hadamard half in f32 (identity when hadamard_block == 0)."""
  if hadamard_block:
    return int8_quant.hadamard_tc(x, hadamard_block)
  return x.astype(jnp.float32)


def quantize_qdq(x: jax.Array, config: NVFP4QuantConfig = NVFP4QuantConfig()):
  """x[M, K] (bf16 or f32; K % 16 == 0) -> (bf16[M, K] block values, f32[] tensor scale)."""
  with jax.named_scope("nvfp4_quant"):
    t = formats.quantize_nvfp4(rotate(x, config.hadamard_block))
    return formats.nvfp4_block_values(t).astype(jnp.bfloat16), t.global_scale


def reference(x: jax.Array, config: NVFP4QuantConfig = NVFP4QuantConfig()):
  """The packed-codes path of mpqjax.qlinear_xla (f32 HIGHEST rotation): NVFP4Tensor."""
  y = x.astype(jnp.float32)
  if config.hadamard_block:
    y = formats.hadamard(y, config.hadamard_block)
  return formats.quantize_nvfp4(y)
