"""W8A8 Mosaic GPU kernel, INT8 quantizer and MOSAIC.w4a8 against the xla reference.

On CPU the kernel runs in Mosaic GPU's interpret mode (small shapes, a few seconds each);
the same checks at real shapes run on a Hopper GPU (marked gpu, skipped elsewhere).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpqjax import formats, qlinear_xla
from mpqjax.qlinear import Mode, qlinear, quantize_linear
from mpqjax.testing import rel_err
from pallas_kernels import int8_quant, qlinear_mosaic
from pallas_kernels import w8a8_matmul as w8a8
from tests.markers import needs_hopper

ON_GPU = jax.default_backend() == "gpu"

SMALL = w8a8.W8A8Config(tile_m=64, tile_n=64, tile_k=128, max_concurrent_steps=2,
                        epi_tile_m=64, epi_tile_n=32, grid_minor_dim=w8a8.Dim.N,
                        grid_tile_width=2)


def operands(rng, m, n, k):
  a = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
  b = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
  rs = jnp.asarray(rng.uniform(0.5, 2.0, m), jnp.float32) * 1e-2
  cs = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32) * 1e-3
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
  return a, b, rs, cs, bias


@pytest.mark.parametrize("cfg,shape", [
    (SMALL, (96, 256, 256)),                                           # ragged M tile
    (dataclasses.replace(SMALL, wg_dimension=w8a8.Dim.M), (200, 128, 256)),
    (dataclasses.replace(SMALL, k_splits=2), (64, 128, 512)),         # split-K path
    (w8a8.pick_config(200, 128, 512, 132), (200, 128, 512)),          # small-M heuristic
], ids=["wgN-raggedM", "wgM", "splitK", "picked-smallM"])
def test_int32_path_exact(rng, cfg, shape):
  m, n, k = shape
  a, b, rs, cs, bias = operands(rng, m, n, k)
  got = w8a8.w8a8_matmul(a, b, rs, cs, config=cfg, out_dtype=jnp.int32, interpret=qlinear_mosaic.interpret_params())
  want = w8a8.reference(a, b, rs, cs, out_dtype=jnp.int32)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("cfg,shape,sms", [
    (SMALL, (200, 256, 768), 3),                                     # chained, uneven tiles/CTA
    (dataclasses.replace(SMALL, chain_tiles=False), (200, 256, 768), 3),
    (dataclasses.replace(SMALL, cluster_dimension=w8a8.Dim.M), (520, 128, 512), 4),  # odd M tiles
    (dataclasses.replace(SMALL, cluster_dimension=w8a8.Dim.N), (64, 512, 256), 2),
], ids=["chained", "unchained", "clusterM-chained", "clusterN-chained"])
def test_chained_tiles_and_clusters_exact(rng, cfg, shape, sms):
  """Tiles' K pipelines chained across a CTA's tiles (3 CTAs: 3, 3 and 2 tiles), and 2-CTA
  clusters sharing one operand's tile by multicast, with a last pair half out of bounds."""
  m, n, k = shape
  a, b, rs, cs, bias = operands(rng, m, n, k)
  kw = dict(config=cfg, interpret=qlinear_mosaic.interpret_params(), sms=sms)
  got = w8a8.w8a8_matmul(a, b, rs, cs, out_dtype=jnp.int32, **kw)
  np.testing.assert_array_equal(np.asarray(got),
                                np.asarray(w8a8.reference(a, b, rs, cs, out_dtype=jnp.int32)))
  y = w8a8.w8a8_matmul(a, b, rs, cs, bias, **kw)
  assert rel_err(y, w8a8.reference(a, b, rs, cs, bias)) < 1e-3


def test_cluster_config_validation(rng):
  a, b, rs, cs, _ = operands(rng, 64, 128, 256)
  with pytest.raises(ValueError, match="clusters need k_splits == 1"):
    w8a8.w8a8_matmul(a, b, rs, cs, config=dataclasses.replace(
        SMALL, cluster_dimension=w8a8.Dim.M, k_splits=2))
  with pytest.raises(ValueError, match="multiple of 2 CTA tiles"):
    w8a8.w8a8_matmul(a, b, rs, cs, config=dataclasses.replace(
        SMALL, cluster_dimension=w8a8.Dim.N))


