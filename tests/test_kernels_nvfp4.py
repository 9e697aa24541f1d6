"""NVFP4 Mosaic GPU kernel (W4A16 / W4A4), its QDQ activation quantizer and MOSAIC.w4a4/w4a16
against the jnp reference, float64 and the xla implementation computed on the host CPU.

On CPU the kernel runs in Mosaic GPU's interpret mode (small shapes; the register decode is
replaced by the same jnp decode there); the real-hardware checks are marked gpu.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpqjax import formats, qlinear_xla
from mpqjax.qlinear import Mode, quantize_linear
from mpqjax.testing import derotated_block_values_f64, rel_err, w4a16_exact_f64
from pallas_kernels import nvfp4_derotate, nvfp4_quant, qlinear_mosaic
from pallas_kernels import nvfp4_matmul as nm
from tests.markers import needs_hopper


SMALL = nm.NVFP4MatmulConfig(tile_m=64, tile_k=64, max_concurrent_steps=2, epi_tile_m=32)
# the heuristic's small-M config (M = 48, chosen when the interpreter stalled at random with
# 32-row tiles: the thread-pool deadlock conftest.py's PJRT_NPROC now prevents)
SMALL_M = nm.pick_config(48, 128, 1024, sms=2)


def problem(rng, m, n, k, decode="perm", e4m3_scales=False):
  w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.1, 3, (n, 1))
  t = formats.quantize_nvfp4(jnp.asarray(w))
  x = jnp.asarray(rng.standard_normal((m, k)) * rng.uniform(0.5, 2, (m, 1)), jnp.bfloat16)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  w4, ws, gain = nm.weight_operands(t, decode, e4m3_scales)
  return x, t, w4, ws, t.global_scale * gain, bias


def float64_product(x, t, bias):
  wv = np.asarray(formats.dequantize_nvfp4(t), np.float64)
  return np.asarray(x, np.float64) @ wv.T + np.asarray(bias, np.float64)


@pytest.mark.parametrize("decode", ["perm", "bits", "int4"])
def test_weight_operands_decode_to_block_values(rng, decode):
  _, t, w4, ws, gain, _ = problem(rng, 8, 32, 64, decode)
  got = np.asarray(nm._decoded_values_jnp(w4, ws, decode), np.float64) * float(gain / t.global_scale)
  want = np.asarray(formats.nvfp4_block_values(t), np.float64)
  np.testing.assert_array_equal(got, want)


def test_bit_decode_formula_matches_e2m1():
  """The kernel's register decode, replayed in numpy on every byte: nibble pair -> bf16x2."""
  import ml_dtypes
  b = np.arange(256, dtype=np.uint32)
  q = (b << 12) | (b << 24)
  bits = (q & 0x80008000) | ((q >> 6) & 0x01C001C0)
  half = lambda v: v.astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64) * 2.0 ** 126
  table = np.asarray(formats.e2m1_decode(jnp.arange(16, dtype=jnp.uint8)), np.float64)
  np.testing.assert_array_equal(half(bits & 0xFFFF), table[b & 15])
  np.testing.assert_array_equal(half(bits >> 16), table[b >> 4])


def test_perm_decode_formula_matches_e2m1(rng):
  """The "perm" decode, replayed in numpy: register a of a 32-bit word of 8 codes holds codes
  a (low half) and a + 4 (high half), on every pair of those codes and random other codes."""
  import ml_dtypes
  table = np.asarray(formats.e2m1_decode(jnp.arange(16, dtype=jnp.uint8)), np.float64)
  half = lambda v: v.astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64) * 2.0 ** 126
  shift = lambda v, n: (v << np.uint32(n)) if n >= 0 else (v >> np.uint32(-n))
  lo, hi = np.meshgrid(np.arange(16, dtype=np.uint32), np.arange(16, dtype=np.uint32))
  lo, hi = lo.ravel(), hi.ravel()
  for a in range(4):
    word = rng.integers(0, 2 ** 32, lo.size, dtype=np.uint64).astype(np.uint32)
    word &= ~np.uint32((0xF << 4 * a) | (0xF << 4 * (a + 4)))
    word |= (lo << np.uint32(4 * a)) | (hi << np.uint32(4 * (a + 4)))
    bits = (shift(word, 12 - 4 * a) & np.uint32(0x80008000)) | (
        shift(word, 6 - 4 * a) & np.uint32(0x01C001C0))
    np.testing.assert_array_equal(half(bits & np.uint32(0xFFFF)), table[lo])
    np.testing.assert_array_equal(half(bits >> np.uint32(16)), table[hi])


def test_e4m3_scale_conversion_formula():
  """The in-kernel e4m3 -> bf16(s * 2^119) conversion (e4m3_scales), replayed in numpy on
  every pair of scale bytes formats can write (non-negative, not NaN): the hardware's exact
  e4m3x2 -> f16x2 conversion, then one shift and add for both halves. Zero comes out 2^104
  (its block's codes are zero)."""
  import ml_dtypes
  b = np.arange(0x7F, dtype=np.uint16)  # 0 .. 0x7E: every non-negative, non-NaN e4m3
  lo, hi = np.meshgrid(b, b, indexing="ij")
  f16 = lambda v: v.astype(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float16)
  h2 = (f16(lo).view(np.uint16).astype(np.uint32)
        | (f16(hi).view(np.uint16).astype(np.uint32) << 16))
  bits = (h2 >> 3) + np.uint32(nm._F16_TO_SCALED_BF16_ADD)
  half = lambda v: (v & 0xFFFF).astype(np.uint16).view(ml_dtypes.bfloat16).astype(np.float64)
  for got, code in ((half(bits), lo), (half(bits >> 16), hi)):
    want = code.astype(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64) * 2.0 ** 119
    np.testing.assert_array_equal(got, np.where(code == 0, 2.0 ** 104, want))


