"""One-pass per-token INT8 quantizer with the block-128 Hadamard (Mosaic GPU): x read once.

  quantize_rows_onepass(x bf16[M, K], hadamard_block, rows=None) -> (s8[M, K], f32[M, 1])

The same function as int8_quant_mgpu.quantize_rows_mgpu (values and scales bit for bit in
interpret mode; the cast is the same correctly rounded `quotient_to_int8` arithmetic). That
kernel reads x twice (5 bytes of HBM traffic per element), because a 64-row block of x does
not fit in shared memory and its per-row absmax is needed before the first value can be
cast. Here a CTA takes only `rows` (8-32) rows, so the whole [rows, K] block fits (<= 112 KB:
2 CTAs per SM), is loaded once by TMA, and both passes read it from shared memory: 3 bytes
per element.

With so few rows x cannot be the wgmma A operand (64 rows); the rotation runs transposed,
y^T = H x^T, with the 64-block +-1 matrix as A and the x tile as the (transposed) B operand
(rows = wgmma N), two 64-wide halves per 128-block as in int8_quant_mgpu.rotate_tile. The
per-row absmax is then a column-wise max of the [64, rows] accumulators, and the int8 result
is written back row-major by per-byte shared-memory stores (`_store_transposed`: Mosaic GPU has
no WGMMA -> transposed relayout for 8-bit fragments), then TMA.

Status: correct in interpret mode and lowers for CUDA (tests); not yet timed on a GPU
(pallas_kernels/NOTES.md, "Session 7"); qlinear does not use it yet.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from pallas_kernels.int8_quant_mgpu import (COLS, HALF, bf16_tile_transforms, divisor_terms,
                                            int8_cast_jnp, load_to_smem, markstein_quotient,
                                            rotation_operands, rotation_smem, saturated_s8)

SMEM_BUDGET = 112 * 1024  # bytes of x per CTA, so that two CTAs share an SM
MAX_TILES = 32  # one TMA barrier per 128-column tile, and Mosaic GPU allows 32 per group
MAX_BLOCK_BYTES = 200 * 1024  # an explicit `rows` may use one CTA's shared memory (227 KB)


def pick_rows(k: int) -> int | None:
  """Rows per CTA: the most of (32, 16, 8) whose [rows, K] bf16 block fits SMEM_BUDGET, or
  None when even 8 rows do not (K > 7168)."""
  return next((r for r in (32, 16, 8) if r * k * 2 <= SMEM_BUDGET), None)


def supported(x: jax.Array, hadamard_block: int, rows: int | None = None) -> bool:
  rows = rows or (pick_rows(x.shape[-1]) if x.ndim == 2 else None)
  return (x.ndim == 2 and x.dtype == jnp.bfloat16 and x.shape[1] % COLS == 0
          and x.shape[1] // COLS <= MAX_TILES and rows is not None and rows % 8 == 0
          and rows * x.shape[1] * 2 <= MAX_BLOCK_BYTES
          and hadamard_block in (0, COLS))


def _store_transposed(yt, scale_b, q_ref, col0: int, interpret: bool):
  """q_ref[r, col0 + c] = int8(yt[c, r] / scale[r]) for yt f32 [64, R] (wgmma layout) and
  scale_b the per-row scales broadcast to [64, R]: `quotient_to_int8`'s arithmetic (Markstein
  quotient, cvt.rni.sat.s8.f32), one byte store per element into the unswizzled [R, 128]
  int8 tile."""
  if interpret:
    q_ref[:, pl.ds(col0, HALF)] = int8_cast_jnp(yt, scale_b).T
    return
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, memref, vector

  wgmma = plgpu.Layout.WGMMA

  @plgpu.inline_mgpu(arg_types=(wgmma, wgmma, plgpu.RefType()))
  def fn(_, y_a, s_a, ref):
    index = ir.IndexType.get()
    regs = y_a.registers
    assert all(d == 1 for d in regs.shape[2:4] + regs.shape[5:]), regs.shape
    # one divisor per column (= row of x); a register's columns depend on j = idx[1] only, so
    # its per-element divisor terms are built once per j
    terms = {}
    for (row, col), idx in zip(y_a.layout.thread_idxs(y_a.shape), np.ndindex(regs.shape)):
      vty = regs[idx].type
      if idx[1] not in terms:
        s = s_a.registers[idx]
        per_elem = [divisor_terms(vector.extract(
            s, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([e])))
            for e in range(ir.VectorType(vty).shape[0])]
        terms[idx[1]] = [vector.from_elements(vty, [t[i] for t in per_elem]) for i in range(3)]
      k_idx = arith.addi(row, arith.constant(index, col0))
      for e, qe in enumerate(saturated_s8(markstein_quotient(regs[idx], terms[idx[1]]))):
        memref.store(qe, ref, [arith.addi(col, arith.constant(index, e)), k_idx])

  fn(yt, scale_b, q_ref)


def quantize_rows_onepass(x: jax.Array, hadamard_block: int = COLS, rows: int | None = None,
                          interpret=None):
  """x bf16[M, K] -> (s8[M, K], f32[M, 1] scales), per-row symmetric INT8 of x rotated by the
  block-128 Hadamard (hadamard_block 128) or not (0). rows: rows per CTA (pick_rows)."""
  rows = rows or (pick_rows(x.shape[-1]) if x.ndim == 2 else None)
  if not supported(x, hadamard_block, rows):
    raise ValueError(f"quantize_rows_onepass needs bf16 [M, K] with K % {COLS} == 0, "
                     f"K <= {MAX_TILES * COLS}, a [rows, K] "
                     f"block that fits shared memory (rows {rows}) and hadamard_block in "
                     f"(0, {COLS}); got {x.dtype} {x.shape}, hadamard_block {hadamard_block}")
  m, k = x.shape
  nk = k // COLS
  h, post = rotation_operands(hadamard_block)
  interp = interpret is not None
  tile = (HALF, rows)

  def rotated(x_s, h_s, kb):
    """y^T for column tile kb: (rotated columns 0-63, 64-127), f32 [64, rows] each."""
    def mm(acc0, acc1):
      plgpu.wgmma(acc0, h_s, x_s.at[kb, :, pl.ds(0, HALF)].T)
      plgpu.wgmma(acc1, h_s, x_s.at[kb, :, pl.ds(HALF, HALF)].T)
      return acc0[...], acc1[...]
    acc = plgpu.ACC(tile, jnp.float32)
    y0, y1 = pl.run_scoped(mm, acc, acc)
    if post is None:
      return y0, y1
    return (y0 + y1) * post, (y0 - y1) * post

  def kernel(x_g, h_g, q_g, s_g, x_s, h_s, q_s, s_s, bars, h_bar):
    row0 = lax.axis_index("rows") * rows

    @pl.loop(0, nk)
    def _issue(kb):  # the whole row block in flight at once
      plgpu.copy_gmem_to_smem(x_g.at[pl.ds(row0, rows), pl.ds(kb * COLS, COLS)], x_s.at[kb],
                              bars.at[kb])

    load_to_smem(h_g, h_s, h_bar)
    zeros = plgpu.layout_cast(jnp.zeros(tile, jnp.float32), plgpu.Layout.WGMMA)

    def pass1(kb, carry):
      amax, bad = carry
      plgpu.barrier_wait(bars.at[kb])
      y0, y1 = rotated(x_s, h_s, kb)
      a = jnp.maximum(jnp.abs(y0), jnp.abs(y1))
      # |y| < inf is false for NaN and +-inf alike (see int8_quant_mgpu.rotated_row_amax)
      nonfinite = jnp.where(a < jnp.float32(jnp.inf), jnp.float32(0.0), jnp.float32(1.0))
      return jnp.maximum(amax, a), jnp.maximum(bad, nonfinite)

    amax, bad = lax.fori_loop(0, nk, pass1, (zeros, zeros))
    amax, bad = amax.max(axis=0), bad.max(axis=0)
    scale = jnp.where(amax == 0, jnp.float32(1.0), amax / jnp.float32(127.0))
    scale = jnp.where(bad == 0, scale, jnp.float32(jnp.nan))
    s_s[...] = scale
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(s_s, s_g.at[pl.ds(row0, rows)])
    scale_b = lax.broadcast_in_dim(scale, tile, [1])

    @pl.loop(0, nk)
    def _pass2(kb):
      y0, y1 = rotated(x_s, h_s, kb)
      slot = lax.rem(kb, 2)
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store that used this slot
      _store_transposed(y0, scale_b, q_s.at[slot], 0, interp)
      _store_transposed(y1, scale_b, q_s.at[slot], HALF, interp)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_s.at[slot], q_g.at[pl.ds(row0, rows), pl.ds(kb * COLS, COLS)])

    plgpu.wait_smem_to_gmem(0)

  f = plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((m,), jnp.float32)),
      grid=(pl.cdiv(m, rows),), grid_names=("rows",),
      scratch_types=[plgpu.SMEM((nk, rows, COLS), jnp.bfloat16, transforms=bf16_tile_transforms()),
                     rotation_smem(), plgpu.SMEM((2, rows, COLS), jnp.int8),
                     plgpu.SMEM((rows,), jnp.float32), plgpu.Barrier(num_barriers=nk),
                     plgpu.Barrier()],
      interpret=interpret)
  q, s = f(x, h)
  return q, s[:, None]