def test_pick_config_large_m_stages_divide_k_steps():
  """Large M: the stage count divides the K steps, so that the tiles' pipelines chain."""
  for k in (1920, 3072, 7680, 8192, 12288):
    for dtype in (jnp.int8, jnp.bfloat16):
      c = w8a8.pick_config(35552, 3840, k, 132, dtype)
      assert c.chain_tiles and (k // c.tile_k) % c.max_concurrent_steps == 0, (k, dtype, c)


def test_pick_config_large_m_clusters():
  """Large M: 2-CTA clusters along M where the CTA tile is 256 wide in N (the measured
  choice, w8a8_matmul._with_clusters); not at N = 1920 (CTA 256 x 128) nor for bf16 at
  K = 12288, not below 1024 rows."""
  for dtype in (jnp.int8, jnp.bfloat16):
    assert w8a8.pick_config(35552, 7680, 1920, 132, dtype).cluster_dimension == w8a8.Dim.M
    assert w8a8.pick_config(35552, 1920, 1920, 132, dtype).cluster_dimension is None
    assert w8a8.pick_config(512, 7680, 1920, 132, dtype).cluster_dimension is None
  assert w8a8.pick_config(35552, 3072, 12288, 132, jnp.int8).cluster_dimension == w8a8.Dim.M
  assert w8a8.pick_config(35552, 3072, 12288, 132, jnp.bfloat16).cluster_dimension is None


def test_pick_config_small_m():
  """Below 1024 rows: 64 x 64 warpgroup tiles, split along M above 128 rows (the measured
  choice), K split until the SMs are busy."""
  assert w8a8.pick_config(64, 3072, 3072, 132).wg_dimension == w8a8.Dim.N
  c = w8a8.pick_config(256, 3072, 3072, 132)
  assert (c.wg_dimension, c.cta_tile_m, c.cta_tile_n) == (w8a8.Dim.M, 128, 64)
  assert w8a8.pick_config(200, 128, 512, 132).k_splits == 2


@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_epilogue_matches_xla(rng, with_bias):
  m, n, k = 96, 256, 256
  a, b, rs, cs, bias = operands(rng, m, n, k)
  bias = bias if with_bias else None
  got = w8a8.w8a8_matmul(a, b, rs, cs, bias, config=SMALL, interpret=qlinear_mosaic.interpret_params())
  want = w8a8.reference(a, b, rs, cs, bias)
  assert got.dtype == jnp.bfloat16 and got.shape == (m, n)
  g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
  # same f32 arithmetic then one bf16 rounding: at most one bf16 ulp apart
  np.testing.assert_allclose(g, w, rtol=2 ** -8, atol=1e-6)
  assert np.linalg.norm(g - w) / np.linalg.norm(w) < 1e-3


SMALL_BF16 = dataclasses.replace(SMALL, tile_k=64)


@pytest.mark.parametrize("cfg,with_bias", [(SMALL_BF16, True), (SMALL_BF16, False),
                                           (dataclasses.replace(SMALL_BF16, k_splits=2), True)],
                         ids=["bias", "no-bias", "splitK"])
def test_bf16_operands_match_xla_dot(rng, cfg, with_bias):
  """The bf16 form (the NVFP4 paths' dequantized GEMM): f32 accumulation, f32 epilogue."""
  m, n, k = 96, 256, 256
  a = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  b = jnp.asarray(rng.standard_normal((n, k)) * rng.uniform(0.1, 3, (n, 1)), jnp.bfloat16)
  cs = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(n), jnp.float32) if with_bias else None
  got = w8a8.bf16_matmul(a, b, cs, bias, config=cfg, interpret=qlinear_mosaic.interpret_params())
  want = w8a8.reference(a, b, jnp.ones((m,), jnp.float32), cs, bias)
  assert got.dtype == jnp.bfloat16 and got.shape == (m, n)
  exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64).T * np.asarray(cs, np.float64)
  exact = exact + (np.asarray(bias, np.float64) if with_bias else 0)
  assert rel_err(got, want) < 1e-3 and rel_err(got, exact) < 4e-3
  raw = w8a8.w8a8_matmul(a, b, jnp.ones((m,), jnp.float32), cs, config=cfg, out_dtype=jnp.float32,
                         interpret=qlinear_mosaic.interpret_params())  # the f32 accumulator
  product = np.asarray(a, np.float64) @ np.asarray(b, np.float64).T
  assert raw.dtype == jnp.float32 and rel_err(raw, product) < 1e-6


