"""The "mosaic" implementation of qlinear: Mosaic GPU (Pallas) kernels for Hopper.

  MOSAIC.w4a8(x2d, layer): INT8 per-token activations (pallas_kernels.int8_quant_mgpu, or the
      XLA fusion pallas_kernels.int8_quant for non-bf16 inputs) x the
      weight re-expressed in INT8 per channel, on the W8A8 kernel (pallas_kernels.w8a8_matmul)
      with the scales and bias fused into its epilogue. Up to W4A8_REGDEC_MAX_ROWS rows (off
      until GPU-checked) the NVFP4 weight is instead decoded onto the same INT8 grid in
      registers, tile by tile (nvfp4_matmul.w4a8_matmul), with the XLA quantizer's output in
      that kernel's K order.
  MOSAIC.w4a16(x2d, layer): bf16 activations (Hadamard-rotated like the xla path) x the NVFP4
      weight decoded in registers (pallas_kernels.nvfp4_matmul), tensor scale and bias fused.
  MOSAIC.w4a4(x2d, layer): activations quantized to NVFP4 and handed over as their exact bf16
      block values (pallas_kernels.nvfp4_quant), then the same kernel with both tensor scales
      in its epilogue. The kernel's "perm" decode reads x in a K order that w4a16 folds into
      the rotation; w4a4 makes it with a copy, so only up to W4A4_PERM_MAX_ROWS rows.
  From DEQUANT_MIN_ROWS rows both NVFP4 paths instead decode the whole weight once per call
  to its exact bf16 values (one XLA fusion, 2.56 B per weight element of traffic, a transient
  bf16 copy of one layer's weight) and run the bf16 form of the W8A8 kernel
  (w8a8_matmul.bf16_matmul, scale and bias in its epilogue): with many rows the decode is
  amortised and a plain bf16 GEMM beats decoding every tile in registers (NOTES.md).
  Same arithmetic either way: exact bf16 products, f32 accumulation, f32 epilogue.
  Where qlinear_xla.w4a16_folds_rotation holds (from 4096 rows, N <= M), w4a16 rotates the
  decoded weight back instead of rotating x (weight_derotated_bf16: N x K elements instead of
  M x K, one launch), then runs the same bf16 GEMM on x as it is, as the xla path does.

The NVFP4 weight is converted to INT8 by one XLA fusion on every call (weight_int8): only
the NVFP4 copy stays resident (0.5625 B per weight element); pallas_kernels/NOTES.md compares
this with keeping an INT8 copy too (1.5625 B per element). Shapes the kernel does not tile
(N not a multiple of its CTA tile, K not a multiple of 128, stacked layers) fall back to xla.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mpqjax import formats, qlinear_xla
from pallas_kernels import hopper_unavailable_reason
from pallas_kernels import int8_quant, int8_quant_mgpu, nvfp4_derotate, nvfp4_quant, nvfp4_to_int8
from pallas_kernels import nvfp4_matmul as nvmm
from pallas_kernels import w8a8_matmul as w8a8


def interpret_params():
  """Mosaic GPU interpret mode off a GPU (CPU tests), None on the GPU."""
  if jax.default_backend() == "gpu":
    return None
  import jax.experimental.pallas.mosaic_gpu as plgpu
  return plgpu.InterpretGPUParams()


def kernel_fits(m: int, n: int, k: int, dtype=jnp.int8) -> bool:
  """Whether the W8A8 kernel (with int8 or bf16 operands) tiles this problem (else the xla
  path runs)."""
  cfg = w8a8.pick_config(max(m, 1), n, k, dtype=dtype)
  return m > 0 and n % cfg.cta_tile_n == 0 and k % (cfg.tile_k * cfg.k_splits) == 0


# Rows from which the Mosaic quantizer (one CTA per 64 rows) beats the XLA fusion; below it
# the kernel has too few CTAs to stream the rows (NOTES.md).
MGPU_QUANT_MIN_ROWS = 1024


def quantize_activations(x: jax.Array, hadamard_block: int, use_mgpu: bool | None = None):
  """Per-token INT8 (+ Hadamard): the Mosaic GPU kernel for bf16 x with many rows, else
  the XLA fusion. Returns (s8[M, K], f32[M, 1])."""
  mc = int8_quant_mgpu.QuantMgpuConfig(hadamard_block)
  if use_mgpu is None:
    use_mgpu = x.shape[0] >= MGPU_QUANT_MIN_ROWS
  if use_mgpu and int8_quant_mgpu.supported(x, mc):
    return int8_quant_mgpu.quantize_rows_mgpu(x, mc, interpret=interpret_params())
  return int8_quant.quantize_rows(x, small_m_quant_config(hadamard_block))


# The XLA quantizer's rotation below MGPU_QUANT_MIN_ROWS rows (int8_quant.QuantConfig.rotation).
SMALL_M_QUANT_ROTATION = "tc"


def small_m_quant_config(hadamard_block: int) -> int8_quant.QuantConfig:
  return int8_quant.QuantConfig(hadamard_block, rotation=SMALL_M_QUANT_ROTATION)


def weight_int8(layer) -> jax.Array:
  """s8[N, K] for the W8A8 kernel, equal to qlinear_xla.weight_as_int8(layer).

  On the GPU: the gather-free fusion (nvfp4_to_int8), 2.2-2.4x faster, and measured bit-equal
  to the reference there (benchmarks/kernels.py conv_fast_mismatch_frac = 0 at every shape).
  Elsewhere the reference itself: NVFP4 values divided by the channel scale often land on an
  exact .5, and XLA:CPU rewrites one of the two fusions' divisions as a reciprocal multiply,
  which rounds those ties the other way.
  """
  if jax.default_backend() == "gpu":
    return nvfp4_to_int8.nvfp4_to_int8(layer)
  return qlinear_xla.weight_as_int8(layer)


# Rows up to which MOSAIC.w4a8 decodes the NVFP4 weight onto its INT8 grid in registers
# (nvfp4_matmul.w4a8_matmul: 0.5625 B read per weight element) instead of converting the whole
# weight to INT8 per call and running the W8A8 kernel (2.56 B per element). 0 (off) until the
# kernel has run on a GPU: its register layout for the s8 wgmma is checked by
# tests/test_kernels_nvfp4.py::test_gpu_w4a8_register_decode_real_shapes only there; then
# `benchmarks/kernels.py --only int8 --max-m 256` (rows mosaic_w4a8_regdec vs
# mosaic_w4a8_fastconv) sets it (pallas_kernels/NOTES.md, "Session 16").
W4A8_REGDEC_MAX_ROWS = 0


def w4a8_regdec(x: jax.Array, layer, max_rows: int | None = None):
  """MOSAIC.w4a8 by the register decode onto the INT8 grid, or None where it does not tile or
  x has more than max_rows (default W4A8_REGDEC_MAX_ROWS) rows."""
  (m, k), n = x.shape, layer.out_features
  max_rows = W4A8_REGDEC_MAX_ROWS if max_rows is None else max_rows
  if layer.weight_format != "nvfp4" or layer.weight.shape != (n, k) or m > max_rows:
    return None
  cfg = nvmm.pick_config(m, n, k, int8_grid=True)
  if not nvmm.supported(m, n, k, cfg):
    return None
  hb = layer.hadamard_block
  # the kernel's K order (permute_k_int8, within 32 columns) folded into the rotation
  perm = nvmm.k_permutation_int8(hb) if hb and hb % 32 == 0 else None
  xq, xs = int8_quant.quantize_rows(x, small_m_quant_config(hb), out_perm=perm)
  w4, ws, _ = nvmm.weight_operands(layer.weight, "perm", cfg.e4m3_scales)
  return nvmm.w4a8_matmul(xq, xs, w4, ws, layer.w_int8_scale, layer.weight.global_scale,
                          layer.bias, config=cfg, interpret=interpret_params(),
                          x_permuted=perm is not None)


def w4a8(x: jax.Array, layer) -> jax.Array:
  """x[M, K] -> bf16[M, N], matching qlinear_xla.w4a8."""
  (m, k), n = x.shape, layer.out_features
  if layer.weight.shape != (n, k):
    return qlinear_xla.w4a8(x, layer)
  if (y := w4a8_regdec(x, layer)) is not None:
    return y
  if not kernel_fits(m, n, k):
    return qlinear_xla.w4a8(x, layer)
  xq, xs = quantize_activations(x, layer.hadamard_block)
  w = weight_int8(layer)
  return w8a8.w8a8_matmul(xq, w, xs[:, 0], layer.w_int8_scale[:, 0], layer.bias,
                          out_dtype=jnp.bfloat16, interpret=interpret_params())


def nvfp4_kernel_fits(m: int, n: int, k: int) -> bool:
  """Whether the NVFP4 kernel (or, from DEQUANT_MIN_ROWS, the bf16 GEMM) tiles this problem
  (else the xla path runs)."""
  if m >= DEQUANT_MIN_ROWS:
    return kernel_fits(m, n, k, jnp.bfloat16)
  return m > 0 and nvmm.supported(m, n, k, nvmm.pick_config(m, n, k))


def _nvfp4_ok(x: jax.Array, layer) -> bool:
  (m, k), n = x.shape, layer.out_features
  return (layer.weight_format == "nvfp4" and layer.weight.shape == (n, k)
          and nvfp4_kernel_fits(m, n, k))


# Rows from which decoding the weight to bf16 once per call (then a bf16 GEMM) beats the
# in-register decode of every tile. H200: 6-8% faster at M = 8192 (8192^3) and M = 35552
# (CogVideoX shapes); the decode (~2.9 TB/s) costs about what the register decode loses to
# the bf16 GEMM (~10%) at M ~ 3600 (NOTES.md, "NVFP4 at large M").
DEQUANT_MIN_ROWS = 4096


def weight_bf16(layer) -> jax.Array:
  """bf16[N, K]: the NVFP4 weight's exact block values (e2m1 x e4m3; no tensor scale), equal
  to formats.nvfp4_block_values(layer.weight).astype(bf16).

  One elementwise fusion over the packed bytes: both nibbles' f32 values (at most 4
  significant bits, so their top 16 bits are the exact bf16) go into one uint32 that is
  bitcast to the bf16 pair, instead of interleaving two decoded halves (which XLA:GPU ran at
  ~1 TB/s: 159 us at 8192^2)."""
  with jax.named_scope("nvfp4_to_bf16"):
    low, high = (jax.lax.bitcast_convert_type(v, jnp.uint32)
                 for v in formats.nvfp4_nibble_values(layer.weight))
    pair = (high & jnp.uint32(0xFFFF0000)) | (low >> 16)
    return jax.lax.bitcast_convert_type(pair, jnp.bfloat16).reshape(layer.weight.shape)


def _kernel_config(x: jax.Array, layer, decode: str | None = None):
  """The register-decode kernel's config for x[M, K] (pick_config's, with `decode` instead of
  its decode if given), or None from DEQUANT_MIN_ROWS rows (the bf16 decode + GEMM path)."""
  (m, k), n = x.shape, layer.out_features
  if m >= DEQUANT_MIN_ROWS:
    return None
  cfg = nvmm.pick_config(m, n, k)
  return cfg if decode is None else nvmm.replace_config(cfg, decode=decode)


def _nvfp4_matmul(xv: jax.Array, layer, act_scale, cfg, x_permuted: bool = False) -> jax.Array:
  """cfg: from _kernel_config (None: the bf16 decode + GEMM); act_scale: f32[] or None (1)."""
  gs = layer.weight.global_scale
  scale = gs if act_scale is None else act_scale * gs
  if cfg is None:
    return w8a8.bf16_matmul(xv, weight_bf16(layer), scale, layer.bias,
                            interpret=interpret_params())
  w4, ws, gain = nvmm.weight_operands(layer.weight, cfg.decode, cfg.e4m3_scales)
  return nvmm.nvfp4_matmul(xv, w4, ws, scale, layer.bias, config=cfg, gain=float(gain),
                           interpret=interpret_params(), x_permuted=x_permuted)


def weight_derotated_bf16(layer) -> jax.Array:
  """bf16[N, K] = qlinear_xla.weight_derotated(layer) except in a few nearly cancelling sums
  (that one adds f32-rounded products with +-1/sqrt(block); these add the exact values times
  +-1, then scale and round once): one Mosaic launch (pallas_kernels.nvfp4_derotate) where it
  tiles the weight, else `weight_derotated_tc`."""
  t, hb = layer.weight, layer.hadamard_block
  if DEROTATE_KERNEL and nvfp4_derotate.supported(t.shape, hb):
    return nvfp4_derotate.derotate(t, hb, interpret=interpret_params())
  return weight_derotated_tc(layer)


# Whether weight_derotated_bf16 uses the one-launch kernel (benchmarks turn it off to compare).
DEROTATE_KERNEL = True


def weight_derotated_tc(layer) -> jax.Array:
  """weight_derotated_bf16 in two XLA launches: the exact bf16 block values (`weight_bf16`),
  then their product with the +-1 sign matrix on the tensor cores (`int8_quant.hadamard_tc`)."""
  with jax.named_scope("nvfp4_derotate"):
    return int8_quant.hadamard_tc(weight_bf16(layer), layer.hadamard_block).astype(jnp.bfloat16)


def w4a16(x: jax.Array, layer) -> jax.Array:
  """x[M, K] -> bf16[M, N], matching qlinear_xla.w4a16."""
  (m, k), n = x.shape, layer.out_features
  if qlinear_xla.w4a16_folds_rotation(m, layer):
    # the weight rotated back instead of x rotated (N x K elements instead of M x K), then
    # the plain bf16 GEMM on x as it is
    if layer.weight.shape != (n, k) or not kernel_fits(m, n, k, jnp.bfloat16):
      return qlinear_xla.w4a16(x, layer)
    return w8a8.bf16_matmul(x.astype(jnp.bfloat16), weight_derotated_bf16(layer),
                            layer.weight.global_scale, layer.bias, interpret=interpret_params())
  if not _nvfp4_ok(x, layer):
    return qlinear_xla.w4a16(x, layer)
  hb, cfg = layer.hadamard_block, _kernel_config(x, layer)
  # the register-decode kernel's K order (nvfp4_matmul.permute_k, within 32 columns) folded
  # into the rotation's columns, instead of a copy of x
  fold = cfg is not None and cfg.decode == "perm" and hb % 32 == 0 and hb > 0
  xr = nvfp4_quant.rotate(x, hb, nvmm.k_permutation(hb) if fold else None)
  return _nvfp4_matmul(xr.astype(jnp.bfloat16), layer, None, cfg, x_permuted=fold)


# Rows up to which MOSAIC.w4a4 takes pick_config's "perm" decode; above, "bits" (see w4a4).
W4A4_PERM_MAX_ROWS = 128


def w4a4(x: jax.Array, layer) -> jax.Array:
  """x[M, K] -> bf16[M, N], matching qlinear_xla.w4a4."""
  if not _nvfp4_ok(x, layer):
    return qlinear_xla.w4a4(x, layer)
  # The Mosaic quantizer (one CTA per 64 rows, two launches) only pays with many rows: at
  # M = 64 it took 84 us against 14 us for the XLA fusion (NOTES.md).
  xv, gx = nvfp4_quant.quantize_qdq(x, nvfp4_quant.NVFP4QuantConfig(layer.hadamard_block),
                                     interpret=interpret_params(),
                                     use_mgpu=x.shape[0] >= MGPU_QUANT_MIN_ROWS)
  # The "perm" decode's K order cannot be folded into the QDQ (its 16-blocks span the order's
  # 32 columns), so it costs a copy of xv: past W4A4_PERM_MAX_ROWS that copy outweighs the
  # decode's gain (H100, M = 2048: 31.5 us with the copy vs 26.9 for "bits"; NOTES.md).
  decode = None if x.shape[0] <= W4A4_PERM_MAX_ROWS else "bits"
  return _nvfp4_matmul(xv, layer, gx, _kernel_config(x, layer, decode))


class _Mosaic:
  name = "mosaic"
  w4a4 = staticmethod(w4a4)
  w4a8 = staticmethod(w4a8)
  w4a16 = staticmethod(w4a16)

  @staticmethod
  def available() -> bool:
    return hopper_unavailable_reason() is None


MOSAIC = _Mosaic()
