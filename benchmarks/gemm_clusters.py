"""2-CTA clusters in the large-M GEMM (pallas_kernels/w8a8_matmul.py, int8 and bf16 operands)
against its unclustered configs and XLA, and the qlinear paths that run on it (issues 6, 7).

  PYTHONPATH=. python3 benchmarks/gemm_clusters.py   (env: OUT=dir for the JSON,
      ONLY=name,... e.g. ONLY="2B K1920 N7680,8192^3"; E2E=0 skips the qlinear rows;
      VARIANTS=0 times only the defaults: XLA's bf16 dot, the picked kernels, the qlinear paths)

Per shape, CUPTI device time (benchmarks.kernels.time_fn) of:
- XLA's bf16 dot (the baseline), XLA's s8 dot with the scales and bias, and XLA's bf16 dot with
  f32 output and the same epilogue (what the bf16 kernel replaces);
- the kernel with pick_config's config and with clusters along M / N, int8 and bf16 operands;
- MOSAIC.w4a8 and MOSAIC.w4a16 end to end with pick_config's config and with the fastest
  clustered one of this run (E2E=1, the default).
Errors are relative to w8a8_matmul.reference (the same f32 epilogue). Writes
$OUT/gemm_clusters.json with device, JAX version, date and command.
"""
import dataclasses
import datetime
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
from benchmarks.kernels import M_2B, bf16_dot, make_problem, time_fn  # noqa: E402
from mpqjax import atomic  # noqa: E402
from mpqjax.testing import rel_err  # noqa: E402
from pallas_kernels import qlinear_mosaic  # noqa: E402
from pallas_kernels import w8a8_matmul as w8a8  # noqa: E402

SHAPES = [("8192^3", 8192, 8192, 8192), ("2B K1920 N7680", M_2B, 1920, 7680),
          ("2B K7680 N1920", M_2B, 7680, 1920), ("2B K1920 N1920", M_2B, 1920, 1920),
          ("5B K3072 N3072", M_2B, 3072, 3072), ("5B K3072 N12288", M_2B, 3072, 12288),
          ("5B K12288 N3072", M_2B, 12288, 3072)]


PICK_CONFIG = w8a8.pick_config  # the module's, before the e2e rows patch it


def session12_config(m, n, k, dtype):
  """pick_config's choice before chained tiles and clusters: 4 bf16 / 3 int8 stages."""
  bf16 = jnp.dtype(dtype) == jnp.bfloat16
  return dataclasses.replace(PICK_CONFIG(m, n, k, dtype=dtype), chain_tiles=False,
                             cluster_dimension=None, grid_tile_width=8,
                             max_concurrent_steps=4 if bf16 else 3, epi_tile_n=32 if bf16 else 64)


def variants(m, n, k, dtype):
  """{name: config}: session 12's, pick_config's without and with chained tiles, then
  clustered forms of it that tile (m, n, k); each distinct config once (the first name)."""
  base = w8a8.pick_config(m, n, k, dtype=dtype)
  out = {"s12": session12_config(m, n, k, dtype),
         "nochain": dataclasses.replace(base, chain_tiles=False), "default": base}
  for cd in (w8a8.Dim.M, w8a8.Dim.N):
    c = dataclasses.replace(base, cluster_dimension=cd)
    if cd == w8a8.Dim.N and n % (2 * c.cta_tile_n):
      continue
    out[f"cluster{cd.name}"] = c
  if "clusterM" in out:
    out["clusterM_w16"] = dataclasses.replace(out["clusterM"], grid_tile_width=16)
    if out["clusterM"].epi_tile_n != 64:
      out["clusterM_epi64"] = dataclasses.replace(out["clusterM"], epi_tile_n=64)
    out["clusterM_gM"] = dataclasses.replace(out["clusterM"], grid_minor_dim=w8a8.Dim.M)
  seen = set()
  return {name: c for name, c in out.items() if not (c in seen or seen.add(c))}