@pytest.mark.parametrize("cluster", [None, w8a8.Dim.M])
def test_bf16_kernel_lowers_for_hopper(cluster):
  """The picked bf16 configs (N = 1920 splits M between the warpgroups; chained tiles), also
  in 2-CTA clusters, pass Mosaic GPU's lowering for CUDA, exported from the CPU."""
  for n in (1920, 3072):
    cfg = dataclasses.replace(w8a8.pick_config(35552, n, 1920, 132, jnp.bfloat16),
                              cluster_dimension=cluster)
    f = jax.jit(lambda a, b, s: w8a8.bf16_matmul(a, b, s, config=cfg, sms=132))
    args = (jax.ShapeDtypeStruct((35552, 1920), jnp.bfloat16),
            jax.ShapeDtypeStruct((n, 1920), jnp.bfloat16), jax.ShapeDtypeStruct((), jnp.float32))
    assert "mosaic_gpu" in jax.export.export(f, platforms=["cuda"])(*args).mlir_module()


def test_mixed_operand_dtypes_are_rejected(rng):
  a = jnp.zeros((64, 256), jnp.int8)
  with pytest.raises(ValueError, match="two int8 or two bfloat16"):
    w8a8.w8a8_matmul(a, a.astype(jnp.bfloat16), jnp.ones(64), jnp.ones(64))


def test_bad_shapes_are_rejected(rng):
  a, b, rs, cs, _ = operands(rng, 64, 128, 256)
  with pytest.raises(ValueError, match="K must match"):
    w8a8.w8a8_matmul(a, b[:, :128], rs, cs, config=SMALL)
  with pytest.raises(ValueError, match="multiple of the CTA tile"):
    w8a8.w8a8_matmul(a, b[:64], rs, cs[:64], config=SMALL)
  with pytest.raises(ValueError, match="int8"):
    w8a8.w8a8_matmul(a.astype(jnp.int32), b, rs, cs, config=SMALL)


@pytest.mark.parametrize("block", [0, 128])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("rotation", int8_quant.ROTATIONS)
def test_quantizer_matches_reference(rng, block, dtype, rotation):
  x = jnp.asarray(rng.standard_normal((64, 512)) * rng.uniform(0.1, 10, (64, 1)), dtype)
  q, s = int8_quant.quantize_rows(x, int8_quant.QuantConfig(block, rotation))
  q_ref, s_ref = int8_quant.reference(x, int8_quant.QuantConfig(block))
  np.testing.assert_allclose(np.asarray(s), np.asarray(s_ref), rtol=1e-6)
  diff = np.abs(np.asarray(q, np.int32) - np.asarray(q_ref, np.int32))
  # only values sitting on a rounding boundary may differ, and by one step
  assert diff.max() <= 1 and diff.mean() < 1e-3, (diff.max(), diff.mean())


@pytest.mark.parametrize("block", [32, 128])
def test_hadamard_butterfly_is_the_rotation(rng, block):
  """The butterfly rotation against the f32 rotation (formats.hadamard) and with out_perm
  against the permuted columns; a bad block is refused."""
  x = jnp.asarray(rng.standard_normal((6, 4 * block)) * 3, jnp.float32)
  want = np.asarray(formats.hadamard(x, block), np.float64)
  got = np.asarray(int8_quant.hadamard_butterfly(x, block), np.float64)
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
  perm = rng.permutation(block)
  got_p = np.asarray(int8_quant.hadamard_butterfly(x, block, perm))
  np.testing.assert_array_equal(got_p.reshape(6, 4, block), got.reshape(6, 4, block)[..., perm])
  with pytest.raises(ValueError, match="power of two"):
    int8_quant.hadamard_butterfly(x, 96)
  with pytest.raises(ValueError, match="rotation must be one of"):
    int8_quant.QuantConfig(128, "fwht")


@pytest.mark.parametrize("weight_format,hadamard", [("nvfp4", True), ("nvfp4", False),
                                                     ("int8", True)])
def test_mosaic_w4a8_matches_xla(rng, weight_format, hadamard):
  m, k, n = 80, 256, 128
  w = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
  b = rng.standard_normal(n).astype(np.float32) * 0.1
  layer = quantize_linear(w, b, hadamard=hadamard, weight_format=weight_format)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
  got = qlinear_mosaic.w4a8(x, layer)
  want = qlinear_xla.w4a8(x, layer)
  g, r = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert np.linalg.norm(g - r) / np.linalg.norm(r) <= 1e-3


@pytest.mark.parametrize("mode, fits", [("w4a8", "kernel_fits"), ("w4a16", "nvfp4_kernel_fits"),
                                        ("w4a4", "nvfp4_kernel_fits")])
