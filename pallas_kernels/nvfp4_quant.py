"""NVFP4 activation quantizer for the W4A4 kernel, emitting QDQ bf16 (Mosaic GPU, 2 launches).

  quantize_qdq(x[M, K], config) -> (v bf16[M, K], g f32[])
  v = formats.nvfp4_block_values(formats.quantize_nvfp4(rotate(x)))   e2m1 * f32(s), exact in bf16
  g = the tensor scale, applied by the matmul's epilogue

Both launches run one CTA per 64 rows and K chunk (`k_splits`; by default enough CTAs for ~8
per SM, since the tiles are independent along K once g is known). Kernel 1
(int8_quant_mgpu.row_amax_mgpu, the INT8 quantizer's pass 1 alone) streams x, rotates each
64 x 128 tile on the tensor cores (the +-1 matrix, or the identity: exact) and keeps the
per-row absmax of the f32 result; XLA reduces them to g exactly as
formats.nvfp4_global_scale. Kernel 2 (`qdq_kernel`): streams x again, rotates the same way
(bit-identical y), takes each 16-element block's absmax in registers (two registers
and a quad of lanes: 2 shuffles, inline Mosaic GPU) and its scale there, once per block:
s = e4m3(min(amax / (6 g), 448)); then elementwise q = y / (f32(s) g) (true division, as
formats.exact_div), e2m1 round-half-even, v = e2m1 * f32(s) -> bf16, written by TMA.
HBM: 2 reads + 1 write of bf16.
`quantize_qdq_xla` is the same function as one XLA fusion chain (any shape or dtype).

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
import numpy as np
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from mpqjax import formats
from pallas_kernels import int8_quant
from pallas_kernels.int8_quant_mgpu import (COLS, ROWS, bf16_tile_transforms, load_to_smem,
                                            pick_k_splits, rotate_tile, rotation_operands,
                                            rotation_smem, row_amax_mgpu, row_tiles_spec)


@dataclasses.dataclass(frozen=True)
class NVFP4QuantConfig:
  """hadamard_block: 0 for none, else a power of two dividing K (128 in mpqjax; the Mosaic
  kernels take 0 or 128). k_splits: CTAs per 64-row block along K in both launches (None:
  int8_quant_mgpu.pick_k_splits). e2m1_bits: the e2m1 rounding by float/bit arithmetic
  (`_qdq_values`, same values), else by `_e2m1_round`'s step selects."""
  hadamard_block: int = 0
  max_concurrent_steps: int = 4
  k_splits: int | None = None
  e2m1_bits: bool = True


def rotate(x: jax.Array, hadamard_block: int, out_perm=None) -> jax.Array:
  """The online Hadamard half in f32 (identity when hadamard_block == 0); out_perm: see
  int8_quant.hadamard_tc."""
  if hadamard_block:
    return int8_quant.hadamard_tc(x, hadamard_block, out_perm)
  return x.astype(jnp.float32)


def supported(x: jax.Array, config: NVFP4QuantConfig) -> bool:
  """Whether the Mosaic kernels take x (else quantize_qdq runs the XLA fusion)."""
  return (x.ndim == 2 and x.dtype == jnp.bfloat16 and x.shape[1] % COLS == 0
          and config.hadamard_block in (0, COLS))


def quantize_qdq(x: jax.Array, config: NVFP4QuantConfig = NVFP4QuantConfig(), interpret=None,
                 use_mgpu: bool = True):
  """x[M, K] (bf16 or f32; K % 16 == 0) -> (bf16[M, K] block values, f32[] tensor scale).
  The Mosaic kernels where `supported` (and use_mgpu), else the XLA fusion."""
  if use_mgpu and supported(x, config):
    return quantize_qdq_mgpu(x, config, interpret)
  return quantize_qdq_xla(x, config)


def quantize_qdq_xla(x: jax.Array, config: NVFP4QuantConfig = NVFP4QuantConfig()):
  """The same as one XLA fusion chain (formats.quantize_nvfp4 on the rotated x)."""
  with jax.named_scope("nvfp4_quant"):
    t = formats.quantize_nvfp4(rotate(x, config.hadamard_block))
    return formats.nvfp4_block_values(t).astype(jnp.bfloat16), t.global_scale