def main():
  only = os.environ.get("ONLY")
  res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "command": "PYTHONPATH=. python3 benchmarks/gemm_clusters.py"
                    + (f" (ONLY={only})" if only else "")
                    + (" (E2E=0)" if os.environ.get("E2E") == "0" else "")
                    + (" (VARIANTS=0)" if os.environ.get("VARIANTS") == "0" else ""),
         "rows": []}
  out_dir = os.environ.get("OUT", "benchmarks/results")
  for name, m, k, n in SHAPES:
    if only and name not in [s.strip() for s in only.split(",")]:
      continue
    p = make_problem(m, k, n, 0)
    ones = jnp.ones((m,), jnp.float32)
    g = p["layer"].weight.global_scale
    row = {"shape": name, "m": m, "k": k, "n": n, "us": {}, "err": {}, "config": {}}
    res["rows"].append(row)

    def bench(key, fn, args, ref=None):
      try:
        o = jax.jit(lambda *a: fn(*a))(*args)
        if ref is not None:
          row["err"][key] = rel_err(o, ref)
        row["us"][key] = time_fn(fn, [args]) * 1e3
        print(f"{name:16s} {key:28s} {row['us'][key]:10.1f} us  "
              f"{2 * m * n * k / row['us'][key] / 1e6:7.1f} T/s  err={row['err'].get(key, '-')}",
              flush=True)
      except Exception as e:  # one failure must not lose the run
        row["err"][key] = f"{type(e).__name__}: {str(e)[:300]}"
        print(name, key, "FAILED", row["err"][key], flush=True)

    bench("xla_bf16", bf16_dot, (p["x"], p["w_bf16"]))
    quick = os.environ.get("VARIANTS") == "0"
    s8_args = (p["xq"], p["w8"], p["xs"], p["ws"], p["bias"])
    ref_s8 = jax.jit(w8a8.reference)(*s8_args)
    bf_args = (p["x"], p["w_bf16"], ones, jnp.broadcast_to(g, (n,)), p["bias"])
    ref_bf = jax.jit(w8a8.reference)(*bf_args)
    if not quick:
      bench("xla_s8_scaled", w8a8.reference, s8_args)
      bench("xla_bf16_f32_epilogue", w8a8.reference, bf_args)
    best = {}
    for dtype, args, ref in ((jnp.int8, s8_args, ref_s8), (jnp.bfloat16, bf_args, ref_bf)):
      tag = "s8" if dtype == jnp.int8 else "bf16"
      for vname, cfg in variants(m, n, k, dtype).items():
        if quick and vname != "default":
          continue
        key = f"{tag}[{vname}]"
        row["config"][key] = str(cfg)
        bench(key, lambda *a, cfg=cfg: w8a8.w8a8_matmul(*a, config=cfg), args, ref)
        if vname not in ("s12", "nochain") and key in row["us"] and (
            tag not in best or row["us"][key] < row["us"][best[tag][0]]):
          best[tag] = (key, cfg)
    try:  # the chained int8 kernel's raw int32 sums, bit for bit against XLA's s8 dot
      got = jax.jit(lambda a, b: w8a8.w8a8_matmul(a, b, p["xs"], p["ws"], out_dtype=jnp.int32))(
          p["xq"], p["w8"])
      want = jax.jit(lambda *a: w8a8.reference(*a, out_dtype=jnp.int32))(
          p["xq"], p["w8"], p["xs"], p["ws"])
      row["s8_int32_exact"] = bool(jnp.array_equal(got, want))
      print(name, "s8 int32 exact:", row["s8_int32_exact"], flush=True)
      del got, want
    except Exception as e:
      row["s8_int32_exact"] = f"{type(e).__name__}: {str(e)[:300]}"
    del ref_s8, ref_bf
    if os.environ.get("E2E") == "0":
      continue
    pick = w8a8.pick_config
    for tag, path in (("s8", qlinear_mosaic.w4a8), ("bf16", qlinear_mosaic.w4a16)):
      pname = "mosaic_w4a8" if tag == "s8" else "mosaic_w4a16"
      bench(pname, path, (p["x"], p["layer"]))
      alts = {"s12": lambda m_, n_, k_, sms=None, dtype=jnp.int8: session12_config(m_, n_, k_, dtype)}
      if quick:
        alts = {}
      if tag in best:
        b = best[tag][1]
        alts[best[tag][0]] = lambda *a, b=b, **kw: dataclasses.replace(pick(*a, **kw), **{
            f: getattr(b, f) for f in ("cluster_dimension", "grid_tile_width", "epi_tile_n",
                                       "grid_minor_dim")})
      for alt, fn in alts.items():  # every large-M pick replaced
        w8a8.pick_config = fn
        try:
          bench(f"{pname}[{alt}]", path, (p["x"], p["layer"]))
        finally:
          w8a8.pick_config = pick
  path = atomic.write_json(os.path.join(out_dir, "gemm_clusters.json"), res)
  print("wrote", path)


if __name__ == "__main__":
  main()
