"""The "xla" implementation of qlinear: pure jnp, runs everywhere, the reference.

Every matmul multiplies exactly representable bf16 (or int8) operands with f32 (int32)
accumulation and applies the tensor/channel scales and the bias in an f32 epilogue:
the same arithmetic a fused kernel does, so kernels can be checked against it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mpqjax import formats


def _rotate(x: jax.Array, layer) -> jax.Array:
  """Online half of the Hadamard pair, in f32."""
  x = x.astype(jnp.float32)
  return formats.hadamard(x, layer.hadamard_block) if layer.hadamard_block else x


def _epilogue(acc: jax.Array, scale: jax.Array, layer) -> jax.Array:
  y = acc.astype(jnp.float32) * scale
  if layer.bias is not None:
    y = y + layer.bias
  return y.astype(jnp.bfloat16)


def _dot_bf16(a: jax.Array, b: jax.Array) -> jax.Array:
  """a[M, K] . b[N, K] -> f32[M, N], bf16 operands."""
  return jax.lax.dot_general(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                             (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_int8(a: jax.Array, b: jax.Array) -> jax.Array:
  """a s8[M, K] . b s8[N, K] -> s32[M, N]. The barrier keeps the producers' f32 -> s8 converts
  out of the dot's fusion: XLA:GPU's Triton gemm with such a fused convert returned wrong
  sums on an H200 (JAX 0.11.2, K=16, M=40, N=16: off by up to 7e4; exact with plain s8
  operands, at N=64, or with Triton gemms off)."""
  a, b = jax.lax.optimization_barrier((a, b))
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


def weight_as_int8(layer) -> jax.Array:
  """s8[N, K]: the stored weight re-expressed per output channel with layer.w_int8_scale."""
  if layer.weight_format == "int8":
    return layer.weight.values
  w = formats.dequantize_nvfp4(layer.weight)
  return jnp.clip(jnp.round(formats.exact_div(w, layer.w_int8_scale)), -127, 127).astype(jnp.int8)


def w4a4(x: jax.Array, layer) -> jax.Array:
  """NVFP4 activations x NVFP4 weight (needs an nvfp4-format layer)."""
  xq = formats.quantize_nvfp4(_rotate(x, layer))
  acc = _dot_bf16(formats.nvfp4_block_values(xq), formats.nvfp4_block_values(layer.weight))
  return _epilogue(acc, xq.global_scale * layer.weight.global_scale, layer)


def w4a8(x: jax.Array, layer) -> jax.Array:
  """Per-token INT8 activations x per-channel INT8 weight, int32 accumulation."""
  xq = formats.quantize_int8(_rotate(x, layer), axis=-1)
  acc = dot_int8(xq.values, weight_as_int8(layer))
  return _epilogue(acc, xq.scales * layer.w_int8_scale[:, 0], layer)


# Rows from which W4A16 rotates the weight back to x's basis instead of rotating x.
W4A16_FOLD_MIN_ROWS = 4096


def w4a16_folds_rotation(m: int, layer) -> bool:
  """Whether W4A16 on m rows computes x . W_derot^T (`weight_derotated`) rather than
  (x H) . W^T: for an nvfp4 layer with a Hadamard block, from W4A16_FOLD_MIN_ROWS rows and
  when x has at least as many rows as the weight, so that the rotation touches N x K
  elements instead of M x K (3-18x fewer at the CogVideoX shapes). With the rotated-back
  weight made in one launch (pallas_kernels.nvfp4_derotate) the fold was 2% faster on an H100
  at N = M (8192^3), where it had been 3% slower in two XLA launches; at 2048 rows, N = M, it
  lost (session 14), hence the row threshold. The two forms differ only in what is rounded to
  bf16, the rotated x or the rotated-back weight: both are 2.35e-3 (relative) from the exact
  product, but ~3e-3 from each other, so every implementation takes the form this rule picks
  (pallas_kernels/NOTES.md, "Session 14", "Session 15")."""
  return (layer.weight_format == "nvfp4" and bool(layer.hadamard_block)
          and m >= W4A16_FOLD_MIN_ROWS and layer.out_features <= m)


def derotated_block_values(t: formats.NVFP4Tensor, block: int) -> jax.Array:
  """bf16[N, K]: t's block values (no tensor scale) times the block Hadamard, in f32,
  rounded to bf16 once."""
  w = formats.nvfp4_block_values(t).astype(jnp.float32)
  return formats.hadamard(w, block).astype(jnp.bfloat16)


def weight_derotated(layer) -> jax.Array:
  """bf16[N, K]: the NVFP4 block values rotated back to x's basis by the same block Hadamard
  (its own inverse)."""
  return derotated_block_values(layer.weight, layer.hadamard_block)


def w4a16(x: jax.Array, layer) -> jax.Array:
  """bf16 activations x the decoded weight: (x H) . W^T, or x . W_derot^T where
  `w4a16_folds_rotation` (the same product up to bf16 rounding)."""
  if w4a16_folds_rotation(x.shape[0], layer):
    acc = _dot_bf16(x, weight_derotated(layer))
    return _epilogue(acc, layer.weight.global_scale, layer)
  xr = _rotate(x, layer).astype(jnp.bfloat16)
  if layer.weight_format == "int8":
    acc = _dot_bf16(xr, layer.weight.values)
    return _epilogue(acc, layer.weight.scales[:, 0], layer)
  acc = _dot_bf16(xr, formats.nvfp4_block_values(layer.weight))
  return _epilogue(acc, layer.weight.global_scale, layer)


class _Xla:
  name = "xla"
  w4a4 = staticmethod(w4a4)
  w4a8 = staticmethod(w4a8)
  w4a16 = staticmethod(w4a16)

  @staticmethod
  def available() -> bool:
    return True


XLA = _Xla()