def test_permute_k_is_the_registers_column_order():
  """Logical column 32t + 8a + 2b + e holds physical column 32t + 8b + 4e + a."""
  k = 96
  got = np.asarray(nm.permute_k(jnp.arange(k)[None]))[0]
  t, a, b, e = np.meshgrid(np.arange(k // 32), np.arange(4), np.arange(4), np.arange(2),
                           indexing="ij")
  np.testing.assert_array_equal(got[(32 * t + 8 * a + 2 * b + e).ravel()],
                                (32 * t + 8 * b + 4 * e + a).ravel())
  assert sorted(got) == list(range(k))
  np.testing.assert_array_equal(nm.k_permutation(k), got)


@pytest.mark.parametrize("cfg,shape", [
    (SMALL, (96, 128, 128)),                                        # ragged M tile
    (dataclasses.replace(SMALL, k_splits=2), (40, 128, 256)),       # split-K, M % 8 != 0
    (dataclasses.replace(SMALL, decode="int4"), (64, 256, 128)),
    (dataclasses.replace(SMALL, decode="perm"), (96, 128, 128)),   # codes decoded in place
    (nm.replace_config(SMALL_M, decode="bits"), (48, 128, 1024)),  # small M: split-K, 256-wide K
    (SMALL_M, (48, 128, 1024)),                        # its default: perm, e4m3 scales, K chunks
], ids=["raggedM", "splitK", "int4decode", "permdecode", "smallM-bits", "smallM"])
def test_kernel_matches_reference_and_float64(rng, cfg, shape):
  m, n, k = shape
  if cfg is SMALL_M:  # pick_config's small-M choices at this K
    assert (cfg.decode, cfg.e4m3_scales, cfg.decode_chunks) == ("perm", True, 4), cfg
  if cfg.tile_k == 256:  # the small-M config: two splits of two 256-wide steps
    assert (cfg.k_splits, cfg.tile_k) == (2, 256), cfg
  x, t, w4, ws, cs, bias = problem(rng, m, n, k, cfg.decode, cfg.e4m3_scales)
  got = nm.nvfp4_matmul(x, w4, ws, cs, bias, config=cfg, interpret=qlinear_mosaic.interpret_params())
  assert got.shape == (m, n) and got.dtype == jnp.bfloat16
  want = nm.reference(x, w4, ws, cs, bias, decode=cfg.decode)
  assert rel_err(got, want) <= 1e-3
  # vs float64: only f32 summation order and the final bf16 rounding (2^-9 relative)
  np.testing.assert_allclose(np.asarray(got, np.float64), float64_product(x, t, bias),
                             rtol=2 ** -8, atol=1e-2 * float(jnp.abs(want).max()) * 2 ** -8)


@pytest.mark.parametrize("cfg", [dataclasses.replace(SMALL, decode="perm"),
                                 dataclasses.replace(SMALL, decode="perm", k_splits=2)],
                         ids=["fused-epilogue", "splitK"])
@pytest.mark.parametrize("scale_kind,with_bias", [("columns", True), ("columns", False),
                                                  ("one", True), ("one", False)])
def test_kernel_epilogue_operand_forms(rng, cfg, scale_kind, with_bias):
  """The epilogue's operands: a per-column scale f32[N] (TMA-fetched) or one scale (read in
  place), with or without bias, times the constant gain."""
  m, n, k = 64, 128, 256
  x, _, w4, ws, _, bias = problem(rng, m, n, k, "perm")
  cs = jnp.asarray(rng.uniform(0.5, 2, n if scale_kind == "columns" else ()), jnp.float32)
  bias = bias if with_bias else None
  got = nm.nvfp4_matmul(x, w4, ws, cs, bias, config=cfg, gain=4.0,
                        interpret=qlinear_mosaic.interpret_params())
  want = nm.reference(x, w4, ws, cs * 4.0, bias, decode="perm")
  assert rel_err(got, want) <= 1e-3


def test_bad_inputs_are_rejected(rng):
  x, _, w4, ws, cs, _ = problem(rng, 64, 128, 128)
  with pytest.raises(ValueError, match="K must match"):
    nm.nvfp4_matmul(x[:, :64], w4, ws, cs, config=SMALL)
  with pytest.raises(ValueError, match="multiple of the CTA tile"):
    nm.nvfp4_matmul(x, w4[:64], ws[:, :64], cs, config=SMALL)
  with pytest.raises(ValueError, match="bf16"):
    nm.nvfp4_matmul(x.astype(jnp.float32), w4, ws, cs, config=SMALL)
  with pytest.raises(ValueError, match="x_permuted"):
    nm.nvfp4_matmul(x, w4, ws, cs, config=dataclasses.replace(SMALL, decode="bits"),
                    x_permuted=True)
  with pytest.raises(ValueError, match="block scales"):
    nm.nvfp4_matmul(x, w4, ws.T, cs, config=SMALL)
  with pytest.raises(ValueError, match="e4m3_scales needs"):
    nm.nvfp4_matmul(x, w4, ws, cs, config=dataclasses.replace(SMALL, e4m3_scales=True))
  with pytest.raises(ValueError, match="decode must be"):
    nm.nvfp4_matmul(x, w4, ws, cs, config=dataclasses.replace(SMALL, decode="nibbles"))
  with pytest.raises(ValueError, match=r"col_scale must be one value or \[N=128\]"):
    nm.nvfp4_matmul(x, w4, ws, jnp.ones((64,), jnp.float32), config=SMALL)
  for bad in (dict(decode="bits", decode_chunks=2), dict(decode="perm", decode_chunks=3),
              dict(decode="perm", decode_chunks=0)):
    with pytest.raises(ValueError, match="decode_chunks needs"):
      nm.nvfp4_matmul(x, w4, ws, cs, config=dataclasses.replace(SMALL, tile_k=128, **bad))


def test_pick_config_small_m_defaults_and_replace_config():
  """Small M on a 132-SM GPU: "perm" with the stored e4m3 scales and 4 K chunks where K
  allows (5B K3072), no e4m3 at the 2B K1920; replace_config drops the "perm"-only options
  where a variant cannot take them, and every config it gives passes the kernel's checks."""
  cfg = nm.pick_config(64, 12288, 3072, sms=132)
  assert (cfg.decode, cfg.tile_k, cfg.e4m3_scales, cfg.decode_chunks) == ("perm", 256, True, 4)
  assert not nm.pick_config(64, 7680, 1920, sms=132).e4m3_scales
  assert nm.pick_config(4096, 1920, 1920).decode_chunks == 1
  bits = nm.replace_config(cfg, decode="bits")
  assert (bits.e4m3_scales, bits.decode_chunks) == (False, 1)
  narrow = nm.replace_config(cfg, tile_k=128)
  assert (narrow.e4m3_scales, narrow.decode_chunks, narrow.decode) == (False, 1, "perm")
  assert nm.replace_config(cfg, pingpong=True).decode_chunks == 1
  assert nm.replace_config(cfg, decode_chunks=2).decode_chunks == 2
  x = jax.ShapeDtypeStruct((64, 3072), jnp.bfloat16)
  for c in (cfg, bits, narrow):
    w4 = jax.ShapeDtypeStruct((12288, 3072), jnp.int4)
    ws = (jax.ShapeDtypeStruct((12288, 192), jnp.uint8) if c.e4m3_scales
          else jax.ShapeDtypeStruct((192, 12288), jnp.bfloat16))
    nm._check(x, w4, ws, c)


@pytest.mark.parametrize("m,n,k,chunks,e4m3", [
    (64, 12288, 3072, 1, True), (64, 12288, 3072, 4, False), (64, 12288, 3072, 4, True),
    (16, 3072, 3072, 2, True), (2048, 1920, 1920, 1, False)])
def test_perm_kernel_lowers_for_hopper(m, n, k, chunks, e4m3):
  """The register-decode kernel as pick_config tiles real shapes ("perm", with the stored e4m3
  scales and K-chunked decode + wgmma where asked) passes Mosaic GPU's lowering for CUDA from
  the CPU: the inline decode's register walk and the sliced SMEM operands (interpret mode runs
  a jnp decode instead)."""
  t = formats.quantize_nvfp4(jax.random.normal(jax.random.key(m + chunks), (n, k), jnp.float32))
  cfg = dataclasses.replace(nm.pick_config(m, n, k, sms=132), decode="perm", e4m3_scales=e4m3,
                            decode_chunks=chunks)
  w4, ws, gain = nm.weight_operands(t, "perm", e4m3)
  f = jax.jit(lambda x, w4, ws: nm.nvfp4_matmul(x, w4, ws, gain, None, config=cfg, sms=132))
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
  assert "mosaic_gpu" in jax.export.export(f, platforms=["cuda"])(x, w4, ws).mlir_module()


@pytest.mark.parametrize("block", [0, 128])
@pytest.mark.parametrize("path", ["mgpu", "mgpu-ksplit", "xla"])
def test_qdq_equals_decoded_packed_codes(rng, block, path):
  """QDQ is exact: the bf16 block values equal decoding the packed codes of the same
  quantization bit for bit, and the tensor scale is the same (Mosaic kernels, also with K
  split across CTAs, and XLA fusion)."""
  x = jnp.asarray(rng.standard_normal((72, 512)) * rng.uniform(0.1, 10, (72, 1)), jnp.bfloat16)
  x = x.at[3, 5].set(jnp.bfloat16(0.0))  # an exact zero and a tiny block
  x = x.at[7, 16:32].set(jnp.bfloat16(1e-30))
  x = x.at[11, 300].set(jnp.bfloat16(90.0))  # the global amax in the second K chunk
  cfg = nvfp4_quant.NVFP4QuantConfig(block, k_splits=2 if path == "mgpu-ksplit" else 1)
  if path.startswith("mgpu"):
    assert nvfp4_quant.supported(x, cfg)
    v, g = nvfp4_quant.quantize_qdq_mgpu(x, cfg, interpret=qlinear_mosaic.interpret_params())
  else:
    v, g = nvfp4_quant.quantize_qdq_xla(x, cfg)
  t = formats.quantize_nvfp4(nvfp4_quant.rotate(x, block))
  assert v.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(v, np.float32), np.asarray(formats.nvfp4_block_values(t)))
  assert float(g) == float(t.global_scale)
  # and against the xla path's own quantizer (f32 HIGHEST rotation): codes may differ only
  # where rotate()'s f32 summation order moves a value across a rounding boundary
  ref = nvfp4_quant.reference(x, nvfp4_quant.NVFP4QuantConfig(block))
  diff = np.asarray(v, np.float32) != np.asarray(formats.nvfp4_block_values(ref))
  assert diff.mean() < 1e-3


