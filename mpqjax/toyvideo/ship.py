"""Package a trained toy model for shipping: the pre-quantized NVFP4 copy of its block linears and
its DMPQ calibration (mpqjax.calibrate on grammar prompts drawn from a fixed seed), written next
to the weights; the Γ–E_rel scatter goes to --plot.

  python -m mpqjax.toyvideo.ship [--folder mpqjax/toyvideo/weights] [--prompts 8 --steps 50]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from mpqjax.toyvideo import weights

CALIB_SEED = 777  # dataset seed of the calibration prompts (quality.py evaluates other prompts)


def calibration_prompts(n: int) -> list[str]:
  from mpqjax.toyvideo import data
  _, caps, _ = data.sample(CALIB_SEED, n)
  return caps


def make_calibration(model, prompts, *, seeds=(0,), steps: int = 50, guidance: float = 6.0,
                     target_bits: float = 6.0):
  """(Calibration, samples) of the toy model on `prompts` (empty prompt as the negative)."""
  from mpqjax.calibrate import calibrate
  pos, neg = model.encode(prompts)
  calib, samples = calibrate(model, pos, negative_embs=neg, seeds=seeds, steps=steps,
                             guidance=guidance, scheduler=model.scheduler_config(),
                             target_bits=target_bits)
  calib.extra.update(prompts=list(prompts), guidance=guidance, model_path="toyvideo (shipped)")
  return calib, samples


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--folder", default=weights.WEIGHTS_DIR)
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--plot", default="benchmarks/results/toyvideo_calibration.png")
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  print("wrote", weights.save_prequantized(args.folder), flush=True)
  model = weights.load(args.folder)
  calib, samples = make_calibration(model, calibration_prompts(args.prompts), steps=args.steps)
  path = weights.calibration_path(args.folder)
  calib.save(path)
  from mpqjax.calibrate import scatter_png
  os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
  scatter_png(samples, calib, args.plot)
  print(f"wrote {path} and {args.plot}: Pearson r overall {calib.pearson_r_overall:.3f}, "
        f"tau {calib.tau:.4g} ({time.perf_counter() - t0:.0f}s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
