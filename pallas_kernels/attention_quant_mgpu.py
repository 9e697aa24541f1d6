"""INT8 quantize pre-pass for the attention kernel's Q or K operand (Mosaic GPU): one HBM read.

  quantize_blocks_mgpu(x bf16[B, T, H, D], center f32[B, H, D] | None, block_rows, t_pad)
    -> (s8[B, t_pad, H, D], scale f32[B, H, t_pad / block_rows])

The same function as mpqjax.attention.quantize_blocks_xla (its reference): y = x Hd - center
with Hd the unnormalized +-1 Sylvester matrix of size D (D = 64 or 128, the rotation block of
mpqjax.attention), rows >= T are 0; per (batch, head, block of block_rows tokens)
scale = max(amax |y|, 1e-30) * (1 / 127) and q = clip(round(y * (1 / scale)), -127, 127).

XLA's version of this pass (a dot for the rotation, then separate amax and quantize fusions)
took 0.75 ms for Q at the CogVideoX-2B shape on an H200, against ~0.05 ms for its bytes
(pallas_kernels/NOTES.md). Here one CTA takes one block of block_rows tokens of one batch and
walks the heads with a TMA pipeline: each [block_rows, D] tile is read once into shared
memory, rotated on the tensor cores 64 rows at a time (twice: once for the block's absmax, once
to quantize, both from shared memory), and written as int8 by TMA. The rotation reuses
int8_quant_mgpu's 64-block matrix (D = 128: its two-halves rotate_tile).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.int8_quant_mgpu import (HALF, ROWS, bf16_tile_transforms, load_to_smem,
                                            rotate_tile, rotation_operands, rotation_smem,
                                            wgmma_f32)
from pallas_kernels.w8a8_matmul import smem_transforms

HEAD_DIMS = (64, 128)
INV_127 = np.float32(1.0 / 127.0)


@dataclasses.dataclass(frozen=True)
class PrepassConfig:
  max_concurrent_steps: int = 2  # [block_rows, D] bf16 tiles in flight per CTA


def supported_operand(x: jax.Array) -> bool:
  """Whether the pre-pass kernels (this one and attention_vt_mgpu) take x [B, T, H, D]."""
  return x.ndim == 4 and x.dtype == jnp.bfloat16 and x.shape[-1] in HEAD_DIMS


def supported(x: jax.Array, block_rows: int) -> bool:
  return supported_operand(x) and block_rows % ROWS == 0


def check_operand(fn: str, x: jax.Array, pad: tuple[str, int], multiple: int,
                  per_channel: tuple[str, jax.Array | None]):
  """The pre-pass kernels' argument checks: x bf16 [B, T, H, D] with D in HEAD_DIMS, padded to
  pad = (name, length), >= T and a multiple of `multiple`; per_channel = (name, f32 [B, H, D]
  or None)."""
  if not supported_operand(x):
    raise ValueError(f"{fn} needs bf16 [B, T, H, D] with D in {HEAD_DIMS}; got {x.dtype} "
                     f"{x.shape}")
  b, t, h, d = x.shape
  (pad_name, length), (pc_name, pc) = pad, per_channel
  if length < t or length % multiple:
    raise ValueError(f"{fn}: {pad_name}={length} must be >= the length {t} and a multiple of "
                     f"{multiple}")
  if pc is not None and pc.shape != (b, h, d):
    raise ValueError(f"{fn}: {pc_name} must be [B, H, D] = {(b, h, d)}, got {pc.shape}")


def pad_tokens_to_8(x: jax.Array) -> jax.Array:
  """[B, T, H, D] -> T zero-padded to a multiple of 8: TMA tiles of the [B, T, H * D] view need
  it (the kernels zero or mask the rows past T anyway; real lengths are multiples of 8, so
  this copy is rare)."""
  t = x.shape[1]
  return x if t % 8 == 0 else jnp.pad(x, ((0, 0), (0, -t % 8), (0, 0), (0, 0)))


def _rotate_rows(x_s, h_s, d: int):
  """f32[64, d]: a bf16 [64, d] SMEM tile times the unnormalized +-1 Sylvester matrix of size d
  (d = 64: one wgmma against the 64-block matrix; d = 128: rotate_tile's two halves)."""
  if d == 2 * HALF:
    return rotate_tile(x_s, h_s, np.float32(1.0))
  return wgmma_f32(x_s, h_s, (ROWS, d))


def quantize_blocks_mgpu(x: jax.Array, center: jax.Array | None, *, block_rows: int, t_pad: int,
                         config: PrepassConfig = PrepassConfig(), interpret=None):
  """See the module docstring. x bf16[B, T, H, D] (D in HEAD_DIMS), center f32[B, H, D] or None
  (no centering), block_rows a multiple of 64, t_pad >= T a multiple of block_rows.
  interpret: a plgpu.InterpretGPUParams to run on CPU."""
  if block_rows % ROWS:
    raise ValueError(f"quantize_blocks_mgpu: block_rows={block_rows} must be a multiple of "
                     f"{ROWS}")
  check_operand("quantize_blocks_mgpu", x, ("t_pad", t_pad), block_rows, ("center", center))
  b, t, h, d = x.shape
  centered = center is not None
  n_blocks = t_pad // block_rows
  subs = block_rows // ROWS
  h_pad = -(-h // 32) * 32  # the scale row of a CTA leaves by TMA: a multiple of 16 bytes
  interp = interpret is not None
  hmat, _ = rotation_operands(2 * HALF)  # the 64-block +-1 matrix, unnormalized
  x3 = pad_tokens_to_8(x).reshape(b, -1, h * d)
  c2 = (center if centered else jnp.zeros((b, h, d), jnp.float32)).reshape(b, h * d)
  steps = min(config.max_concurrent_steps, h)

  def attention_quant_kernel(x_g, c_g, h_g, q_g, s_g, h_s, q_s, s_s, bar):
    bi, ti = lax.axis_index("b"), lax.axis_index("t")
    t0 = ti * block_rows
    load_to_smem(h_g, h_s, bar)

    def body(idx, x_s, c_s):
      (hh,) = idx

      def rotated(i):
        y = _rotate_rows(x_s.at[pl.ds(i * ROWS, ROWS)], h_s, d)
        if not centered:
          return y  # rows >= T were zero-filled by TMA: they stay 0
        c = c_s[...] if interp else plgpu.load(c_s, layout=plgpu.Layout.WGMMA.reduce(0))
        y = y - lax.broadcast_in_dim(c, (ROWS, d), [1])
        rows = plgpu.broadcasted_iota(jnp.int32, (ROWS, d), 0, layout=plgpu.Layout.WGMMA)
        return jnp.where(rows + (t0 + i * ROWS) < t, y, jnp.float32(0.0))

      amax = jnp.float32(0.0)
      for i in range(subs):
        amax = jnp.maximum(amax, jnp.abs(rotated(i)).max(axis=1).max(axis=0))
      scale = jnp.maximum(amax, jnp.float32(1e-30)) * INV_127
      inv = jnp.float32(1.0) / scale
      s_s[hh] = scale
      for i in range(subs):
        q = jnp.clip(jnp.round(rotated(i) * inv), -127.0, 127.0).astype(jnp.int8)
        # alternate the two out slots across heads too (block_rows = 64 stores once per head)
        slot = lax.rem(hh * subs + i, 2)
        plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store that used this slot
        q_s[slot] = q
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            q_s.at[slot], q_g.at[bi, pl.ds(t0 + i * ROWS, ROWS), pl.ds(hh * d, d)])

    plgpu.emit_pipeline(
        body, grid=(h,), max_concurrent_steps=steps,
        in_specs=[plgpu.BlockSpec((block_rows, d), lambda hh: (0, hh),
                                  transforms=bf16_tile_transforms()),
                  plgpu.BlockSpec((d,), lambda hh: (hh,))],
    )(x_g.at[bi, pl.ds(t0, block_rows)], c_g.at[bi])
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(s_s, s_g.at[bi, ti])
    plgpu.wait_smem_to_gmem(0)

  f = plgpu.kernel(
      attention_quant_kernel,
      out_type=(jax.ShapeDtypeStruct((b, t_pad, h * d), jnp.int8),
                jax.ShapeDtypeStruct((b, n_blocks, h_pad), jnp.float32)),
      grid=(b, n_blocks), grid_names=("b", "t"),
      scratch_types=[rotation_smem(),
                     plgpu.SMEM((2, ROWS, d), jnp.int8, transforms=smem_transforms(d, 8)),
                     plgpu.SMEM((h_pad,), jnp.float32), plgpu.Barrier()],
      interpret=interpret)
  q8, scale = f(x3, c2, hmat)
  return q8.reshape(b, t_pad, h, d), jnp.moveaxis(scale[..., :h], 1, 2)