@pytest.mark.parametrize("mode", [Mode.NVFP4, Mode.BF16])
@pytest.mark.parametrize("hadamard", [True, False])
@pytest.mark.parametrize("path", ["register-decode", "perm-decode", "perm-e4m3-scales",
                                  "w4a4-bits-past-perm-rows", "dequant"])
def test_mosaic_qlinear_matches_xla_on_cpu(rng, monkeypatch, mode, hadamard, path):
  """MOSAIC.w4a4 / w4a16 (QDQ + kernel) against qlinear_xla computed on the host CPU, on both
  weight paths: the in-register decode ("bits", or "perm" with the K order folded into the
  rotation, also with stored e4m3 block scales), and (from DEQUANT_MIN_ROWS rows, lowered
  here to 64) the bf16 decode + bf16 GEMM.
  (M = 64: Mosaic GPU's interpreter sometimes stalls on partial 128-row tiles.)"""
  m, k, n = 64, 256, 128
  monkeypatch.setattr(nm, "DEFAULT_DECODE", "bits" if path == "register-decode" else "perm")
  monkeypatch.setattr(nm, "SMALL_M_E4M3_SCALES", path == "perm-e4m3-scales")
  if path == "perm-e4m3-scales":  # 256-wide K steps need K >= 1024 here (2 splits of 2 steps)
    k = 1024
    monkeypatch.setattr(nm, "num_sms", lambda: 2)
    assert nm.pick_config(m, n, k).e4m3_scales
  decodes = []
  if path == "w4a4-bits-past-perm-rows":  # w4a4 takes "bits" past W4A4_PERM_MAX_ROWS
    monkeypatch.setattr(qlinear_mosaic, "W4A4_PERM_MAX_ROWS", m - 1)
    real_mm = nm.nvfp4_matmul
    monkeypatch.setattr(nm, "nvfp4_matmul", lambda *a, config, **kw: decodes.append(
        config.decode) or real_mm(*a, config=config, **kw))
  if path == "dequant":
    monkeypatch.setattr(qlinear_mosaic, "DEQUANT_MIN_ROWS", m)
    calls = []
    real = qlinear_mosaic.w8a8.bf16_matmul
    monkeypatch.setattr(qlinear_mosaic.w8a8, "bf16_matmul",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
  w = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
  b = rng.standard_normal(n).astype(np.float32) * 0.1
  layer = quantize_linear(w, b, hadamard=hadamard)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  fn = {Mode.NVFP4: "w4a4", Mode.BF16: "w4a16"}[mode]
  assert qlinear_mosaic.nvfp4_kernel_fits(m, n, k)
  got = getattr(qlinear_mosaic, fn)(x, layer)
  with jax.default_device(jax.devices("cpu")[0]):
    want = getattr(qlinear_xla, fn)(x, layer)
  assert got.shape == (m, n) and got.dtype == jnp.bfloat16
  assert rel_err(got, want) <= 2e-3
  if path == "dequant":
    assert calls, "the dequant path did not run the bf16 GEMM"
  if path == "w4a4-bits-past-perm-rows":  # w4a16 keeps "perm" (its K order is folded)
    assert decodes == ["bits" if mode == Mode.NVFP4 else "perm"], decodes


def test_mosaic_w4a16_folded_rotation_matches_xla_on_cpu(rng, monkeypatch):
  """Where qlinear_xla.w4a16_folds_rotation holds (its threshold lowered here), MOSAIC.w4a16
  multiplies x as it is by the rotated-back weight on the bf16 GEMM, with no rotation of x,
  and matches the xla path's folded form; its weight equals qlinear_xla.weight_derotated
  except in a few (nearly) cancelling sums."""
  m, k, n = 256, 256, 128
  monkeypatch.setattr(qlinear_xla, "W4A16_FOLD_MIN_ROWS", m)
  calls = []
  real = qlinear_mosaic.w8a8.bf16_matmul
  monkeypatch.setattr(qlinear_mosaic.w8a8, "bf16_matmul",
                      lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
  monkeypatch.setattr(nvfp4_quant, "rotate", lambda *a, **kw: pytest.fail("x was rotated"))
  w = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
  b = rng.standard_normal(n).astype(np.float32) * 0.1
  layer = quantize_linear(w, b)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  got = qlinear_mosaic.w4a16(x, layer)
  with jax.default_device(jax.devices("cpu")[0]):
    want = qlinear_xla.w4a16(x, layer)
    unfolded = qlinear_xla.w4a16(x[:-1], layer)  # one row fewer: below both thresholds
  assert calls == [(m, k)]
  assert got.shape == (m, n) and got.dtype == jnp.bfloat16
  assert rel_err(got, want) <= 2e-4
  assert rel_err(got[:-1], unfolded) > 1e-3  # the other rounding point, for contrast
  wd = np.asarray(jax.jit(qlinear_mosaic.weight_derotated_bf16)(layer), np.float32)
  wd_ref = np.asarray(qlinear_xla.weight_derotated(layer), np.float32)
  # they differ only in a few sums that (nearly) cancel: the xla form adds f32-rounded
  # products x (+-1/sqrt(128)), the tensor cores add the exact +-values, then scale
  assert (wd != wd_ref).mean() < 1e-3
  assert np.abs(wd - wd_ref).max() <= 1e-3 * np.sqrt(np.mean(wd_ref ** 2))


@pytest.mark.parametrize("cfg,n,k,sms", [
    (nvfp4_derotate.DerotateConfig(), 128, 256, 1),       # one CTA, two chained row tiles
    (nvfp4_derotate.DerotateConfig(), 128, 512, 2),       # two CTAs, two chained tiles each
    (nvfp4_derotate.DerotateConfig(decode="bits"), 64, 512, 2),
    (nvfp4_derotate.DerotateConfig(tile_rows=128), 128, 512, 1),
    (nvfp4_derotate.DerotateConfig(chain_tiles=False), 128, 512, 2),
], ids=["perm-1cta", "perm-2cta", "bits", "rows128", "nochain"])
def test_derotate_matches_reference_and_float64(rng, cfg, n, k, sms):
  """The one-launch rotated-back weight: equal to the xla reference (f32 HIGHEST rotation,
  one bf16 rounding) except in a few nearly cancelling sums, and within one bf16 rounding of
  the float64 product of the exact block values with the orthonormal Hadamard. With
  chain_tiles, every CTA here has >= 2 row tiles, so their K pipelines chain."""
  w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(1e-2, 1e2, (n, 1))
  w[:, 5] *= 30  # an outlier input channel
  t = formats.quantize_nvfp4(jnp.asarray(w))
  got = nvfp4_derotate.derotate(t, 128, config=cfg, interpret=qlinear_mosaic.interpret_params(),
                                sms=sms)
  assert got.shape == (n, k) and got.dtype == jnp.bfloat16
  got = np.asarray(got, np.float64)
  want = np.asarray(nvfp4_derotate.reference(t, 128), np.float64)
  exact = derotated_block_values_f64(t, 128)
  assert (got != want).mean() < 5e-3
  row_rms = np.sqrt(np.mean(exact ** 2, axis=1, keepdims=True))
  assert np.all(np.abs(got - want) <= 1e-3 * row_rms)
  assert np.all(np.abs(got - exact) <= 2 ** -8 * np.abs(exact) + 1e-6 * row_rms)


@pytest.mark.parametrize("cfg", [dataclasses.replace(SMALL, decode="perm"),
                                 dataclasses.replace(SMALL, decode="perm", k_splits=2)],
                         ids=["fused-epilogue", "splitK"])
def test_weight_major_output_is_the_transpose(rng, cfg):
  """nvfp4_matmul(weight_major=True) stores the accumulator untransposed: bf16[N, M], equal to
  the usual output transposed (the same epilogue arithmetic), M padded and cropped."""
  m, n, k = 40, 128, 256
  x, _, w4, ws, cs, bias = problem(rng, m, n, k, "perm")
  kw = dict(config=cfg, interpret=qlinear_mosaic.interpret_params())
  got = nm.nvfp4_matmul(x, w4, ws, cs, bias, weight_major=True, **kw)
  assert got.shape == (n, m) and got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got).T, np.asarray(nm.nvfp4_matmul(x, w4, ws, cs,
                                                                                bias, **kw)))
  assert rel_err(got.T, nm.reference(x, w4, ws, cs, bias, decode="perm")) <= 1e-3