def reference(x: jax.Array, config: NVFP4QuantConfig = NVFP4QuantConfig()):
  """The packed-codes path of mpqjax.qlinear_xla (f32 HIGHEST rotation): NVFP4Tensor."""
  y = x.astype(jnp.float32)
  if config.hadamard_block:
    y = formats.hadamard(y, config.hadamard_block)
  return formats.quantize_nvfp4(y)


# --------------------------------------------------------------------------- Mosaic kernels
def _block_scales(a: jax.Array, g_ref, interpret: bool):
  """|y| [64, 128] f32 (wgmma layout), g_ref f32[4] = (g, 6 g, pad) -> (s32, d), each [64, 128]
  f32 holding the value of the element's 16-wide row block: s32 = f32(e4m3(min(amax / 6g,
  448))) (formats.quantize_nvfp4's block scale) and d = s32 * g (the divisor of its values).

  On the GPU each thread computes them once per 4 elements it holds of a block (its quad
  holds the 16) instead of once per element: the division and the e4m3 round trip are most
  of the quantizer's per-element work (NOTES.md)."""
  rows, cols = a.shape
  f = np.float32
  if interpret:
    m = a.reshape(rows, cols // 16, 16).max(axis=-1, keepdims=True)
    m = jnp.broadcast_to(m, (rows, cols // 16, 16)).reshape(rows, cols)
    s = jnp.minimum(m / g_ref[1], f(formats.E4M3_MAX))
    s32 = s.astype(jnp.float8_e4m3fn).astype(jnp.float32)
    return s32, s32 * g_ref[0]
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm, memref, vector
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils

  out_ty = plgpu.ShapeDtypeStruct((rows, cols), jnp.float32, layout=plgpu.Layout.WGMMA)

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()),
                     return_type=(out_ty, out_ty))
  def fn(_, arr, g_smem):
    regs = arr.registers
    # wgmma layout: register (i, j, 0, 0, h, ...) holds columns 8j + 2 (lane % 4) + {0, 1} of
    # one row: block b = registers j = 2b, 2b + 1 of the 4 lanes of a quad.
    assert regs.shape[1] == cols // 8 and regs.shape[4] == 2, regs.shape
    f32, i16, i32 = ir.F32Type.get(), ir.IntegerType.get_signless(16), ir.IntegerType.get_signless(32)
    v2 = ir.VectorType.get((2,), f32)
    idx_c = lambda i: arith.constant(ir.IndexType.get(), i)
    g, six_g = memref.load(g_smem, [idx_c(0)]), memref.load(g_smem, [idx_c(1)])
    e4m3_max = arith.constant(f32, float(formats.E4M3_MAX))
    elem = lambda r, e: vector.extract(r, dynamic_position=[],
                                       static_position=ir.DenseI64ArrayAttr.get([e]))

    def e4m3_round_trip(v):  # f32 -> e4m3 (RNE, satfinite as Mosaic's astype) -> f32
      packed = llvm.inline_asm(i16, [v], "cvt.rn.satfinite.e4m3x2.f32 $0, $1, $1;", "=h,f")
      halves = llvm.inline_asm(i32, [packed], "cvt.rn.f16x2.e4m3x2 $0, $1;", "=r,h")
      return llvm.inline_asm(f32, [halves],
                             "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $1; cvt.f32.f16 $0, lo; }",
                             "=f,r")

    out_s = np.empty(regs.shape, dtype=object)
    out_d = np.empty(regs.shape, dtype=object)
    for idx in np.ndindex(regs.shape):
      if idx[1] % 2:
        continue
      nxt = (idx[0], idx[1] + 1, *idx[2:])
      m = None
      for r in (regs[idx], regs[nxt]):
        for e in range(2):
          v = elem(r, e)
          m = v if m is None else arith.maximumf(m, v)
      m = arith.maximumf(m, mgpu_utils.shfl_bfly(m, 1))
      m = arith.maximumf(m, mgpu_utils.shfl_bfly(m, 2))
      s32 = e4m3_round_trip(arith.minimumf(arith.divf(m, six_g), e4m3_max))
      out_s[idx] = out_s[nxt] = vector.broadcast(v2, s32)
      out_d[idx] = out_d[nxt] = vector.broadcast(v2, arith.mulf(s32, g))
    wrap = lambda o: mgpu.FragmentedArray(_registers=o, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)
    return wrap(out_s), wrap(out_d)

  return fn(a, g_ref)


def _e2m1_round(a: jax.Array) -> jax.Array:
  """|q| f32 -> e2m1 magnitude (f32), round-half-even, saturating at 6, NaN -> 0: the values
  of formats.e2m1_decode(formats.e2m1_encode(q)) (tests/test_kernels_nvfp4.py checks every
  representable tie and a dense grid). e2m1 steps by 0.5 below 2, by 1 in [2, 4) and by 2
  above, so round(a / step) * step with round-half-even (exact: the steps are powers of two):
  ~12 ops per element instead of the 21 of summing the 7 threshold steps."""
  f = np.float32
  big, mid = a >= f(4.0), a >= f(2.0)
  inv_step = jnp.where(big, f(0.5), jnp.where(mid, f(1.0), f(2.0)))
  step = jnp.where(big, f(2.0), jnp.where(mid, f(1.0), f(0.5)))
  v = jnp.minimum(jnp.round(a * inv_step) * step, f(formats.E2M1_MAX))
  return jnp.where(a == a, v, f(0.0))  # a NaN quotient (0/0 in an all-zero block) gives 0


_SMALL_MAGIC = 1.5 * 2.0 ** 22  # (a + it) - it rounds a < 2^21 to a multiple of 0.5, half to even


def _qdq_values(q: jax.Array, s32: jax.Array, interpret: bool, bits: bool = True) -> jax.Array:
  """q = y / d and the block scale s32 (f32, wgmma layout) -> v = sign(q) e2m1(|q|) s32 (f32),
  the QDQ value (e2m1 round-half-even, saturating at 6; a NaN quotient, which only 0 / 0 in
  a block with s32 = 0 gives, makes v 0, as `_e2m1_round`).

  On the GPU (`bits`), per element with a = |q| (bit and):
    a < 2: (a + 1.5 * 2^22) - 1.5 * 2^22, the float add itself rounding to a multiple of 0.5
      half to even (e2m1's step there, and its codes' parity);
    a >= 2: round the f32 bits to 1 mantissa bit half to even (add 0x1FFFFF + bit 22, clear
      the 22 low bits): e2m1's grid 2, 3, 4, 6 (8 and above, inf, NaN saturate below);
    then minnum(r, 6) (NaN -> 6, times s32 = 0), times s32, and the sign bit of q + 0 or-ed
    in (so that -0.0 gives +0, as q < 0 does):
  ~13 instructions instead of `_e2m1_round`'s ~20 with the sign select and the NaN test.
  Interpret mode (and bits=False) runs the jnp form."""
  if interpret or not bits:
    mag = _e2m1_round(jnp.abs(q))
    return jnp.where(q < 0, -mag, mag) * s32
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils

  layout = plgpu.Layout.WGMMA

  @plgpu.inline_mgpu(arg_types=(layout, layout),
                     return_type=plgpu.ShapeDtypeStruct(q.shape, jnp.float32, layout=layout))
  def fn(_, q_a, s_a):
    out = np.empty(q_a.registers.shape, dtype=object)
    fty = q_a.registers.flat[0].type  # every register is the same vector<N x f32>
    ity = ir.VectorType.get(ir.VectorType(fty).shape, ir.IntegerType.get_signless(32))
    ci = lambda v: arith.constant(ity, ir.DenseElementsAttr.get_splat(
        ity, ir.IntegerAttr.get(ir.IntegerType.get_signless(32), v)))
    cf = lambda v: arith.constant(fty, ir.DenseElementsAttr.get_splat(
        fty, ir.FloatAttr.get(ir.F32Type.get(), v)))
    for idx in np.ndindex(out.shape):
      qr, sr = q_a.registers[idx], s_a.registers[idx]
      qb = mgpu_utils.bitcast(qr, ity)
      # the sign of q + 0 (-0 + 0 = +0): -0.0 gives +0, as `q < 0` in the jnp form
      sign = arith.andi(mgpu_utils.bitcast(arith.addf(qr, cf(0.0)), ity), ci(-(1 << 31)))
      ub = arith.andi(qb, ci(0x7FFFFFFF))
      a = mgpu_utils.bitcast(ub, fty)
      small = arith.subf(arith.addf(a, cf(_SMALL_MAGIC)), cf(_SMALL_MAGIC))
      lsb = arith.andi(arith.shrui(ub, ci(22)), ci(1))
      big = arith.andi(arith.addi(arith.addi(ub, ci(0x1FFFFF)), lsb), ci(-(1 << 22)))
      r = arith.select(arith.cmpf(arith.CmpFPredicate.OLT, a, cf(2.0)), small,
                       mgpu_utils.bitcast(big, fty))
      r = arith.mulf(arith.minnumf(r, cf(formats.E2M1_MAX)), sr)
      out[idx] = mgpu_utils.bitcast(arith.ori(mgpu_utils.bitcast(r, ity), sign), fty)
    return mgpu.FragmentedArray(_registers=out, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

  return fn(q, s32)


def quantize_qdq_mgpu(x: jax.Array, config: NVFP4QuantConfig = NVFP4QuantConfig(),
                      interpret=None):
  """The Mosaic GPU path of quantize_qdq (x bf16[M, K], K % 128 == 0)."""
  if not supported(x, config):
    raise ValueError(f"quantize_qdq_mgpu needs bf16 [M, K] with K % {COLS} == 0 "
                     f"and hadamard_block in (0, {COLS}); got {x.dtype} {x.shape}, {config}")
  m, k = x.shape
  if m % ROWS:  # whole 64-row CTAs; the zero rows change neither amax nor the kept rows
    v, g = quantize_qdq_mgpu(jnp.pad(x, ((0, -m % ROWS), (0, 0))), config, interpret)
    return v[:m], g
  nk = k // COLS
  splits = config.k_splits or pick_k_splits(m, k)
  nk_cta = nk // splits  # row_amax_mgpu below rejects a split that does not divide nk
  interp = interpret is not None
  h, post = rotation_operands(config.hadamard_block)
  bf16_tr = bf16_tile_transforms()
  steps = min(config.max_concurrent_steps, nk_cta)

  row_amax, row_bad = row_amax_mgpu(x, config.hadamard_block, config.max_concurrent_steps,
                                    interpret, k_splits=splits)
  # formats.nvfp4_global_scale on the kernel's per-row absmax
  amax = jnp.max(row_amax)
  g = formats.exact_div(amax, jnp.float32(formats.E2M1_MAX * formats.E4M3_MAX))
  g = jnp.where(amax == 0, jnp.float32(1.0), g)
  g = jnp.where(jnp.any(row_bad > 0) | ~jnp.isfinite(amax), jnp.float32(jnp.nan), g)
  # g, 6 g (formats' order of ops), padded to the 16 bytes a TMA copy needs at least
  g_in = jnp.stack([g, jnp.float32(formats.E2M1_MAX) * g, jnp.float32(0), jnp.float32(0)])

  def qdq_kernel(x_g, h_g, g_g, v_g, h_s, v_s, g_s, bar):
    row0 = lax.axis_index("rows") * ROWS
    kb0 = lax.axis_index("k") * nk_cta  # this CTA's first column tile
    load_to_smem(h_g, h_s, bar)
    load_to_smem(g_g, g_s, bar)

    def body(idx, x_s):
      (kb,) = idx
      y = rotate_tile(x_s, h_s, post)
      s32, d = _block_scales(jnp.abs(y), g_s, interp)
      v = _qdq_values(y / d, s32, interp, config.e2m1_bits)
      slot = lax.rem(kb, 2)
      plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the store that used this slot
      v_s[slot] = v.astype(jnp.bfloat16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(v_s.at[slot],
                              v_g.at[pl.ds(row0, ROWS), pl.ds((kb0 + kb) * COLS, COLS)])

    plgpu.emit_pipeline(body, grid=(nk_cta,), in_specs=[row_tiles_spec()],
                        max_concurrent_steps=steps)(
        x_g.at[pl.ds(row0, ROWS), pl.ds(kb0 * COLS, nk_cta * COLS)])
    plgpu.wait_smem_to_gmem(0)

  qdq_f = plgpu.kernel(
      qdq_kernel, out_type=jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
      grid=(m // ROWS, splits), grid_names=("rows", "k"),
      scratch_types=[rotation_smem(),
                     plgpu.SMEM((2, ROWS, COLS), jnp.bfloat16, transforms=bf16_tr),
                     plgpu.SMEM((4,), jnp.float32),
                     plgpu.Barrier()],
      interpret=interpret)
  return qdq_f(x, h, g_in), g
