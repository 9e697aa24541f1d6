"""Attention benchmark: cuDNN bf16 vs our Mosaic GPU bf16 and INT8/FP8 kernels, in one run.

  PYTHONPATH=. python benchmarks/attention.py [--out DIR] [--reps N] [--shapes 2b,5b,wan]

First checks correctness at small odd lengths (every implementation against a float64 reference
on inputs with outlier channels in Q and K; Mosaic kernels also against the xla path of the same
precision, which emulates their numerics), then times each implementation at full size. INT8
attention runs with both PV formats (int8_pv "fp8": e4m3 P and V, the default; "bf16").
The check also runs each timed shape's key length (2 heads, the first 256 queries). FLOPs =
4 * B * H * T * T * D (T the unpadded length). Writes attention-<device>.json (device, JAX
version, date, command, all numbers).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import sys
import time
import traceback

import numpy as np

from mpqjax import atomic, testing

SHAPES = {  # name: (B, T, H, D)
    "cogvideox-2b": (2, 17776, 30, 64),   # CFG batch 2, 17550 video + 226 text tokens
    "cogvideox-5b": (2, 17776, 48, 64),
    "wan-1.3b-480p": (2, 32760, 12, 128),  # Wan2.1-1.3B, 81 frames 480p
}


LONG_QUERIES = 256
outlier_inputs = testing.attention_outlier_inputs
reference_f64 = testing.attention_reference_f64
accuracy = testing.cosine_and_rel_l1


def time_fn(fn, args, reps):
  import jax
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def prepass_variants(A, am, q, k, v):
  """The INT8 API's work around the kernel (fp8 PV): the whole pre-pass (quantize_operands +
  prepare_vt; also with the Mosaic pre-pass kernels), its Q, K and V parts alone (XLA), and
  the output post-pass (crop, V scale)."""
  import jax.numpy as jnp
  t = q.shape[1]
  mult = max(A.SEQ_MULTIPLE, A.BLOCK_KV)  # as quantize_operands pads
  t_p = -(-t // mult) * mult

  def full(q, k, v, prepass="xla"):
    ops = A.quantize_operands(q, k, v, prepass=prepass)
    return ops._replace(v8=A._vt_operand(v, ops, pv="fp8", prepass=prepass, interpret=False))

  def q_part(q):
    return A.quantize_blocks_xla(q, None, block_rows=A.BLOCK_Q, t_pad=t_p)

  def k_part(k):  # the pre-pass with Q and V left out by the compiler
    ops = A.quantize_operands(k, k, k)
    return ops.k8, ops.k_scale

  def v_part(v):
    ops = A.quantize_operands(v, v, v)
    return am.prepare_vt(ops.v8), ops.v_scale

  o = jnp.pad(q, ((0, 0), (0, t_p - t), (0, 0), (0, 0)))
  v_scale = jnp.ones((q.shape[0], q.shape[2], q.shape[3]), jnp.float32)
  post = lambda o, s: (o[:, :t].astype(jnp.float32) * s[:, None]).astype(q.dtype)
  return {"int8_prepass": (full, (q, k, v)),
          "int8_prepass_mosaic": (functools.partial(full, prepass="mosaic"), (q, k, v)),
          "int8_prepass_q": (q_part, (q,)),
          "int8_prepass_k": (k_part, (k,)), "int8_prepass_v": (v_part, (v,)),
          "int8_postpass": (post, (o, v_scale))}


def run_metadata() -> dict:
  """device, device_short (for the file name), jax_version, date, command, flops_formula."""
  import jax
  kind = jax.devices()[0].device_kind
  short = kind.lower().replace("nvidia", "").strip().split()[0] if kind else "cpu"
  print(f"device {kind}, jax {jax.__version__}", flush=True)
  return {"device": kind, "device_short": short, "jax_version": jax.__version__,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
          "flops_formula": "4*B*H*T*T*D (unpadded T)"}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated SHAPES keys")
  ap.add_argument("--skip-check", action="store_true")
  ap.add_argument("--check-only", action="store_true",
                  help="only the accuracy check (runs on CPU: xla rows; the others report errors)")
  ap.add_argument("--variants", default="",
                  help="comma-separated substrings: time only the variants whose name contains "
                       "one, or is equal to one given as =NAME (cudnn_bf16, the baseline, always "
                       "runs); default all")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from mpqjax import attention as A
  from pallas_kernels import attention_mosaic as am

  result = {**run_metadata(), "accuracy": [], "timing": [], "errors": []}
  short = result["device_short"]

  impls = [("bf16", "xla"), ("bf16", "cudnn"), ("bf16", "mosaic"), ("int8", "xla"),
           ("int8", "mosaic"), ("int8", "mosaic_magic_init"), ("int8", "xla_pv_fp8x2"),
           ("int8", "mosaic_pv_fp8x2"), ("int8", "xla_pv_bf16"), ("int8", "mosaic_pv_bf16")]
  impl_fns = {
      "mosaic_magic_init": lambda q, k, v, prec: A._int8_mosaic(q, k, v,
                                                                int8_convert="magic_init"),
      "xla_pv_bf16": lambda q, k, v, prec: A.attention(q, k, v, precision=prec,
                                                       implementation="xla", int8_pv="bf16"),
      "xla_pv_fp8x2": lambda q, k, v, prec: A.attention(q, k, v, precision=prec,
                                                        implementation="xla", int8_pv="fp8x2"),
      "mosaic_pv_fp8x2": lambda q, k, v, prec: A.attention(q, k, v, precision=prec,
                                                           implementation="mosaic",
                                                           int8_pv="fp8x2"),
      "mosaic_pv_bf16": lambda q, k, v, prec: A.attention(q, k, v, precision=prec,
                                                          implementation="mosaic",
                                                          int8_pv="bf16"),
  }
  xla_of = {"mosaic_pv_bf16": "xla_pv_bf16", "mosaic_pv_fp8x2": "xla_pv_fp8x2"}  # the xla path with the same numerics
  if jax.default_backend() != "gpu":  # cuDNN and Mosaic GPU need the GPU
    impls = [(p, i) for p, i in impls if i.startswith("xla")]
    result["note"] = f"backend {jax.default_backend()}: xla implementations only"
  # (shape, outlier magnitude, query rows kept): small odd lengths, then each timed shape's
  # key length with 2 heads and its first LONG_QUERIES queries (the float64 reference of the
  # full problem does not fit a quick check; the softmax statistics depend on the key count)
  checks = [((1, t, 2, d), mag, None) for d in (64, 128) for t, mag in ((1000, 4.0), (333, 8.0))]
  long_td = dict.fromkeys((SHAPES[n][1], SHAPES[n][3]) for n in args.shapes.split(","))
  checks += [((1, t, 2, d), 4.0, LONG_QUERIES) for t, d in long_td]
  if not args.skip_check:
    for shape, mag, n_q in checks:
      t, d = shape[1], shape[3]
      q, k, v = outlier_inputs(jax.random.key(t + d), shape, magnitude=mag)
      if n_q:
        q = q[:, :n_q]
      ref = reference_f64(q, k, v)
      outs = {}
      for prec, impl in impls:
        try:
          fn = impl_fns.get(impl, lambda q, k, v, prec, impl=impl: A.attention(
              q, k, v, precision=prec, implementation=impl))
          o = jax.jit(functools.partial(fn, prec=prec))(q, k, v)
          outs[(prec, impl)] = np.asarray(o.astype(jnp.float32))
          cos, rl1 = accuracy(outs[(prec, impl)], ref)
          row = {"shape": shape, "query_rows": n_q or t, "outlier_magnitude": mag,
                 "precision": prec,
                 "implementation": impl, "cos": cos, "rel_l1": rl1}
          if impl.startswith("mosaic"):
            cos_x, rl1_x = accuracy(outs[(prec, impl)], outs[(prec, xla_of.get(impl, "xla"))])
            row.update(cos_vs_xla=cos_x, rel_l1_vs_xla=rl1_x)
          result["accuracy"].append(row)
          print(f"acc {shape} q={n_q or t} mag={mag} {prec:5s} {impl:7s} cos={cos:.6f} "
                f"relL1={rl1:.4f}"
                + (f"  vs xla: cos={row['cos_vs_xla']:.6f} relL1={row['rel_l1_vs_xla']:.4f}"
                   if impl.startswith("mosaic") else ""), flush=True)
        except Exception as e:  # Report and go on: one broken variant must not hide the rest.
          msg = f"accuracy {shape} {prec} {impl}: {type(e).__name__}: {e}"
          result["errors"].append(msg[:4000])
          print(msg[:4000], flush=True)
          traceback.print_exc()

  for name in [] if args.check_only else args.shapes.split(","):
    b, t, h, d = SHAPES[name]
    flops = 4 * b * h * t * t * d
    q, k, v = outlier_inputs(jax.random.key(0), (b, t, h, d))
    variants = {
        "cudnn_bf16": (lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),
                       (q, k, v)),
        "mosaic_bf16": (lambda q, k, v: A.attention(q, k, v, implementation="mosaic"), (q, k, v)),
        "mosaic_int8": (lambda q, k, v: A.attention(q, k, v, precision="int8",
                                                    implementation="mosaic"), (q, k, v)),
        "mosaic_int8_prepass_xla": (lambda q, k, v: A._int8_mosaic(q, k, v, prepass="xla"),
                                    (q, k, v)),
        "mosaic_int8_vscale_xla": (lambda q, k, v: A._int8_mosaic(q, k, v, fold_v_scale=False),
                                   (q, k, v)),
        "mosaic_int8_pp_on": (lambda q, k, v: A._int8_mosaic(q, k, v, pingpong=True), (q, k, v)),
        "mosaic_bf16_pp_off": (lambda q, k, v: A._bf16_mosaic(q, k, v, pingpong=False), (q, k, v)),
        "mosaic_int8_pv_bf16": (lambda q, k, v: A.attention(
            q, k, v, precision="int8", implementation="mosaic", int8_pv="bf16"), (q, k, v)),
        "mosaic_int8_pv_fp8x2": (lambda q, k, v: A.attention(
            q, k, v, precision="int8", implementation="mosaic", int8_pv="fp8x2"), (q, k, v)),
    }
    variants.update(prepass_variants(A, am, q, k, v))
    # Kernel alone on pre-padded / pre-quantized operands, per block_kv (256 x 128 bf16 K+V
    # tiles do not fit SMEM at D = 128).
    for bkv in (128, 256):
      s_p = -(-t // max(A.SEQ_MULTIPLE, bkv)) * max(A.SEQ_MULTIPLE, bkv)
      if d == 64 or bkv == 128:
        cfg_b = A.kernel_config("bf16", d, block_kv=bkv)
        padded = tuple(jnp.pad(x, ((0, 0), (0, s_p - t), (0, 0), (0, 0))) for x in (q, k, v))
        variants[f"mosaic_bf16_kernel_only_bkv{bkv}"] = (
            lambda q, k, v, cfg_b=cfg_b: am.flash_attention(q, k, v, kv_len=t, config=cfg_b),
            padded)
      ops = A.quantize_operands(q, k, v, block_kv=bkv)
      vt8 = am.prepare_vt(ops.v8)
      for conv in ("magic", "magic_init"):
        cfg_i = A.kernel_config("int8", d, block_kv=bkv, int8_convert=conv)
        variants[f"mosaic_int8_kernel_only_bkv{bkv}_{conv}"] = (
            lambda *o, cfg_i=cfg_i: am.flash_attention(*o, kv_len=t, config=cfg_i),
            (ops.q8, ops.k8, vt8, ops.q_scale, ops.k_scale))
      if d == 64 or bkv == 128:  # 256-key bf16 V^T tiles do not fit SMEM at D = 128
        ops = A.quantize_operands(q, k, v, block_kv=bkv, pv="bf16")
        vt16 = am.prepare_vt(ops.v8)
        for conv in ("magic", "magic_init"):
          cfg_i = A.kernel_config("int8", d, pv="bf16", block_kv=bkv, int8_convert=conv)
          variants[f"mosaic_int8_pv_bf16_kernel_only_bkv{bkv}_{conv}"] = (
              lambda *o, cfg_i=cfg_i: am.flash_attention(*o, kv_len=t, config=cfg_i),
              (ops.q8, ops.k8, vt16, ops.q_scale, ops.k_scale))
        del vt16
      del ops, vt8
    wanted = [w for w in args.variants.split(",") if w]
    if wanted:
      variants = {n: f for n, f in variants.items()
                  if n == "cudnn_bf16" or any(n == w[1:] if w.startswith("=") else w in n
                                              for w in wanted)}
    row = {"shape_name": name, "B": b, "T": t, "H": h, "D": d, "flops": flops}
    for vname, (fn, fargs) in variants.items():
      try:
        med, times = time_fn(jax.jit(fn), fargs, args.reps)
        row[vname] = {"ms": med * 1e3, "tflops": flops / med / 1e12,
                      "ms_all": [x * 1e3 for x in times]}
        print(f"time {name:14s} {vname:24s} {med * 1e3:8.3f} ms {flops / med / 1e12:7.1f} TF/s",
              flush=True)
      except Exception as e:
        msg = f"timing {name} {vname}: {type(e).__name__}: {e}"
        result["errors"].append(msg[:4000])
        print(msg[:4000], flush=True)
        traceback.print_exc()
    base = row.get("cudnn_bf16", {}).get("ms")
    if base:
      for vname in variants:
        if vname != "cudnn_bf16" and vname in row:
          row[vname]["speedup_vs_cudnn"] = base / row[vname]["ms"]
    result["timing"].append(row)
    del q, k, v, variants

  print("\n%-14s %-44s %9s %8s %8s" % ("shape", "variant", "ms", "TF/s", "x cuDNN"))
  for row in result["timing"]:
    for vname in row:
      if isinstance(row[vname], dict):
        r = row[vname]
        print("%-14s %-44s %9.3f %8.1f %8.3f" % (row["shape_name"], vname, r["ms"], r["tflops"],
                                                 r.get("speedup_vs_cudnn", 1.0)))
  path = atomic.write_json(os.path.join(args.out, f"attention-{short}.json"), result)
  print("wrote", path)
  return 1 if result["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