def test_derotate_rejects_what_it_does_not_tile():
  t = formats.quantize_nvfp4(jax.random.normal(jax.random.key(0), (64, 256), jnp.float32))
  assert not nvfp4_derotate.supported((64, 256), 64)       # a 64-wide block: one K step
  assert not nvfp4_derotate.supported((64, 192), 128)      # K not a multiple of the block
  assert not nvfp4_derotate.supported((32, 256), 128)      # 64 rows of 128: half a CTA tile
  assert nvfp4_derotate.supported((64, 256), 128)
  with pytest.raises(ValueError, match=r"\[64, 256\] weight with Hadamard block 64"):
    nvfp4_derotate.derotate(t, 64)
  with pytest.raises(ValueError, match="2-D"):
    nvfp4_derotate.derotate(formats.NVFP4Tensor(t.codes[None], t.scales[None], t.global_scale),
                            128)


@pytest.mark.parametrize("n,k,rows", [(7680, 1920, 64), (12288, 3072, 64), (8192, 8192, 128)])
def test_derotate_lowers_for_hopper(n, k, rows):
  """The kernel at CogVideoX / 8192^2 weights passes Mosaic GPU's lowering for CUDA from the
  CPU (interpret mode runs a jnp decode instead of the inline one)."""
  t = formats.quantize_nvfp4(jax.random.normal(jax.random.key(n), (n, k), jnp.float32))
  cfg = nvfp4_derotate.DerotateConfig(tile_rows=rows)
  f = jax.jit(lambda t: nvfp4_derotate.derotate(t, 128, config=cfg, sms=132))
  assert "mosaic_gpu" in jax.export.export(f, platforms=["cuda"])(t).mlir_module()


