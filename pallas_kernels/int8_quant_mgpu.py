"""Per-token INT8 activation quantizer with the optional block-128 Hadamard, Mosaic GPU kernel.

  quantize_rows_mgpu(x bf16[M, K], config) -> (values s8[M, K], scales f32[M, 1])

Same function as int8_quant.quantize_rows (reference: int8_quant.reference). One CTA per
64-row block, with 4 warpgroups that split the block's column tiles (1 for K < 1024). The
rotation runs on the tensor cores: each 64 x 128 bf16
tile of x is multiplied by the +-1 Sylvester matrix, as two 64-wide halves against the
64-block matrix (`rotate_tile`), or by the identity when there is no Hadamard (which just
moves the tile into registers as exact f32), with f32 accumulation.
Pass 1 streams the row block and keeps the running per-row absmax in registers (the
warpgroups then exchange theirs through shared memory); pass 2 streams it again, each
warpgroup's tiles last to first, and writes round(y / scale) as int8 through TMA
(`quotient_to_int8`: a correctly rounded quotient and one saturating convert). The per-row
absmax must be known before the first value can be cast, and a 64 x K row block does not fit
in shared memory for K > ~1500, so x is read twice: up to 5 bytes of HBM traffic per element
(two bf16 reads, the int8 write; ~3.3 TB/s on an H200 at M = 35552, NOTES.md) vs ~5-13 for
the XLA fusion. With one row block per SM in flight, part of the second read comes from L2
(12% faster at K = 7680, NOTES.md session 9).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from mpqjax import formats
from pallas_kernels import int8_quant
from pallas_kernels.w8a8_matmul import num_sms

ROWS = 64   # one wgmma M tile
COLS = 128  # one Hadamard block / one 128-byte int8 swizzle row


@dataclasses.dataclass(frozen=True)
class QuantMgpuConfig:
  """hadamard_block: 0 or 128. max_concurrent_steps: pipeline stages per pass (None:
  `pick_steps`). fast_cast: pass 2's y / scale -> int8 by `quotient_to_int8` (correctly
  rounded quotient, one saturating convert) instead of jnp's division, round, clip and
  convert (on the GPU that division is div.full.f32, up to 2 ulp off; NOTES.md).
  warpgroups: 1, 2 or 4 warpgroups per CTA, which split one 64-row block's column tiles
  between them (None: `pick_warpgroups`; 1: one warpgroup walks the whole row)."""
  hadamard_block: int = 0
  max_concurrent_steps: int | None = None
  fast_cast: bool = True
  warpgroups: int | None = None


def pick_steps(m: int) -> int:
  """One-warpgroup kernel: 2 stages when there are enough 64-row CTAs for 2+ per SM (a 2-stage
  CTA needs less shared memory, so more of them fit: 6-9% faster at M = 35552 on an H200),
  else 4 (deeper pipelines per CTA: 7% faster at M = 8192, 128 CTAs). NOTES.md, run 6."""
  return 2 if pl.cdiv(m, ROWS) >= 2 * num_sms() else 4


HALF = COLS // 2  # the rotation runs as two 64-wide wgmmas (see rotate_tile)


def _rotation(block: int) -> np.ndarray:
  if block == 0:
    return np.eye(HALF, dtype=np.float32)
  if block != COLS:
    raise ValueError(f"quantize_rows_mgpu supports hadamard_block 0 or {COLS}, got {block}")
  return np.sign(np.asarray(formats.hadamard_matrix(HALF)))


def rotation_operands(block: int):
  """(h bf16[HALF, HALF], post): the +-1 64-block Sylvester matrix (the identity for block 0)
  that rotate_tile multiplies by on the tensor cores, and the 1/sqrt(block) that normalizes
  the 128-block rotation (None for block 0: no rotation)."""
  post = np.float32(1.0 / math.sqrt(block)) if block else None
  return jnp.asarray(_rotation(block), jnp.bfloat16), post


def bf16_tile_transforms():
  """SMEM tiling + 128-byte swizzle of the bf16 [ROWS, COLS] x tiles and the rotation matrix."""
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def rotation_smem():
  """The scratch that holds the rotation matrix in a kernel."""
  return plgpu.SMEM((HALF, HALF), jnp.bfloat16, transforms=bf16_tile_transforms())


def load_to_smem(src_g, dst_s, bar):
  """Copies a constant operand (the rotation matrix, ...) into SMEM and waits for it (inside a
  kernel)."""
  plgpu.copy_gmem_to_smem(src_g, dst_s, bar)
  plgpu.barrier_wait(bar)


def wgmma_f32(a_s, b_s, shape):
  """f32[shape] = a_s @ b_s, one wgmma of SMEM operands into a fresh accumulator."""
  def mm(acc_ref):
    plgpu.wgmma(acc_ref, a_s, b_s)
    return acc_ref[...]
  return pl.run_scoped(mm, plgpu.ACC(shape, jnp.float32))


def rotate_tile(x_s, h_s, post):
  """f32[ROWS, COLS]: the bf16 x tile in SMEM rotated on the tensor cores, times post.

  The 128-block Sylvester matrix is [[H, H], [H, -H]] with H the 64-block one, so for the
  column halves x0, x1 of the tile, x H128 = [x0 H + x1 H, x0 H - x1 H]: two 64-wide wgmmas
  against the 8 KB H (half the tensor-core work and a quarter of the shared memory of one
  against H128), then one f32 add per element. Without a rotation (post None) h is the
  identity and the tile is [x0, x1], exact.
  """
  def mm(acc0, acc1):
    plgpu.wgmma(acc0, x_s.at[:, pl.ds(0, HALF)], h_s)
    plgpu.wgmma(acc1, x_s.at[:, pl.ds(HALF, HALF)], h_s)
    return acc0[...], acc1[...]
  acc = plgpu.ACC((ROWS, HALF), jnp.float32)
  y0, y1 = pl.run_scoped(mm, acc, acc)
  if post is None:
    return jnp.concatenate([y0, y1], axis=1)
  return jnp.concatenate([y0 + y1, y0 - y1], axis=1) * post


def row_tiles_spec():
  """The pipeline's [ROWS, COLS] block over a row block's K tiles."""
  return plgpu.BlockSpec((ROWS, COLS), lambda kk: (0, kk), transforms=bf16_tile_transforms())


def amax_step(x_s, h_s, post, carry):
  """One tile of pass 1: folds the bf16 x tile in SMEM, rotated, into the per-row (max |x h| *
  post, non-finite flag) carry, f32[ROWS] each."""
  amax, bad = carry
  y = jnp.abs(rotate_tile(x_s, h_s, post))
  # Non-finite rows get a NaN scale, as formats' quantizers give them. The flag does not
  # rely on max propagating NaN (max.NaN on the GPU, but XLA:CPU's row max, which runs the
  # interpreter, drops it): |y| < inf is false for NaN and +-inf alike.
  nonfinite = jnp.where(y < jnp.float32(jnp.inf), jnp.float32(0.0), jnp.float32(1.0))
  return jnp.maximum(amax, y.max(axis=1)), jnp.maximum(bad, nonfinite.max(axis=1))


def row_zeros():
  return plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))


def rotated_row_amax(x_rows, h_s, post, nk: int, steps: int):
  """Streams one [ROWS, K] row block of x (gmem) and returns, per row, max |x h| * post and a
  non-finite flag (1 when the rotated row holds NaN or +-inf), f32[ROWS] each."""
  return plgpu.emit_pipeline(lambda _, x_s, carry: amax_step(x_s, h_s, post, carry),
                             grid=(nk,), in_specs=[row_tiles_spec()],
                             max_concurrent_steps=steps, init_carry=(row_zeros(), row_zeros()))(x_rows)


def stream_tiles(x_rows, bufs, bars, base, nslots: int, tile, count, body, carry):
  """A TMA pipeline over column tiles of one [ROWS, K] row block, on buffers the caller owns
  (a multi-warpgroup kernel cannot allocate per-warpgroup shared memory, which emit_pipeline
  does): step i waits for column tile tile(i) in slot s = base + i % nslots of bufs (SMEM
  [n, ROWS, COLS] bf16) and bars (n barriers) and runs carry = body(i, bufs[s], carry); the
  tile nslots steps ahead is then fetched into that slot. count may be traced."""
  def fetch(i):
    slot = base + lax.rem(i, nslots)
    plgpu.copy_gmem_to_smem(x_rows.at[:, pl.ds(tile(i) * COLS, COLS)], bufs.at[slot],
                            bars.at[slot])

  for i in range(nslots):
    pl.when(i < count)(functools.partial(fetch, jnp.int32(i)))

  def step(i, carry):
    slot = base + lax.rem(i, nslots)
    plgpu.barrier_wait(bars.at[slot])
    carry = body(i, bufs.at[slot], carry)
    pl.when(i + nslots < count)(functools.partial(fetch, i + nslots))
    return carry
  return lax.fori_loop(0, count, step, carry)


_TINY, _HUGE = 2.0 ** -60, 2.0 ** 60  # divisors outside are moved in by 2^64 or 2^-64


def divisor_terms(d):
  """MLIR f32 scalar d -> (f, d2, inv): f = 2^64 below 2^-60, 2^-64 above 2^60, else 1;
  d2 = d * f and inv = 1 / d2 correctly rounded (`rcp.rn.f32`; once per row, not per
  element; arith.divf would be div.full.f32 here: XLA sets -nvptx-prec-divf32=1 for the
  process). y / d == (y * f) / d2 exactly (powers of two), and d2 keeps
  `markstein_quotient` away from overflow and underflow for any finite d (NaN stays NaN,
  0 gives inv = inf)."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm
  f32 = ir.F32Type.get()
  c = lambda v: arith.constant(f32, v)
  lt = arith.cmpf(arith.CmpFPredicate.OLT, d, c(_TINY))
  gt = arith.cmpf(arith.CmpFPredicate.OGT, d, c(_HUGE))
  f = arith.select(lt, c(2.0 ** 64), arith.select(gt, c(2.0 ** -64), c(1.0)))
  d2 = arith.mulf(d, f)
  return f, d2, llvm.inline_asm(f32, [d2], "rcp.rn.f32 $0, $1;", "=f,f")


