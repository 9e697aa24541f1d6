"""W4A16 at large M with the Hadamard rotation folded into the weight (issue 7): the weight
rotated back to x's basis (N x K elements) instead of x rotated (M x K), then the bf16 GEMM.

  PYTHONPATH=. python3 benchmarks/w4a16_fold.py   (env: OUT=dir for the JSON,
      ONLY=name,... e.g. ONLY="2B K1920 N1920,8192^3")

Per shape (the seven large ones of gemm_clusters.py, the CogVideoX ones first), CUPTI device
time (benchmarks.kernels.time_fn) of:
- xla_bf16: XLA's bf16 dot on the unquantized weight (the baseline of every ratio);
- mosaic_w4a16[fold] / [nofold]: MOSAIC.w4a16 with the rotation folded into the weight, and
  with x rotated (the session-13 path), each forced (qlinear_xla.w4a16_folds_rotation replaced
  by a constant: forcing only the row threshold would leave the rule's condition on N in
  place, as in session 15's first run at 8192^3); the row's "folds" says which one the
  default rule takes;
- mosaic_w4a16[fold-tc]: the folded form with its weight made by the two XLA launches of
  session 14 (qlinear_mosaic.weight_derotated_tc) instead of the one-launch kernel;
- derotate: the folded path's weight alone (qlinear_mosaic.weight_derotated_bf16: the
  nvfp4_derotate kernel), with its launches (kernel_breakdown); derotate[tc]: the two XLA
  launches; derotate[<variant>]: the kernel with other DerotateConfigs and CTAs per SM
  (DEROTATE_VARIANTS),
  each checked against the xla reference (qlinear_xla.weight_derotated: the fraction of
  differing elements, the largest difference over the weight's rms);
- bf16_gemm: the bf16 GEMM alone on that weight.
Errors: the folded form against the xla path's folded form (same arithmetic: the issue's
2e-3), both forms against the product with the exact rotated-back weight (float64 on the
host, a row sample), and the two forms against each other. Writes
$OUT/w4a16_fold-<device>.json after every shape, with device, JAX version, date and command.
"""
import datetime
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
from benchmarks.gemm_clusters import SHAPES  # noqa: E402
from benchmarks.kernels import bf16_dot, kernel_breakdown, make_problem, time_fn  # noqa: E402
from mpqjax import atomic, qlinear_xla  # noqa: E402
from mpqjax.testing import rel_err, w4a16_exact_f64  # noqa: E402
from pallas_kernels import nvfp4_derotate, qlinear_mosaic  # noqa: E402
from pallas_kernels import w8a8_matmul as w8a8  # noqa: E402

SAMPLE_ROWS = 512  # rows of the float64 check (the host product at M = 35552 takes minutes)


FORMS = {"fold": True, "nofold": False}  # qlinear_xla.w4a16_folds_rotation forced to each
D = nvfp4_derotate.DerotateConfig
DEROTATE_VARIANTS = {  # name: (config, CTAs per SM)
    "rows64": (D(), 1),
    "nochain": (D(chain_tiles=False), 1),
    "rows128": (D(tile_rows=128), 1),
    "rows128-nochain": (D(tile_rows=128, chain_tiles=False), 1),
    "bits": (D(decode="bits"), 1),
    "epi128": (D(epi_tile=128), 1),
    "2cta": (D(), 2),
    "rows128-2cta": (D(tile_rows=128), 2),
}


def forced_fold(fold: bool):
  """qlinear_xla.w4a16_folds_rotation replaced by a constant (both implementations read it at
  trace time); returns a function that restores it."""
  real = qlinear_xla.w4a16_folds_rotation
  qlinear_xla.w4a16_folds_rotation = lambda m, layer: fold
  return lambda: setattr(qlinear_xla, "w4a16_folds_rotation", real)