def test_unsupported_shape_falls_back_to_xla(rng, mode, fits):
  """Every Mosaic qlinear path (W8A8 and both NVFP4 kernels) hands untileable shapes to xla."""
  w = rng.standard_normal((96, 256)).astype(np.float32)  # N=96: no CTA tile fits
  layer = quantize_linear(w, None, hadamard=False)
  x = jnp.asarray(rng.standard_normal((8, 256)), jnp.float32)
  assert not getattr(qlinear_mosaic, fits)(8, 96, 256)
  np.testing.assert_array_equal(np.asarray(getattr(qlinear_mosaic, mode)(x, layer)),
                                np.asarray(getattr(qlinear_xla, mode)(x, layer)))


def test_unavailable_off_a_gpu_with_a_reason():
  """Off a GPU the Mosaic implementation reports itself unavailable and says why."""
  from pallas_kernels import hopper_unavailable_reason
  if ON_GPU:
    pytest.skip("the GPU side is covered by the gpu-marked tests running at all")
  assert not qlinear_mosaic.MOSAIC.available()
  assert isinstance(hopper_unavailable_reason(), str) and hopper_unavailable_reason()


@pytest.mark.parametrize("m,k,n,cluster", [(35552 // 16, 1920, 7680, None),
                                           (35552 // 16, 1920, 7680, w8a8.Dim.M),
                                           (35552 // 4, 1920, 1920, w8a8.Dim.M),
                                           (256, 3072, 3072, None), (64, 3072, 12288, None)])
@pytest.mark.gpu
@needs_hopper
def test_gpu_kernel_real_shapes(rng, m, k, n, cluster):
  """pick_config's kernel (from 1024 rows: chained tiles), also in 2-CTA clusters along M
  (8888 rows at N = 1920: an odd count of 256-row tiles, the last pair half out of bounds)."""
  a, b, rs, cs, bias = operands(rng, m, n, k)
  cfg = dataclasses.replace(w8a8.pick_config(m, n, k), cluster_dimension=cluster)
  got = w8a8.w8a8_matmul(a, b, rs, cs, out_dtype=jnp.int32, config=cfg)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(w8a8.reference(a, b, rs, cs, out_dtype=jnp.int32)))
  y = w8a8.w8a8_matmul(a, b, rs, cs, bias, config=cfg)
  r = w8a8.reference(a, b, rs, cs, bias)
  assert np.linalg.norm(np.asarray(y, np.float64) - np.asarray(r, np.float64)) <= 1e-3 * np.linalg.norm(np.asarray(r, np.float64))


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("mode, xla_on_cpu, tol", [(Mode.INT8, False, 1e-3),
                                                   (Mode.NVFP4, True, 2e-3),
                                                   (Mode.BF16, True, 2e-3)])
@pytest.mark.parametrize("dequant_min_rows", [None, 1024], ids=["default", "dequant"])
@pytest.mark.parametrize("rows,k,n", [(1111, 1920, 7680), (32, 3072, 3072)])
def test_gpu_qlinear_mosaic_vs_xla(rng, monkeypatch, mode, xla_on_cpu, tol, dequant_min_rows,
                                   rows, k, n):
  """Each Mosaic qlinear path end to end against the xla implementation (the NVFP4 paths
  against it on the host CPU, so the GPU's own XLA does not judge its kernels); "dequant"
  lowers the NVFP4 paths' threshold so that 2 x 1111 rows take the bf16 decode + GEMM. 2 x 32
  rows at K 3072 take the small-M kernel with its stored e4m3 block scales."""
  if dequant_min_rows:
    if 2 * rows < dequant_min_rows:
      pytest.skip("these rows stay below the lowered threshold: the default case again")
    monkeypatch.setattr(qlinear_mosaic, "DEQUANT_MIN_ROWS", dequant_min_rows)
  w = rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k)
  b = rng.standard_normal(n).astype(np.float32) * 0.1
  layer = quantize_linear(w, b)
  x = jnp.asarray(rng.standard_normal((2, rows, k)), jnp.bfloat16)
  got = qlinear(x, layer, mode, implementation="mosaic")
  if xla_on_cpu:
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
      want = qlinear(jax.device_put(x, cpu), jax.device_put(layer, cpu), mode,
                     implementation="xla")
  else:
    want = qlinear(x, layer, mode, implementation="xla")
  assert rel_err(got, want) <= tol


@pytest.mark.parametrize("hadamard", [True, False])
def test_nvfp4_to_int8_matches_reference_up_to_exact_ties(rng, hadamard):
  """The gather-free conversion equals weight_as_int8 except where w / scale sits on a .5
  tie, which NVFP4 grids hit often and which XLA rounds differently depending on whether
  it rewrote the division as a reciprocal multiply."""
  from mpqjax import formats
  from pallas_kernels import nvfp4_to_int8
  w = rng.standard_normal((64, 256)).astype(np.float32) * rng.uniform(0.01, 3, (64, 1))
  layer = quantize_linear(w, None, hadamard=hadamard)
  got = np.asarray(nvfp4_to_int8.nvfp4_to_int8(layer), np.int32)
  want = np.asarray(nvfp4_to_int8.reference(layer), np.int32)
  quot = (np.asarray(formats.dequantize_nvfp4(layer.weight), np.float64)
          / np.asarray(layer.w_int8_scale, np.float64))
  at_tie = np.abs(np.abs(quot - np.trunc(quot)) - 0.5) < 1e-5
  assert np.abs(got - want).max() <= 1
  assert not np.any((got != want) & ~at_tie)


def test_ragged_m_not_multiple_of_8(rng):
  a, b, rs, cs, bias = operands(rng, 100, 128, 256)
  got = w8a8.w8a8_matmul(a, b, rs, cs, config=SMALL, out_dtype=jnp.int32, interpret=qlinear_mosaic.interpret_params())
  np.testing.assert_array_equal(np.asarray(got), np.asarray(w8a8.reference(a, b, rs, cs, out_dtype=jnp.int32)))


def _cast_kernel(y, scale, interpret=None):
  """int8_quant_mgpu.quotient_to_int8 alone in a kernel: y f32 [64, 128], scale f32 [64]."""
  import jax.experimental.pallas.mosaic_gpu as plgpu
  from pallas_kernels import int8_quant_mgpu as qm

  def kernel(y_g, s_g, q_g, y_s, s_s, q_s, bar):
    plgpu.copy_gmem_to_smem(y_g, y_s, bar)
    plgpu.barrier_wait(bar)
    plgpu.copy_gmem_to_smem(s_g, s_s, bar)
    plgpu.barrier_wait(bar)
    if interpret is None:
      yv = plgpu.load(y_s, (), layout=plgpu.Layout.WGMMA)
      sv = plgpu.load(s_s, (), layout=plgpu.Layout.WGMMA.reduce(1))
    else:
      yv, sv = y_s[...], s_s[...]
    q_s[...] = qm.quotient_to_int8(yv, sv, interpret is not None)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(q_s, q_g)
    plgpu.wait_smem_to_gmem(0)

  s8_tr = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))
  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((64, 128), jnp.int8),
      scratch_types=[plgpu.SMEM((64, 128), jnp.float32), plgpu.SMEM((64,), jnp.float32),
                     plgpu.SMEM((64, 128), jnp.int8, transforms=s8_tr), plgpu.Barrier()],
      interpret=interpret)(y, scale)