def markstein_quotient(y, terms):
  """fl(y / d) for an MLIR f32 vector y and `divisor_terms(d)` (scalars): y2 = y * f (exact),
  q0 = y2 * inv, r = fma(-q0, d2, y2) (exact), q = fma(r, inv, q0). Markstein's theorem: with
  inv the correctly rounded 1 / d2 and q0 within an ulp, q is the correctly rounded quotient
  (operands in range, which f ensures; tests/test_kernels_w8a8.py checks it in numpy at and
  next to rounding ties). 2 multiplies + 2 FMAs per element, and correctly rounded, where
  arith.divf would give div.full.f32."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, math as mlir_math, vector
  f, d2, inv = (vector.broadcast(y.type, t) for t in terms)
  y2 = arith.mulf(y, f)
  q0 = arith.mulf(y2, inv)
  r = mlir_math.fma(arith.negf(q0), d2, y2)
  return mlir_math.fma(r, inv, q0)


def saturated_s8(q):
  """MLIR f32 vector q -> its elements as i8 values: `cvt.rni.sat.s8.f32` (round half to
  even, saturate to [-128, 127], NaN -> 0), one per element."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm, vector
  i8, i16 = ir.IntegerType.get_signless(8), ir.IntegerType.get_signless(16)
  out = []
  for e in range(ir.VectorType(q.type).shape[0]):
    qe = vector.extract(q, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([e]))
    out.append(arith.trunci(i8, llvm.inline_asm(i16, [qe], "cvt.rni.sat.s8.f32 $0, $1;", "=h,f")))
  return out


