"""`mpqjax calibrate`: fit the DMPQ predictor on prompts x seeds and pick τ.

  mpqjax calibrate --model CKPT --prompt-embeds embs.npy --seeds 0,1 --steps 20 \
                   --target-bits 6 --out calib.json [--plot scatter.png]

Records (Γ_b(t−1), E_rel(l,t)) for every block linear and step, fits E_rel ≈ α_l Γ + β_l by
least squares, prints Pearson r per linear kind and overall, chooses τ so the average nominal
activation width hits --target-bits, writes the versioned JSON and a Γ–E_rel scatter PNG
(default: the JSON path with .png).
"""
from __future__ import annotations

import argparse
import os

from mpqjax.errors import UserInputError
from mpqjax.generate_cli import add_method_arguments, check_common, load_for_method


def add_arguments(p: argparse.ArgumentParser) -> None:
  add_method_arguments(p)
  p.set_defaults(steps=20)
  p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
  p.add_argument("--target-bits", type=float, default=6.0,
                 help="average activation bits to pick tau for (4..8, default 6)")
  p.add_argument("--trajectory-precision", choices=("int8", "nvfp4", "bf16"), default="int8",
                 help="precision the calibration trajectories run in (default int8)")
  p.add_argument("--out", required=True, help="calibration JSON to write")
  p.add_argument("--plot", default=None, help="scatter PNG (default: OUT with .png)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run(args: argparse.Namespace) -> int:
  from mpqjax.calibrate import calibrate, scatter_png
  check_common(args)
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    raise UserInputError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
  if not seeds:
    raise UserInputError("--seeds is empty")
  if not 4.0 <= args.target_bits <= 8.0:
    raise UserInputError(f"--target-bits must be in [4, 8], got {args.target_bits}")
  if args.steps < 2:
    raise UserInputError(f"--steps must be >= 2 for calibration, got {args.steps}")
  if os.path.exists(args.out) and not args.overwrite:
    raise FileExistsError(f"{args.out} exists (pass --overwrite to replace it)")
  from mpqjax.generate_cli import parse_latent_shape
  shape = parse_latent_shape(args.latent_shape)
  model, pos, neg, _, sched = load_for_method(args, quantized=True)
  calib, samples = calibrate(model, pos, negative_embs=neg, seeds=seeds, steps=args.steps,
                             target_bits=args.target_bits, precision=args.trajectory_precision,
                             guidance=args.guidance, scheduler=sched, latent_shape=shape,
                             implementation=args.implementation)
  calib.extra["model_path"] = os.path.abspath(args.model)
  calib.save(args.out)
  plot = args.plot or os.path.splitext(args.out)[0] + ".png"
  scatter_png(samples, calib, plot)
  print(f"wrote {args.out} and {plot}")
  print(f"pairs {calib.extra['n_pairs']}, Pearson r overall {calib.pearson_r_overall:.4f}, mean "
        f"per linear {calib.extra['pearson_r_mean_per_linear']:.4f}; tau {calib.tau:.6g} for "
        f"{args.target_bits} bits")
  for name, r in calib.extra["pearson_r_by_linear_name"].items():
    print(f"  r({name}) = {r:.4f} (mean over blocks)")
  return 0
