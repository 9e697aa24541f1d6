"""NVFP4 weight x bf16 activation matmul for Hopper (Mosaic GPU), the W4A16 / W4A4 kernel.

  y[m, n] = bf16(f32(sum_k x[m, k] * wv[n, k]) * col_scale[n] + bias[n])
  wv[n, k] = e2m1(code[n, k]) * f32(s[n, k // 16])      (exact in bf16)

which is mpqjax.qlinear_xla's W4A16 arithmetic (col_scale = the weight's tensor scale) and,
fed a QDQ activation (pallas_kernels.nvfp4_quant), its W4A4 arithmetic (col_scale = both
tensor scales): bf16 products, f32 accumulation, f32 epilogue.

Hopper has no FP4 tensor cores, so the weight is decoded in registers: it is the wgmma A
operand and the kernel computes y^T = W . x^T (the layout of tokamax's sm90 quantized
ragged_dot). Per pipeline step a consumer warpgroup loads its [tile_n, tile_k] slice of
codes (int4 view of the packed uint8 codes, moved by TMA at 0.5 B per element), relays it
out to the wgmma register layout, turns each pair of nibbles into a bf16x2 by bit
arithmetic and multiplies by the block scale (`decode="bits"`):

  e2m1 bits s e1 e0 m -> bf16 bits s 0000000 0e1e0 m000000 = e2m1 * 2^-126 (exact: a bf16
  subnormal when e == 0), times the block scale stored as bf16(s * 2^119): e2m1 * s * 2^-7,
  exact in bf16; the epilogue multiplies the 2^7 back in with the tensor scale.

`decode="int4"` is the same with Mosaic's own int4 -> bf16 conversion followed by bf16
arithmetic (slower; a fallback). Activations [tile_m, tile_k] bf16 are the B operand,
transposed in shared memory (bf16 wgmma takes either major-ness). The accumulator is
[tile_n, tile_m]; the epilogue applies scale and bias per accumulator row and stores the
tile transposed (a register transpose of 2x2 blocks, then swizzled SMEM, then TMA).

Structure (shared with w8a8_matmul): a persistent grid of one CTA per SM walks the output
tiles; one TMA producer warpgroup and two consumer warpgroups (each its own tile_n weight
rows, both the same tile_m activation rows). Split-K (small M): raw f32 partials
[k_splits, N, M] (stored untransposed), summed and scaled in XLA.

In Mosaic GPU's interpret mode (CPU tests) inline Mosaic code cannot run and wgmma reads A
from SMEM only, so there the decode is jnp on the same tile and goes through SMEM.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu

from mpqjax import formats
from pallas_kernels.w8a8_matmul import (Dim, chained_pipeline_state, num_sms, persistent_tile,
                                        smem_transforms, tiles_chain)

# The "bits" decode yields e2m1 * 2^-126; scales carry 2^119 so that s * 2^119 <= 448 * 2^119
# stays below bf16's max and the product e2m1 * s * 2^-7 is exact; the epilogue has 2^7.
_BITS_SCALE_EXP = 119
_BITS_GAIN_EXP = 126 - _BITS_SCALE_EXP


@dataclasses.dataclass(frozen=True)
class NVFP4MatmulConfig:
  """tile_n: weight rows per consumer warpgroup (wgmma M, multiple of 64); the CTA has two.
  tile_m: activation rows per CTA (wgmma N, multiple of 8 up to 256). tile_k: multiple of 64.
  decode: "bits" relays the codes out to the wgmma register layout with shuffles, then
  decodes each pair; "perm" (pick_config's, DEFAULT_DECODE) decodes each thread's 8
  consecutive codes in place and runs the wgmma over K-permuted columns (`permute_k`, applied
  to x by the wrapper or folded into the rotation by qlinear_mosaic); "int4" uses Mosaic's
  int4 -> bf16 conversion.
  decode_chunks ("perm" only): decode each K step in this many column chunks, each chunk's
  wgmma issued before the next chunk is decoded (one wait per step), so that the decode
  overlaps the tensor cores within a warpgroup; tile_k % (64 * decode_chunks) == 0.
  e4m3_scales: read the block scales as stored (e4m3 bytes [N, K/16]) and convert them in
  registers, two per instruction, instead of the bf16[K/16, N] copy `weight_operands` makes per
  call; needs the "perm" decode, tile_k >= 256 and K % 256 == 0 (TMA boxes and row strides of
  the scales are whole multiples of 16 bytes), and scales as formats.quantize_nvfp4 writes them
  (non-negative; a zero scale's codes zero: see _e4m3_pair_to_scaled_bf16x2).
  pingpong: stagger the two consumer warpgroups (a 2-arrival barrier around the decode) so
  that one decodes while the other's wgmma runs; measured 10% slower on an H200 (NOTES.md), off.
  (A double-buffered SMEM copy of the decoded tile with one wgmma in flight was measured 9%
  slower too and removed in session 6; NOTES.md, "SMEM decode".)
  chain_tiles: a CTA's tiles chain their K pipelines (as w8a8_matmul's, Pallas'
  PipelinePipeline states): the TMA warpgroup fetches the next tile's first steps while the
  consumers run this tile's epilogue. Applies where every CTA has >= 2 tiles and the stages
  divide the K steps; for short-K work (nvfp4_derotate: 2 steps per tile), off elsewhere.
  """
  tile_n: int = 64
  tile_m: int = 256
  tile_k: int = 64
  max_concurrent_steps: int = 4
  epi_tile_m: int = 64
  grid_minor_dim: Dim = Dim.N
  grid_tile_width: int = 8
  k_splits: int = 1
  decode: str = "bits"
  e4m3_scales: bool = False
  pingpong: bool = False
  decode_chunks: int = 1
  chain_tiles: bool = False

  @property
  def cta_tile_n(self) -> int:
    return 2 * self.tile_n


def pick_config(m: int, n: int, k: int, sms: int | None = None) -> NVFP4MatmulConfig:
  """Heuristic tiles (pallas_kernels/NOTES.md): 128 x 256 CTA tiles when M is large; for
  small M an activation tile of M rounded up to a power of two >= 32, split-K until the SMs
  are busy, K steps of 256 or 128 where they divide a split, and with the "perm" decode the
  stored e4m3 scales and K-chunked decode + wgmma where the K step allows."""
  sms = sms or num_sms()
  if m > 128:
    return NVFP4MatmulConfig(decode=DEFAULT_DECODE)
  tile_m = max(32, 1 << (m - 1).bit_length())  # 32, 64 or 128 (split-K stores 32-row chunks)
  cfg = NVFP4MatmulConfig(tile_m=tile_m, tile_k=64, max_concurrent_steps=6,
                          epi_tile_m=tile_m, grid_minor_dim=Dim.M, grid_tile_width=1,
                          decode=DEFAULT_DECODE)
  tiles = pl.cdiv(n, cfg.cta_tile_n)
  k_iters = k // cfg.tile_k
  # the most splits (a divisor of the K steps, >= 2 steps each) that still fits on the SMs
  splits = max((s for s in range(1, k_iters + 1)
                if k_iters % s == 0 and k_iters // s >= 2 and tiles * s <= sms), default=1)
  cfg = dataclasses.replace(cfg, k_splits=splits)
  # then the widest K step that divides each split into >= 2 steps and whose stages fit shared
  # memory: fewer, bigger steps (at M = 64 on an H200: 2-15% faster than 64-wide, NOTES.md
  # "Session 8")
  k_split = k // splits
  for tile_k, stages in _SMALL_M_K_STEPS:
    if (k_split % tile_k == 0 and k_split // tile_k >= 2
        and stages * _stage_bytes(cfg, tile_k) <= _SMALL_M_PIPELINE_BYTES):
      # the "perm" options where this step takes them (tile_k divides K, so a 256-wide step
      # also means K % 256 == 0, as the e4m3 scales need)
      return replace_config(cfg, tile_k=tile_k, max_concurrent_steps=stages,
                            e4m3_scales=SMALL_M_E4M3_SCALES,
                            decode_chunks=SMALL_M_DECODE_CHUNKS)
  return cfg


# pick_config's decode, and (small M, "perm" decode) whether the block scales are read as
# stored and converted in the kernel (no per-call bf16 copy). Both measured faster end to end
# through MOSAIC.w4a16 at every shape tried on an H100 (NOTES.md, "Session 11").
DEFAULT_DECODE = "perm"
SMALL_M_E4M3_SCALES = True
# Small-M "perm" configs: K chunks per step, each chunk's wgmma in flight while the next one
# decodes. H100, bf16 scales: best or tied at the three M = 64 shapes (64 x 3072 x 12288: 19.6 ->
# 17.2 us); with the e4m3 scales since their conversion went to two per cvt, 1 / 2 / 4 chunks
# are within 4% of each other (NOTES.md, "Session 11", "Session 12").
SMALL_M_DECODE_CHUNKS = 4


_SMALL_M_K_STEPS = ((256, 3), (128, 4))  # (tile_k, pipeline stages), widest first
_SMALL_M_PIPELINE_BYTES = 160 * 1024  # leaves room for the epilogue's buffers


def _stage_bytes(cfg: NVFP4MatmulConfig, tile_k: int) -> int:
  """Shared memory of one pipeline stage: the bf16 activation tile, the packed codes and the
  bf16 block scales of the CTA's weight rows."""
  return (cfg.tile_m * tile_k * 2 + cfg.cta_tile_n * tile_k // 2
          + tile_k // 16 * cfg.cta_tile_n * 2)


def _unfit_perm_options(cfg: NVFP4MatmulConfig) -> set[str]:
  """The "perm"-only options set in cfg that it cannot take (K aside): "decode_chunks" needs
  the "perm" decode, no pingpong and tile_k % (64 * decode_chunks) == 0; "e4m3_scales" needs
  the "perm" decode and tile_k >= 256. The one statement of these rules, for `_check` and
  `replace_config`."""
  perm, chunks = cfg.decode == "perm", cfg.decode_chunks
  unfit = set()
  if chunks < 1 or cfg.tile_k % (64 * chunks) or (chunks > 1 and (not perm or cfg.pingpong)):
    unfit.add("decode_chunks")
  if cfg.e4m3_scales and (not perm or cfg.tile_k < 256):
    unfit.add("e4m3_scales")
  return unfit


_PERM_OPTION_OFF = {"decode_chunks": 1, "e4m3_scales": False}


def replace_config(cfg: NVFP4MatmulConfig, **changes) -> NVFP4MatmulConfig:
  """dataclasses.replace, then the "perm"-only options (stored e4m3 scales, K chunks) turned
  off where the new config cannot take them (another decode, pingpong, a narrower K step):
  for variants of pick_config's configs."""
  cfg = dataclasses.replace(cfg, **changes)
  return dataclasses.replace(cfg, **{o: _PERM_OPTION_OFF[o] for o in _unfit_perm_options(cfg)})


def supported(m: int, n: int, k: int, cfg: NVFP4MatmulConfig) -> bool:
  return (m > 0 and n % cfg.cta_tile_n == 0 and k % (cfg.tile_k * cfg.k_splits) == 0)


def _check(x, w4, ws, cfg: NVFP4MatmulConfig):
  (_, k), (n, k2) = x.shape, w4.shape  # any M: the wrapper pads it
  if x.dtype != jnp.bfloat16:
    raise ValueError(f"nvfp4_matmul: activations must be bf16, got {x.dtype}")
  if w4.dtype != jnp.int4:
    raise ValueError(f"nvfp4_matmul: weight codes must be the int4 view, got {w4.dtype}")
  if k != k2:
    raise ValueError(f"nvfp4_matmul: x is {x.shape} but the weight is {w4.shape}; K must match")
  if n % cfg.cta_tile_n:
    raise ValueError(f"nvfp4_matmul: N={n} must be a multiple of the CTA tile {cfg.cta_tile_n}")
  if k % (cfg.tile_k * cfg.k_splits):
    raise ValueError(f"nvfp4_matmul: K={k} must be a multiple of tile_k*k_splits="
                     f"{cfg.tile_k * cfg.k_splits}")
  if cfg.tile_n % 64 or cfg.tile_k % 64 or cfg.tile_m % 8 or cfg.tile_m % cfg.epi_tile_m:
    raise ValueError(f"nvfp4_matmul: bad tiles {cfg}")
  if cfg.k_splits > 1 and cfg.tile_m % 32:
    raise ValueError(f"nvfp4_matmul: split-K needs tile_m % 32 == 0, got {cfg}")
  if cfg.decode not in DECODES:
    raise ValueError(f"nvfp4_matmul: decode must be one of {DECODES}, got {cfg.decode!r}")
  unfit = _unfit_perm_options(cfg)
  if "e4m3_scales" in unfit or (cfg.e4m3_scales and k % 256):
    raise ValueError(f"nvfp4_matmul: e4m3_scales needs the 'perm' decode, tile_k >= 256 and "
                     f"K % 256 == 0 (TMA: scale rows of whole 16 bytes), got K={k}, {cfg}")
  if "decode_chunks" in unfit:
    raise ValueError(f"nvfp4_matmul: decode_chunks needs the 'perm' decode, no pingpong and "
                     f"tile_k % (64 * decode_chunks) == 0, got {cfg}")
  want = (jnp.uint8, (n, k // 16)) if cfg.e4m3_scales else (jnp.bfloat16, (k // 16, n))
  if (ws.dtype, ws.shape) != want:
    raise ValueError(f"nvfp4_matmul: block scales are {ws.dtype}{list(ws.shape)}, want "
                     f"{jnp.dtype(want[0])}{list(want[1])} (weight_operands(e4m3_scales="
                     f"{cfg.e4m3_scales}))")


DECODES = ("perm", "bits", "int4")


# ------------------------------------------------------------------------------ operands
def weight_operands(t: formats.NVFP4Tensor, decode: str = "bits", e4m3_scales: bool = False):
  """NVFP4Tensor [N, K] -> (codes int4[N, K], block scales bf16[K/16, N], gain f32).

  The int4 view reinterprets the packed bytes (element 2i = low nibble, as in formats); the
  scales are transposed so that a TMA box of them is >= 16 bytes wide, and pre-multiplied
  for the "bits" / "perm" decodes; `gain` is what the epilogue multiplies back (2^7 or 1).
  e4m3_scales: the stored scales' bytes instead, uint8[N, K/16] (free bitcast; the kernel
  converts them to the same bf16(s * 2^119)).
  """
  n, kh = t.codes.shape
  w4 = lax.bitcast_convert_type(t.codes, jnp.int4).reshape(n, 2 * kh)
  if e4m3_scales:
    return (w4, lax.bitcast_convert_type(t.scales, jnp.uint8),
            np.float32(2.0 ** _BITS_GAIN_EXP))
  exp = 0 if decode == "int4" else _BITS_SCALE_EXP
  ws = (t.scales.astype(jnp.float32) * np.float32(2.0 ** exp)).astype(jnp.bfloat16).T
  return w4, ws, np.float32(2.0 ** (exp and _BITS_GAIN_EXP))


def _decoded_values_jnp(w4, ws, decode: str):
  """jnp decode of a [rows, K] int4 tile with its [K/16, rows] scales (or uint8 e4m3 bytes
  [rows, K/16]) -> bf16 (the kernel's values; used in interpret mode and by `reference`)."""
  codes = (w4.astype(jnp.int32) & 0xF).astype(jnp.uint8)
  vals = formats.e2m1_decode(codes)
  if ws.dtype == jnp.uint8:  # e4m3 bytes: the kernel's bf16(s * 2^119)
    s = lax.bitcast_convert_type(ws, jnp.float8_e4m3fn).astype(jnp.float32) * np.float32(
        2.0 ** _BITS_SCALE_EXP)
  else:
    s = ws.astype(jnp.float32).T
  if decode != "int4":
    s = s * np.float32(2.0 ** -126)
  s = jnp.repeat(s, formats.NVFP4_BLOCK, axis=-1)
  return (vals * s).astype(jnp.bfloat16)


# ------------------------------------------------------------------------ register decode
def _decode_bits(w4_wgmma, ws_ref):
  """int4 [tile_n, tile_k] in the wgmma layout -> bf16 wgmma A operand, scales from SMEM."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, memref, vector
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils

  rows, cols = w4_wgmma.shape

  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()),
      return_type=plgpu.ShapeDtypeStruct((rows, cols), jnp.bfloat16, layout=plgpu.Layout.WGMMA))
  def decode(_, w, s_ref):
    i8, i32 = ir.IntegerType.get_signless(8), ir.IntegerType.get_signless(32)
    bf16 = ir.BF16Type.get()
    v2bf16 = ir.VectorType.get((2,), bf16)
    c = lambda v: arith.constant(i32, v)
    regs = w.registers
    # WGMMA layout: register (i, j, 0, 0, h, 0...) holds row 64i + 16 warp + 8h + lane/4,
    # columns 8j + 2 (lane % 4) + {0, 1}: its block scale is column block j // 2.
    assert regs.shape[:2] == (rows // 64, cols // 8) and regs.shape[4] == 2, regs.shape
    assert all(d == 1 for d in regs.shape[2:4] + regs.shape[5:]), regs.shape
    row_of = {}
    for mlir_idx, reg_idx in zip(w.layout.thread_idxs(w.shape), np.ndindex(regs.shape)):
      if reg_idx[1] == 0:
        row_of[(reg_idx[0], reg_idx[4])] = mlir_idx[0]
    scale_cache = {}
    out = np.empty(regs.shape, dtype=object)
    for reg_idx in np.ndindex(regs.shape):
      i, j, h = reg_idx[0], reg_idx[1], reg_idx[4]
      b = arith.extui(i32, mgpu_utils.bitcast(regs[reg_idx], i8))  # n1 n0 in bits 7..0
      # n0 -> bits 15..12, n1 -> bits 31..28; then sign stays, magnitude moves to bits 8..6.
      q = arith.ori(arith.shli(b, c(12)), arith.shli(b, c(24)))
      mag = arith.andi(arith.shrui(q, c(6)), c(0x01C001C0))
      bits = arith.ori(arith.andi(q, c(0x80008000 - (1 << 32))), mag)
      val = mgpu_utils.bitcast(bits, v2bf16)
      key = (i, j // 2, h)
      if key not in scale_cache:
        col = arith.constant(ir.IndexType.get(), j // 2)
        s = memref.load(s_ref, [col, row_of[(i, h)]])
        scale_cache[key] = vector.broadcast(v2bf16, s)
      out[reg_idx] = arith.mulf(val, scale_cache[key])
    return mgpu.FragmentedArray(_registers=out, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

  return decode(w4_wgmma, ws_ref)


def permute_k(a: jax.Array) -> jax.Array:
  """[..., K] -> [..., K] in the column order the "perm" decode feeds the wgmma (K % 32 == 0).

  Within each 32 columns, logical column 8a + 2b + e holds physical column 8b + 4e + a
  (a, b < 4; e < 2): thread b of a row quad holds the physical columns 8b..8b+7 (one 32-bit
  word of codes, one block scale), and its wgmma register a pairs the codes a and a + 4, which
  lie 16 bits apart, so that one shift and mask per field decodes both halves."""
  *lead, k = a.shape
  xp = np if isinstance(a, np.ndarray) else jnp  # numpy stays numpy (k_permutation, traced code)
  return xp.moveaxis(a.reshape(*lead, k // 32, 4, 2, 4), -1, -3).reshape(*lead, k)


def k_permutation(k: int) -> np.ndarray:
  """int[k]: the physical column at each logical position of `permute_k` (k % 32 == 0)."""
  return permute_k(np.arange(k))


# bf16 bits of s * 2^119 from an f16 s >= 0 (normal or zero): exponent and mantissa moved down
# to bf16's fields (>> 3: the dropped mantissa bits are zero for e4m3 values) and the exponent
# rebiased by -15 + 127 + 119; applied to both halves of an f16x2 word at once.
_F16_TO_SCALED_BF16_ADD = ((127 + _BITS_SCALE_EXP - 15) << 7) * 0x10001  # 0x73807380 < 2^31


def _e4m3_pair_to_scaled_bf16x2(pair, i32):
  """i16 (MLIR value) holding two e4m3 scale bytes -> i32 holding bf16(s * 2^119) for each
  (the low byte's in the low half). Exact for every scale formats writes (s >= 0; subnormal
  e4m3 are normal f16): the hardware's e4m3x2 -> f16x2 conversion, then one shift and one add
  for both (`_F16_TO_SCALED_BF16_ADD`). A zero scale comes out as 2^104, not 0: formats zeroes
  such a block's codes, so its values stay 0; negative and NaN codes come out wrong (formats
  writes neither)."""
  from jax._src.lib.mlir.dialects import arith, llvm
  h2 = llvm.inline_asm(i32, [pair], "cvt.rn.f16x2.e4m3x2 $0, $1;", "=r,h")
  return arith.addi(arith.shrui(h2, arith.constant(i32, 3)),
                    arith.constant(i32, _F16_TO_SCALED_BF16_ADD))


def _decode_perm(w4_upcast, ws_ref, e4m3_scales: bool = False,
                 cols: tuple[int, int] | None = None):
  """int4 [tile_n, tile_k] in the WGMMA_UPCAST_4X layout (a thread's 8 consecutive codes of
  a row in one 32-bit word) -> bf16 wgmma A operand over the `permute_k` columns, decoded in
  place: no shuffles, one block scale per word. Scales: bf16 [tile_k/16, tile_n] ref, or with
  e4m3_scales the stored bytes [tile_n, tile_k/16]. cols = (start, width), multiples of 32:
  only those columns -> bf16 [tile_n, width]."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, memref, vector
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils

  rows, all_cols = w4_upcast.shape
  col0, cols = cols or (0, all_cols)
  assert col0 % 32 == 0 and cols % 32 == 0 and col0 + cols <= all_cols, (col0, cols, all_cols)

  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA_UPCAST_4X, plgpu.RefType()),
      return_type=plgpu.ShapeDtypeStruct((rows, cols), jnp.bfloat16, layout=plgpu.Layout.WGMMA))
  def decode(_, w, s_ref):
    i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
    v2bf16 = ir.VectorType.get((2,), ir.BF16Type.get())
    c = lambda v: arith.constant(i32, v)
    sign_mask, mag_mask = c(0x80008000 - (1 << 32)), c(0x01C001C0)
    sixteen = arith.constant(index, 16)

    def shift(x, n):  # logical shift by n (left if n > 0)
      if n > 0:
        return arith.shli(x, c(n))
      return arith.shrui(x, c(-n)) if n < 0 else x

    regs = w.registers
    # register (i, t, 0, 0, h, ...) holds row 64i + 16 warp + 8h + lane/4, columns
    # 32t + 8 (lane % 4) + 0..7 (code e in bits 4e+3..4e): block scale (32t + 8 (lane % 4)) / 16.
    assert regs.shape[:2] == (rows // 64, all_cols // 32) and regs.shape[4] == 2, regs.shape
    assert all(d == 1 for d in regs.shape[2:4] + regs.shape[5:]), regs.shape
    out = np.empty((rows // 64, cols // 8) + regs.shape[2:], dtype=object)
    words = {}  # this chunk's registers by row: t -> (index, row, block index, word)
    for (row, col), reg_idx in zip(w.layout.thread_idxs(w.shape), np.ndindex(regs.shape)):
      t = reg_idx[1] - col0 // 32  # this register's 32-column group within the chunk
      if 0 <= t < cols // 32:
        words.setdefault((reg_idx[0],) + reg_idx[2:], {})[t] = (
            reg_idx, row, arith.divui(col, sixteen), regs[reg_idx])
    for by_t in words.values():
      scales = {}  # t -> the word's block scale, broadcast to bf16x2
      if e4m3_scales:  # two words' scale bytes (the same row, t and t + 1) converted at once
        i16 = ir.IntegerType.get_signless(16)
        for t in range(0, cols // 32, 2):
          lo, hi = (arith.extui(i16, memref.load(s_ref, list(by_t[u][1:3]))) for u in (t, t + 1))
          pair = arith.ori(lo, arith.shli(hi, arith.constant(i16, 8)))
          s2 = mgpu_utils.bitcast(_e4m3_pair_to_scaled_bf16x2(pair, i32), v2bf16)
          scales[t] = vector.shuffle(s2, s2, [0, 0])
          scales[t + 1] = vector.shuffle(s2, s2, [1, 1])
      else:
        for t, (_, row, blk, _) in by_t.items():
          scales[t] = vector.broadcast(v2bf16, memref.load(s_ref, [blk, row]))
      for t, (reg_idx, _, _, reg) in by_t.items():
        word = mgpu_utils.bitcast(reg, i32)
        for a in range(4):
          # codes a (bits 4a+3..4a) and a+4 (16 bits up) -> bf16 halves: sign to bit 15 / 31,
          # magnitude to bits 8..6 / 24..22, i.e. e2m1 * 2^-126 (see _decode_bits)
          bits = arith.ori(arith.andi(shift(word, 12 - 4 * a), sign_mask),
                           arith.andi(shift(word, 6 - 4 * a), mag_mask))
          out_idx = (reg_idx[0], 4 * t + a) + reg_idx[2:]
          out[out_idx] = arith.mulf(mgpu_utils.bitcast(bits, v2bf16), scales[t])
    return mgpu.FragmentedArray(_registers=out, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

  return decode(w4_upcast, ws_ref)


def _decode_int4(w4_wgmma, ws_ref):
  """Fallback: Mosaic's int4 -> bf16, then e2m1(v) from the integer v = code - 16 sign by
  bf16 arithmetic, scaled per 16 columns."""
  v = w4_wgmma.astype(jnp.bfloat16)
  neg = v < 0
  mag = jnp.where(neg, v + 8, v)
  zero = jnp.zeros_like(mag)
  f = mag * 0.5 + jnp.maximum(mag - 4, zero) * 0.5 + jnp.maximum(mag - 6, zero)
  f = jnp.where(neg, -f, f)
  rows, cols = v.shape
  chunks = []
  for j in range(cols // 16):
    s = plgpu.load(ws_ref.at[j], layout=plgpu.Layout.WGMMA.reduce(1))
    chunks.append(f[:, 16 * j:16 * (j + 1)] * lax.broadcast_in_dim(s, (rows, 16), [0]))
  return jnp.concatenate(chunks, axis=1)


# ---------------------------------------------------------------------------------- kernel
def _gmem_scalar_splat(ref, n: int):
  """f32[n] in the wgmma row layout, every element ref[0] (a GMEM f32[1] ref: one load per
  thread, no TMA copy, which needs 16 bytes)."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, memref
  from jax.experimental.mosaic import gpu as mgpu

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),),
                     return_type=plgpu.ShapeDtypeStruct((n,), jnp.float32,
                                                        layout=plgpu.Layout.WGMMA.reduce(1)))
  def splat(_, r):
    v = memref.load(r, [arith.constant(ir.IndexType.get(), 0)])
    return mgpu.FragmentedArray.splat(v, (n,), layout=mgpu.WGMMA_ROW_LAYOUT)

  return splat(ref)


def _kernel_call(x, w4, ws, col_scale, bias, cfg: NVFP4MatmulConfig, raw: bool, interpret,
                 sms: int, gain: float = 1.0, weight_major: bool = False):
  """One launch: bf16 [M, N] with the epilogue (weight_major: bf16 [N, M], the accumulator's
  own layout, stored untransposed), or raw f32 partials [k_splits, N, M].
  col_scale f32[N] or f32[1] (one scale for all columns, read in place); bias f32[N] or None;
  gain: a constant factor on col_scale."""
  (m, k), (n, _) = x.shape, w4.shape
  tile_m, tile_n, tile_k = cfg.tile_m, cfg.tile_n, cfg.tile_k
  cta_n = cfg.cta_tile_n
  m_iters, n_iters = pl.cdiv(m, tile_m), n // cta_n
  splits = cfg.k_splits
  k_per_split = k // splits
  k_iters = k_per_split // tile_k
  epi_m = cfg.epi_tile_m if not raw else 32
  x_tr = smem_transforms(tile_k * 2, 16)
  w_tr = smem_transforms(tile_k // 2, 4)
  out_dtype = jnp.float32 if raw else jnp.bfloat16
  # out tile in SMEM: [epi_m, tile_n] bf16 written transposed, or untransposed [tile_n, epi_m]
  # (bf16, weight_major) / [tile_n, 32] (f32, raw).
  untransposed = raw or weight_major
  out_block = (tile_n, epi_m) if untransposed else (epi_m, tile_n)
  out_tr = smem_transforms(out_block[1] * jnp.dtype(out_dtype).itemsize,
                       jnp.dtype(out_dtype).itemsize * 8)
  n_epi = tile_m // epi_m
  num_slots = min(2, n_epi)
  interp = interpret is not None
  n_scale = tile_k // 16
  e4m3 = cfg.e4m3_scales
  # the epilogue's per-column operands, fetched by TMA into SMEM (each one barrier arrival); a
  # single scale is read from GMEM in place instead, and a missing bias not at all
  cs_scalar, has_bias = col_scale.shape == (1,), bias is not None
  tma_fetches = (not cs_scalar) + has_bias
  if bias is None:
    bias = col_scale  # a placeholder operand, never read
  total = m_iters * n_iters * splits
  grid_size = min(sms, total)
  stages = min(cfg.max_concurrent_steps, k_iters)
  chain = cfg.chain_tiles and tiles_chain(total, grid_size, k_iters, stages)

  def nvfp4_matmul_kernel(x_g, w_g, ws_g, cs_g, bias_g, out_g):
    def get_pipeline(body, ctx, state=None):
      return plgpu.emit_pipeline_warp_specialized(
          body, grid=(k_iters,), memory_registers=40,
          in_specs=[
              plgpu.BlockSpec((tile_m, tile_k), lambda kk: (0, kk), transforms=x_tr,
                              memory_space=plgpu.SMEM),
              plgpu.BlockSpec((cta_n, tile_k), lambda kk: (0, kk), transforms=w_tr,
                              memory_space=plgpu.SMEM),
              plgpu.BlockSpec((cta_n, n_scale), lambda kk: (0, kk), memory_space=plgpu.SMEM)
              if e4m3 else
              plgpu.BlockSpec((n_scale, cta_n), lambda kk: (kk, 0), memory_space=plgpu.SMEM),
          ],
          wg_axis="wg", num_compute_wgs=2,
          max_concurrent_steps=stages, compute_context=ctx, pipeline_state=state)

    ignore = lambda *_, **__: None
    scratch = dict(
        allocs=get_pipeline(ignore, ignore).get_allocations(x_g, w_g, ws_g),
        out_smem=plgpu.SMEM((2, num_slots, *out_block), out_dtype, transforms=out_tr),
        cs_smem=plgpu.SMEM((2, tile_n), jnp.float32),
        bias_smem=plgpu.SMEM((2, tile_n), jnp.float32),
        bar=plgpu.Barrier(num_arrivals=max(tma_fetches, 1), num_barriers=2),
    )
    pingpong = cfg.pingpong and not interp
    if pingpong:
      scratch["sched"] = plgpu.Barrier(num_arrivals=2)
    if interp:  # the interpreter's wgmma reads A from SMEM only
      scratch["wdec_smem"] = plgpu.SMEM((2, tile_n, tile_k),
                                        jnp.bfloat16, transforms=smem_transforms(tile_k * 2, 16))

    @functools.partial(pl.run_scoped, collective_axes="wg", **scratch)
    def _scope(allocs, out_smem, cs_smem, bias_smem, bar, sched=None, wdec_smem=None):
      wg = lax.axis_index("wg")

      def schedule():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

      @plgpu.nd_loop((m_iters * n_iters * splits,), collective_axes="sm")
      def _tile_loop(info):
        mi, ni, split = persistent_tile(info.index[0], m_iters, n_iters, cfg)
        m0 = mi * tile_m
        n0 = ni * cta_n + wg * tile_n
        k_slice = pl.ds(split * k_per_split, k_per_split)

        def ctx(eval_pipeline):
          if not raw:  # fetch this tile's scale and bias while the K loop runs
            if not cs_scalar:
              plgpu.copy_gmem_to_smem(cs_g.at[pl.ds(n0, tile_n)], cs_smem.at[wg], bar.at[wg])
            if has_bias:
              plgpu.copy_gmem_to_smem(bias_g.at[pl.ds(n0, tile_n)], bias_smem.at[wg],
                                      bar.at[wg])

          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_n, tile_m), jnp.float32))
          def _acc(acc_ref):
            eval_pipeline(acc_ref)
            acc = acc_ref[...]
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            if raw:
              for e in range(n_epi):
                slot = e % num_slots
                plgpu.wait_smem_to_gmem(num_slots - 1, wait_read_only=True)
                out_smem[wg, slot] = acc[:, e * epi_m:(e + 1) * epi_m]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    out_smem.at[wg, slot],
                    out_g.at[split, pl.ds(n0, tile_n), pl.ds(m0 + e * epi_m, epi_m)])
              return
            if tma_fetches:
              plgpu.barrier_wait(bar.at[wg])
            row = plgpu.Layout.WGMMA.reduce(1)
            load = (lambda r: r[...]) if interp else (lambda r: plgpu.load(r, layout=row))
            if not cs_scalar:
              cs = load(cs_smem.at[wg])
            elif interp:
              cs = jnp.broadcast_to(cs_g[...], (tile_n,))
            else:
              cs = _gmem_scalar_splat(cs_g, tile_n)
            shape = (tile_n, epi_m)
            cs_b = lax.broadcast_in_dim(cs * np.float32(gain) if gain != 1 else cs, shape, [0])
            bb_b = lax.broadcast_in_dim(load(bias_smem.at[wg]), shape, [0]) if has_bias else None
            for e in range(n_epi):
              part = acc[:, e * epi_m:(e + 1) * epi_m] * cs_b
              if has_bias:
                part = part + bb_b
              part = part.astype(jnp.bfloat16)
              slot = e % num_slots
              plgpu.wait_smem_to_gmem(num_slots - 1, wait_read_only=True)
              if weight_major:
                out_smem[wg, slot] = part
                out_tile = out_g.at[pl.ds(n0, tile_n), pl.ds(m0 + e * epi_m, epi_m)]
              else:
                if not interp:
                  part = plgpu.layout_cast(part, plgpu.Layout.WGMMA_TRANSPOSED)
                out_smem.at[wg, slot].T[...] = part
                out_tile = out_g.at[pl.ds(m0 + e * epi_m, epi_m), pl.ds(n0, tile_n)]
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], out_tile)

        def mma(_, x_s, w_s, ws_s, acc_ref):
          ns = pl.ds(wg * tile_n, tile_n)
          wg_scales = ws_s.at[ns] if e4m3 else ws_s.at[:, ns]  # this warpgroup's weight rows
          if interp:
            wdec = _decoded_values_jnp(w_s[ns], wg_scales[...], cfg.decode)
            wdec_smem[wg] = permute_k(wdec) if cfg.decode == "perm" else wdec
            plgpu.commit_smem()
            plgpu.wgmma(acc_ref, wdec_smem.at[wg], x_s.T)
          else:
            # pingpong: warpgroup 1 decodes while 0's wgmma runs, and the other way round
            if pingpong:
              pl.when(wg == 0)(schedule)
            w4 = plgpu.load(w_s.at[ns], layout=plgpu.Layout.WGMMA_UPCAST_4X)
            chunks = cfg.decode_chunks  # ("perm" only) each chunk's wgmma in flight while
            width = tile_k // chunks    # the next chunk decodes
            for ch in range(chunks):
              if cfg.decode == "perm":
                wv = _decode_perm(w4, wg_scales, e4m3, cols=(ch * width, width))
              else:
                decode = _decode_bits if cfg.decode == "bits" else _decode_int4
                wv = decode(plgpu.layout_cast(w4, plgpu.Layout.WGMMA), wg_scales)
              if pingpong:
                schedule()
              plgpu.wgmma(acc_ref, wv,
                          (x_s if chunks == 1 else x_s.at[:, pl.ds(ch * width, width)]).T)
            if pingpong:
              pl.when(wg == 1)(schedule)
          plgpu.wgmma_wait(0)
          return acc_ref

        get_pipeline(mma, ctx, chained_pipeline_state(info) if chain else None)(
            x_g.at[pl.ds(m0, tile_m), k_slice],
            w_g.at[pl.ds(ni * cta_n, cta_n), k_slice],
            ws_g.at[pl.ds(ni * cta_n, cta_n), pl.ds(split * (k_per_split // 16), k_per_split // 16)]
            if e4m3 else
            ws_g.at[pl.ds(split * (k_per_split // 16), k_per_split // 16), pl.ds(ni * cta_n, cta_n)],
            allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  out_shape = (splits, n, m) if raw else (n, m) if weight_major else (m, n)
  f = plgpu.kernel(
      nvfp4_matmul_kernel, out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
      grid=(grid_size,), grid_names=("sm",), num_threads=3, thread_name="wg",
      interpret=interpret)
  return f(x, w4, ws, col_scale, bias)


def nvfp4_matmul(x: jax.Array, w4: jax.Array, ws: jax.Array, col_scale: jax.Array,
                 bias: jax.Array | None = None, *, config: NVFP4MatmulConfig | None = None,
                 interpret=None, sms: int | None = None, x_permuted: bool = False,
                 gain: float = 1.0, weight_major: bool = False) -> jax.Array:
  """x bf16[M, K], (w4 int4[N, K], ws bf16[K/16, N] or with e4m3_scales uint8[N, K/16]) from
  `weight_operands` (with the same `decode` and `e4m3_scales`), col_scale f32[N] or one f32
  (shape () or (1,): the tensor scales, read by the kernel in place, no broadcast launch),
  bias f32[N] | None, gain: a constant factor on col_scale (the operands' gain; in the
  kernel's epilogue, no XLA multiply).
  x_permuted: x is already `permute_k(x)` (only with the "perm" decode).

  Returns bf16[M, N] = (x @ wv.T) * col_scale * gain + bias, or with weight_major its
  transpose bf16[N, M], stored as the kernel accumulates it (no transpose in the epilogue).
  interpret: plgpu.InterpretGPUParams.
  """
  m, k = x.shape
  n = w4.shape[0]
  cfg = config or pick_config(m, n, k, sms)
  _check(x, w4, ws, cfg)
  if x_permuted and cfg.decode != "perm":
    raise ValueError(f"nvfp4_matmul: x_permuted needs the 'perm' decode, got {cfg.decode!r}")
  sms = sms or num_sms()
  col_scale = jnp.asarray(col_scale, jnp.float32)
  if col_scale.size == 1:
    col_scale = col_scale.reshape(1)  # a bitcast: no launch
  elif col_scale.shape != (n,):
    raise ValueError(f"nvfp4_matmul: col_scale must be one value or [N={n}], got "
                     f"{col_scale.shape}")
  if bias is not None:
    bias = bias.reshape(n).astype(jnp.float32)
  # TMA stores of the swizzled output tiles need M % 8 == 0; split-K partials (small M) are
  # stored along M in 32-row chunks: pad M to whole tiles there. Pad, then slice.
  align = cfg.tile_m if cfg.k_splits > 1 else 8
  if cfg.decode == "perm" and not x_permuted:  # the kernel's K order (one XLA copy of x, or
    x, x_permuted = permute_k(x), True       # fused into its producer)
  if m % align:
    xp = jnp.pad(x, ((0, -m % align), (0, 0)))
    y = nvfp4_matmul(xp, w4, ws, col_scale, bias, config=cfg, interpret=interpret, sms=sms,
                     x_permuted=x_permuted, gain=gain, weight_major=weight_major)
    return y[:, :m] if weight_major else y[:m]
  if cfg.k_splits > 1:
    parts = _kernel_call(x, w4, ws, col_scale, bias, cfg, True, interpret, sms)
    yt = parts.sum(axis=0) * (col_scale * np.float32(gain))[:, None]  # [N, M]
    yt = yt if bias is None else yt + bias[:, None]
    return (yt if weight_major else yt.T).astype(jnp.bfloat16)
  return _kernel_call(x, w4, ws, col_scale, bias, cfg, False, interpret, sms, gain,
                      weight_major)


def reference(x, w4, ws, col_scale, bias=None, decode: str = "bits"):
  """The same function in plain jnp (XLA's bf16 dot with f32 accumulation)."""
  wv = _decoded_values_jnp(w4, ws, decode)
  acc = lax.dot_general(x.astype(jnp.bfloat16), wv, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)
  y = acc * jnp.asarray(col_scale, jnp.float32).reshape(1, -1)
  if bias is not None:
    y = y + bias.reshape(1, -1)
  return y.astype(jnp.bfloat16)
