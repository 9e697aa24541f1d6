"""The NVFP4 kernel's decode variants side by side (issue 7), and the W4A16 / W4A4 paths' parts.

  PYTHONPATH=. python3 benchmarks/nvfp4_decode.py   (env: OUT=dir for the JSON, ONLY=MxKxN,...,
  KERNEL_ONLY=1: the kernel rows only)

Per shape, CUPTI device time (benchmarks.kernels.time_fn) of:
- XLA's bf16 dot (the baseline);
- pick_config's kernel with the "perm" decode (the default, with its K chunks at small M), on
  x already in its K order (permute_x, the copy that makes it, timed apart); the same with
  "bits"; at small M also other K chunk counts, the stored e4m3 block scales (also a
  default), other K steps (512-wide also with 8 chunks) and split-K, and where the default
  steps are 64 wide (2B K1920) fewer splits with 128 / 256-wide chunked steps;
- the per-call pre-passes (weight_operands, rotation);
- MOSAIC.w4a16 / w4a4 end to end with the "perm" decode, with "bits", and at small M with
  the e4m3 scales; for w4a16 also each launch's time ("parts"), and the rotation + kernel
  with the K order made by a copy instead of folded into the rotation (w4a16_unfolded).
Errors are relative to nvfp4_matmul.reference.
Writes $OUT/nvfp4_decode.json with device, JAX version, date and command.
"""
import json, os, sys, datetime
import jax, jax.numpy as jnp
sys.path.insert(0, ".")
from benchmarks.kernels import time_fn, make_problem, bf16_dot, kernel_breakdown
from mpqjax.testing import rel_err
from pallas_kernels import nvfp4_matmul as nm, nvfp4_quant, qlinear_mosaic
out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
       "command": "PYTHONPATH=. python3 benchmarks/nvfp4_decode.py "
                  + (f"(ONLY={os.environ['ONLY']})" if os.environ.get("ONLY") else "")
                  + (" (KERNEL_ONLY=1)" if os.environ.get("KERNEL_ONLY") else ""),
       "rows": []}
shapes = [(64, 3072, 12288), (64, 3072, 3072), (64, 1920, 7680), (64, 12288, 3072),
          (256, 3072, 12288), (2048, 1920, 1920), (64, 1920, 1920), (64, 7680, 1920),
          (16, 3072, 12288), (256, 1920, 7680), (2048, 3072, 12288), (8192, 8192, 8192)]
