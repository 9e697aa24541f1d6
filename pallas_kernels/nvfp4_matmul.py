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

W4A8 (`w4a8_matmul`, config int8_grid): the same kernel with per-token INT8 activations; each
weight value is decoded onto its channel's INT8 grid in registers (weight_as_int8's integers,
.5 ties included: `_INT8_GRID_PAIR_PTX`), multiplied by s8 wgmma into int32, and both scales
are applied in the epilogue, so only the NVFP4 weight is read (0.5625 B per element).

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
  int8_grid: the W4A8 product (`w4a8_matmul`): x is per-token INT8 (s8, in `permute_k_int8`
  order) and each weight value is decoded in registers onto its channel's INT8 grid,
  clip(round(f32(e2m1 * s * g) / w_int8_scale[n]), +-127) with the roundings of
  qlinear_xla.weight_as_int8 (`_int8_grid_values_jnp`), then s8 wgmma with int32
  accumulation and both scales in the epilogue. Needs the "perm" decode, tile_n == 64 and
  K chunks of 128 columns (tile_k % (128 * decode_chunks) == 0).
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
  int8_grid: bool = False

  @property
  def cta_tile_n(self) -> int:
    return 2 * self.tile_n


def pick_config(m: int, n: int, k: int, sms: int | None = None,
                int8_grid: bool = False) -> NVFP4MatmulConfig:
  """Heuristic tiles (pallas_kernels/NOTES.md): 128 x 256 CTA tiles when M is large; for
  small M an activation tile of M rounded up to a power of two >= 32, split-K until the SMs
  are busy, K steps of 256 or 128 where they divide a split, and with the "perm" decode the
  stored e4m3 scales and K-chunked decode + wgmma where the K step allows.
  int8_grid: the W4A8 form (s8 activations, 128-column chunks, 256-wide K steps where K
  allows, so that the stored e4m3 scales can be read)."""
  sms = sms or num_sms()
  if m > 128 and not int8_grid:
    return NVFP4MatmulConfig(decode=DEFAULT_DECODE)
  # 32, 64 or 128 rows (split-K stores 32-row chunks); int8_grid takes M > 128 in 128-row tiles
  tile_m = min(128, max(32, 1 << (m - 1).bit_length()))
  cfg = NVFP4MatmulConfig(tile_m=tile_m, tile_k=128 if int8_grid else 64,
                          max_concurrent_steps=6, epi_tile_m=tile_m, grid_minor_dim=Dim.M,
                          grid_tile_width=1, decode="perm" if int8_grid else DEFAULT_DECODE,
                          int8_grid=int8_grid)
  tiles = pl.cdiv(m, tile_m) * pl.cdiv(n, cfg.cta_tile_n)
  k_iters = k // cfg.tile_k
  # the most splits (a divisor of the K steps, >= 2 steps each) that still fits on the SMs
  splits = max((s for s in range(1, k_iters + 1)
                if k_iters % s == 0 and k_iters // s >= 2 and tiles * s <= sms), default=1)
  cfg = dataclasses.replace(cfg, k_splits=splits)
  # then the widest K step that divides each split into >= 2 steps and whose stages fit shared
  # memory: fewer, bigger steps (at M = 64 on an H200: 2-15% faster than 64-wide, NOTES.md
  # "Session 8")
  k_split = k // splits
  for tile_k, stages in _SMALL_M_K_STEPS_INT8 if int8_grid else _SMALL_M_K_STEPS:
    if (k_split % tile_k == 0 and k_split // tile_k >= 2
        and stages * _stage_bytes(cfg, tile_k) <= _SMALL_M_PIPELINE_BYTES):
      # the "perm" options where this step takes them (tile_k divides K, so a 256-wide step
      # also means K % 256 == 0, as the e4m3 scales need)
      chunks = tile_k // 128 if int8_grid else SMALL_M_DECODE_CHUNKS
      return replace_config(cfg, tile_k=tile_k, max_concurrent_steps=stages,
                            e4m3_scales=SMALL_M_E4M3_SCALES, decode_chunks=chunks)
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
# int8_grid: 256-wide steps (the stored e4m3 scales) with 2 stages where 3 do not fit
_SMALL_M_K_STEPS_INT8 = ((256, 3), (256, 2), (128, 4))
_SMALL_M_PIPELINE_BYTES = 160 * 1024  # leaves room for the epilogue's buffers


def _stage_bytes(cfg: NVFP4MatmulConfig, tile_k: int) -> int:
  """Shared memory of one pipeline stage: the activation tile (bf16, or s8 with int8_grid),
  the packed codes and the bf16 block scales of the CTA's weight rows."""
  x_bytes = 1 if cfg.int8_grid else 2
  return (cfg.tile_m * tile_k * x_bytes + cfg.cta_tile_n * tile_k // 2
          + tile_k // 16 * cfg.cta_tile_n * 2)


def _unfit_perm_options(cfg: NVFP4MatmulConfig) -> set[str]:
  """The "perm"-only options set in cfg that it cannot take (K aside): "decode_chunks" needs
  the "perm" decode, no pingpong and tile_k % (64 * decode_chunks) == 0 (128 * decode_chunks
  with int8_grid); "e4m3_scales" needs the "perm" decode and tile_k >= 256. The one statement
  of these rules, for `_check` and `replace_config`."""
  perm, chunks = cfg.decode == "perm", cfg.decode_chunks
  width = 128 if cfg.int8_grid else 64  # a chunk is whole wgmma swizzle groups (128 bytes)
  unfit = set()
  if chunks < 1 or cfg.tile_k % (width * chunks) or (chunks > 1 and (not perm or cfg.pingpong)):
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
  x_dtype = jnp.int8 if cfg.int8_grid else jnp.bfloat16
  if x.dtype != x_dtype:
    raise ValueError(f"nvfp4_matmul: activations must be {'int8' if cfg.int8_grid else 'bf16'}"
                     f" (int8_grid={cfg.int8_grid}), got {x.dtype}")
  if cfg.int8_grid and (cfg.decode != "perm" or cfg.tile_n != 64 or cfg.tile_k % 128):
    raise ValueError(f"nvfp4_matmul: int8_grid needs the 'perm' decode, tile_n == 64 and "
                     f"tile_k % 128 == 0, got {cfg}")
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
                     f"tile_k % ({128 if cfg.int8_grid else 64} * decode_chunks) == 0, got {cfg}")
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


def permute_k_int8(a: jax.Array) -> jax.Array:
  """[..., K] -> [..., K] in the column order int8_grid feeds the s8 wgmma (K % 32 == 0).

  Within each 32 columns, logical column 16h + 4b + 2c + d holds physical column
  8b + 4d + 2h + c (b < 4; h, c, d < 2): thread b of a row quad holds the physical columns
  8b..8b+7 (one word of codes), and its two 4-byte wgmma registers (logical columns 4b..4b+3
  and 16+4b..16+4b+3) take codes (0, 4, 1, 5) and (2, 6, 3, 7) of the word: each pair of
  codes a, a+4 is decoded together (as in `permute_k`) and byte-permuted into place."""
  *lead, k = a.shape
  xp = np if isinstance(a, np.ndarray) else jnp
  # physical (b, d, h, c) -> logical (h, b, c, d)
  return xp.transpose(a.reshape(*lead, k // 32, 4, 2, 2, 2),
                      (*range(len(lead) + 1), len(lead) + 3, len(lead) + 1,
                       len(lead) + 4, len(lead) + 2)).reshape(*lead, k)


def k_permutation_int8(k: int) -> np.ndarray:
  """int[k]: the physical column at each logical position of `permute_k_int8`."""
  return permute_k_int8(np.arange(k))


def _int8_grid_values_jnp(w4, ws, w_int8_scale, global_scale):
  """jnp int8_grid decode of a [rows, K] int4 tile (scales as for "perm"), w_int8_scale
  f32[rows], global_scale f32 (any shape of one value) -> s8 [rows, K] in physical column
  order: clip(round(f32(f32(e2m1 * s) * g) / w_int8_scale), +-127), each step rounded to
  f32, the quotient correctly rounded, then to the integer, half to even: the arithmetic and
  roundings of qlinear_xla.weight_as_int8 (its values on the CPU, .5 ties included)."""
  g = jnp.asarray(global_scale, jnp.float32).reshape(())
  w = _decoded_values_jnp(w4, ws, "perm").astype(jnp.float32) * (
      g * np.float32(2.0 ** _BITS_GAIN_EXP))
  v = formats.exact_div(w, jnp.asarray(w_int8_scale, jnp.float32).reshape(-1, 1))
  return jnp.clip(jnp.round(v), -127, 127).astype(jnp.int8)


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


def _perm_pairs(w, s_ref, e4m3_scales: bool, col0: int, cols: int):
  """Inside an inline_mgpu body: the "perm" decode of an int4 [tile_n, tile_k] array in the
  WGMMA_UPCAST_4X layout (a thread's 8 consecutive codes of a row in one 32-bit word),
  columns col0 .. col0 + cols (multiples of 32). Yields (reg_idx, t, row, pairs) per word:
  its register index, its 32-column group t within the chunk, its row (an MLIR index) and
  pairs[a] (a < 4), the bf16x2 e2m1 * s * 2^-7 of codes a (low half) and a + 4 (high half),
  exact. Scales: bf16 [tile_k/16, tile_n] ref, or with e4m3_scales the stored bytes
  [tile_n, tile_k/16] (one scale per word; two converted at once)."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, memref, vector
  from jax.experimental.mosaic.gpu import utils as mgpu_utils

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
  rows, all_cols = w.shape
  # register (i, t, 0, 0, h, ...) holds row 64i + 16 warp + 8h + lane/4, columns
  # 32t + 8 (lane % 4) + 0..7 (code e in bits 4e+3..4e): block scale (32t + 8 (lane % 4)) / 16.
  assert regs.shape[:2] == (rows // 64, all_cols // 32) and regs.shape[4] == 2, regs.shape
  assert all(d == 1 for d in regs.shape[2:4] + regs.shape[5:]), regs.shape
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
    for t, (reg_idx, row, _, reg) in by_t.items():
      word = mgpu_utils.bitcast(reg, i32)
      pairs = []
      for a in range(4):
        # codes a (bits 4a+3..4a) and a+4 (16 bits up) -> bf16 halves: sign to bit 15 / 31,
        # magnitude to bits 8..6 / 24..22, i.e. e2m1 * 2^-126 (see _decode_bits)
        bits = arith.ori(arith.andi(shift(word, 12 - 4 * a), sign_mask),
                         arith.andi(shift(word, 6 - 4 * a), mag_mask))
        pairs.append(arith.mulf(mgpu_utils.bitcast(bits, v2bf16), scales[t]))
      yield reg_idx, t, row, pairs


def _decode_perm(w4_upcast, ws_ref, e4m3_scales: bool = False,
                 cols: tuple[int, int] | None = None):
  """int4 [tile_n, tile_k] in the WGMMA_UPCAST_4X layout -> bf16 wgmma A operand over the
  `permute_k` columns, decoded in place (`_perm_pairs`): no shuffles, one block scale per
  word. cols = (start, width), multiples of 32: only those columns -> bf16 [tile_n, width]."""
  from jax.experimental.mosaic import gpu as mgpu

  rows, all_cols = w4_upcast.shape
  col0, cols = cols or (0, all_cols)
  assert col0 % 32 == 0 and cols % 32 == 0 and col0 + cols <= all_cols, (col0, cols, all_cols)

  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA_UPCAST_4X, plgpu.RefType()),
      return_type=plgpu.ShapeDtypeStruct((rows, cols), jnp.bfloat16, layout=plgpu.Layout.WGMMA))
  def decode(_, w, s_ref):
    out = np.empty((rows // 64, cols // 8) + w.registers.shape[2:], dtype=object)
    for reg_idx, t, _, pairs in _perm_pairs(w, s_ref, e4m3_scales, col0, cols):
      for a, pair in enumerate(pairs):
        out[(reg_idx[0], 4 * t + a) + reg_idx[2:]] = pair
    return mgpu.FragmentedArray(_registers=out, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)

  return decode(w4_upcast, ws_ref)


# Per pair of codes (a bf16x2 from `_perm_pairs`, e2m1 * s * 2^-7 exact): each half to f32;
# w = f32(x * 2^7 g), the reference's f32(e2m1 * s * g); its quotient by the channel scale
# correctly rounded by Markstein's step from RN(1/scale) (q0 = w * rcp, r = w - q0 * scale
# exact by fma, q = q0 + r * rcp = RN(w / scale)); + 1.5 * 2^23 rounds q to an integer, half
# to even, leaving it in the low 16 bits as two's complement; both integers packed to s16x2
# and clipped to +-127. $1: the bf16x2; $2: 2^7 g; $3: RN(1/scale); $4: -scale; $5, $6: the
# s16x2 clip bounds.
_INT8_GRID_PAIR_PTX = """{
.reg .f32 x, w, q, r, lo;
.reg .b32 a, b;
shl.b32 a, $1, 16;
mov.b32 x, a;
mul.rn.f32 w, x, $2; mul.rn.f32 q, w, $3; fma.rn.f32 r, q, $4, w; fma.rn.f32 q, r, $3, q;
add.rn.f32 lo, q, 0f4B400000;
and.b32 b, $1, 0xFFFF0000;
mov.b32 x, b;
mul.rn.f32 w, x, $2; mul.rn.f32 q, w, $3; fma.rn.f32 r, q, $4, w; fma.rn.f32 q, r, $3, q;
add.rn.f32 x, q, 0f4B400000;
mov.b32 a, lo;
mov.b32 b, x;
prmt.b32 a, a, b, 0x5410;
max.s16x2 a, a, $5;
min.s16x2 $0, a, $6;
}"""


def _decode_perm_int8(w4_upcast, ws_ref, wsi_ref, g_ref, e4m3_scales: bool,
                      cols: tuple[int, int]):
  """int8_grid's decode: int4 [64, tile_k] in the WGMMA_UPCAST_4X layout -> s8 [64, width]
  wgmma A operand (WGMMA_8BIT layout) over the `permute_k_int8` columns col0 .. col0 + width:
  the "perm" bf16x2 pairs (`_perm_pairs`), each onto the INT8 grid (`_INT8_GRID_PAIR_PTX`,
  the arithmetic of `_int8_grid_values_jnp`), two pairs byte-packed per s8x4 register (prmt).
  wsi_ref: SMEM f32 [64], these rows' channel scales; g_ref: GMEM f32[1], the tensor scale."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm, memref
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils

  rows, all_cols = w4_upcast.shape
  col0, width = cols
  assert rows == 64 and col0 % 128 == 0 and width % 128 == 0 and col0 + width <= all_cols

  @plgpu.inline_mgpu(
      arg_types=(plgpu.Layout.WGMMA_UPCAST_4X, plgpu.RefType(), plgpu.RefType(),
                 plgpu.RefType()),
      return_type=plgpu.ShapeDtypeStruct((rows, width), jnp.int8,
                                         layout=plgpu.Layout.WGMMA_8BIT))
  def decode(_, w, s_ref, wsi, g):
    i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
    v4i8 = ir.VectorType.get((4,), ir.IntegerType.get_signless(8))
    c = lambda v: arith.constant(i32, v)
    asm = lambda ty, args, text, cons: llvm.inline_asm(ty, args, text, cons)
    gain = arith.mulf(memref.load(g, [arith.constant(ir.IndexType.get(), 0)]),
                      arith.constant(f32, 2.0 ** _BITS_GAIN_EXP))  # exact: a power of two
    lo_clip, hi_clip = c(((-127) & 0xFFFF) * 0x10001 - (1 << 32)), c(127 * 0x10001)
    per_row = {}  # the thread's row half -> (RN(1/scale), -scale)
    out = np.empty((1, width // 16) + w.registers.shape[2:], dtype=object)
    for reg_idx, t, row, pairs in _perm_pairs(w, s_ref, e4m3_scales, col0, width):
      key = reg_idx[2:]
      if key not in per_row:
        scale = memref.load(wsi, [row])
        per_row[key] = (asm(f32, [arith.constant(f32, 1.0), scale], "div.rn.f32 $0, $1, $2;",
                            "=f,f,f"), arith.negf(scale))
      rcp, neg_scale = per_row[key]
      s16 = [asm(i32, [mgpu_utils.bitcast(pair, i32), gain, rcp, neg_scale, lo_clip, hi_clip],
                 _INT8_GRID_PAIR_PTX, "=r,r,f,f,f,r,r") for pair in pairs]
      # bytes (k0, k4, k1, k5) and (k2, k6, k3, k7): logical columns 32t + 4b + 0..3 and
      # 32t + 16 + 4b + 0..3 (permute_k_int8)
      for half, (u, v) in enumerate(((0, 1), (2, 3))):
        packed = asm(i32, [s16[u], s16[v]], "prmt.b32 $0, $1, $2, 0x6420;", "=r,r,r")
        out[(reg_idx[0], 2 * t + half) + reg_idx[2:]] = mgpu_utils.bitcast(packed, v4i8)
    return mgpu.FragmentedArray(_registers=out, _layout=mgpu.WGMMA_LAYOUT_8BIT, _is_signed=True)

  return decode(w4_upcast, ws_ref, wsi_ref, g_ref)


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
                 sms: int, gain: float = 1.0, weight_major: bool = False, row_scale=None,
                 global_scale=None):
  """One launch: bf16 [M, N] with the epilogue (weight_major: bf16 [N, M], the accumulator's
  own layout, stored untransposed), or raw partials [k_splits, N, M] (f32; int32 with
  int8_grid).
  col_scale f32[N] or f32[1] (one scale for all columns, read in place); bias f32[N] or None;
  gain: a constant factor on col_scale. int8_grid: col_scale is w_int8_scale f32[N] (also
  the decode's grid), row_scale the per-token f32[M], global_scale the weight's f32[1]."""
  (m, k), (n, _) = x.shape, w4.shape
  tile_m, tile_n, tile_k = cfg.tile_m, cfg.tile_n, cfg.tile_k
  cta_n = cfg.cta_tile_n
  m_iters, n_iters = pl.cdiv(m, tile_m), n // cta_n
  splits = cfg.k_splits
  k_per_split = k // splits
  k_iters = k_per_split // tile_k
  epi_m = cfg.epi_tile_m if not raw else 32
  int8 = cfg.int8_grid
  x_bits = jnp.dtype(x.dtype).itemsize * 8
  x_tr = smem_transforms(tile_k * x_bits // 8, x_bits)
  w_tr = smem_transforms(tile_k // 2, 4)
  acc_dtype = jnp.int32 if int8 else jnp.float32
  out_dtype = acc_dtype if raw else jnp.bfloat16
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
  # (raw int8_grid partials: only the channel scales, for the decode)
  tma_fetches = int(int8) if raw else (not cs_scalar) + has_bias + int8
  if bias is None:
    bias = col_scale  # a placeholder operand, never read
  total = m_iters * n_iters * splits
  grid_size = min(sms, total)
  stages = min(cfg.max_concurrent_steps, k_iters)
  chain = cfg.chain_tiles and tiles_chain(total, grid_size, k_iters, stages)

  def nvfp4_matmul_kernel(x_g, w_g, ws_g, cs_g, bias_g, *rest):
    rs_g, gs_g, out_g = rest if int8 else (None, None, rest[0])

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
        rs_smem=plgpu.SMEM((2, tile_m if int8 else 8), jnp.float32),
        bar=plgpu.Barrier(num_arrivals=max(tma_fetches, 1), num_barriers=2),
    )
    pingpong = cfg.pingpong and not interp
    if pingpong:
      scratch["sched"] = plgpu.Barrier(num_arrivals=2)
    if interp:  # the interpreter's wgmma reads A from SMEM only
      scratch["wdec_smem"] = plgpu.SMEM((2, tile_n, tile_k), x.dtype, transforms=x_tr)

    @functools.partial(pl.run_scoped, collective_axes="wg", **scratch)
    def _scope(allocs, out_smem, cs_smem, bias_smem, rs_smem, bar, sched=None, wdec_smem=None):
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
            if int8:
              plgpu.copy_gmem_to_smem(rs_g.at[pl.ds(m0, tile_m)], rs_smem.at[wg], bar.at[wg])
          if int8:
            # the decode needs the channel scales (cs_smem) from the first step: wait here,
            # while the TMA warpgroup's first loads are in flight, not at the epilogue
            if raw:
              plgpu.copy_gmem_to_smem(cs_g.at[pl.ds(n0, tile_n)], cs_smem.at[wg], bar.at[wg])
            plgpu.barrier_wait(bar.at[wg])

          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_n, tile_m), acc_dtype))
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
            if tma_fetches and not int8:
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
            if int8:
              acc = acc.astype(jnp.float32)  # rounded as qlinear_xla's epilogue rounds it
            for e in range(n_epi):
              scale = cs_b
              if int8:  # (token scale x channel scale) first, as qlinear_xla.w4a8 rounds it
                col = plgpu.Layout.WGMMA.reduce(0)
                rs_e = rs_smem.at[wg, pl.ds(e * epi_m, epi_m)]
                rs = rs_e[...] if interp else plgpu.load(rs_e, layout=col)
                scale = lax.broadcast_in_dim(rs, shape, [1]) * cs_b
              part = acc[:, e * epi_m:(e + 1) * epi_m] * scale
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
          if int8 and interp:
            wdec_smem[wg] = permute_k_int8(
                _int8_grid_values_jnp(w_s[ns], wg_scales[...], cs_smem[wg], gs_g[...]))
            plgpu.commit_smem()
            plgpu.wgmma(acc_ref, wdec_smem.at[wg], x_s.T)
          elif int8:
            w4 = plgpu.load(w_s.at[ns], layout=plgpu.Layout.WGMMA_UPCAST_4X)
            width = tile_k // cfg.decode_chunks
            for ch in range(cfg.decode_chunks):
              wv = _decode_perm_int8(w4, wg_scales, cs_smem.at[wg], gs_g, e4m3,
                                     cols=(ch * width, width))
              plgpu.wgmma(acc_ref, wv, x_s.at[:, pl.ds(ch * width, width)].T)
          elif interp:
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
  return f(x, w4, ws, col_scale, bias, *((row_scale, global_scale) if int8 else ()))


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
  if cfg.int8_grid:
    raise ValueError("nvfp4_matmul: an int8_grid config is the W4A8 product: call w4a8_matmul")
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
    return _partials_epilogue(parts, (col_scale * np.float32(gain))[:, None], bias, weight_major)
  return _kernel_call(x, w4, ws, col_scale, bias, cfg, False, interpret, sms, gain,
                      weight_major)


def _partials_epilogue(parts, scale, bias, weight_major: bool = False) -> jax.Array:
  """Split-K's raw partials [k_splits, N, M] (f32, or int32 with int8_grid: summed exactly)
  summed in their own type, then f32 * scale (broadcastable to [N, M]) + bias f32[N] | None
  -> bf16 [M, N], or with weight_major [N, M]: the fused epilogue's arithmetic, in XLA."""
  yt = parts.sum(axis=0).astype(jnp.float32) * scale
  if bias is not None:
    yt = yt + bias[:, None]
  return (yt if weight_major else yt.T).astype(jnp.bfloat16)


def w4a8_matmul(xq: jax.Array, x_scale: jax.Array, w4: jax.Array, ws: jax.Array,
                w_int8_scale: jax.Array, global_scale: jax.Array, bias: jax.Array | None = None,
                *, config: NVFP4MatmulConfig | None = None, interpret=None,
                sms: int | None = None, x_permuted: bool = False) -> jax.Array:
  """W4A8 with the NVFP4 weight decoded onto its per-channel INT8 grid in registers (no INT8
  copy of the weight, 0.5625 B per weight element read):

    xq s8[M, K]: per-token INT8 activations; x_scale f32[M] or [M, 1]: their scales;
    (w4, ws) = weight_operands(t, "perm", config.e4m3_scales); w_int8_scale f32[N] or [N, 1];
    global_scale f32[]: t.global_scale; bias f32[N] | None.
    x_permuted: xq is already `permute_k_int8(xq)` (e.g. folded into the quantizer's rotation).

  Returns bf16[M, N] = f32(xq @ wq.T) * (x_scale[m] * w_int8_scale[n]) + bias[n], int32
  accumulation, with wq = `int8_grid_weight(w4, ws, w_int8_scale, global_scale)`:
  qlinear_xla.w4a8's arithmetic after its activation quantizer (wq: its weight_as_int8 values).
  """
  m, k = xq.shape
  n = w4.shape[0]
  cfg = config or pick_config(m, n, k, sms, int8_grid=True)
  if not cfg.int8_grid:
    raise ValueError(f"w4a8_matmul: the config must have int8_grid=True, got {cfg}")
  _check(xq, w4, ws, cfg)
  sms = sms or num_sms()
  vec = lambda v, size, what: _f32_vector(v, size, f"w4a8_matmul: {what}")
  x_scale, w_int8_scale = vec(x_scale, m, "x_scale"), vec(w_int8_scale, n, "w_int8_scale")
  global_scale = jnp.asarray(global_scale, jnp.float32)
  if global_scale.size != 1:
    raise ValueError(f"w4a8_matmul: global_scale must be one value, got {global_scale.shape}")
  global_scale = global_scale.reshape(1)
  bias = None if bias is None else vec(bias, n, "bias")
  if not x_permuted:
    xq = permute_k_int8(xq)
  align = cfg.tile_m if cfg.k_splits > 1 else 8
  if m % align:
    pad = -m % align
    y = w4a8_matmul(jnp.pad(xq, ((0, pad), (0, 0))), jnp.pad(x_scale, (0, pad)), w4, ws,
                    w_int8_scale, global_scale, bias, config=cfg, interpret=interpret,
                    sms=sms, x_permuted=True)
    return y[:m]
  if cfg.k_splits > 1:
    parts = _kernel_call(xq, w4, ws, w_int8_scale, bias, cfg, True, interpret, sms,
                         row_scale=x_scale, global_scale=global_scale)
    return _partials_epilogue(parts, x_scale[None, :] * w_int8_scale[:, None], bias)
  return _kernel_call(xq, w4, ws, w_int8_scale, bias, cfg, False, interpret, sms,
                      row_scale=x_scale, global_scale=global_scale)


def _f32_vector(v, size: int, what: str) -> jax.Array:
  """v as f32[size] (from [size] or [size, 1]), or a ValueError naming `what`."""
  v = jnp.asarray(v, jnp.float32)
  if v.size != size or v.ndim > 2:
    raise ValueError(f"{what} must have {size} values ([{size}] or [{size}, 1]), got "
                     f"{v.shape}")
  return v.reshape(size)


def int8_grid_weight(w4, ws, w_int8_scale, global_scale) -> jax.Array:
  """s8[N, K]: the weight w4a8_matmul multiplies (physical column order), in plain jnp."""
  return _int8_grid_values_jnp(
      w4, ws, _f32_vector(w_int8_scale, w4.shape[0], "w_int8_scale"), global_scale)


def w4a8_reference(xq, x_scale, w4, ws, w_int8_scale, global_scale, bias=None):
  """w4a8_matmul in plain jnp (XLA's int8 dot, int32 accumulation), xq in natural order."""
  m, n = xq.shape[0], w4.shape[0]
  acc = lax.dot_general(xq, int8_grid_weight(w4, ws, w_int8_scale, global_scale),
                        (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
  y = acc.astype(jnp.float32) * (_f32_vector(x_scale, m, "x_scale")[:, None]
                                 * _f32_vector(w_int8_scale, n, "w_int8_scale")[None, :])
  if bias is not None:
    y = y + _f32_vector(bias, n, "bias")[None, :]
  return y.astype(jnp.bfloat16)


def reference(x, w4, ws, col_scale, bias=None, decode: str = "bits"):
  """The same function in plain jnp (XLA's bf16 dot with f32 accumulation)."""
  wv = _decoded_values_jnp(w4, ws, decode)
  acc = lax.dot_general(x.astype(jnp.bfloat16), wv, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)
  y = acc * jnp.asarray(col_scale, jnp.float32).reshape(1, -1)
  if bias is not None:
    y = y + bias.reshape(1, -1)
  return y.astype(jnp.bfloat16)