def _cast_inputs(rng, min_exp=-133):
  """Row scales from 2^(min_exp - 7) (subnormal by default) to 2^100, a zero row and a NaN
  row among them, and quotients at, and an ulp off, the ties k + 1/2: the cases a reciprocal
  multiply or div.full gets wrong."""
  f32 = np.float32
  amax = (rng.uniform(1, 2, 64) * 2.0 ** rng.integers(min_exp, 100, 64)).astype(f32)
  scale = (amax / f32(127)).astype(f32)
  scale[3], scale[7] = 1.0, np.nan
  half = (rng.integers(-127, 127, (64, 128)) + 0.5).astype(f32)
  y = (half * scale[:, None]).astype(f32)
  step = (rng.choice([-1, 0, 1], (64, 128)) * np.inf).astype(f32)
  y = np.where(step == 0, y, np.nextafter(y, step)).astype(f32)
  y[:, :8] = (rng.uniform(-1, 1, (64, 8)) * amax[:, None]).astype(f32)
  y[3] = 0.0
  return y, scale


def _cast_want(y, scale):
  with np.errstate(invalid="ignore"):
    q = np.clip(np.round((y / scale[:, None]).astype(np.float32)), -127, 127)
  return np.where(np.isnan(q), 0, q).astype(np.int8)


def test_quotient_to_int8_interpret(rng):
  """The jnp form in interpret mode (normal scales only: XLA:CPU flushes subnormals)."""
  y, scale = _cast_inputs(rng, min_exp=-100)
  got = _cast_kernel(jnp.asarray(y), jnp.asarray(scale), qlinear_mosaic.interpret_params())
  np.testing.assert_array_equal(np.asarray(got), _cast_want(y, scale))