only = os.environ.get("ONLY")
for (m, k, n) in shapes:
  if only and f"{m}x{k}x{n}" not in only.split(","): continue
  probs = [make_problem(m, k, n, s) for s in range(3 if m * k < 1e8 else 2)]
  row = {"m": m, "k": k, "n": n, "us": {}, "err": {}}
  def bench(key, fn, pick, ref=None, parts=False):
    try:
      sets = [pick(p) for p in probs]
      o = jax.jit(lambda *a: fn(*a))(*sets[0])  # a fresh trace under the current settings
      if ref is not None: row["err"][key] = rel_err(o, ref)
      row["us"][key] = time_fn(fn, sets) * 1e3
      print(f"{m}x{k}x{n} {key:40s} {row['us'][key]:9.2f} us err={row['err'].get(key,'-')}", flush=True)
      if parts:  # launch by launch, to see where an end-to-end time goes
        row.setdefault("parts", {})[key] = kernel_breakdown(fn, sets[0])
        print("   ", "; ".join(f"{nm_[:40]} {t:.2f}" for nm_, t in row["parts"][key]), flush=True)
    except Exception as e:
      row["err"][key] = f"{type(e).__name__}: {str(e)[:300]}"; print(key, "FAILED", row["err"][key], flush=True)
  for p in probs:
    w4, ws, g = nm.weight_operands(p["layer"].weight)
    p["w4"], p["ws"], p["cs"] = w4, ws, p["layer"].weight.global_scale * g
    p["xp"] = jax.jit(nm.permute_k)(p["x"])  # the "perm" kernels' K order, made outside the timing
  pick = lambda p: (p["x"], p["w4"], p["ws"], p["cs"], p["bias"])
  pick_p = lambda p: (p["xp"], p["w4"], p["ws"], p["cs"], p["bias"])
  ref = jax.jit(nm.reference)(*pick(probs[0]))
  bench("xla_bf16", bf16_dot, lambda p: (p["x"], p["w_bf16"]))
  nm.DEFAULT_DECODE = "perm"  # the default; "bits" timed beside it
  nm.SMALL_M_E4M3_SCALES = False  # the stored e4m3 scales (default at small M) timed apart
  base = nm.pick_config(m, n, k)  # with the e4m3 scales off (above), K chunks as the default
  rep = lambda **kw: nm.replace_config(base, **kw)
  cfgs = {"perm": base, "bits": rep(decode="bits")}
  if m <= 128:
    for tk, st in ((512, 2), (128, 6)):
      c = rep(tile_k=tk, max_concurrent_steps=st)
      if nm.supported(m, n, k, c) and (k // c.k_splits) // tk >= 2:
        cfgs[f"perm_k{tk}s{st}"] = c
        if tk == 512:  # the widest step with more chunks: less of the last chunk's MMA exposed
          cfgs[f"perm_k{tk}s{st}_ch8"] = nm.replace_config(c, decode_chunks=8)
    if base.k_splits > 1:
      cfgs["perm_ks_half"] = rep(k_splits=base.k_splits // 2)
    if base.tile_k == 64:  # (2B K1920 shapes) fewer splits for K steps wide enough to chunk
      for ks in sorted({1, base.k_splits // 2} - {0, base.k_splits}):
        for tk in (128, 256):
          c = rep(k_splits=ks, tile_k=tk, max_concurrent_steps=4 if tk == 128 else 3,
                  decode_chunks=tk // 64)
          if k % (ks * tk) == 0 and k // (ks * tk) >= 2:
            cfgs[f"perm_ks{ks}_k{tk}_ch{tk // 64}"] = c
    for ch in (1, 2, 4):  # K-chunked decode + wgmma within a step
      if base.tile_k % (64 * ch) == 0 and ch != base.decode_chunks:
        cfgs[f"perm_ch{ch}"] = rep(decode_chunks=ch)
  if base.tile_k >= 256:
    for p in probs: p["ws8"] = nm.weight_operands(p["layer"].weight, e4m3_scales=True)[1]
    c8 = rep(e4m3_scales=True)
    for ch in (1, 2, 4):
      c8c = nm.replace_config(c8, decode_chunks=ch)
      bench(f"kernel[perm_e4m3_ch{ch}]",
            lambda x, w4, ws, cs, b, c=c8c: nm.nvfp4_matmul(x, w4, ws, cs, b, config=c,
                                                            x_permuted=True),
            lambda p: (p["xp"], p["w4"], p["ws8"], p["cs"], p["bias"]), ref)
  for name, c in cfgs.items():
    perm = c.decode == "perm"
    bench(f"kernel[{name}]", lambda x, w4, ws, cs, b, c=c, perm=perm: nm.nvfp4_matmul(
        x, w4, ws, cs, b, config=c, x_permuted=perm), pick_p if perm else pick, ref)
  bench("permute_x", nm.permute_k, lambda p: (p["x"],))  # what the wrapper adds unfolded
  if m <= 2048 and not os.environ.get("KERNEL_ONLY"):
    bench("weight_operands", lambda t: nm.weight_operands(t)[:2], lambda p: (p["layer"].weight,))
    bench("rotate_bf16", lambda x: nvfp4_quant.rotate(x, 128).astype(jnp.bfloat16), lambda p: (p["x"],))
    nm.DEFAULT_DECODE = "bits"
    bench("mosaic_w4a16[bits]", qlinear_mosaic.w4a16, lambda p: (p["x"], p["layer"]), parts=True)
    nm.DEFAULT_DECODE = "perm"
    bench("mosaic_w4a16", qlinear_mosaic.w4a16, lambda p: (p["x"], p["layer"]), parts=True)
    bench("w4a16_unfolded", lambda x, w4, ws, cs, b: nm.nvfp4_matmul(nvfp4_quant.rotate(x, 128).astype(jnp.bfloat16), w4, ws, cs, b), pick)
    bench("mosaic_w4a4", qlinear_mosaic.w4a4, lambda p: (p["x"], p["layer"]))
    nm.DEFAULT_DECODE = "bits"
    bench("mosaic_w4a4[bits]", qlinear_mosaic.w4a4, lambda p: (p["x"], p["layer"]))
    nm.DEFAULT_DECODE = "perm"
    if m <= 128:
      nm.SMALL_M_E4M3_SCALES = True
      bench("mosaic_w4a16[e4m3]", qlinear_mosaic.w4a16, lambda p: (p["x"], p["layer"]), parts=True)
      bench("mosaic_w4a4[e4m3]", qlinear_mosaic.w4a4, lambda p: (p["x"], p["layer"]))
      nm.SMALL_M_E4M3_SCALES = False
  out["rows"].append(row)
  with open(os.path.join(os.environ.get("OUT", "/tmp"), "nvfp4_decode.json"), "w") as f:
    json.dump(out, f, indent=1)
