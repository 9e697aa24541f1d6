"""Per-token INT8 activation quantizer with the optional block Hadamard, as one XLA fusion.

  quantize_rows(x[M, K], hadamard_block) -> (values s8[M, K], scales f32[M, 1])

equal to formats.quantize_int8(formats.hadamard(x, block), axis=-1), the arithmetic of
mpqjax.qlinear_xla's INT8 path. The rotation is done on the tensor cores: the orthonormal
Hadamard matrix is (+-1) / sqrt(b), and +-1 is exact in bf16, so a bf16 x (+-1) dot with
f32 accumulation equals the f32 rotation up to f32 summation order. f32 inputs are split
into three bf16 terms (hi + mid + lo), which covers f32's 24-bit significand.

Pallas or XLA: benchmarks/kernels.py times this fusion; pallas_kernels/NOTES.md records
why it is an XLA fusion (the per-row absmax needs the whole row before any value can be
cast, so a one-pass kernel must hold [rows, K] on chip; one that held 8-32 rows in shared
memory was measured slower than the two-pass Mosaic kernel and removed, NOTES.md "Session 8").
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from mpqjax import formats


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """hadamard_block: 0 for none, else a power of two dividing K (128 in mpqjax).
  rotation: "tc", a +-1 dot on the tensor cores (its own launch), or "butterfly", the fast
  Walsh-Hadamard transform's log2(block) add/subtract stages in f32, elementwise, so that XLA
  can fuse it into the absmax and into the cast (one launch fewer; it is computed twice)."""
  hadamard_block: int = 0
  rotation: str = "tc"

  def __post_init__(self):
    if self.rotation not in ROTATIONS:
      raise ValueError(f"QuantConfig: rotation must be one of {ROTATIONS}, got {self.rotation!r}")


ROTATIONS = ("tc", "butterfly")


def _sign_matrix(block: int) -> jax.Array:
  return jnp.asarray(np.sign(formats.hadamard_matrix(block)), jnp.bfloat16)


def hadamard_tc(x: jax.Array, block: int, out_perm=None) -> jax.Array:
  """Block Hadamard of x[..., K] along the last axis on the tensor cores -> f32.
  out_perm (int[block], optional): each block's output columns in this order (a permutation
  of the matrix's columns: same values, no extra pass)."""
  if x.shape[-1] % block:
    raise ValueError(f"hadamard_tc(block={block}): last axis must be a multiple of {block}, "
                     f"got shape {tuple(x.shape)}")
  if x.dtype == jnp.bfloat16:
    parts = [x]
  else:
    rest, parts = x.astype(jnp.float32), []
    for _ in range(3):  # f32 = hi + mid + lo in bf16 (8 + 8 + 8 significant bits)
      parts.append(rest.astype(jnp.bfloat16))
      rest = rest - parts[-1].astype(jnp.float32)
  h = _sign_matrix(block)
  if out_perm is not None:
    h = h[:, np.asarray(out_perm)]
  y = None
  for p in parts:
    pb = p.reshape(*p.shape[:-1], -1, block)
    t = jnp.einsum("...b,bc->...c", pb, h, preferred_element_type=jnp.float32)
    y = t if y is None else y + t
  # Same f32 constant as formats.hadamard_matrix's entries.
  return (y * np.float32(1.0 / math.sqrt(block))).reshape(x.shape)


def hadamard_butterfly(x: jax.Array, block: int, out_perm=None) -> jax.Array:
  """hadamard_tc's result (f32, the same rotation up to f32 summation order) by the fast
  Walsh-Hadamard transform: stage h pairs columns j and j + h of each 2h-group into (a + b,
  a - b), for h = 1, 2, ..., block / 2 (Sylvester order), then one multiply by 1/sqrt(block).
  Elementwise (reshapes, slices, adds), so XLA fuses it into its consumer."""
  *lead, k = x.shape
  if k % block or block & (block - 1):
    raise ValueError(f"hadamard_butterfly(block={block}): block must be a power of two "
                     f"dividing the last axis, got shape {tuple(x.shape)}")
  y = x.astype(jnp.float32)
  h = 1
  while h < block:
    y = y.reshape(*lead, k // (2 * h), 2, h)
    a, b = y[..., 0, :], y[..., 1, :]
    y = jnp.stack([a + b, a - b], axis=-2)
    h *= 2
  y = y.reshape(*lead, k // block, block) * np.float32(1.0 / math.sqrt(block))
  if out_perm is not None:
    y = y[..., np.asarray(out_perm)]
  return y.reshape(x.shape)


def quantize_rows(x: jax.Array, config: QuantConfig = QuantConfig(), out_perm=None):
  """x[M, K] (bf16 or f32) -> (s8[M, K], f32[M, 1]), per-row symmetric INT8.
  out_perm (int[hadamard_block], with a rotation): each block's columns in this order (the
  same values permuted: the row's absmax does not change), folded into the rotation."""
  if out_perm is not None and not config.hadamard_block:
    raise ValueError("quantize_rows: out_perm needs a Hadamard block (it is folded into the "
                     "rotation)")
  with jax.named_scope("int8_quant"):
    rotate = hadamard_butterfly if config.rotation == "butterfly" else hadamard_tc
    y = (rotate(x, config.hadamard_block, out_perm) if config.hadamard_block
         else x.astype(jnp.float32))
    q = formats.quantize_int8(y, axis=-1)
  return q.values, q.scales


def reference(x: jax.Array, config: QuantConfig = QuantConfig()):
  """The xla implementation's arithmetic (f32 HIGHEST-precision rotation)."""
  y = x.astype(jnp.float32)
  if config.hadamard_block:
    y = formats.hadamard(y, config.hadamard_block)
  q = formats.quantize_int8(y, axis=-1)
  return q.values, q.scales