@pytest.mark.gpu
@needs_hopper
def test_gpu_quotient_to_int8_is_correctly_rounded(rng):
  """On the GPU (Markstein quotient from rcp.rn, cvt.rni.sat.s8.f32 in inline PTX): numpy's
  correctly rounded y / s, rounded half to even, clipped, NaN -> 0, at and next to every
  kind of tie; several draws."""
  for _ in range(8):
    y, scale = _cast_inputs(rng)
    got = jax.jit(_cast_kernel)(jnp.asarray(y), jnp.asarray(scale))
    np.testing.assert_array_equal(np.asarray(got), _cast_want(y, scale))


@pytest.mark.gpu
@needs_hopper
def test_gpu_quantizer_matches_cpu_reference(rng):
  """The whole quantizer on the GPU against int8_quant.reference computed on the host CPU (f32
  HIGHEST rotation, correctly rounded division), at a real width and rows of every magnitude
  (incl. an all-zero and a NaN row): values differ only by one step where the rotation's f32
  summation order moves y across a tie (~1e-5 of them at real shapes, benchmarks/kernels.py);
  the scales agree to ~1e-5."""
  from pallas_kernels import int8_quant_mgpu as qm
  x = rng.standard_normal((4096, 3072)) * (2.0 ** rng.integers(-30, 30, (4096, 1)))
  x[5] = 0.0
  x[9, 77] = np.nan
  x = jnp.asarray(x, jnp.bfloat16)
  q, s = jax.jit(lambda x: qm.quantize_rows_mgpu(x, qm.QuantMgpuConfig(128)))(x)
  cpu = jax.devices("cpu")[0]
  q_ref, s_ref = jax.jit(lambda x: int8_quant.reference(x, int8_quant.QuantConfig(128)),
                         device=cpu)(jax.device_put(x, cpu))
  q, q_ref = np.asarray(q, np.int32), np.asarray(q_ref, np.int32)
  s, s_ref = np.asarray(s), np.asarray(s_ref)
  assert not np.any(q[[5, 9]]) and np.isnan(s[9, 0]) and np.isnan(s_ref[9, 0])
  ok = np.isfinite(s_ref[:, 0])
  # amax: the rotation's f32 summation order (tensor cores vs the CPU's HIGHEST dot) moves a
  # sum of 128 terms with cancellation by up to ~1e-5 relative (measured 6e-6 on an H200)
  np.testing.assert_allclose(s[ok], s_ref[ok], rtol=3e-5)
  diff = np.abs(q - q_ref)[ok]
  assert diff.max() <= 1 and diff.mean() <= 3e-5, (diff.max(), diff.mean())


@pytest.mark.parametrize("block", [0, 128])
def test_mgpu_quantizer_non_finite_rows(rng, block):
  """Rows holding NaN or +-Inf get a NaN scale and all-zero values, as formats.quantize_int8
  defines it (the xla path); the other rows are untouched."""
  from pallas_kernels import int8_quant_mgpu as qm
  x = rng.standard_normal((128, 256)) * rng.uniform(0.1, 10, (128, 1))
  bad = rng.choice(128, 6, replace=False)
  for r, val in zip(bad, (np.nan, np.inf, -np.inf, np.nan, np.inf, -np.inf)):
    x[r, rng.integers(256)] = val
  x = jnp.asarray(x, jnp.bfloat16)
  q, s = qm.quantize_rows_mgpu(x, qm.QuantMgpuConfig(block), interpret=qlinear_mosaic.interpret_params())
  q, s = np.asarray(q, np.int32), np.asarray(s)[:, 0]
  ok = np.setdiff1d(np.arange(128), bad)
  assert np.all(np.isnan(s[bad])) and not np.any(q[bad])
  q_ref, s_ref = int8_quant.reference(x, int8_quant.QuantConfig(block))
  q_ref, s_ref = np.asarray(q_ref, np.int32), np.asarray(s_ref)[:, 0]
  np.testing.assert_allclose(s[ok], s_ref[ok], rtol=1e-6)
  assert np.abs(q[ok] - q_ref[ok]).max() <= 1
  # The xla path on the Inf rows (on XLA:CPU its batched row max drops NaN, so a NaN-only row
  # is checked against the contract above, not against it).
  inf_rows = [r for r in bad if np.isinf(np.asarray(x[r], np.float32)).any()]
  assert np.all(np.isnan(s_ref[inf_rows])) and not np.any(q_ref[inf_rows])


QUANT_VARIANTS = {"default": {}, "division": dict(fast_cast=False)}