def int8_cast_jnp(y: jax.Array, scale_b: jax.Array, divide=formats.exact_div) -> jax.Array:
  """int8 clip(round_half_even(y / scale_b), -127, 127), NaN -> 0, in jnp: the interpret-mode
  form of the kernels' cast (formats.exact_div: XLA:CPU would rewrite y / broadcast(s) as
  y * (1 / s)), and with divide=jnp.divide the previous cast that QuantMgpuConfig.fast_cast
  replaced. A NaN scale makes the whole row 0, as in formats.quantize_int8 (the scale carries
  the poison); not left to the float -> int8 conversion, whose NaN result is backend-defined."""
  q = jnp.clip(jnp.round(divide(y, scale_b)), -127.0, 127.0)
  return jnp.where(q == q, q, jnp.float32(0.0)).astype(jnp.int8)


def quotient_to_int8(y, scale, interpret: bool):
  """int8[R, C] = clip(round_half_even(y / s), -127, 127), NaN -> 0, for f32 y [R, C] in the
  wgmma layout and the row scales s f32 [R] (wgmma row layout): formats.quantize_int8's
  values, the quantizer's cast.

  On the GPU the quotient is `markstein_quotient` (the divisor terms once per row) and one
  `cvt.rni.sat.s8.f32` rounds half to even, saturates to [-128, 127] and turns NaN into 0
  (|y / s| <= 127 + an ulp, since s = amax / 127 rounded: the saturation never cuts at
  -128). Interpret mode runs the jnp form with formats.exact_div (correctly rounded on the
  CPU)."""
  rows, cols = y.shape
  if interpret:
    return int8_cast_jnp(y, lax.broadcast_in_dim(scale, (rows, cols), [0]))
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import vector
  from jax.experimental.mosaic import gpu as mgpu

  wgmma = plgpu.Layout.WGMMA
  scale = lax.broadcast_in_dim(scale, (rows, cols), [0])  # registers only: no data movement

  @plgpu.inline_mgpu(arg_types=(wgmma, wgmma),
                     return_type=plgpu.ShapeDtypeStruct((rows, cols), jnp.int8, layout=wgmma))
  def fn(_, y_a, s_a):
    i8 = ir.IntegerType.get_signless(8)
    regs = y_a.registers
    # wgmma layout: register (i, j, 0, 0, h, ...) holds 2 columns of row 64 i + 16 warp + 8 h
    # + lane / 4, so the row's divisor terms depend on (i, h) only.
    assert regs.shape[4] == 2 and all(d == 1 for d in regs.shape[2:4] + regs.shape[5:]), regs.shape
    terms = {}
    out = np.empty(regs.shape, dtype=object)
    for idx in np.ndindex(regs.shape):
      key = (idx[0], idx[4])
      if key not in terms:
        s0 = vector.extract(s_a.registers[idx], dynamic_position=[],
                            static_position=ir.DenseI64ArrayAttr.get([0]))
        terms[key] = divisor_terms(s0)
      parts = saturated_s8(markstein_quotient(regs[idx], terms[key]))
      out[idx] = vector.from_elements(ir.VectorType.get((len(parts),), i8), parts)
    return mgpu.FragmentedArray(_registers=out, _layout=mgpu.WGMMA_LAYOUT, _is_signed=True)

  return fn(y, scale)


