"""Attention: API, the int8 xla reference of the quantized algorithm, and the Mosaic GPU kernel
(through Mosaic GPU's interpret mode on CPU; natively in the gpu-marked tests)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpqjax import attention as A
from mpqjax import formats, testing
from pallas_kernels import attention_mosaic as am

ON_HOPPER = A.mosaic_unavailable_reason(jnp.zeros((1, 1, 1, 64))) is None


def _inputs(seed, shape, magnitude=4.0, n_outliers=4, dtype=jnp.bfloat16):
  return testing.attention_outlier_inputs(jax.random.key(seed), shape, n_outliers, magnitude,
                                          dtype)


_ref64 = testing.attention_reference_f64


def _metrics(out, ref):
  cos, rel_l1 = testing.cosine_and_rel_l1(jnp.asarray(out, jnp.float32), ref)
  assert np.isfinite(cos), "non-finite attention output"
  return cos, rel_l1


# ---------------------------------------------------------------------------------------- API


def test_bad_arguments_are_named():
  q = jnp.ones((1, 8, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="expected q"):
    A.attention(q, q[:, :, :1], q)
  with pytest.raises(ValueError, match="precision"):
    A.attention(q, q, q, precision="fp4")
  with pytest.raises(ValueError, match="implementation"):
    A.attention(q, q, q, implementation="triton")
  with pytest.raises(ValueError, match="int8_pv"):
    A.attention(q, q, q, precision="int8", int8_pv="fp4")
  with pytest.raises(ValueError, match="cudnn"):
    A.attention(q, q, q, precision="int8", implementation="cudnn")
  if not ON_HOPPER:
    with pytest.raises(ValueError, match="mosaic.*unavailable"):
      A.attention(q, q, q, implementation="mosaic")


@pytest.mark.parametrize("t,s", [(37, 37), (50, 130)])
def test_xla_bf16_matches_float64(t, s):
  q, _, _ = _inputs(1, (2, t, 3, 64))
  _, k, v = _inputs(2, (2, s, 3, 64))
  cos, rel_l1 = _metrics(A.attention(q, k, v, implementation="xla"), _ref64(q, k, v))
  assert cos > 0.99999 and rel_l1 < 0.005


# The bars on DiT-like outlier inputs (the benchmark's accuracy settings, fresh seeds).
BAR_COS, BAR_REL_L1 = 0.999, 0.03


ACCURACY_SETTINGS = [(64, 1000, 4.0), (64, 333, 8.0), (128, 1000, 4.0), (128, 333, 8.0)]
# FP8 P and V: e4m3 rounding of P and V alone costs ~0.027 rel. L1 on N(0, 1) V (ablation in
# pallas_kernels/NOTES.md), so the int8 path with fp8 PV lands at 0.027-0.035 rel. L1 here:
# what it reliably meets is the cosine bar and this bound; two-term fp8 V ("fp8x2") and bf16
# PV meet both bars.
FP8_PV_REL_L1 = 0.04
PV_REL_L1 = {"fp8": FP8_PV_REL_L1, "fp8x2": BAR_REL_L1, "bf16": BAR_REL_L1}


@pytest.mark.parametrize("pv", A.INT8_PVS)
@pytest.mark.parametrize("d,t,magnitude", ACCURACY_SETTINGS)
def test_xla_int8_accuracy_on_outlier_inputs(d, t, magnitude, pv):
  q, k, v = _inputs(20 + d + t, (1, t, 2, d), magnitude=magnitude)
  ref = _ref64(q, k, v)
  cos, rel_l1 = _metrics(A.attention(q, k, v, precision="int8", implementation="xla",
                                     int8_pv=pv), ref)
  # ... and it is really quantized: measurably worse than bf16.
  _, rel_bf16 = _metrics(A.attention(q, k, v, implementation="xla"), ref)
  assert rel_l1 > 2 * rel_bf16
  assert cos >= BAR_COS and rel_l1 <= PV_REL_L1[pv], (
      cos, rel_l1)


def test_quantize_operands():
  q, k, v = _inputs(4, (2, 150, 3, 64), magnitude=8.0)
  ops = A.quantize_operands(q, k, v)
  assert ops.q8.shape == (2, 256, 3, 64) and ops.q8.dtype == jnp.int8
  assert ops.k8.shape == (2, 256, 3, 64) and ops.k_scale.shape == (2, 3, 256 // A.BLOCK_KV)
  assert ops.q_scale.shape == (2, 3, 256 // A.BLOCK_Q) and ops.v_scale.shape == (2, 3, 64)
  assert ops.v8.dtype == jnp.float8_e4m3fn
  # Padding stays zero.
  assert not np.any(np.asarray(ops.q8[:, 150:])) and not np.any(np.asarray(ops.k8[:, 150:]))
  # Dequantized K is the mean-smoothed K rotated by the +-1 Hadamard matrix H (so its token
  # mean is ~0 even in outlier channels), and Q H * q_scale carries 1/D (H H^T = D I),
  # 1/sqrt(D) and log2(e): q_scale * k_scale * q8 . k8 = log2(e) q . k / sqrt(D).
  h = np.sign(np.asarray(formats.hadamard_matrix(64), np.float64))
  kd = (np.asarray(ops.k8, np.float64)
        * np.repeat(np.asarray(ops.k_scale), A.BLOCK_KV, axis=2).transpose(0, 2, 1)[..., None])
  kf = np.asarray(k, np.float64)
  ks = (kf - kf.mean(axis=1, keepdims=True)) @ h
  np.testing.assert_allclose(kd[:, :150], ks, atol=np.abs(ks).max() / 127)
  assert np.abs(kd[:, :150].mean(axis=1)).max() < 0.05 * np.abs(kf.mean(axis=1)).max()
  qd = (np.asarray(ops.q8, np.float64)
        * np.repeat(np.asarray(ops.q_scale), A.BLOCK_Q, axis=2).transpose(0, 2, 1)[..., None])
  qf = np.asarray(q, np.float64) @ h * (64 ** -1.5 * np.log2(np.e))
  np.testing.assert_allclose(qd[:, :150], qf, atol=np.abs(qf).max() / 127)
  # The rotation spreads the outlier channels: the INT8 step shrinks against Q's size.
  qx = np.asarray(q, np.float64)
  assert np.abs(qf).max() / np.abs(qf).std() < 0.7 * np.abs(qx).max() / np.abs(qx).std()
  vd = np.asarray(ops.v8[:, :150], np.float64) * np.asarray(ops.v_scale)[:, None]
  # e4m3: 3 mantissa bits (relative 2^-4), subnormal spacing 2^-9 in units of v_scale.
  np.testing.assert_allclose(vd, np.asarray(v, np.float64), rtol=2.0 ** -4,
                             atol=float(np.max(ops.v_scale)) * 2.0 ** -10)


@pytest.mark.parametrize("d", [128, 96, 3])
def test_rotate_is_the_block_hadamard_product(d):
  """_rotate is x times blockdiag(+-1 Sylvester H) of rotation_block(D), up to f32 rounding
  of the partial sums."""
  x = jnp.asarray(np.random.default_rng(d).standard_normal((2, 7, 3, d)), jnp.bfloat16)
  b = A.rotation_block(d)
  h = np.sign(np.asarray(formats.hadamard_matrix(b), np.float64)) if b > 1 else np.ones((1, 1))
  want = (np.asarray(x, np.float64).reshape(2, 7, 3, d // b, b) @ h).reshape(x.shape)
  np.testing.assert_allclose(np.asarray(A._rotate(x), np.float64), want,
                             rtol=0, atol=2.0 ** -21 * np.abs(want).max())


def test_attention_switch_picks_the_branch():
  q, k, v = _inputs(5, (1, 40, 2, 64))
  f = jax.jit(functools.partial(A.attention_switch, implementation="xla"))
  for i, prec in enumerate(A.PRECISIONS):
    want = A.attention(q, k, v, precision=prec, implementation="xla")
    np.testing.assert_array_equal(np.asarray(f(q, k, v, jnp.int32(i)), np.float32),
                                  np.asarray(want, np.float32))
  assert not np.array_equal(np.asarray(f(q, k, v, 0), np.float32),
                            np.asarray(f(q, k, v, 1), np.float32))


def test_permute_kv_tokens_keeps_the_product():
  rng = np.random.default_rng(6)
  p = rng.standard_normal((5, 64)).astype(np.float32)
  vt = rng.standard_normal((7, 64)).astype(np.float32)
  pp = np.asarray(am.permute_kv_tokens(jnp.asarray(p), axis=1))
  vp = np.asarray(am.permute_kv_tokens(jnp.asarray(vt), axis=-1))
  assert sorted(pp[0]) == sorted(p[0]) and not np.array_equal(pp, p)
  np.testing.assert_allclose(pp @ vp.T, p @ vt.T, rtol=1e-5, atol=1e-5)


def test_kernel_config_validation():
  with pytest.raises(ValueError, match="block_kv"):
    am.AttentionConfig(precision="int8", block_kv=64)
  with pytest.raises(ValueError, match="precision"):
    am.AttentionConfig(precision="fp8")
  with pytest.raises(ValueError, match="pv_dtype"):
    am.AttentionConfig(precision="int8", pv_dtype="float16")


# ------------------------------------------------------------- kernel, Mosaic GPU interpret mode


@pytest.mark.parametrize("precision,d,convert,block_kv,pv", [
    ("bf16", 64, "magic", 128, None), ("int8", 64, "magic", 128, "fp8"),
    ("int8", 64, "cvt", 128, "fp8"), ("bf16", 128, "magic", 128, None),
    ("int8", 128, "magic", 128, "fp8"), ("int8", 64, "magic", 256, "fp8"),
    ("bf16", 64, "magic", 256, None), ("int8", 64, "magic", 256, "bf16"),
    ("int8", 128, "magic", 128, "bf16"), ("int8", 64, "magic", 256, "fp8x2"),
    ("int8", 128, "magic", 128, "fp8x2")])
def test_kernel_interpret_matches_reference(precision, d, convert, block_kv, pv):
  """The kernel body (barriers, TMA ring, online softmax, tail mask, int8 scales) run by the
  interpreter on CPU against its jnp reference, at a length that needs padding and masking."""
  t, kv_len = (256, 200) if block_kv == 128 else (512, 400)  # a full block and a masked tail
  cfg = am.AttentionConfig(precision=precision, interpret=True, int8_convert=convert,
                           block_kv=block_kv,
                           pv_dtype="bfloat16" if pv == "bf16" else "float8_e4m3fn",
                           v_terms=2 if pv == "fp8x2" else 1)
  ks = jax.random.split(jax.random.key(7 + d), 5)
  if precision == "bf16":
    ops = [jax.random.normal(kk, (1, t, 1, d)).astype(jnp.bfloat16) for kk in ks[:3]]
    tol = 0.01
  else:
    q, k, v = _inputs(8 + d, (1, kv_len, 1, d))
    qo = A.quantize_operands(q, k, v, block_kv=block_kv, pv=pv)
    vt8 = am.prepare_vt(qo.v8, cfg.v_terms)
    ops = [qo.q8, qo.k8, vt8, qo.q_scale, qo.k_scale]
    # Same rounded P against the same running max: only f32 rounding order differs ("magic"
    # turns a few P values into the neighbouring e4m3 value; "cvt" is bit-equal on CPU).
    tol = 0.003
  # int8: V's scales and a crop of the padded query rows go into the epilogue, as the API runs it
  extra = {} if precision == "bf16" else {"v_scale": qo.v_scale, "q_len": kv_len - 3}
  out = am.flash_attention(*ops, kv_len=kv_len, config=cfg, **extra)
  ref = am.reference(*ops, kv_len=kv_len, config=cfg, **extra)
  assert out.shape == ref.shape == (1, extra.get("q_len", t), 1, d)
  o, r = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert np.all(np.isfinite(o))
  assert np.linalg.norm(o - r) / np.linalg.norm(r) < tol


@pytest.mark.parametrize("pv", A.INT8_PVS)
def test_int8_mosaic_interpret_matches_xla(pv):
  """The whole int8 pipeline (quantize, transpose + permute V, kernel, V scale) vs the xla path,
  which emulates the kernel's numerics (see mpqjax.attention's docstring)."""
  q, k, v = _inputs(9, (1, 190, 1, 64), magnitude=6.0)
  out = A._int8_mosaic(q, k, v, interpret=True, pv=pv)
  xla = A.attention(q, k, v, precision="int8", implementation="xla", int8_pv=pv)
  cos, rel_l1 = _metrics(out, np.asarray(jnp.asarray(xla, jnp.float32), np.float64))
  assert cos > 0.99999 and rel_l1 < 0.003
  cos, rel_l1 = _metrics(out, _ref64(q, k, v))
  assert cos >= BAR_COS and rel_l1 <= BAR_REL_L1


def test_int8_mosaic_interpret_pingpong_same_output():
  """The int8 default runs the warpgroups free (no ping-pong); the ping-pong schedule gives
  the same values."""
  q, k, v = _inputs(10, (1, 190, 1, 64), magnitude=6.0)
  assert not A.kernel_config("int8", 64).pingpong and A.kernel_config("bf16", 64).pingpong
  on = A._int8_mosaic(q, k, v, interpret=True, pingpong=True)
  off = A._int8_mosaic(q, k, v, interpret=True)
  assert np.all(np.isfinite(np.asarray(off, np.float32)))
  np.testing.assert_array_equal(np.asarray(on, np.float32), np.asarray(off, np.float32))


@pytest.mark.parametrize("pv,t", [("fp8", 1100), ("fp8x2", 700)])
def test_int8_kernel_interpret_many_kv_steps(pv, t):
  """More KV steps than the K/V ring holds (5 and 3 steps of 256 keys, a 2-deep ring), so the
  ring wraps and its barriers change phase: the kernel against its jnp reference."""
  cfg = A.kernel_config("int8", 64, pv=pv, interpret=True)
  q, k, v = _inputs(12, (1, t, 1, 64), magnitude=6.0)
  qo = A.quantize_operands(q, k, v, block_kv=cfg.block_kv, pv=pv)
  ops = [qo.q8, qo.k8, am.prepare_vt(qo.v8, cfg.v_terms), qo.q_scale, qo.k_scale]
  assert cfg.block_kv == 256 and qo.k8.shape[1] // cfg.block_kv > cfg.max_concurrent_steps
  out = np.asarray(am.flash_attention(*ops, kv_len=t, config=cfg, v_scale=qo.v_scale, q_len=t),
                   np.float32)
  ref = np.asarray(am.reference(*ops, kv_len=t, config=cfg, v_scale=qo.v_scale, q_len=t),
                   np.float32)
  assert np.all(np.isfinite(out))
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.003


@pytest.mark.parametrize("d,block_rows,centered", [(64, 64, False), (64, 256, True),
                                                   (128, 64, False), (128, 256, True)])
def test_prepass_kernel_interpret_matches_xla(d, block_rows, centered):
  """The Mosaic Q/K pre-pass (one read) against its XLA reference: ragged T (padding rows must
  stay 0 even after centering), several heads, per-channel offsets."""
  from pallas_kernels import attention_quant_mgpu as aq
  from pallas_kernels import qlinear_mosaic
  rng = np.random.default_rng(d + block_rows)
  b, t, h = 2, 300, 3
  x = jnp.asarray(rng.standard_normal((b, t, h, d)) * rng.uniform(0.1, 5, (1, 1, h, d))
                  + rng.standard_normal((1, 1, h, d)), jnp.bfloat16)
  center = A._rotate(jnp.mean(x.astype(jnp.float32), axis=1)) if centered else None
  t_pad = -(-t // block_rows) * block_rows
  q8, scale = aq.quantize_blocks_mgpu(x, center, block_rows=block_rows, t_pad=t_pad,
                                      interpret=qlinear_mosaic.interpret_params())
  q_ref, s_ref = A.quantize_blocks_xla(x, center, block_rows=block_rows, t_pad=t_pad)
  assert q8.shape == q_ref.shape == (b, t_pad, h, d) and scale.shape == s_ref.shape
  np.testing.assert_allclose(np.asarray(scale), np.asarray(s_ref), rtol=1e-6)
  diff = np.abs(np.asarray(q8, np.int32) - np.asarray(q_ref, np.int32))
  assert diff.max() <= 1 and diff.mean() < 1e-3, (diff.max(), diff.mean())
  assert not np.any(np.asarray(q8[:, t:]))
  assert np.abs(np.asarray(q8[:, :t], np.int32)).max() == 127  # each block reaches full scale


@pytest.mark.parametrize("d,pv", [(64, "fp8"), (128, "fp8"), (64, "fp8x2")])
def test_vt_kernel_interpret_matches_prepare_vt(d, pv):
  """The Mosaic V^T kernel (scale, e4m3, transpose, token permutation, ones row; the second
  e4m3 term for "fp8x2") against prepare_vt of the XLA-quantized V, bit for bit: every step is
  exact or the same rounding."""
  from pallas_kernels import attention_vt_mgpu as av
  from pallas_kernels import qlinear_mosaic
  rng = np.random.default_rng(d)
  b, s, h = 2, 300, 3
  v = jnp.asarray(rng.standard_normal((b, s, h, d)) * rng.uniform(0.1, 5, (1, 1, h, d)),
                  jnp.bfloat16)
  q = jnp.ones((b, 64, h, d), jnp.bfloat16)
  ops = A.quantize_operands(q, v, v, pv=pv)
  terms = 2 if pv == "fp8x2" else 1
  got = av.transposed_fp8_v_mgpu(v, 1.0 / ops.v_scale, s_pad=ops.k8.shape[1], terms=terms,
                                 interpret=qlinear_mosaic.interpret_params())
  want = am.prepare_vt(ops.v8, terms)
  assert got.shape == want.shape == (b, h, terms * (d + am.V_EXTRA_ROWS), 512)
  if terms == 2:  # the second term is the first's rounding error: nonzero, and small
    lo = np.abs(np.asarray(got[:, :, d + 8:2 * d + 8].astype(jnp.float32)))
    hi = np.abs(np.asarray(got[:, :, :d].astype(jnp.float32)))
    assert lo.max() > 0 and lo.max() <= hi.max() / 16
  np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)),
                                np.asarray(want.astype(jnp.float32)))


def test_prepass_rejects_bad_input():
  from pallas_kernels import attention_quant_mgpu as aq
  x = jnp.ones((1, 64, 2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match="bf16"):
    aq.quantize_blocks_mgpu(x.astype(jnp.float32), None, block_rows=64, t_pad=64)
  with pytest.raises(ValueError, match="t_pad"):
    aq.quantize_blocks_mgpu(x, None, block_rows=64, t_pad=96)
  with pytest.raises(ValueError, match="center"):
    aq.quantize_blocks_mgpu(x, jnp.ones((1, 2, 32)), block_rows=64, t_pad=64)
  from pallas_kernels import attention_vt_mgpu as av
  with pytest.raises(ValueError, match="s_pad"):
    av.transposed_fp8_v_mgpu(x, jnp.ones((1, 2, 64)), s_pad=128)
  with pytest.raises(ValueError, match="inv_scale"):
    av.transposed_fp8_v_mgpu(x, jnp.ones((1, 64)), s_pad=256)
  q, k, v = _inputs(3, (1, 64, 2, 64))
  with pytest.raises(ValueError, match="prepass"):
    A.quantize_operands(q, k, v, prepass="cuda")


def test_int8_mosaic_with_xla_prepass_interpret_matches_xla():
  """The whole int8 pipeline with the XLA pre-pass (the default is the Mosaic one) against
  the xla path."""
  q, k, v = _inputs(9, (1, 190, 1, 64), magnitude=6.0)
  out = A._int8_mosaic(q, k, v, interpret=True, prepass="xla")
  xla = A.attention(q, k, v, precision="int8", implementation="xla")
  cos, rel_l1 = _metrics(out, np.asarray(jnp.asarray(xla, jnp.float32), np.float64))
  assert cos > 0.99999 and rel_l1 < 0.003


@pytest.mark.parametrize("d,h,t", [(64, 30, 1000), (128, 12, 1000), (64, 2, 1001)])
def test_prepass_kernel_lowers_for_hopper(d, h, t):
  """The Q (64-row blocks), K (256-row blocks, centered) and V^T pre-pass kernels at the real
  head counts pass Mosaic GPU's lowering for CUDA (shared-memory budget included), also at a
  length that is not a multiple of 8 (TMA tiling)."""
  from pallas_kernels import attention_quant_mgpu as aq
  from pallas_kernels import attention_vt_mgpu as av
  x = jax.ShapeDtypeStruct((2, t, h, d), jnp.bfloat16)
  c = jax.ShapeDtypeStruct((2, h, d), jnp.float32)
  fq = jax.jit(lambda x: aq.quantize_blocks_mgpu(x, None, block_rows=64, t_pad=1024))
  fk = jax.jit(lambda x, c: aq.quantize_blocks_mgpu(x, c, block_rows=256, t_pad=1024))
  fv = jax.jit(lambda x, c: av.transposed_fp8_v_mgpu(x, c, s_pad=1024))
  assert "mosaic_gpu" in jax.export.export(fq, platforms=["cuda"])(x).mlir_module()
  assert "mosaic_gpu" in jax.export.export(fk, platforms=["cuda"])(x, c).mlir_module()
  assert "mosaic_gpu" in jax.export.export(fv, platforms=["cuda"])(x, c).mlir_module()


def test_bf16_mosaic_interpret_matches_float64():
  q, k, v = _inputs(10, (1, 130, 2, 64))
  cos, rel_l1 = _metrics(A._bf16_mosaic(q, k, v, interpret=True), _ref64(q, k, v))
  assert cos > 0.99999 and rel_l1 < 0.005


@pytest.mark.parametrize("precision,d,pv", [
    ("bf16", 64, None), ("bf16", 128, None), ("int8", 64, "fp8"), ("int8", 128, "fp8"),
    ("int8", 64, "bf16"), ("int8", 128, "bf16"), ("int8", 64, "fp8x2"), ("int8", 128, "fp8x2")])
def test_kernel_lowers_for_hopper(precision, d, pv):
  """The configs attention() runs pass Mosaic GPU's lowering for CUDA (layouts, wgmma operand
  rules, shared-memory budget), exported from the CPU: what interpret mode cannot check."""
  cfg = A.kernel_config(precision, d, **({"pv": pv} if pv else {}))
  assert "mosaic_gpu" in _export_for_cuda(cfg, d)
  if precision == "int8" and pv == "bf16" and d == 128:  # why kernel_config picks block_kv 128
    with pytest.raises(ValueError, match="shared memory"):
      _export_for_cuda(dataclasses.replace(cfg, block_kv=256), d)


def _export_for_cuda(cfg, d, h=2):
  """Lowers the kernel for CUDA at a length of 3 KV blocks (a full K/V ring); -> MLIR text."""
  t = 3 * cfg.block_kv
  if cfg.precision == "int8":
    args = (jax.ShapeDtypeStruct((1, t, h, d), jnp.int8),) * 2 + (
        jax.ShapeDtypeStruct((1, h, cfg.v_terms * (d + am.V_EXTRA_ROWS), t),
                             jnp.dtype(cfg.pv_dtype)),
        jax.ShapeDtypeStruct((1, h, t // cfg.block_q), jnp.float32),
        jax.ShapeDtypeStruct((1, h, t // cfg.block_kv), jnp.float32))
    # as the API calls it: V's scales and the crop to the real query rows in the epilogue
    f = jax.jit(lambda *ops: am.flash_attention(*ops[:-1], kv_len=t - 50, config=cfg,
                                                v_scale=ops[-1], q_len=t - 50))
    args += (jax.ShapeDtypeStruct((1, h, d), jnp.float32),)
  else:
    args = (jax.ShapeDtypeStruct((1, t, h, d), jnp.bfloat16),) * 3
    f = jax.jit(lambda *ops: am.flash_attention(*ops, kv_len=t - 50, config=cfg))
  return jax.export.export(f, platforms=["cuda"])(*args).mlir_module()


# --------------------------------------------------------------------------------- GPU only

gpu = pytest.mark.skipif(not ON_HOPPER, reason="needs a Hopper GPU for the Mosaic GPU kernel")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("precision,pv", [("bf16", None), ("int8", "fp8"), ("int8", "fp8x2"),
                                          ("int8", "bf16")])
@pytest.mark.parametrize("d,t", [(64, 1000), (128, 333)])
def test_mosaic_gpu_matches_xla(precision, pv, d, t):
  q, k, v = _inputs(11 + d, (2, t, 3, d))
  out = A.attention(q, k, v, precision=precision, implementation="mosaic", int8_pv=pv)
  xla = A.attention(q, k, v, precision=precision, implementation="xla", int8_pv=pv)
  cos, rel_l1 = _metrics(out, np.asarray(jnp.asarray(xla, jnp.float32), np.float64))
  # int8: the xla path emulates the kernel's numerics up to f32 rounding order, ex2.approx and
  # the tensor cores' FP8 accumulation.
  assert cos > (0.9999 if precision == "int8" else 0.9995) and rel_l1 < 0.01


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("d,h", [(64, 30), (128, 12)])
def test_mosaic_gpu_prepass_matches_xla(d, h):
  """The Mosaic pre-pass kernels on the GPU against the XLA pre-pass on the GPU (V^T bit for
  bit), and the int8 attention built on them against the xla path."""
  q, k, v = _inputs(30 + d, (2, 2000, h, d))
  ops = A.quantize_operands(q, k, v, prepass="mosaic")
  ref = A.quantize_operands(q, k, v, prepass="xla")
  for got, want in ((ops.q8, ref.q8), (ops.k8, ref.k8)):
    diff = np.abs(np.asarray(got, np.int32) - np.asarray(want, np.int32))
    assert diff.max() <= 1 and diff.mean() < 1e-3, (diff.max(), diff.mean())
  np.testing.assert_allclose(np.asarray(ops.q_scale), np.asarray(ref.q_scale), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ops.k_scale), np.asarray(ref.k_scale), rtol=1e-5)
  from pallas_kernels import attention_vt_mgpu as av
  vt8 = av.transposed_fp8_v_mgpu(v, 1.0 / ref.v_scale, s_pad=ref.k8.shape[1])
  np.testing.assert_array_equal(np.asarray(vt8.astype(jnp.float32)),
                                np.asarray(am.prepare_vt(ref.v8).astype(jnp.float32)))
  out = A._int8_mosaic(q, k, v, prepass="mosaic")
  xla = A.attention(q, k, v, precision="int8", implementation="xla")
  cos, rel_l1 = _metrics(out, np.asarray(jnp.asarray(xla, jnp.float32), np.float64))
  assert cos > 0.9999 and rel_l1 < 0.01


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_mosaic_gpu_pingpong_does_not_change_the_output(precision):
  """The warpgroup schedule (ping-pong or free) only reorders whole wgmmas: same bits."""
  q, k, v = _inputs(41, (2, 1500, 3, 64))
  fn = A._int8_mosaic if precision == "int8" else A._bf16_mosaic
  on, off = fn(q, k, v, pingpong=True), fn(q, k, v, pingpong=False)
  assert np.all(np.isfinite(np.asarray(on, np.float32)))
  np.testing.assert_array_equal(np.asarray(on, np.float32), np.asarray(off, np.float32))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("pv", A.INT8_PVS)
@pytest.mark.parametrize("d,t,magnitude", ACCURACY_SETTINGS)
def test_mosaic_gpu_int8_accuracy_on_outlier_inputs(d, t, magnitude, pv):
  q, k, v = _inputs(20 + d + t, (1, t, 2, d), magnitude=magnitude)
  cos, rel_l1 = _metrics(A.attention(q, k, v, precision="int8", implementation="mosaic",
                                     int8_pv=pv), _ref64(q, k, v))
  assert cos >= BAR_COS and rel_l1 <= PV_REL_L1[pv], (
      cos, rel_l1)


def test_package_exports_a_callable_attention():
  import mpqjax
  q, k, v = _inputs(12, (1, 20, 2, 64))
  got = mpqjax.attention(q, k, v, precision="int8", implementation="xla")
  want = mpqjax.attention.attention(q, k, v, precision="int8", implementation="xla")
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  assert "attention" in mpqjax.__all__