def test_weight_bf16_is_the_exact_block_values(rng):
  """The large-M path's one-fusion decode equals formats' block values bit for bit (signed
  zeros, every code, scales over six decades)."""
  w = rng.standard_normal((64, 512)).astype(np.float32) * rng.uniform(1e-3, 1e3, (64, 1))
  w[3, :32] = 0.0
  layer = quantize_linear(w, None, hadamard=False)
  got = np.asarray(jax.jit(qlinear_mosaic.weight_bf16)(layer)).view(np.uint16)
  want = np.asarray(formats.nvfp4_block_values(layer.weight).astype(jnp.bfloat16)).view(np.uint16)
  assert got.shape == (64, 512)
  np.testing.assert_array_equal(got, want)
  assert len(np.unique(np.asarray(layer.weight.codes) & 15)) == 16  # every code was decoded


def test_qdq_nonfinite_input_poisons_the_scale(rng):
  x = jnp.asarray(rng.standard_normal((64, 128)), jnp.bfloat16).at[9, 9].set(jnp.inf)
  v, g = nvfp4_quant.quantize_qdq_mgpu(x, interpret=qlinear_mosaic.interpret_params())
  assert np.isnan(float(g)) and np.isnan(float(formats.quantize_nvfp4(x).global_scale))


# ------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("variant", ["default", "perm", "bits", "int4", "perm-e4m3",
                                    "perm-e4m3-chunks2", "perm-chunks4", "perm-e4m3-chunks4"])