def _fma32(a, b, c):
  """float32 fma(a, b, c): a * b is exact in float64, one rounding to float32 after the add
  (a second rounding in float64 first, off only at ~2^-29 odds)."""
  return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def _markstein_np(y, d):
  """int8_quant_mgpu.divisor_terms + markstein_quotient in numpy float32."""
  f32 = np.float32
  f = np.where(d < f32(2.0 ** -60), f32(2.0 ** 64),
               np.where(d > f32(2.0 ** 60), f32(2.0 ** -64), f32(1))).astype(f32)
  d2 = (d * f).astype(f32)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    inv = (f32(1) / d2).astype(f32)
    y2 = (y * f).astype(f32)
    q0 = (y2 * inv).astype(f32)
    return _fma32(_fma32(-q0, d2, y2), inv, q0), (y * (f32(1) / d)).astype(f32)


def test_markstein_quotient_is_the_correctly_rounded_division(rng):
  """The quantizers' division y / d in the kernels (int8_quant_mgpu.divisor_terms +
  markstein_quotient): equal to the true float32 division, for divisors from 2^-140
  (subnormal) to 2^120 and quotients at, and an ulp off, the rounding ties k + 1/2 and the
  e2m1 ties (where y * (1 / d) alone goes wrong)."""
  n = 100_000
  f32 = np.float32
  d = (rng.uniform(1, 2, n) * 2.0 ** rng.integers(-140, 120, n)).astype(f32)
  d = np.where(d > 0, d, f32(2.0 ** -140))  # subnormal draws that flushed to zero
  ties = np.concatenate([rng.integers(-127, 127, n // 2) + 0.5,
                         rng.choice([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], n - n // 2)])
  at_tie = (ties.astype(f32) * d).astype(f32)
  off_tie = np.nextafter(at_tie, (rng.choice([-1, 1], n) * np.inf).astype(f32))
  assert off_tie.dtype == f32 and np.all(off_tie != at_tie)
  random = (rng.uniform(-127, 127, n) * d.astype(np.float64)).astype(f32)
  naive_wrong = 0
  for y in (random, at_tie, off_tie):
    q, naive = _markstein_np(y, d)
    want = (y / d).astype(f32)
    np.testing.assert_array_equal(q.view(np.int32), want.view(np.int32))
    naive_wrong += int(np.sum(naive != want))
  assert naive_wrong > 0  # the test inputs do reach the cases the correction is for


@pytest.mark.parametrize("variant", sorted(QUANT_VARIANTS))
@pytest.mark.parametrize("block", [0, 128])
def test_mgpu_quantizer_lowers_for_hopper(block, variant):
  """The quantizer (with the non-finite flag) passes Mosaic GPU's lowering for CUDA, exported
  from the CPU: layouts and ops that interpret mode does not check."""
  from pallas_kernels import int8_quant_mgpu as qm
  cfg = qm.QuantMgpuConfig(block, **QUANT_VARIANTS[variant])
  f = jax.jit(lambda x: qm.quantize_rows_mgpu(x, cfg))
  x = jax.ShapeDtypeStruct((192, 384), jnp.bfloat16)
  assert "mosaic_gpu" in jax.export.export(f, platforms=["cuda"])(x).mlir_module()


@pytest.mark.parametrize("block", [0, 128])
def test_mgpu_quantizer_matches_reference(rng, block):
  from pallas_kernels import int8_quant_mgpu as qm
  x = jnp.asarray(rng.standard_normal((96, 256)) * rng.uniform(0.1, 10, (96, 1)), jnp.bfloat16)
  q, s = qm.quantize_rows_mgpu(x, qm.QuantMgpuConfig(block), interpret=qlinear_mosaic.interpret_params())
  q_ref, s_ref = int8_quant.reference(x, int8_quant.QuantConfig(block))
  assert q.shape == x.shape and s.shape == (96, 1)
  np.testing.assert_allclose(np.asarray(s), np.asarray(s_ref), rtol=1e-6)
  diff = np.abs(np.asarray(q, np.int32) - np.asarray(q_ref, np.int32))
  assert diff.max() <= 1 and diff.mean() < 1e-3, (diff.max(), diff.mean())


def test_mgpu_quantizer_cast_variants_agree_on_cpu(rng):
  """In interpret mode (where the jnp division is correctly rounded too) the default cast and
  the division variant give the same values and scales bit for bit."""
  from pallas_kernels import int8_quant_mgpu as qm
  x = jnp.asarray(rng.standard_normal((136, 384)) * rng.uniform(0.1, 10, (136, 1)), jnp.bfloat16)
  ip = qlinear_mosaic.interpret_params()
  q0, s0 = qm.quantize_rows_mgpu(x, qm.QuantMgpuConfig(128), interpret=ip)
  q1, s1 = qm.quantize_rows_mgpu(x, qm.QuantMgpuConfig(128, fast_cast=False), interpret=ip)
  np.testing.assert_array_equal(np.asarray(q1), np.asarray(q0))
  np.testing.assert_array_equal(np.asarray(s1), np.asarray(s0))


# 4 warpgroups hung Mosaic GPU's interpreter at random until session 15 (1 of 8 local tries at
# 136 x 1024, and two CI runs): the CPU client's thread pool had fewer threads than interpreted
# warpgroups, which conftest.py's PJRT_NPROC now prevents.
@pytest.mark.parametrize("m,k,wgs", [(72, 640, 2), (64, 1024, 2), (200, 1152, 2), (136, 1024, 4)])
def test_mgpu_quantizer_warpgroups_split_the_row(rng, m, k, wgs):
  """Warpgroups sharing a row block (each its own column tiles, maxima exchanged in shared
  memory, pass 2 last tile first) give the one-warpgroup kernel's values and scales bit for
  bit, incl. an uneven split (5 tiles over 2), a NaN row and a partial last row block."""
  from pallas_kernels import int8_quant_mgpu as qm
  x = rng.standard_normal((m, k)) * rng.uniform(0.1, 10, (m, 1))
  x[3, rng.integers(k)] = np.nan
  x = jnp.asarray(x, jnp.bfloat16)
  ip = qlinear_mosaic.interpret_params()
  q1, s1 = qm.quantize_rows_mgpu(x, qm.QuantMgpuConfig(128, warpgroups=1), interpret=ip)
  qw, sw = qm.quantize_rows_mgpu(x, qm.QuantMgpuConfig(128, warpgroups=wgs), interpret=ip)
  np.testing.assert_array_equal(np.asarray(qw), np.asarray(q1))
  np.testing.assert_array_equal(np.asarray(sw), np.asarray(s1))
  assert np.isnan(np.asarray(s1)[3, 0]) and not np.any(np.asarray(q1)[3])
  q_ref, s_ref = int8_quant.reference(x, int8_quant.QuantConfig(128))
  np.testing.assert_allclose(np.asarray(sw), np.asarray(s_ref), rtol=1e-6)
  assert np.abs(np.asarray(qw, np.int32) - np.asarray(q_ref, np.int32)).max() <= 1


def test_mgpu_quantizer_warpgroups_validation():
  from pallas_kernels import int8_quant_mgpu as qm
  x = jnp.ones((64, 256), jnp.bfloat16)
  for bad in (3, 4):  # 3 is not offered; 4 exceeds the 2 column tiles
    with pytest.raises(ValueError, match="warpgroups"):
      qm.quantize_rows_mgpu(x, qm.QuantMgpuConfig(128, warpgroups=bad))


@pytest.mark.parametrize("k", [1920, 3072])
def test_mgpu_quantizer_warpgroups_lower_for_hopper(k):
  from pallas_kernels import int8_quant_mgpu as qm
  f = jax.jit(lambda x: qm.quantize_rows_mgpu(x, qm.QuantMgpuConfig(128, warpgroups=4)))
  x = jax.ShapeDtypeStruct((4104, k), jnp.bfloat16)
  assert "mosaic_gpu" in jax.export.export(f, platforms=["cuda"])(x).mlir_module()


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("k", [1920, 3072, 7680])
def test_gpu_quantizer_warpgroups_bit_equal(rng, k):
  """On the GPU, 2 and 4 warpgroups per row block equal the one-warpgroup kernel bit for bit
  (a partial last row block, a NaN row and rows of every magnitude)."""
  from pallas_kernels import int8_quant_mgpu as qm
  x = rng.standard_normal((4104, k)) * (2.0 ** rng.integers(-30, 30, (4104, 1)))
  x[9, 77] = np.nan
  x = jnp.asarray(x, jnp.bfloat16)
  run = lambda w: [np.asarray(a) for a in jax.jit(
      lambda x: qm.quantize_rows_mgpu(x, qm.QuantMgpuConfig(128, warpgroups=w)))(x)]
  q1, s1 = run(1)
  for w in (2, 4):
    qw, sw = run(w)
    np.testing.assert_array_equal(qw, q1)
    np.testing.assert_array_equal(sw, s1)
