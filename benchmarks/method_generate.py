"""The method's generate loop on one device: wall time per denoising step of each precision and
of TDC, as ratios against the unquantized bf16 baseline measured in the same run.

  PYTHONPATH=. python benchmarks/method_generate.py [--preset cogvideox-2b] [--layers 8]
      [--frames 13 --height 60 --width 90] [--steps 6] [--out benchmarks/results]

Random weights (init_params, bf16) at the preset's width with --layers blocks, the full
CogVideoX token count by default (13 latent frames x 60 x 90 -> 17,550 video + 226 text
tokens, CFG batch 2). Each mode is compiled, run once to warm up, then timed over --reps runs
(block_until_ready). On random weights the TDC decisions mean nothing, so TDC is run with a
permissive threshold to measure what skipping saves: the skip ratio is reported beside the time.
Writes method_generate-<device>.json (device, JAX version, date, command, every number).
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import types


def main(argv=None) -> int:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from models.cogvideox.config import PRESETS
  from models.cogvideox.params import init_params, quantize_blocks
  from mpqjax import atomic
  from mpqjax import generate as G

  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="cogvideox-2b", choices=sorted(PRESETS))
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--frames", type=int, default=13)
  p.add_argument("--height", type=int, default=60)
  p.add_argument("--width", type=int, default=90)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--reps", type=int, default=2)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args(argv)

  cfg = PRESETS[args.preset].replace(num_layers=args.layers)
  t0 = time.perf_counter()
  raw = init_params(cfg, 0, dtype=jnp.bfloat16)
  quant = quantize_blocks(raw)
  setup_s = time.perf_counter() - t0
  text = np.random.default_rng(1).standard_normal((cfg.max_text_seq_length, cfg.text_embed_dim))
  text = text.astype(np.float32)
  shape = (args.frames, args.height, args.width)
  modes = {
      "bf16": dict(params=raw, precision="bf16", tdc=False),
      "w4a16": dict(params=quant, precision="bf16", tdc=False),
      "int8": dict(params=quant, precision="int8", tdc=False),
      "nvfp4": dict(params=quant, precision="nvfp4", tdc=False),
      "mixed": dict(params=quant, precision="mixed", tau="median", tdc=False),
      "mixed+tdc": dict(params=quant, precision="mixed", tau="median", tdc=True, tdc_threshold=1e9,
                        tdc_error_bound=1e9, tdc_warmup=2),
      "bf16+tdc": dict(params=raw, precision="bf16", tdc=True, tdc_threshold=1e9,
                       tdc_error_bound=1e9, tdc_warmup=2),
  }
  results = {}
  gammas = None  # Γ of the int8 run, which comes before the modes with tau="median"
  for name, kw in modes.items():
    kw = dict(kw)
    if kw.get("tau") == "median":
      # uncalibrated predictor (pred = Γ_b(t−1)); τ = the median Γ of the int8 run -> ~6 bits
      kw["tau"] = float(np.nanmedian(gammas))
    model = types.SimpleNamespace(config=cfg, params=kw.pop("params"))
    run = lambda: G.generate(model, text, latent_shape=shape, steps=args.steps, seed=0, **kw)
    t0 = time.perf_counter()
    r = run()
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(args.reps):
      t0 = time.perf_counter()
      r = run()  # generate returns host arrays: the device work is complete
      times.append(time.perf_counter() - t0)
    best = min(times)
    if name == "int8":
      gammas = r.stats["gamma"][1:]
    s = r.summary
    results[name] = {"seconds": best, "seconds_per_step": best / args.steps,
                     "first_call_seconds": first_s, "skip_ratio": s["skip_ratio"],
                     "avg_activation_bits": s["avg_activation_bits"],
                     "mode_counts": s["linear_mode_counts"],
                     "tdc_cache_bytes": s["tdc_cache_bytes"], "weight_bytes": s["weight_bytes"],
                     "finite": bool(np.isfinite(r.latents).all())}
    print(f"{name:10s} {best:8.3f} s ({best / args.steps * 1e3:8.1f} ms/step) first "
          f"{first_s:6.1f} s skip {s['skip_ratio']:.2f} bits {s['avg_activation_bits']}",
          flush=True)
  base = results["bf16"]["seconds"]
  for v in results.values():
    v["speedup_vs_bf16"] = base / v["seconds"]
  dev = jax.devices()[0]
  out = {"benchmark": "method_generate", "device": dev.device_kind, "backend": jax.default_backend(),
         "jax_version": jax.__version__, "date": datetime.datetime.now(datetime.timezone.utc)
         .isoformat(timespec="seconds"), "command": " ".join(["python", *sys.argv]),
         "config": {"preset": args.preset, "layers": args.layers, "latent_shape": shape,
                    "steps": args.steps, "cfg_batch": 2,
                    "video_tokens": args.frames * (args.height // 2) * (args.width // 2),
                    "text_tokens": cfg.max_text_seq_length},
         "setup_seconds": setup_s, "results": results}
  kind = dev.device_kind.replace(" ", "_").lower()
  path = atomic.write_json(os.path.join(args.out, f"method_generate-{kind}.json"), out)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