@pytest.mark.parametrize("m,k,n", [(2048, 1920, 1920), (35552 // 8, 3072, 1536), (64, 1920, 7680),
                                   (16, 3072, 3072), (64, 3072, 12288)])
def test_gpu_kernel_real_shapes(rng, variant, m, k, n):
  """"default": pick_config's config as it is; the others pin the decode and its options."""
  if variant == "default":
    cfg = nm.pick_config(m, n, k)
  else:
    decode, e4m3 = variant.split("-")[0], "-e4m3" in variant
    chunks = int(variant.split("chunks")[1][0]) if "chunks" in variant else 1
    cfg = dataclasses.replace(nm.pick_config(m, n, k), decode=decode, e4m3_scales=e4m3)
    if (e4m3 or chunks > 1) and cfg.tile_k < 256:
      pytest.skip("e4m3 scales and K chunks need 256-wide K steps (the small-M configs)")
    cfg = dataclasses.replace(cfg, decode_chunks=chunks)
  decode, e4m3 = cfg.decode, cfg.e4m3_scales
  x, t, w4, ws, cs, bias = problem(rng, m, n, k, decode, e4m3)
  if variant == "perm":  # the epilogue's per-column scale form (TMA-fetched), not one scale
    cs = jnp.full((n,), cs, jnp.float32)
  if variant == "bits":  # and without bias
    bias = jnp.zeros((n,), jnp.float32)
  got = nm.nvfp4_matmul(x, w4, ws, cs, None if variant == "bits" else bias, config=cfg)
  want = nm.reference(x, w4, ws, cs, bias, decode=decode)
  assert rel_err(got, want) <= 2e-3
  assert rel_err(got, float64_product(x, t, bias)) <= 4e-3




@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("m,k,n", [(4608, 1920, 1920), (6144, 3072, 3072)])
def test_gpu_w4a16_folded_rotation(rng, m, k, n):
  """Past W4A16_FOLD_MIN_ROWS (the default), MOSAIC.w4a16 (rotated-back weight, bf16 GEMM)
  against the xla implementation on the host CPU, and against the product with the exact
  rotated-back weight in float64 (a row sample)."""
  w = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
  b = rng.standard_normal(n).astype(np.float32) * 0.1
  layer = quantize_linear(w, b)
  assert qlinear_xla.w4a16_folds_rotation(m, layer)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  got = np.asarray(jax.jit(qlinear_mosaic.w4a16)(x, layer))
  cpu = jax.devices("cpu")[0]
  with jax.default_device(cpu):
    want = qlinear_xla.w4a16(jax.device_put(x, cpu), jax.device_put(layer, cpu))
  assert rel_err(got, want) <= 2e-3
  rows = rng.choice(m, 256, replace=False)
  assert rel_err(got[rows], w4a16_exact_f64(np.asarray(x)[rows], layer)) <= 4e-3


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("cfg", [nvfp4_derotate.DerotateConfig(),
                                 nvfp4_derotate.DerotateConfig(decode="bits"),
                                 nvfp4_derotate.DerotateConfig(tile_rows=128),
                                 nvfp4_derotate.DerotateConfig(chain_tiles=False)],
                         ids=["perm", "bits", "rows128", "nochain"])
@pytest.mark.parametrize("n,k", [(1920, 1920), (12288, 3072)])
def test_gpu_derotate_real_shapes(rng, cfg, n, k):
  """The one-launch rotated-back weight on the GPU against the xla reference on the host."""
  if not nvfp4_derotate.supported((n, k), 128, cfg):
    pytest.skip(f"{cfg} does not tile [{n}, {k}]")
  w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(1e-2, 1e2, (n, 1))
  t = formats.quantize_nvfp4(jnp.asarray(w))
  got = np.asarray(jax.jit(lambda t: nvfp4_derotate.derotate(t, 128, config=cfg))(t),
                   np.float32)
  cpu = jax.devices("cpu")[0]
  with jax.default_device(cpu):
    want = np.asarray(nvfp4_derotate.reference(jax.device_put(t, cpu), 128), np.float32)
  assert (got != want).mean() < 5e-3
  row_rms = np.sqrt(np.mean(want.astype(np.float64) ** 2, axis=1, keepdims=True))
  assert np.all(np.abs(got - want) <= 1e-3 * row_rms)


def test_e2m1_round_equals_the_formats_encoding():
  """The QDQ kernel's step-size rounding gives formats' e2m1 values everywhere: every tie
  between e2m1 neighbours and its f32 neighbours, a dense grid, saturation, 0, inf and NaN."""
  e2m1 = np.asarray(formats.e2m1_decode(jnp.arange(8, dtype=jnp.uint8)))
  ties = (e2m1[:-1] + e2m1[1:]) / 2
  near = np.concatenate([np.nextafter(ties, 0), ties, np.nextafter(ties, np.inf)])
  a = np.concatenate([near, np.linspace(0, 8, 8193), e2m1, [6.5, 7.0, 100.0, np.inf, np.nan]])
  a = jnp.asarray(a, jnp.float32)
  got = np.asarray(nvfp4_quant._e2m1_round(a))
  want = np.asarray(formats.e2m1_decode(formats.e2m1_encode(a)))
  np.testing.assert_array_equal(got, want)


def _qdq_values_bits_np(q, s32):
  """nvfp4_quant._qdq_values' GPU arithmetic (the `bits` form) in numpy float32 / uint32."""
  f32, u32 = np.float32, np.uint32
  qb = q.astype(f32).view(u32)
  sign = (q.astype(f32) + f32(0)).view(u32) & u32(0x80000000)
  ub = qb & u32(0x7FFFFFFF)
  a = ub.view(f32)
  magic = f32(nvfp4_quant._SMALL_MAGIC)
  small = ((a + magic).astype(f32) - magic).astype(f32)
  big = ((ub + u32(0x1FFFFF) + ((ub >> u32(22)) & u32(1))) & u32(0xFFC00000)).view(f32)
  r = np.where(a < f32(2), small, big)
  r = np.where(np.isnan(r), f32(6), np.minimum(r, f32(6)))  # minnum: NaN -> the other operand
  return ((r * s32).astype(f32).view(u32) | sign).view(f32)


def test_qdq_values_bits_equal_the_formats_encoding(rng):
  """The GPU form of the QDQ value (float/bit e2m1 rounding, sign or-ed in) equals
  sign(q) e2m1(|q|) s32 by formats' encoding: at every e2m1 tie, its f32 neighbours, a dense
  grid, saturation, 0, -0, inf, and NaN where s32 = 0 (the only way 0 / 0 arises). (No
  subnormal q: XLA:CPU, which runs the jnp form, flushes them.)"""
  e2m1 = np.asarray(formats.e2m1_decode(jnp.arange(8, dtype=jnp.uint8)))
  ties = (e2m1[:-1] + e2m1[1:]) / 2
  near = np.concatenate([np.nextafter(ties, 0), ties, np.nextafter(ties, np.inf)])
  a = np.concatenate([near, np.linspace(0, 8, 8193), e2m1, [6.5, 7.0, 100.0, 1e-30, np.inf]])
  q = np.concatenate([a, -a, [-0.0] * 5]).astype(np.float32)
  s32 = rng.choice(np.asarray([0.0, 2.0 ** -9, 0.375, 1.0, 448.0], np.float32), q.size)
  want = np.asarray(nvfp4_quant._qdq_values(jnp.asarray(q), jnp.asarray(s32), interpret=True))
  got = _qdq_values_bits_np(q, s32)
  np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
  nan_q, zero_s = np.full(4, np.nan, np.float32), np.zeros(4, np.float32)
  assert not np.any(_qdq_values_bits_np(nan_q, zero_s))
  assert not np.any(np.asarray(nvfp4_quant._qdq_values(jnp.asarray(nan_q), jnp.asarray(zero_s),
                                                       interpret=True)))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("block", [0, 128])
def test_gpu_qdq_equals_xla_fusion(rng, block):
  """On the GPU the QDQ quantizer (e2m1 rounding by float/bit arithmetic, and by step
  selects) equals the XLA fusion (quantize to codes, then decode) value for value, on rows of
  every magnitude and inputs on a coarse grid (they land on e2m1 ties often)."""
  x = rng.integers(-48, 48, (4096, 3072)) * 0.125 * (2.0 ** rng.integers(-20, 20, (4096, 1)))
  x[::7] = rng.standard_normal(x[::7].shape) * 3
  x = jnp.asarray(x, jnp.bfloat16)
  run = lambda **kw: jax.jit(lambda x: nvfp4_quant.quantize_qdq_mgpu(
      x, nvfp4_quant.NVFP4QuantConfig(block, **kw)))(x)
  want, g_want = jax.jit(lambda x: nvfp4_quant.quantize_qdq_xla(
      x, nvfp4_quant.NVFP4QuantConfig(block)))(x)
  want = np.asarray(want, np.float32)
  for got, g in (run(), run(e2m1_bits=False)):
    got = np.asarray(got, np.float32)
    bad = np.argwhere(got != want)  # as values: the codes path may sign a zero differently
    assert not len(bad), [(tuple(i), float(got[tuple(i)]), float(want[tuple(i)])) for i in bad[:8]]
    assert float(g) == float(g_want)


@pytest.mark.parametrize("block", [0, 128])
@pytest.mark.parametrize("k", [1920, 4096])  # K split across 1 and 8 CTAs per row block
def test_qdq_kernels_lower_for_hopper(block, k):
  """Both QDQ quantizer launches pass Mosaic GPU's lowering for CUDA (from the CPU)."""
  from pallas_kernels.int8_quant_mgpu import pick_k_splits
  assert pick_k_splits(1024, k, 132) == {1920: 1, 4096: 8}[k]
  f = jax.jit(lambda x: nvfp4_quant.quantize_qdq_mgpu(x, nvfp4_quant.NVFP4QuantConfig(block)))
  x = jax.ShapeDtypeStruct((1024, k), jnp.bfloat16)
  assert "mosaic_gpu" in jax.export.export(f, platforms=["cuda"])(x).mlir_module()


# ------------------------------------------------- W4A8: the weight decoded onto its INT8 grid
def w4a8_problem(rng, m, n, k, e4m3_scales):
  """An NVFP4 layer-like weight, its per-channel INT8 scale as qlinear makes it, per-token
  INT8 activations with random scales, a bias."""
  w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.1, 3, (n, 1))
  t = formats.quantize_nvfp4(jnp.asarray(w))
  wsi = formats.quantize_int8(formats.dequantize_nvfp4(t), axis=-1).scales
  xq = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
  xs = jnp.asarray(rng.uniform(1e-3, 1e-1, (m, 1)), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  w4, ws, _ = nm.weight_operands(t, "perm", e4m3_scales)
  return t, wsi, xq, xs, bias, w4, ws


def as_layer(t, wsi):
  return type("Layer", (), dict(weight_format="nvfp4", weight=t, w_int8_scale=wsi))()


@pytest.mark.parametrize("e4m3", [False, True])
def test_int8_grid_weight_is_weight_as_int8(rng, e4m3):
  """The int8_grid decode's arithmetic (jnp form) gives qlinear_xla.weight_as_int8's values
  exactly, .5 ties included: NVFP4 values over a channel's scale often land on an exact .5
  (the test checks that some do), where a product with a rounded reciprocal picks either side."""
  t, wsi, _, _, _, w4, ws = w4a8_problem(rng, 8, 256, 512, e4m3)
  got = np.asarray(nm.int8_grid_weight(w4, ws, wsi, t.global_scale))
  want = np.asarray(qlinear_xla.weight_as_int8(as_layer(t, wsi)))
  np.testing.assert_array_equal(got, want)
  exact = np.asarray(formats.dequantize_nvfp4(t), np.float64) / np.asarray(wsi, np.float64)
  assert (np.abs(exact - np.floor(exact) - 0.5) < 1e-6).sum() > 0  # ties exist


def _f32(v):
  return np.asarray(v, np.float64).astype(np.float32)


def test_int8_grid_pair_formula(rng):
  """_INT8_GRID_PAIR_PTX replayed in numpy (f32 steps; fma's exact product and sum via
  float64, which holds them here), on the kernel's bf16x2 inputs: the s16x2 it returns holds
  weight_as_int8's integers for both halves, on every row of a weight with ties."""
  import ml_dtypes
  t, wsi, *_ = w4a8_problem(rng, 8, 64, 512, False)
  vals = np.asarray(formats.nvfp4_block_values(t), np.float32) * np.float32(2.0 ** -7)
  bits = vals.astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.uint32)
  pair = bits[:, 0::2] | (bits[:, 1::2] << np.uint32(16))  # halves: columns 2i, 2i + 1
  gain = _f32(np.float32(t.global_scale) * np.float32(128.0))
  scale = np.asarray(wsi, np.float32)  # [N, 1]
  rcp = _f32(np.float32(1.0) / scale)

  def half(b):  # one half of the PTX: f32 bits -> the integer
    x = b.view(np.float32)
    w = _f32(x * gain)
    q = _f32(w * rcp)
    r = _f32(np.float64(q) * -np.float64(scale) + np.float64(w))
    q = _f32(np.float64(r) * np.float64(rcp) + np.float64(q))
    return (_f32(q + np.float32(1.5 * 2 ** 23)).view(np.uint32) & 0xFFFF).astype(np.uint16)

  lo = half(pair << np.uint32(16)).view(np.int16)
  hi = half(pair & np.uint32(0xFFFF0000)).view(np.int16)
  got = np.stack([np.clip(lo, -127, 127), np.clip(hi, -127, 127)], -1).reshape(vals.shape)
  want = np.asarray(qlinear_xla.weight_as_int8(as_layer(t, wsi)))
  np.testing.assert_array_equal(got, want)