def pick_k_splits(m: int, k: int, sms: int | None = None) -> int:
  """K chunks per 64-row block for passes whose tiles are independent along K (the NVFP4
  quantizer): enough CTAs for ~8 per SM (a 64-row CTA is one warpgroup, so few resident CTAs
  leave the SM latency-bound, and a short last wave idles it), keeping >= 4 tiles per CTA."""
  sms = sms or num_sms()
  rows, nk, splits = pl.cdiv(m, ROWS), k // COLS, 1
  while (rows * splits < 8 * sms and nk % (2 * splits) == 0 and nk // (2 * splits) >= 4):
    splits *= 2
  return splits


def row_amax_mgpu(x: jax.Array, hadamard_block: int, max_concurrent_steps: int = 4,
                  interpret=None, k_splits: int = 1):
  """Pass 1 alone, one launch: x bf16[M, K] (M % 64 == 0, K % 128 == 0) -> (max |x h| * post,
  non-finite flag), f32[M] each (the NVFP4 quantizer's first kernel). k_splits: CTAs per row
  block, each over K / k_splits columns (their partial maxima are combined in XLA)."""
  m, k = x.shape
  nk = k // COLS
  if nk % k_splits:
    raise ValueError(f"row_amax_mgpu: {nk} column tiles do not split into {k_splits}")
  nk_cta = nk // k_splits
  h, post = rotation_operands(hadamard_block)
  steps = min(max_concurrent_steps, nk_cta)

  def amax_kernel(x_g, h_g, amax_g, bad_g, h_s, r_s, bar):
    row0 = lax.axis_index("rows") * ROWS
    split = lax.axis_index("k")
    load_to_smem(h_g, h_s, bar)
    x_part = x_g.at[pl.ds(row0, ROWS), pl.ds(split * nk_cta * COLS, nk_cta * COLS)]
    amax, bad = rotated_row_amax(x_part, h_s, post, nk_cta, steps)
    for val, dst in ((amax, amax_g), (bad, bad_g)):
      r_s[...] = val
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(r_s, dst.at[split, pl.ds(row0, ROWS)])
      plgpu.wait_smem_to_gmem(0)

  part = jax.ShapeDtypeStruct((k_splits, m), jnp.float32)
  f = plgpu.kernel(
      amax_kernel, out_type=(part, part),
      grid=(m // ROWS, k_splits), grid_names=("rows", "k"),
      scratch_types=[rotation_smem(), plgpu.SMEM((ROWS,), jnp.float32), plgpu.Barrier()],
      interpret=interpret)
  amax, bad = f(x, h)
  return amax.max(axis=0), bad.max(axis=0)


def supported(x: jax.Array, config: QuantMgpuConfig) -> bool:
  return (x.ndim == 2 and x.dtype == jnp.bfloat16 and x.shape[1] % COLS == 0
          and x.shape[0] % 8 == 0 and config.hadamard_block in (0, COLS))


def pick_warpgroups(k: int) -> int:
  """Warpgroups per 64-row block: 4 when the row has >= 8 column tiles, else 1.

  Split between 4 warpgroups of one CTA (about 200 KB of shared memory, so one CTA per SM),
  a row block is finished ~4x sooner, so only ~one row block per SM is in flight (~32 MB at
  K = 1920 vs ~130 MB with four one-warpgroup CTAs per SM) and more of pass 2's re-read, which
  walks each warpgroup's tiles last to first, comes from L2. H200: 416 -> 370 us at 35552 x
  7680, 157 -> 153 at x 3072, 100 -> 98 at x 1920 (NOTES.md, session 9)."""
  return 4 if k // COLS >= 8 else 1


def _smem_bytes(warpgroups: int, steps: int) -> int:
  tiles = ROWS * COLS * (2 * steps + 2)  # per warpgroup: bf16 x stages + two int8 store slots
  return warpgroups * tiles + HALF * HALF * 2 + 2 * warpgroups * ROWS * 4 + ROWS * 4


def quantize_rows_mgpu(x: jax.Array, config: QuantMgpuConfig = QuantMgpuConfig(),
                       interpret=None):
  """x bf16[M, K] -> (s8[M, K], f32[M, 1] scales).

  One CTA per 64-row block with `warpgroups` warpgroups; warpgroup w owns column tiles
  [nk w / W, nk (w + 1) / W). Pass 1: each streams its tiles and keeps per-row maxima, which
  the warpgroups exchange through shared memory; pass 2: each streams its tiles again, last
  to first (the most recently read first, so from L2), and writes the int8 tiles."""
  if not supported(x, config):
    raise ValueError(f"quantize_rows_mgpu needs bf16 [M, K] with K % {COLS} == 0, M % 8 == 0 "
                     f"and hadamard_block in (0, {COLS}); got {x.dtype} {x.shape}, {config}")
  m, k = x.shape
  nk = k // COLS
  wgs = config.warpgroups or pick_warpgroups(k)
  # 3 warpgroups hung Mosaic GPU's interpreter (CPU tests), so only 1, 2 and 4 are offered
  if wgs not in (1, 2, 4) or wgs > nk:
    raise ValueError(f"quantize_rows_mgpu: warpgroups={wgs} must be 1, 2 or 4 and at most "
                     f"K / {COLS} = {nk}")
  h, post = rotation_operands(config.hadamard_block)
  s8_tr = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
  steps = config.max_concurrent_steps or (pick_steps(m) if wgs == 1 else 2)
  steps = min(steps, nk // wgs)  # >= 1: wgs <= nk
  if _smem_bytes(wgs, steps) > 227 * 1024:
    raise ValueError(f"quantize_rows_mgpu: {wgs} warpgroups x {steps} stages need "
                     f"{_smem_bytes(wgs, steps)} B of shared memory (> 227 KB)")

  def int8_quant_kernel(x_g, h_g, q_g, s_g, h_s, x_s, part_s, s_s, q_s, bar, x_bars, sync):
    row0 = lax.axis_index("rows") * ROWS
    wg = lax.axis_index("wg") if wgs > 1 else jnp.int32(0)
    first = lax.div(wg * nk, jnp.int32(wgs))
    count = lax.div((wg + 1) * nk, jnp.int32(wgs)) - first

    @pl.when(wg == 0)
    def _():
      plgpu.copy_gmem_to_smem(h_g, h_s, bar)
    plgpu.barrier_wait(bar)
    x_rows = x_g.at[pl.ds(row0, ROWS)]

    def stream(tile, body, carry):
      return stream_tiles(x_rows, x_s, x_bars, wg * steps, steps, tile, count, body, carry)

    amax, bad = stream(lambda i: first + i, lambda _, t, c: amax_step(t, h_s, post, c),
                       (row_zeros(), row_zeros()))
    if wgs > 1:  # every warpgroup needs the whole row's maxima
      part_s[wg] = amax
      part_s[wgs + wg] = bad
      plgpu.commit_smem()
      plgpu.barrier_arrive(sync)
      plgpu.barrier_wait(sync)
      load = ((lambda r: r[...]) if interpret is not None else
              (lambda r: plgpu.load(r, (), layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)))
      for w in range(wgs):
        amax, bad = (jnp.maximum(amax, load(part_s.at[w])),
                     jnp.maximum(bad, load(part_s.at[wgs + w])))
    scale = jnp.where(amax == 0, jnp.float32(1.0), amax / jnp.float32(127.0))
    scale = jnp.where(bad == 0, scale, jnp.float32(jnp.nan))

    @pl.when(wg == 0)
    def _():
      s_s[...] = scale
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(s_s, s_g.at[pl.ds(row0, ROWS)])

    def last_first(i):  # pass 2 starts on the tile pass 1 read last (likely still in L2)
      return first + count - 1 - i

    def pass2(i, x_tile, carry):
      y = rotate_tile(x_tile, h_s, post)
      if config.fast_cast:
        q = quotient_to_int8(y, scale, interpret is not None)
      else:
        q = int8_cast_jnp(y, lax.broadcast_in_dim(scale, (ROWS, COLS), [0]), divide=jnp.divide)
      slot = 2 * wg + lax.rem(i, 2)
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store that used this slot
      q_s[slot] = q
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_s.at[slot],
                              q_g.at[pl.ds(row0, ROWS), pl.ds(last_first(i) * COLS, COLS)])
      return carry

    stream(last_first, pass2, jnp.int32(0))
    plgpu.wait_smem_to_gmem(0)

  f = plgpu.kernel(
      int8_quant_kernel,
      out_type=(jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((m,), jnp.float32)),
      grid=(pl.cdiv(m, ROWS),), grid_names=("rows",),
      num_threads=wgs if wgs > 1 else None, thread_name="wg" if wgs > 1 else None,
      scratch_types=[rotation_smem(),
                     plgpu.SMEM((wgs * steps, ROWS, COLS), jnp.bfloat16,
                                transforms=bf16_tile_transforms()),
                     plgpu.SMEM((2 * wgs, ROWS), jnp.float32), plgpu.SMEM((ROWS,), jnp.float32),
                     plgpu.SMEM((2 * wgs, ROWS, COLS), jnp.int8, transforms=s8_tr),
                     plgpu.Barrier(), plgpu.Barrier(num_barriers=wgs * steps),
                     plgpu.Barrier(num_arrivals=wgs)],
      interpret=interpret)
  q, s = f(x, h)
  return q, s[:, None]


reference = int8_quant.reference