def rel_err_device(out, ref) -> float:
  """||out - ref|| / ||ref|| in f32 on the device (the outputs stay there; ample precision for
  differences of ~1e-3)."""
  out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
  return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def main():
  only = os.environ.get("ONLY")
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "command": "PYTHONPATH=. python3 benchmarks/w4a16_fold.py"
                    + (f" (ONLY={only})" if only else ""),
         "fold_min_rows": qlinear_xla.W4A16_FOLD_MIN_ROWS, "rows": []}
  out_dir = os.environ.get("OUT", "benchmarks/results")
  cogvideox = [s for s in SHAPES if s[0] != "8192^3"]  # first: where the fold should pay
  for name, m, k, n in cogvideox + [s for s in SHAPES if s not in cogvideox]:
    if only and name not in [s.strip() for s in only.split(",")]:
      continue
    p = make_problem(m, k, n, 0)
    x, layer = p["x"], p["layer"]
    row = {"shape": name, "m": m, "k": k, "n": n, "us": {}, "err": {},
           "folds": qlinear_xla.w4a16_folds_rotation(m, layer)}
    res["rows"].append(row)

    def bench(key, fn, args):
      """Times fn(*args); returns its output (None if it failed)."""
      try:
        out = jax.block_until_ready(jax.jit(lambda *a: fn(*a))(*args))
        row["us"][key] = time_fn(fn, [args]) * 1e3
        ratio = row["us"]["xla_bf16"] / row["us"][key] if "xla_bf16" in row["us"] else 1.0
        print(f"{name:16s} {key:24s} {row['us'][key]:10.1f} us  {ratio:6.3f}x bf16", flush=True)
        return out
      except Exception as e:  # one failure must not lose the run
        row["us"][key] = f"{type(e).__name__}: {str(e)[:300]}"
        print(name, key, "FAILED", row["us"][key], flush=True)
        return None

    bench("xla_bf16", bf16_dot, (x, p["w_bf16"]))
    outs = {}
    for form, fold in FORMS.items():  # each form forced; the default is one of them
      restore = forced_fold(fold)
      try:
        out = bench(f"mosaic_w4a16[{form}]", lambda *a: qlinear_mosaic.w4a16(*a), (x, layer))
        if out is None:
          continue
        outs[form] = out
        if form == "fold":  # same arithmetic as the xla path's folded form
          xla = jax.jit(lambda *a: qlinear_xla.w4a16(*a))(x, layer)
          row["err"]["fold_vs_xla"] = rel_err_device(outs[form], xla)
          del xla
      except Exception as e:
        row["err"][form] = f"{type(e).__name__}: {str(e)[:300]}"
      finally:
        restore()
    qlinear_mosaic.DEROTATE_KERNEL = False
    restore = forced_fold(True)
    try:
      bench("mosaic_w4a16[fold-tc]", lambda *a: qlinear_mosaic.w4a16(*a), (x, layer))
    finally:
      qlinear_mosaic.DEROTATE_KERNEL = True
      restore()
    wd_ref = jax.jit(qlinear_xla.weight_derotated)(layer).astype(jnp.float32)
    ref_rms = float(jnp.sqrt(jnp.mean(wd_ref ** 2)))

    def check_weight(key, wd):
      if wd is not None:
        d = jnp.abs(wd.astype(jnp.float32) - wd_ref)
        row["err"][f"{key}_differ_frac"] = float(jnp.mean(d > 0))
        row["err"][f"{key}_max_over_rms"] = float(jnp.max(d)) / ref_rms

    check_weight("derotate[tc]", bench("derotate[tc]", qlinear_mosaic.weight_derotated_tc,
                                       (layer,)))
    hb = layer.hadamard_block
    for variant, (cfg, per_sm) in DEROTATE_VARIANTS.items():
      key = f"derotate[{variant}]"
      if not nvfp4_derotate.supported((n, k), hb, cfg):
        continue
      sms = per_sm * w8a8.num_sms() if jax.default_backend() == "gpu" else None
      check_weight(key, bench(key, lambda t, cfg=cfg, sms=sms: nvfp4_derotate.derotate(
          t, hb, config=cfg, interpret=qlinear_mosaic.interpret_params(), sms=sms),
          (layer.weight,)))
    wd = bench("derotate", qlinear_mosaic.weight_derotated_bf16, (layer,))
    check_weight("derotate", wd)
    del wd_ref
    bench("bf16_gemm", lambda a, b: w8a8.bf16_matmul(
        a, b, layer.weight.global_scale, layer.bias,
        interpret=qlinear_mosaic.interpret_params()), (x, wd))
    try:
      row["derotate_launches"] = kernel_breakdown(qlinear_mosaic.weight_derotated_bf16, (layer,))
    except Exception as e:
      row["derotate_launches"] = f"{type(e).__name__}: {str(e)[:300]}"
    sample = np.random.default_rng(0).choice(m, min(m, SAMPLE_ROWS), replace=False)
    want = w4a16_exact_f64(np.asarray(x[sample]), layer)
    for form, o in outs.items():
      row["err"][f"{form}_vs_exact"] = rel_err(np.asarray(o[sample]), want)
    if len(outs) == 2:
      row["err"]["fold_vs_nofold"] = rel_err_device(outs["fold"], outs["nofold"])
    print(name, "errors", row["err"], "derotate launches", row.get("derotate_launches"),
          flush=True)
    del outs, wd, p
    # after every shape (atomically): a call's time limit keeps the shapes done
    dev = res["device"].replace(" ", "_").replace("/", "_")
    path = atomic.write_json(os.path.join(out_dir, f"w4a16_fold-{dev}.json"), res)
    print("wrote", path, flush=True)


if __name__ == "__main__":
  main()