def test_permute_k_int8_is_the_registers_column_order():
  """Logical column 16h + 4b + 2c + d (the s8 wgmma's column 4b + 2c + d of register h of
  thread b) holds physical column 8b + 4d + 2h + c: byte 2c + d of register h is code
  (h, d, c) -> 2h + 4d + c of the thread's word (the prmt order in _decode_perm_int8)."""
  got = nm.k_permutation_int8(64)
  for k in range(64):
    g, j = divmod(k, 32)
    h, r = divmod(j, 16)
    b, i = divmod(r, 4)
    code = ((0, 4, 1, 5), (2, 6, 3, 7))[h][i]
    assert got[k] == 32 * g + 8 * b + code, (k, got[k])
  x = jnp.asarray(np.arange(3 * 64).reshape(3, 64))
  np.testing.assert_array_equal(np.asarray(nm.permute_k_int8(x)), np.asarray(x)[:, got])


W4A8_CONFIGS = {  # name: (m, n, k, config changes)
    "split-k": (40, 256, 512, dict(k_splits=2)),
    "fused-epilogue": (40, 256, 512, dict(k_splits=1)),
    "e4m3-chunks2": (64, 256, 1024, dict(k_splits=2, tile_k=256, e4m3_scales=True,
                                         decode_chunks=2, max_concurrent_steps=2)),
    "two-m-tiles": (72, 128, 512, dict(k_splits=1, tile_m=64, epi_tile_m=32)),
}


@pytest.mark.parametrize("name", sorted(W4A8_CONFIGS))
def test_w4a8_kernel_matches_reference(rng, name):
  """w4a8_matmul (interpret mode) equals w4a8_reference bit for bit (exact int32 sums, the same
  f32 epilogue) and is within bf16 rounding of the float64 product; split-K partials, the fused
  epilogue with its per-token column scales, the stored e4m3 scales with 2 chunks per K step,
  and two M tiles with a partial last one."""
  m, n, k, changes = W4A8_CONFIGS[name]
  base = nm.pick_config(m, n, k, sms=4, int8_grid=True)
  cfg = nm.replace_config(base, **changes)
  assert cfg.int8_grid and all(getattr(cfg, f) == v for f, v in changes.items()), cfg
  t, wsi, xq, xs, bias, w4, ws = w4a8_problem(rng, m, n, k, cfg.e4m3_scales)
  got = nm.w4a8_matmul(xq, xs, w4, ws, wsi, t.global_scale, bias, config=cfg, sms=4,
                       interpret=qlinear_mosaic.interpret_params())
  want = nm.w4a8_reference(xq, xs, w4, ws, wsi, t.global_scale, bias)
  assert got.shape == (m, n) and got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  wq = np.asarray(qlinear_xla.weight_as_int8(as_layer(t, wsi)), np.float64)
  f64 = (np.asarray(xq, np.float64) @ wq.T * np.asarray(xs, np.float64)
         * np.asarray(wsi, np.float64).T + np.asarray(bias, np.float64))
  assert rel_err(got, f64) <= 4e-3


