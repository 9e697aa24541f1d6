"""Number formats: NVFP4 (E2M1 + E4M3 block scales + FP32 tensor scale), INT8, block Hadamard.

These conventions are part of the public contract and are tested bit for bit against an
independent numpy/ml_dtypes reference (tests/test_formats.py).

NVFP4, along the last axis, blocks of 16:
  g    = amax(|x|) / (6 * 448)                    float32; 1 when amax == 0
  s    = e4m3(min(amax_block / (6 * g), 448))     round to nearest even
  code = e2m1_rne(x / (f32(s) * g))               saturating at +-6; 0 where s == 0
  deq  = e2m1(code) * f32(s) * g
  two codes per uint8, element 2i in the low nibble.

INT8, symmetric along `axis`: scale = amax / 127 (1 when amax == 0),
  values = clip(round_half_even(x / scale), -127, 127).

Non-finite input: the global (NVFP4) or per-row (INT8) scale becomes NaN, so every
dequantized value it touches is NaN rather than finite garbage.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NVFP4_BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
INT8_MAX = 127.0

# Rounding boundaries between consecutive magnitudes, and whether a tie rounds up
# (round-half-even: a tie goes to the even code).
_E2M1_BOUNDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True),
                (2.5, False), (3.5, True), (5.0, False))


class NVFP4Tensor(NamedTuple):
  """codes uint8[..., K/2], scales float8_e4m3fn[..., K/16], global_scale float32[]."""
  codes: jax.Array
  scales: jax.Array
  global_scale: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.codes.shape[:-1], self.codes.shape[-1] * 2)

  @property
  def nbytes(self) -> int:
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in self)


class Int8Tensor(NamedTuple):
  """values int8[...], scales float32 with keepdims along the quantized axis."""
  values: jax.Array
  scales: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape)

  @property
  def nbytes(self) -> int:
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in self)


def _check_last_axis(x: jax.Array, multiple: int, what: str) -> None:
  if x.ndim < 1 or x.shape[-1] % multiple:
    raise ValueError(
        f"{what}: last axis must be a multiple of {multiple}, got shape {tuple(x.shape)}")


def e2m1_encode(y: jax.Array) -> jax.Array:
  """float32 -> uint8 e2m1 code (0..15), round to nearest even, saturating at +-6."""
  a = jnp.abs(y)
  mag = jnp.zeros(y.shape, jnp.uint8)
  for bound, tie_up in _E2M1_BOUNDS:
    mag = mag + (a >= bound if tie_up else a > bound).astype(jnp.uint8)
  return mag | (jnp.signbit(y).astype(jnp.uint8) << 3)


def e2m1_decode(code: jax.Array, dtype=jnp.float32) -> jax.Array:
  """uint8 e2m1 code (low nibble) -> value, built from the code's bits rather than a table
  (a table lookup is a gather, which XLA does not fuse). For magnitude code c = 2e + m:
  0.5 m if e == 0, else (1 + m/2) 2^(e-1), i.e. f32 bits ((e + 126) << 23) | (m << 22)."""
  c = code.astype(jnp.uint32) & 0xF
  e, m = (c >> 1) & 3, c & 1
  bits = jnp.where(e > 0, ((e + 126) << 23) | (m << 22), m * jnp.uint32(126 << 23))
  bits = bits | ((c >> 3) << 31)
  return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)


def pack_nibbles(codes: jax.Array) -> jax.Array:
  """uint8[..., K] codes in 0..15 -> uint8[..., K/2], element 2i in the low nibble."""
  pairs = codes.reshape(*codes.shape[:-1], -1, 2)
  return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: jax.Array) -> jax.Array:
  """uint8[..., K/2] -> uint8[..., K]."""
  both = jnp.stack([packed & 0xF, packed >> 4], axis=-1)
  return both.reshape(*packed.shape[:-1], -1)


def exact_div(a: jax.Array, b: jax.Array) -> jax.Array:
  """a / b, correctly rounded on the CPU. XLA rewrites a division by a scalar, a constant or
  a broadcast into a multiplication by its reciprocal (off by an ulp); the barrier hides b
  from that rewrite. On the GPU, XLA lowers f32 division to div.full.f32 (it sets
  -nvptx-prec-divf32=1: up to 2 ulp off), so there the quotient may still be an ulp or two
  off; the Mosaic INT8 quantizer computes it correctly rounded (int8_quant_mgpu)."""
  b = jax.lax.optimization_barrier(jnp.broadcast_to(b, jnp.broadcast_shapes(a.shape, b.shape)))
  return a / b


def narrowed(x: jax.Array, dtype) -> jax.Array:
  """x.astype(dtype) for a narrower float dtype, kept from XLA:GPU's excess-precision
  simplification: with xla_allow_excess_precision (on by default) it deletes a convert pair
  f32 -> narrow -> f32, so a later widening would silently skip the rounding."""
  return jax.lax.optimization_barrier(x.astype(dtype))


def nvfp4_global_scale(x: jax.Array) -> jax.Array:
  """float32[] tensor scale; NaN if x holds a NaN or Inf."""
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x))
  g = exact_div(amax, jnp.float32(E2M1_MAX * E4M3_MAX))
  g = jnp.where(amax == 0, jnp.float32(1.0), g)
  return jnp.where(jnp.all(jnp.isfinite(x)), g, jnp.float32(jnp.nan))


def quantize_nvfp4(x: jax.Array, global_scale: jax.Array | None = None) -> NVFP4Tensor:
  """Quantize x[..., K] (K % 16 == 0) to NVFP4 along the last axis.

  global_scale: optional precomputed float32[] tensor scale (defaults to the one above).
  """
  _check_last_axis(x, NVFP4_BLOCK, "quantize_nvfp4")
  x = x.astype(jnp.float32)
  g = nvfp4_global_scale(x) if global_scale is None else jnp.asarray(global_scale, jnp.float32)
  blocks = x.reshape(*x.shape[:-1], -1, NVFP4_BLOCK)
  amax_block = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
  s = jnp.minimum(exact_div(amax_block, jnp.float32(E2M1_MAX) * g), jnp.float32(E4M3_MAX))
  s8 = narrowed(s, jnp.float8_e4m3fn)
  s32 = s8.astype(jnp.float32)
  codes = e2m1_encode(exact_div(blocks, s32 * g))
  codes = jnp.where(s32 == 0, jnp.uint8(0), codes).reshape(x.shape)
  return NVFP4Tensor(pack_nibbles(codes), s8[..., 0], g)


def dequantize_nvfp4(t: NVFP4Tensor, dtype=jnp.float32) -> jax.Array:
  """NVFP4Tensor -> dtype[..., K]: e2m1(code) * f32(s) * g."""
  return (nvfp4_block_values(t) * t.global_scale).astype(dtype)


def nvfp4_nibble_values(t: NVFP4Tensor) -> tuple[jax.Array, jax.Array]:
  """The block values of each packed byte's two elements, float32[..., K/2] each: (element
  2i from the low nibble, element 2i + 1 from the high one), without the tensor scale. The
  same numbers as nvfp4_block_values without interleaving them (the kernels' weight
  conversions pack the pair into one wider word instead)."""
  s = jnp.repeat(t.scales.astype(jnp.float32), NVFP4_BLOCK // 2, axis=-1)  # per byte
  return e2m1_decode(t.codes) * s, e2m1_decode(t.codes >> 4) * s


def nvfp4_block_values(t: NVFP4Tensor) -> jax.Array:
  """e2m1(code) * f32(s), without the tensor scale, float32[..., K].

  Exact in bfloat16 too (e2m1 x e4m3 has at most 4 significant bits), which is what
  the matmuls use: they multiply these in bf16 and apply the tensor scales afterwards.
  """
  vals = e2m1_decode(unpack_nibbles(t.codes))
  vals = vals.reshape(*vals.shape[:-1], -1, NVFP4_BLOCK)
  s = t.scales.astype(jnp.float32)[..., None]
  return (vals * s).reshape(*vals.shape[:-2], -1)


def quantize_int8(x: jax.Array, axis: int = -1) -> Int8Tensor:
  """Symmetric INT8 along `axis`; scales float32 keep the reduced axis."""
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
  scale = jnp.where(amax == 0, jnp.float32(1.0), exact_div(amax, jnp.float32(INT8_MAX)))
  # Finiteness from x itself: XLA:CPU's vectorized max drops NaN on larger arrays.
  scale = jnp.where(jnp.all(jnp.isfinite(x), axis=axis, keepdims=True), scale, jnp.float32(jnp.nan))
  q = jnp.clip(jnp.round(exact_div(x, scale)), -INT8_MAX, INT8_MAX)
  q = jnp.where(jnp.isnan(q), 0.0, q)  # the NaN scale carries the poison
  return Int8Tensor(q.astype(jnp.int8), scale)


def dequantize_int8(t: Int8Tensor, dtype=jnp.float32) -> jax.Array:
  return (t.values.astype(jnp.float32) * t.scales).astype(dtype)


def hadamard_matrix(n: int) -> np.ndarray:
  """Orthonormal Sylvester Hadamard matrix, float32[n, n]; n a power of two. Symmetric."""
  if n < 1 or n & (n - 1):
    raise ValueError(f"hadamard block must be a power of two, got {n}")
  h = np.ones((1, 1), np.float64)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return (h / math.sqrt(n)).astype(np.float32)


def hadamard(x: jax.Array, block: int = 128) -> jax.Array:
  """Orthonormal block Hadamard rotation along the last axis (K % block == 0).

  Computed in float32, returned in x's dtype. Applying it twice is the identity.
  """
  _check_last_axis(x, block, f"hadamard(block={block})")
  h = jnp.asarray(hadamard_matrix(block))
  xb = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, block)
  y = jnp.einsum("...b,bc->...c", xb, h, precision=jax.lax.Precision.HIGHEST)
  return y.reshape(x.shape).astype(x.dtype)
