"""Benchmark (and check) the Mosaic GPU qlinear kernels against XLA, side by side in one run.

  PYTHONPATH=. python3 benchmarks/kernels.py [--quick] [--tune] [--max-m M] [--min-m M] [--out DIR]

For each shape (M, K, N) it times, with CUPTI (sum of device kernel time per call, over
input sets rotated so that the weights do not sit in L2):
  xla_bf16          XLA bf16 dot (the baseline of every ratio)
  xla_s8_scaled     XLA s8 dot (cuBLASLt) + a separate f32 scale/bias pass, operands given
  xla_nvfp4_sm      jax.nn.scaled_matmul with NVFP4 operands
  quant_{xla,mgpu}[_had]  the INT8 activation quantizer alone (XLA fusion / Mosaic kernel)
  mosaic_w8a8[cfg]  the W8A8 kernel alone (int8 operands given), per tile config
  mosaic_w8a8_e2e   Mosaic quantizer (no Hadamard) + kernel;  ..._had with the Hadamard
                    (= W4A8 with a cached INT8 weight copy)
  xla_w8a8_e2e_had  the same in XLA (reference quantizer + s8 dot + scaling)
  mosaic_w4a8       MOSAIC.w4a8: quantizer (Hadamard) + NVFP4->INT8 conversion + kernel
  mosaic_w4a8_fastconv  the same with the gather-free conversion (nvfp4_to_int8)
  mosaic_w4a8_regdec  MOSAIC.w4a8's small-M path at any M: the XLA quantizer (K order of the
                    kernel folded into the rotation) + the NVFP4 weight decoded onto its INT8
                    grid in registers (nvfp4_matmul.w4a8_matmul); w4a8_regdec_kernel[cfg] that
                    kernel alone, quant_xla_had[perm] that quantizer alone; [butterfly]: the
                    same (and mosaic_w8a8_e2e_had) with the XLA quantizer's rotation as a
                    butterfly fused into its absmax and cast (int8_quant.QuantConfig.rotation)
  conv_ref / conv_fast  the NVFP4 -> INT8 weight conversion alone
  nvfp4_kernel[cfg] the NVFP4 (W4A16) kernel alone, weight operands prepared (issue 7)
  nvfp4_weight_operands / rotate_bf16 / quant_nvfp4_qdq[_had][_xla]  per-call pre-passes
                    (the QDQ activation quantizer: Mosaic kernels, or _xla the XLA fusion)
  nvfp4_to_bf16 / bf16_kernel  the large-M weight path: exact bf16 decode of the weight, and
                    the bf16 form of the W8A8 kernel on it (scale and bias in its epilogue)
  mosaic_w4a16 / mosaic_w4a4   MOSAIC.w4a16 / w4a4 end to end (rotation / QDQ quantizer; W4A16
                    with the rotation folded into the weight where qlinear_xla's rule says)
  mosaic_w4a16_{regdec,dequant}  the same on the weight path the default does not take at this M
                    (W4A16 with x rotated)
  xla_w4a16 / xla_w4a4         the xla implementation of the same
and checks every kernel output against its XLA reference (exact int32 for the raw kernel).
--only nvfp4 times XLA bf16, scaled_matmul and the NVFP4 rows alone; --only quant the
activation quantizers' variants (INT8: stages, cast; NVFP4 QDQ: e2m1 rounding), W8A8 e2e,
W4A8 and W4A4.
Writes benchmarks/results/kernels-<device>.json (or --out DIR) with device, JAX version,
date and command; prints a table last.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import math
import os
import statistics
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from mpqjax import atomic, formats, qlinear_xla
from mpqjax.qlinear import quantize_linear
from mpqjax.testing import rel_err
from pallas_kernels import (int8_quant, int8_quant_mgpu, nvfp4_quant,
                            nvfp4_to_int8, qlinear_mosaic)
from pallas_kernels import nvfp4_matmul as nvmm
from pallas_kernels import w8a8_matmul as w8a8

L2_BYTES = 50 << 20
M_2B, M_5B = 2 * 17776, 2 * 17776


def shapes(quick: bool, small_ms=(64, 256)):
  """(name, M, K, N)."""
  out = [("8192^3", 8192, 8192, 8192)]
  small = []
  for tag, m, dims in (("5B", M_5B, (3072, 12288)), ("2B", M_2B, (1920, 7680))):
    d, f = dims
    for k, n in ((d, d), (d, f), (f, d)):
      out.append((f"{tag} K{k} N{n}", m, k, n))
      for sm in small_ms:
        small.append((f"{tag} K{k} N{n}", sm, k, n))
  out += small
  if quick:
    out = [s for s in out if s[0] in ("8192^3",) or (s[0] == "5B K3072 N12288")]
  return out


def select(all_shapes, max_m: int | None, min_m: int | None, names: str | None = None):
  """--max-m / --min-m filters (e.g. --max-m 256 for the memory-bound shapes alone), and
  --shapes (comma-separated shape names, e.g. "8192^3,2B K1920 N1920")."""
  keep = None if not names else {v.strip() for v in names.split(",")}
  return [s for s in all_shapes if (max_m is None or s[1] <= max_m)
          and (min_m is None or s[1] >= min_m) and (keep is None or s[0] in keep)]


def tune_configs(m: int, n: int, k: int):
  """Config variants timed with --tune (the first is the heuristic's choice)."""
  base = w8a8.pick_config(m, n, k)
  if m >= 1024:
    c = [base,
         dataclasses.replace(base, wg_dimension=w8a8.Dim.M),
         dataclasses.replace(base, grid_minor_dim=w8a8.Dim.M),
         dataclasses.replace(base, max_concurrent_steps=3, epi_tile_n=64),
         dataclasses.replace(base, max_concurrent_steps=4, epi_tile_n=32),  # session-6 default
         dataclasses.replace(base, grid_minor_dim=w8a8.Dim.M, max_concurrent_steps=3,
                             epi_tile_n=64, grid_tile_width=4)]
  else:  # memory-bound: fewer weight re-reads (wider CTA tiles) vs more CTAs (split K)
    sms = w8a8.num_sms()
    wide = lambda **kw: w8a8.with_k_splits(dataclasses.replace(base, **kw), m, n, k, sms)
    c = [base, dataclasses.replace(base, k_splits=1),
         dataclasses.replace(base, k_splits=base.k_splits * 2),
         wide(max_concurrent_steps=4), wide(max_concurrent_steps=8),
         wide(tile_n=128, max_concurrent_steps=4),  # CTA 64 x 256
         wide(wg_dimension=w8a8.Dim.M),  # CTA 128 x 64
         wide(tile_m=128, wg_dimension=w8a8.Dim.M, max_concurrent_steps=4)]  # CTA 256 x 64
  seen, out = set(), []
  for x in c:
    if x not in seen and n % x.cta_tile_n == 0 and k % (x.tile_k * x.k_splits) == 0:
      seen.add(x)
      out.append(x)
  return out


def cfg_name(c: w8a8.W8A8Config) -> str:
  return (f"m{c.tile_m}n{c.tile_n}k{c.tile_k}s{c.max_concurrent_steps}"
          f"wg{c.wg_dimension.name}g{c.grid_minor_dim.name}{c.grid_tile_width}"
          f"e{c.epi_tile_m}x{c.epi_tile_n}ks{c.k_splits}")


def time_fn(fn, argsets, iterations=5):
  """Median device time (ms) of one call of fn, via CUPTI over all rotated arg sets."""
  from jax.experimental.mosaic.gpu import profiler
  multi = jax.jit(lambda sets: [fn(*s) for s in sets])
  _, times = profiler.measure(multi, iterations=iterations)(argsets)
  return statistics.median(times) / len(argsets)


def kernel_breakdown(fn, args, iterations=5):
  """[(kernel name, median device time in us)] of one call of fn(*args), launch by launch
  (CUPTI): where an end-to-end time goes. fn is traced afresh (a new wrapper): jax.jit(fn)
  would reuse a trace of the same function made under other module settings."""
  from jax.experimental.mosaic.gpu import profiler
  _, per_iter = profiler.measure(jax.jit(lambda *a: fn(*a)), aggregate=False, iterations=iterations)(*args)
  return [(name, statistics.median(it[i][1] for it in per_iter) * 1e3)
          for i, (name, _) in enumerate(per_iter[0])]


def make_problem(m, k, n, seed):
  kx, kw, kb = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
  w = jax.random.normal(kw, (n, k), jnp.float32) * (1.0 / math.sqrt(k))
  b = jax.random.normal(kb, (n,), jnp.float32) * 0.1
  layer = quantize_linear(w, b, hadamard=True)
  w8 = qlinear_xla.weight_as_int8(layer)
  xq, xs = int8_quant.quantize_rows(x, int8_quant.QuantConfig(128))
  nv = layer.weight
  # scaled_matmul operands: e2m1 values and e4m3 block scales, one batch.
  e2m1 = formats.e2m1_decode(formats.unpack_nibbles(nv.codes)).astype(jnp.float4_e2m1fn)
  xnv = formats.quantize_nvfp4(x)
  xe2m1 = formats.e2m1_decode(formats.unpack_nibbles(xnv.codes)).astype(jnp.float4_e2m1fn)
  return dict(x=x, w_bf16=w.astype(jnp.bfloat16), layer=layer, w8=w8, xq=xq, xs=xs[:, 0],
              ws=layer.w_int8_scale[:, 0], bias=b, nv_w=e2m1[None], nv_ws=nv.scales[None],
              nv_x=xe2m1[None], nv_xs=xnv.scales[None])


def nv_cfg_name(c: nvmm.NVFP4MatmulConfig) -> str:
  return (f"n{c.tile_n}m{c.tile_m}k{c.tile_k}s{c.max_concurrent_steps}"
          f"g{c.grid_minor_dim.name}{c.grid_tile_width}e{c.epi_tile_m}ks{c.k_splits}{c.decode}"
          + ("pp" if c.pingpong else "") + (f"ch{c.decode_chunks}" if c.decode_chunks > 1 else "")
          + ("e4m3" if c.e4m3_scales else ""))


def nvfp4_configs(m: int, n: int, k: int, tune: bool):
  """The NVFP4 kernel's heuristic config, plus variants with --tune."""
  base = nvmm.pick_config(m, n, k)
  if not tune:
    return [base]
  rep = lambda **kw: nvmm.replace_config(base, **kw)
  # run 1 (NOTES.md) also timed tile_k 128 x 3 stages and 6 stages (shared memory overflow),
  # grid minor M (same), tile_m 128 (0.74x the default) and the int4 decode (0.55x); run 2:
  # ping-pong (0.90x the default); run 8 and session 6: an SMEM decode (0.91x, removed)
  # session 10: the "perm" decode (codes decoded in place) against the relayout ("bits")
  other = rep(decode="bits" if base.decode == "perm" else "perm")
  if m > 128:
    c = [base, other, rep(pingpong=not base.pingpong)]
  else:  # and the 64-wide K steps of the small-M default before session 8; session 11: the
    # stored e4m3 scales and K chunks of the small-M default, each turned off
    c = [base, other, rep(k_splits=max(1, base.k_splits // 2)),
         rep(pingpong=not base.pingpong), rep(tile_k=64, max_concurrent_steps=6),
         rep(e4m3_scales=False), rep(decode_chunks=1)]
  out = []
  for x in c:
    if x not in out and nvmm.supported(m, n, k, x):
      out.append(x)
  return out


NV_TUNE_SHAPES = {("8192^3", 8192), ("5B K3072 N3072", 35552), ("2B K1920 N7680", 64)}


def nvfp4_rows(args, name, m, k, n, probs, p0, row, bench):
  """W4A16 / W4A4 (issue 7): the NVFP4 kernel alone (weight operands prepared), then
  MOSAIC.w4a16 / w4a4 end to end (Hadamard rotation or QDQ quantizer included)."""
  for p in probs:
    for dec in (*nvmm.DECODES, "e4m3"):  # int4 takes unscaled block scales; e4m3 the stored ones
      w4, ws, gain = nvmm.weight_operands(p["layer"].weight, dec if dec != "e4m3" else "perm",
                                          e4m3_scales=dec == "e4m3")
      p["nv_w4"], p[f"nv_ws_{dec}"] = w4, ws
      p[f"nv_cs_{dec}"] = p["layer"].weight.global_scale * gain
    p["nv_xp"] = jax.jit(nvmm.permute_k)(p["x"])  # the "perm" decode's K order, made untimed
  def pick(p, c=None):
    key = "bits" if c is None else "e4m3" if c.e4m3_scales else c.decode
    x = p["nv_xp"] if c is not None and c.decode == "perm" else p["x"]
    return x, p["nv_w4"], p[f"nv_ws_{key}"], p[f"nv_cs_{key}"], p["bias"]
  ref_k = jax.jit(nvmm.reference)(*pick(p0))
  tune = args.tune and (args.tune_all or (name, m) in NV_TUNE_SHAPES)
  for c in nvfp4_configs(m, n, k, tune):
    fn = lambda x, w4, ws, cs, b, c=c: nvmm.nvfp4_matmul(x, w4, ws, cs, b, config=c,
                                                          x_permuted=c.decode == "perm")
    bench(f"nvfp4_kernel[{nv_cfg_name(c)}]", fn, lambda p, c=c: pick(p, c), ref=ref_k)
  bench("nvfp4_weight_operands", lambda t: nvmm.weight_operands(t)[:2],
        lambda p: (p["layer"].weight,))
  # the large-M weight path: decode to bf16 once per call, then the bf16 GEMM (scale + bias fused)
  bench("nvfp4_to_bf16", qlinear_mosaic.weight_bf16, lambda p: (p["layer"],))
  for p in probs:
    p["nv_w_bf16"] = jax.jit(qlinear_mosaic.weight_bf16)(p["layer"])
  bf16_args = lambda p: (p["x"], p["nv_w_bf16"], p["layer"].weight.global_scale, p["bias"])
  bench("bf16_kernel", lambda x, w, cs, b: w8a8.bf16_matmul(x, w, cs, b), bf16_args, ref=ref_k)
  if tune and m >= 1024:  # the bf16 GEMM's tiles against XLA's dot
    base = w8a8.pick_config(m, n, k, dtype=jnp.bfloat16)
    for c in (dataclasses.replace(base, grid_tile_width=4),
              dataclasses.replace(base, grid_tile_width=16),
              dataclasses.replace(base, grid_minor_dim=w8a8.Dim.M),
              dataclasses.replace(base, epi_tile_n=64),
              dataclasses.replace(base, max_concurrent_steps=3)):
      bench(f"bf16_kernel[{cfg_name(c)}]",
            lambda x, w, cs, b, c=c: w8a8.bf16_matmul(x, w, cs, b, config=c), bf16_args, ref=ref_k)
  had = p0["layer"].hadamard_block
  qc = nvfp4_quant.NVFP4QuantConfig(had)
  bench("rotate_bf16", lambda x: nvfp4_quant.rotate(x, had).astype(jnp.bfloat16),
        lambda p: (p["x"],))
  bench("quant_nvfp4_qdq_had", lambda x: nvfp4_quant.quantize_qdq(x, qc), lambda p: (p["x"],))
  bench("quant_nvfp4_qdq_had_xla", lambda x: nvfp4_quant.quantize_qdq_xla(x, qc),
        lambda p: (p["x"],))
  bench("quant_nvfp4_qdq", lambda x: nvfp4_quant.quantize_qdq(x), lambda p: (p["x"],))
  if m >= qlinear_mosaic.MGPU_QUANT_MIN_ROWS and int8_quant_mgpu.pick_k_splits(m, k) > 1:
    q1 = dataclasses.replace(qc, k_splits=1)  # the grid before K was split across CTAs
    bench("quant_nvfp4_qdq_had[ks1]", lambda x: nvfp4_quant.quantize_qdq(x, q1),
          lambda p: (p["x"],))
  if tune and m >= 1024:
    for st in QUANT_STEPS:
      qs = dataclasses.replace(qc, max_concurrent_steps=st)
      bench(f"quant_nvfp4_qdq_had[steps{st}]", lambda x, qs=qs: nvfp4_quant.quantize_qdq(x, qs),
            lambda p: (p["x"],))
  try:  # the Mosaic QDQ against the XLA fusion: equal up to the rotation's summation order
    a = jax.jit(lambda x: nvfp4_quant.quantize_qdq(x, qc))(p0["x"])
    b = jax.jit(lambda x: nvfp4_quant.quantize_qdq_xla(x, qc))(p0["x"])
    row["check"]["qdq_mgpu_vs_xla_mismatch_frac"] = float(jnp.mean(a[0] != b[0]))
    row["check"]["qdq_mgpu_vs_xla_g_equal"] = bool(a[1] == b[1])
    a = jax.jit(lambda x: nvfp4_quant.quantize_qdq(x))(p0["x"])
    b = jax.jit(lambda x: nvfp4_quant.quantize_qdq_xla(x))(p0["x"])
    row["check"]["qdq_mgpu_vs_xla_nohad_mismatch_frac"] = float(jnp.mean(a[0] != b[0]))
  except Exception as e:
    row["errors"]["qdq_check"] = f"{type(e).__name__}: {str(e)[:400]}"
  lay = p0["layer"]
  w4, ws, cs = p0["nv_w4"], p0["nv_ws_perm"], p0["nv_cs_perm"]
  def ref_w4a16(x):  # x rotated
    return nvmm.reference(nvfp4_quant.rotate(x, had).astype(jnp.bfloat16), w4, ws, cs, lay.bias)
  def ref_w4a4(x):
    v, g = nvfp4_quant.quantize_qdq(x, qc)
    return nvmm.reference(v, w4, ws, cs * g, lay.bias)
  want16, want4 = jax.jit(ref_w4a16)(p0["x"]), jax.jit(ref_w4a4)(p0["x"])
  # where W4A16 folds the rotation into the weight, the xla path's folded form is the reference
  folds = qlinear_xla.w4a16_folds_rotation(m, lay)
  # fresh wrappers throughout: jax.jit of one function object reuses a trace made under other
  # module settings (see kernel_breakdown)
  bench("mosaic_w4a16", lambda *a: qlinear_mosaic.w4a16(*a), lambda p: (p["x"], p["layer"]),
        ref=jax.jit(lambda x: qlinear_xla.w4a16(x, lay))(p0["x"]) if folds else want16)
  bench("mosaic_w4a4", lambda *a: qlinear_mosaic.w4a4(*a), lambda p: (p["x"], p["layer"]),
        ref=want4)
  # the other weight path than the default at this M (register decode <-> dequant + bf16 GEMM),
  # W4A16 with x rotated (no fold)
  other = "regdec" if m >= qlinear_mosaic.DEQUANT_MIN_ROWS else "dequant"
  default_rows, default_fold = qlinear_mosaic.DEQUANT_MIN_ROWS, qlinear_xla.W4A16_FOLD_MIN_ROWS
  qlinear_mosaic.DEQUANT_MIN_ROWS = 1 << 62 if other == "regdec" else 1
  qlinear_xla.W4A16_FOLD_MIN_ROWS = 1 << 62
  try:  # bench traces under the switched thresholds
    bench(f"mosaic_w4a16_{other}", lambda *a: qlinear_mosaic.w4a16(*a),
          lambda p: (p["x"], p["layer"]), ref=want16)
    bench(f"mosaic_w4a4_{other}", lambda *a: qlinear_mosaic.w4a4(*a),
          lambda p: (p["x"], p["layer"]), ref=want4)
  finally:
    qlinear_mosaic.DEQUANT_MIN_ROWS = default_rows
    qlinear_xla.W4A16_FOLD_MIN_ROWS = default_fold
  if m <= 128:  # the xla path for comparison (slow at large M)
    bench("xla_w4a16", qlinear_xla.w4a16, lambda p: (p["x"], p["layer"]))
    bench("xla_w4a4", qlinear_xla.w4a4, lambda p: (p["x"], p["layer"]))
  try:  # for the record: the GPU's own xla path (see the CPU comparison in the tests)
    row["check"]["mosaic_w4a16_vs_gpu_xla"] = rel_err(
        jax.jit(qlinear_mosaic.w4a16)(p0["x"], lay), jax.jit(qlinear_xla.w4a16)(p0["x"], lay))
    row["check"]["mosaic_w4a4_vs_gpu_xla"] = rel_err(
        jax.jit(qlinear_mosaic.w4a4)(p0["x"], lay), jax.jit(qlinear_xla.w4a4)(p0["x"], lay))
  except Exception as e:
    row["errors"]["nvfp4_vs_gpu_xla"] = f"{type(e).__name__}: {str(e)[:400]}"


QUANT_STEPS = (2, 3, 4)  # --tune: the Mosaic quantizers (Hadamard) per pipeline depth


def quant_variants(bench, p0, row):
  """INT8 quantizer per stage count (one warpgroup per row block), per warpgroups sharing a
  row block (checked bit-equal to one), with jnp's division cast
  ("div": on the GPU div.full.f32, up to 2 ulp off) instead of the default's correctly
  rounded one, and its pass 1 alone (amax). Records the fraction of int8 values that differ
  from int8_quant.reference computed on the host CPU (correctly rounded division) over the
  first 1024 rows, for the default and "div" casts and the XLA fusion."""
  for st in QUANT_STEPS:
    qc = int8_quant_mgpu.QuantMgpuConfig(128, max_concurrent_steps=st, warpgroups=1)
    bench(f"quant_mgpu_had[steps{st}]", lambda x, qc=qc: int8_quant_mgpu.quantize_rows_mgpu(x, qc),
          lambda p: (p["x"],))
  one_wg = jax.jit(lambda x: int8_quant_mgpu.quantize_rows_mgpu(
      x, int8_quant_mgpu.QuantMgpuConfig(128, warpgroups=1)))
  # warpgroups sharing a row block (the default picks by K): same arithmetic, so bit-equal
  for wgs in (1, 2, 4):
    qc = int8_quant_mgpu.QuantMgpuConfig(128, warpgroups=wgs)
    bench(f"quant_mgpu_had[wg{wgs}]", lambda x, qc=qc: int8_quant_mgpu.quantize_rows_mgpu(x, qc),
          lambda p: (p["x"],), ref=one_wg if wgs > 1 else None, exact=True)
  # deeper rings with fewer warpgroups: more of pass 2's tiles in flight per warpgroup
  for wgs, st in ((2, 3), (2, 4)):
    qc = int8_quant_mgpu.QuantMgpuConfig(128, max_concurrent_steps=st, warpgroups=wgs)
    bench(f"quant_mgpu_had[wg{wgs}s{st}]",
          lambda x, qc=qc: int8_quant_mgpu.quantize_rows_mgpu(x, qc),
          lambda p: (p["x"],), ref=one_wg, exact=True)
  div = int8_quant_mgpu.QuantMgpuConfig(128, fast_cast=False)
  bench("quant_mgpu_had[div]", lambda x: int8_quant_mgpu.quantize_rows_mgpu(x, div),
        lambda p: (p["x"],))
  bench("quant_mgpu_had[amax]", lambda x: int8_quant_mgpu.row_amax_mgpu(x, 128),
        lambda p: (p["x"],))
  try:
    x = p0["x"][:1024]
    cpu = jax.devices("cpu")[0]
    want = np.asarray(jax.jit(lambda x: int8_quant.reference(x, int8_quant.QuantConfig(128))[0],
                              device=cpu)(jax.device_put(x, cpu)))
    for key, fn in (("default", lambda x: int8_quant_mgpu.quantize_rows_mgpu(
                        x, int8_quant_mgpu.QuantMgpuConfig(128))),
                    ("div", lambda x: int8_quant_mgpu.quantize_rows_mgpu(x, div)),
                    ("xla", lambda x: int8_quant.quantize_rows(x, int8_quant.QuantConfig(128)))):
      got = np.asarray(jax.jit(lambda x, fn=fn: fn(x)[0])(x))
      row["check"][f"quant_{key}_vs_cpu_reference_frac"] = float(np.mean(got != want))
  except Exception as e:
    row["errors"]["quant_vs_cpu_reference"] = f"{type(e).__name__}: {str(e)[:400]}"


def w8a8_e2e(x, w8, ws, bias, *, had: int, use_mgpu=None):
  """W8A8 end to end: qlinear_mosaic's activation quantizer (Hadamard block `had`; use_mgpu
  None = its default by M), then the W8A8 kernel."""
  xq, xs = qlinear_mosaic.quantize_activations(x, had, use_mgpu=use_mgpu)
  return w8a8.w8a8_matmul(xq, w8, xs[:, 0], ws, bias)


def bf16_dot(x, w):
  return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16)


TUNE_SHAPES = {("8192^3", 8192), ("5B K12288 N3072", 64)}


def write_json(res: dict, out_dir: str) -> str:
  dev = res["device"].replace(" ", "_").replace("/", "_")
  return atomic.write_json(os.path.join(out_dir, f"kernels-{dev}{res.get('suffix', '')}.json"),
                           res)


def run(args, out_dir=None) -> dict:
  dev = jax.devices()[0]
  sms = dev.core_count
  results = []
  res = dict(device=dev.device_kind, num_sms=sms, jax_version=jax.__version__,
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             command=" ".join([os.path.basename(sys.executable)] + sys.argv), results=results,
             suffix=getattr(args, "suffix", ""))
  small_ms = tuple(int(v) for v in getattr(args, "small_ms", "64,256").split(",") if v)
  for (name, m, k, n) in select(shapes(args.quick, small_ms), getattr(args, "max_m", None),
                                getattr(args, "min_m", None), getattr(args, "shapes", None)):
    flops = 2.0 * m * n * k
    wbytes = n * k * 2
    n_sets = 1 if m >= 1024 else max(1, min(6, math.ceil(2 * L2_BYTES / wbytes)))
    p_first = make_problem(m, k, n, 0)
    # further input sets: fresh buffers with the same values (they only defeat the L2)
    probs = [p_first] + [jax.tree.map(lambda a: a.copy() if hasattr(a, "copy") else a, p_first)
                         for _ in range(n_sets - 1)]
    p0 = probs[0]
    row = dict(shape=name, M=m, K=k, N=n, flops=flops, times_ms={}, errors={}, check={})
    print(f"== {name} M={m} K={k} N={n} ({n_sets} input sets)", flush=True)

    def bench(key, fn, pick, ref=None, exact=False):
      try:
        sets = [pick(p) for p in probs]
        out = jax.jit(fn)(*sets[0])
        if ref is not None:
          r = ref(*sets[0]) if callable(ref) else ref
          if exact:
            ok = all(np.array_equal(np.asarray(a), np.asarray(b))
                     for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(r), strict=True))
            row["check"][key] = "exact" if ok else "MISMATCH"
          else:
            row["check"][key] = rel_err(out, r)
        t = time_fn(fn, sets)
        row["times_ms"][key] = t
        print(f"  {key:44s} {t * 1e3:9.1f} us  {flops / t / 1e9:8.1f} TF/s"
              f"  check={row['check'].get(key, '-')}", flush=True)
      except Exception as e:  # keep going: one failure must not lose the run
        row["errors"][key] = f"{type(e).__name__}: {str(e)[:400]}"
        print(f"  {key}: FAILED {row['errors'][key]}", flush=True)
        traceback.print_exc(limit=2)

    ref_bf16 = jax.jit(bf16_dot)(p0["x"], p0["w_bf16"])
    bench("xla_bf16", bf16_dot, lambda p: (p["x"], p["w_bf16"]))
    if args.only == "quant":  # the INT8 quantizer's variants, then W8A8 e2e and W4A8 with it
      bench("quant_mgpu_had", lambda x: int8_quant_mgpu.quantize_rows_mgpu(
          x, int8_quant_mgpu.QuantMgpuConfig(128)), lambda p: (p["x"],))
      quant_variants(bench, p0, row)
      bench("mosaic_w8a8_e2e_had", functools.partial(w8a8_e2e, had=128),
            lambda p: (p["x"], p["w8"], p["ws"], p["bias"]))
      bench("mosaic_w4a8", qlinear_mosaic.w4a8, lambda p: (p["x"], p["layer"]),
            ref=jax.jit(qlinear_xla.w4a8)(p0["x"], p0["layer"]))
      # the NVFP4 QDQ quantizer: e2m1 by float/bit arithmetic (default) or by step selects,
      # each bit for bit against the XLA fusion; then W4A4 end to end
      want = jax.jit(lambda x: nvfp4_quant.quantize_qdq_xla(x, nvfp4_quant.NVFP4QuantConfig(128)))(p0["x"])
      for tag, bits in (("", True), ("[select]", False)):
        qc = nvfp4_quant.NVFP4QuantConfig(128, e2m1_bits=bits)
        bench("quant_nvfp4_qdq_had" + tag, lambda x, qc=qc: nvfp4_quant.quantize_qdq(x, qc),
              lambda p: (p["x"],), ref=lambda *_: want, exact=True)
      del want
      bench("mosaic_w4a4", qlinear_mosaic.w4a4, lambda p: (p["x"], p["layer"]))
    if args.only not in ("nvfp4", "quant"):
      ref_s8 = jax.jit(w8a8.reference)(p0["xq"], p0["w8"], p0["xs"], p0["ws"], p0["bias"])
      bench("xla_s8_scaled", w8a8.reference, lambda p: (p["xq"], p["w8"], p["xs"], p["ws"], p["bias"]))
    if args.only != "quant":
      bench("xla_nvfp4_sm",
            lambda a, b, sa, sb: jax.nn.scaled_matmul(a, b, sa, sb, preferred_element_type=jnp.bfloat16),
            lambda p: (p["nv_x"], p["nv_w"], p["nv_xs"], p["nv_ws"]))
    if args.only not in ("nvfp4", "quant"):
      ref_w4a8 = jax.jit(qlinear_xla.w4a8)(p0["x"], p0["layer"])
      for had in (0, 128):
        qc = int8_quant.QuantConfig(had)
        want = jax.jit(lambda x, qc=qc: int8_quant.reference(x, qc)[0])(p0["x"])
        for key, fn in (("quant_xla", lambda x, qc=qc: int8_quant.quantize_rows(x, qc)),
                        ("quant_mgpu", lambda x, had=had: int8_quant_mgpu.quantize_rows_mgpu(
                            x, int8_quant_mgpu.QuantMgpuConfig(had)))):
          key = key + ("_had" if had else "")
          bench(key, fn, lambda p: (p["x"],))
          try:  # fraction of int8 values that differ from the f32-HIGHEST reference quantizer
            got = jax.jit(lambda x, fn=fn: fn(x)[0])(p0["x"])
            row["check"][key + "_mismatch_frac"] = float(jnp.mean(got != want))
          except Exception as e:
            row["errors"][key + "_check"] = f"{type(e).__name__}: {str(e)[:400]}"
        del want
      if args.tune and m >= 1024:
        quant_variants(bench, p0, row)
      # kernel alone, per config
      tune = args.tune and (args.tune_all or (name, m) in TUNE_SHAPES)
      cfgs = tune_configs(m, n, k) if tune else [w8a8.pick_config(m, n, k, sms)]
      for c in cfgs:
        fn = lambda a, b, sa, sb, bb, c=c: w8a8.w8a8_matmul(a, b, sa, sb, bb, config=c)
        bench(f"mosaic_w8a8[{cfg_name(c)}]", fn,
              lambda p: (p["xq"], p["w8"], p["xs"], p["ws"], p["bias"]), ref=ref_s8)
      # the int32 path, bit for bit, at the heuristic config
      c0 = w8a8.pick_config(m, n, k, sms)
      try:
        got = jax.jit(lambda a, b: w8a8.w8a8_matmul(a, b, jnp.ones((m,)), jnp.ones((n,)),
                                                    config=c0, out_dtype=jnp.int32))(p0["xq"], p0["w8"])
        want = jax.jit(lambda a, b: w8a8.reference(a, b, None, None, out_dtype=jnp.int32))(p0["xq"], p0["w8"])
        row["check"]["int32_exact"] = bool(np.array_equal(np.asarray(got), np.asarray(want)))
        print(f"  int32 exact: {row['check']['int32_exact']}", flush=True)
      except Exception as e:
        row["errors"]["int32_exact"] = f"{type(e).__name__}: {str(e)[:400]}"
      # end to end
      for had, use in ((0, None), (128, None), (128, True), (128, False)):
        qc = int8_quant.QuantConfig(had)
        default_mgpu = m >= qlinear_mosaic.MGPU_QUANT_MIN_ROWS
        if use is not None and (use == default_mgpu or
                                ("quant_mgpu_had" if use else "quant_xla_had") in row["errors"]):
          continue
        e2e = functools.partial(w8a8_e2e, had=had, use_mgpu=use)
        def e2e_ref(x, w8, ws, bias, qc=qc):
          xq, xs = int8_quant.reference(x, qc)
          return w8a8.reference(xq, w8, xs[:, 0], ws, bias)
        pick = lambda p: (p["x"], p["w8"], p["ws"], p["bias"])
        key = "mosaic_w8a8_e2e" + ("_had" if had else "")
        key += {None: "", True: "[mgpuq]", False: "[xlaq]"}[use]
        bench(key, e2e, pick, ref=jax.jit(e2e_ref)(*pick(p0)))
        if had and use is None:
          bench("xla_w8a8_e2e_had", e2e_ref, pick)
      bench("mosaic_w4a8", qlinear_mosaic.w4a8, lambda p: (p["x"], p["layer"]), ref=ref_w4a8)
      # W4A8 weight options: reference conversion per call (default), gather-free conversion
      # per call; resident bytes per weight element: NVFP4 0.5625, NVFP4 + cached INT8 1.5625.
      bench("conv_ref", qlinear_xla.weight_as_int8, lambda p: (p["layer"],))
      bench("conv_fast", nvfp4_to_int8.nvfp4_to_int8, lambda p: (p["layer"],))
      try:
        fast = jax.jit(nvfp4_to_int8.nvfp4_to_int8)(p0["layer"])
        row["check"]["conv_fast_mismatch_frac"] = float(jnp.mean(fast != p0["w8"]))
      except Exception as e:
        row["errors"]["conv_fast_check"] = f"{type(e).__name__}: {str(e)[:400]}"
      def w4a8_fast(x, layer):
        xq, xs = qlinear_mosaic.quantize_activations(x, layer.hadamard_block)
        return w8a8.w8a8_matmul(xq, nvfp4_to_int8.nvfp4_to_int8(layer), xs[:, 0],
                                layer.w_int8_scale[:, 0], layer.bias)
      bench("mosaic_w4a8_fastconv", w4a8_fast, lambda p: (p["x"], p["layer"]), ref=ref_w4a8)
      # the NVFP4 weight decoded onto its INT8 grid in registers (the default up to
      # W4A8_REGDEC_MAX_ROWS rows), at any M; and its kernel alone on prepared operands
      if qlinear_mosaic.w4a8_regdec(p0["x"], p0["layer"], max_rows=m) is not None:
        bench("mosaic_w4a8_regdec",
              lambda x, layer: qlinear_mosaic.w4a8_regdec(x, layer, max_rows=m),
              lambda p: (p["x"], p["layer"]), ref=ref_w4a8)
        c8 = nvmm.pick_config(m, n, k, sms, int8_grid=True)
        perm = nvmm.k_permutation_int8(128)
        xqp, xsp = jax.jit(lambda x: int8_quant.quantize_rows(
            x, int8_quant.QuantConfig(128), out_perm=perm))(p0["x"])
        w4, ws8, _ = nvmm.weight_operands(p0["layer"].weight, "perm", c8.e4m3_scales)
        def regdec_kernel(xq, xs, w4, ws, layer):
          return nvmm.w4a8_matmul(xq, xs, w4, ws, layer.w_int8_scale, layer.weight.global_scale,
                                  layer.bias, config=c8, x_permuted=True)
        bench(f"w4a8_regdec_kernel[{nv_cfg_name(c8)}]", regdec_kernel,
              lambda p: (xqp, xsp, w4, ws8, p["layer"]), ref=ref_w4a8)
        bench("quant_xla_had[perm]", lambda x: int8_quant.quantize_rows(
            x, int8_quant.QuantConfig(128), out_perm=perm), lambda p: (p["x"],))
        # the XLA quantizer with the butterfly rotation (fused into its absmax and its cast:
        # one launch fewer), alone and in front of both small-M kernels
        bfly = int8_quant.QuantConfig(128, rotation="butterfly")
        xq_ref, xs_ref = jax.jit(lambda x: int8_quant.reference(x, int8_quant.QuantConfig(128)))(p0["x"])
        bench("quant_xla_had[butterfly]", lambda x: int8_quant.quantize_rows(x, bfly),
              lambda p: (p["x"],))
        try:
          got = jax.jit(lambda x: int8_quant.quantize_rows(x, bfly)[0])(p0["x"])
          row["check"]["quant_xla_had[butterfly]_mismatch_frac"] = float(jnp.mean(got != xq_ref))
        except Exception as e:
          row["errors"]["quant_butterfly_check"] = f"{type(e).__name__}: {str(e)[:400]}"
        def regdec_bfly(x, w4, ws, layer):
          xq, xs = int8_quant.quantize_rows(x, bfly, out_perm=perm)
          return regdec_kernel(xq, xs, w4, ws, layer)
        bench("mosaic_w4a8_regdec[butterfly]", regdec_bfly,
              lambda p: (p["x"], w4, ws8, p["layer"]), ref=ref_w4a8)
        def w8a8_bfly(x, w8, ws, bias):
          xq, xs = int8_quant.quantize_rows(x, bfly)
          return w8a8.w8a8_matmul(xq, w8, xs[:, 0], ws, bias)
        bench("mosaic_w8a8_e2e_had[butterfly]", w8a8_bfly,
              lambda p: (p["x"], p["w8"], p["ws"], p["bias"]),
              ref=jax.jit(w8a8.reference)(xq_ref, p0["w8"], xs_ref[:, 0], p0["ws"], p0["bias"]))
      row["check"]["w4a8_vs_bf16_relerr"] = rel_err(ref_w4a8, ref_bf16)
    if args.only not in ("int8", "quant"):
      nvfp4_rows(args, name, m, k, n, probs, p0, row, bench)
    t = row["times_ms"]
    if "xla_bf16" in t:
      row["tflops"] = {key: flops / v / 1e9 for key, v in t.items()}
      row["vs_bf16"] = {key: t["xla_bf16"] / v for key, v in t.items()}
    results.append(row)
    probs = p0 = None  # free this shape's buffers before the next (bench closes over probs)
    if out_dir:
      write_json(res, out_dir)
  return res


def summary(res: dict) -> str:
  nan = float("nan")
  lines = [f"device {res['device']}, jax {res['jax_version']}",
           "TF/s (TOP/s for int8) | speed-up vs XLA bf16 | W8A8 ratios vs XLA s8",
           f"{'shape':17s} {'M':>5s} {'bf16':>5s} {'s8sc':>5s} {'nvfp4':>5s} {'kern':>5s} "
           f"{'e2eH':>5s} {'w4a8':>5s} {'w4a8f':>5s} | {'kern':>4s} {'e2e':>4s} {'e2eH':>4s} "
           f"{'w4a8':>4s} {'w4a8f':>5s} | kern/s8sc e2eH/xla"]
  for r in res["results"]:
    t = r["times_ms"]
    kern = min((v for key, v in t.items() if key.startswith("mosaic_w8a8[")), default=nan)
    tt = dict(t, kern=kern)
    tf = lambda key: r["flops"] / tt[key] / 1e9 if key in tt else nan
    b = t.get("xla_bf16", nan)
    x = lambda key: b / tt[key] if key in tt else nan
    lines.append(
        f"{r['shape']:17s} {r['M']:5d} {tf('xla_bf16'):5.0f} {tf('xla_s8_scaled'):5.0f} "
        f"{tf('xla_nvfp4_sm'):5.0f} {tf('kern'):5.0f} {tf('mosaic_w8a8_e2e_had'):5.0f} "
        f"{tf('mosaic_w4a8'):5.0f} {tf('mosaic_w4a8_fastconv'):5.0f} | {x('kern'):4.2f} "
        f"{x('mosaic_w8a8_e2e'):4.2f} {x('mosaic_w8a8_e2e_had'):4.2f} {x('mosaic_w4a8'):4.2f} "
        f"{x('mosaic_w4a8_fastconv'):5.2f} | {t.get('xla_s8_scaled', nan) / kern:9.2f} "
        f"{t.get('xla_w8a8_e2e_had', nan) / t.get('mosaic_w8a8_e2e_had', nan):8.2f}")
  return "\n".join(lines)


def summary_nvfp4(res: dict) -> str:
  nan = float("nan")
  lines = ["NVFP4 (issue 7), us | x XLA bf16 (bf16k: our bf16 GEMM) | W4A4 / scaled_matmul",
           f"{'shape':17s} {'M':>5s} {'bf16':>7s} {'nvsm':>7s} {'kern':>7s} {'TF/s':>5s} {'w4a16':>7s} "
           f"{'qdqH':>6s} {'w4a4':>7s} | {'kern':>5s} {'bf16k':>5s} {'w4a16':>5s} {'w4a4':>5s} | "
           f"{'w4a4/sm':>7s}"]
  for r in res["results"]:
    t = r["times_ms"]
    kern = min((v for key, v in t.items() if key.startswith("nvfp4_kernel[")), default=nan)
    us = lambda v: v * 1e3
    b = t.get("xla_bf16", nan)
    g = lambda key: t.get(key, nan)
    lines.append(
        f"{r['shape']:17s} {r['M']:5d} {us(b):7.1f} {us(g('xla_nvfp4_sm')):7.1f} {us(kern):7.1f} "
        f"{r['flops'] / kern / 1e9:5.0f} {us(g('mosaic_w4a16')):7.1f} "
        f"{us(g('quant_nvfp4_qdq_had')):6.1f} {us(g('mosaic_w4a4')):7.1f} | {b / kern:5.2f} "
        f"{b / g('bf16_kernel'):5.2f} {b / g('mosaic_w4a16'):5.2f} {b / g('mosaic_w4a4'):5.2f} | "
        f"{g('xla_nvfp4_sm') / g('mosaic_w4a4'):7.2f}")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="two shapes only")
  ap.add_argument("--tune", action="store_true", help="time several tile configs per shape")
  ap.add_argument("--max-m", type=int, default=None, help="only shapes with M <= this")
  ap.add_argument("--min-m", type=int, default=None, help="only shapes with M >= this")
  ap.add_argument("--suffix", default="", help="appended to the JSON name, e.g. .smallm")
  ap.add_argument("--tune-all", action="store_true", help="--tune at every shape")
  ap.add_argument("--only", choices=("all", "int8", "nvfp4", "quant"), default="all",
                  help="kernel family to time (nvfp4: issue 7's W4A16/W4A4 rows; quant: the "
                  "activation quantizers' variants, W8A8 e2e, W4A8, W4A4)")
  ap.add_argument("--small-ms", default="64,256", help="comma-separated small M values")
  ap.add_argument("--shapes", default=None,
                  help='comma-separated shape names to keep, e.g. "8192^3,2B K1920 N1920"')
  ap.add_argument("--out", default=None, help="directory for the JSON (default benchmarks/results)")
  args = ap.parse_args(argv)
  if jax.default_backend() != "gpu":
    print("benchmarks/kernels.py needs a GPU", file=sys.stderr)
    return 2
  out_dir = args.out or os.path.join(os.path.dirname(__file__), "results")
  res = run(args, out_dir)
  path = write_json(res, out_dir)
  if args.only not in ("nvfp4", "quant"):
    print(summary(res))
  if args.only not in ("int8", "quant"):
    print(summary_nvfp4(res))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