def test_w4a8_matmul_rejects_bad_inputs(rng):
  t, wsi, xq, xs, bias, w4, ws = w4a8_problem(rng, 8, 128, 256, False)
  cfg = nm.pick_config(8, 128, 256, sms=2, int8_grid=True)
  call = lambda **kw: nm.w4a8_matmul(**{**dict(xq=xq, x_scale=xs, w4=w4, ws=ws,
                                              w_int8_scale=wsi, global_scale=t.global_scale,
                                              bias=bias, config=cfg), **kw})
  with pytest.raises(ValueError, match="activations must be int8"):
    call(xq=xq.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="x_scale must have 8 values"):
    call(x_scale=xs[:4])
  with pytest.raises(ValueError, match="w_int8_scale must have 128 values"):
    call(w_int8_scale=wsi[:64])
  with pytest.raises(ValueError, match="int8_grid=True"):
    call(config=nm.pick_config(8, 128, 256, sms=2))
  with pytest.raises(ValueError, match="call w4a8_matmul"):
    nm.nvfp4_matmul(xq, w4, ws, 1.0, config=cfg)
  with pytest.raises(ValueError, match="tile_n == 64"):
    call(config=dataclasses.replace(cfg, tile_n=128))


@pytest.mark.parametrize("m,n,k", [(64, 12288, 3072), (64, 3072, 12288), (256, 3072, 3072),
                                   (64, 1920, 1920)])
def test_w4a8_kernel_lowers_for_hopper(m, n, k):
  """w4a8_matmul as pick_config tiles real shapes passes Mosaic GPU's lowering for CUDA from
  the CPU: the s8 register operand in the WGMMA_8BIT layout built by the inline decode, the
  per-token column scales in the epilogue, split-K's int32 partials."""
  t = formats.quantize_nvfp4(jax.random.normal(jax.random.key(m + k), (n, k), jnp.float32))
  cfg = nm.pick_config(m, n, k, sms=132, int8_grid=True)
  w4, ws, _ = nm.weight_operands(t, "perm", cfg.e4m3_scales)
  f = jax.jit(lambda xq, xs, w4, ws, wsi, g: nm.w4a8_matmul(xq, xs, w4, ws, wsi, g, None,
                                                            config=cfg, sms=132))
  args = (jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((m,), jnp.float32), w4,
          ws, jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))
  assert "mosaic_gpu" in jax.export.export(f, platforms=["cuda"])(*args).mlir_module()


@pytest.mark.parametrize("hadamard,max_rows", [(True, 256), (False, 256), (True, 47)])
def test_mosaic_w4a8_small_m_register_decode_matches_xla_on_cpu(rng, monkeypatch, hadamard,
                                                                max_rows):
  """MOSAIC.w4a8 up to W4A8_REGDEC_MAX_ROWS rows takes the register decode onto the INT8 grid
  (the quantizer's output in the kernel's K order, folded into the rotation), past it the
  per-call conversion and the W8A8 kernel; both match qlinear_xla.w4a8 computed on the host
  CPU."""
  m, k, n = 48, 512, 128
  calls = []
  real = nm.w4a8_matmul
  monkeypatch.setattr(nm, "w4a8_matmul", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
  monkeypatch.setattr(nm, "num_sms", lambda: 4)
  monkeypatch.setattr(qlinear_mosaic, "W4A8_REGDEC_MAX_ROWS", max_rows)
  w = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
  b = rng.standard_normal(n).astype(np.float32) * 0.1
  layer = quantize_linear(w, b, hadamard=hadamard)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  got = qlinear_mosaic.w4a8(x, layer)
  with jax.default_device(jax.devices("cpu")[0]):
    want = qlinear_xla.w4a8(x, layer)
  if m <= max_rows:
    assert calls and calls[0]["x_permuted"] == hadamard  # (a second call: after padding M)
  else:
    assert not calls
  assert got.shape == (m, n) and got.dtype == jnp.bfloat16
  assert rel_err(got, want) <= 1e-3


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("m,k,n", [(64, 3072, 12288), (64, 12288, 3072), (256, 3072, 3072),
                                   (64, 1920, 1920), (16, 3072, 3072), (200, 1920, 7680)])
def test_gpu_w4a8_register_decode_real_shapes(rng, m, k, n):
  """On the GPU: (1) the INT8 grid the PTX decode builds, read back through one-hot
  activation rows (y[m, n] = bf16(wq[n, k_m] * scale[n]), so round(y / scale) is wq exactly),
  equals weight_as_int8 on the host at those columns; (2) random activations against
  w4a8_reference on the host (the epilogue's multiply-add may be fused, moving an output
  across a bf16 rounding boundary now and then: not bit for bit)."""
  cfg = nm.pick_config(m, n, k, int8_grid=True)
  t, wsi, xq, xs, bias, w4, ws = w4a8_problem(rng, m, n, k, cfg.e4m3_scales)
  cpu = jax.devices("cpu")[0]
  host = lambda v: jax.device_put(v, cpu)
  cols = rng.choice(k, m, replace=False)
  onehot = np.zeros((m, k), np.int8)
  onehot[np.arange(m), cols] = 1
  y = nm.w4a8_matmul(jnp.asarray(onehot), jnp.ones((m,), jnp.float32), w4, ws, wsi,
                     t.global_scale, None, config=cfg)
  with jax.default_device(cpu):
    wq = np.asarray(qlinear_xla.weight_as_int8(as_layer(host(t), host(wsi))))
  got = np.rint(np.asarray(y, np.float64) / np.asarray(wsi, np.float64).T)
  np.testing.assert_array_equal(got, wq[:, cols].T)
  y = nm.w4a8_matmul(xq, xs, w4, ws, wsi, t.global_scale, bias, config=cfg)
  with jax.default_device(cpu):
    want = nm.w4a8_reference(*map(host, (xq, xs, w4, ws, wsi, t.global_scale, bias)))
  assert rel_err(y, want) <= 1e-4
