"""`mpqjax profile`: a jax.profiler trace of a few denoising steps and where their time goes.

  mpqjax profile --prompt "a red circle moving left" --steps 3 --out prof   # shipped toy model
  mpqjax profile --model CKPT --prompt-embeds emb.npy --precision mixed --calibration c.json

Compiles and runs generate once (warm-up), then runs it again inside jax.profiler.trace: the
trace lands in OUT/plugins/profile/<run>/ (*.xplane.pb for TensorBoard/XProf,
perfetto_trace.json.gz for ui.perfetto.dev). It prints the time per step by category (attention;
block linears by activation mode; quantize/dequant/Hadamard; norms+modulation; TDC/DMPQ
bookkeeping; other), read from the trace through the model's named scopes, and the idle time
between device ops per step (on a GPU: where the device waits on the host, e.g. for the
predicates of lax.cond / lax.switch). OUT/profile.json holds the full report. Model, text and
method flags are generate's (see `mpqjax generate --help`).
"""
from __future__ import annotations

import argparse
import os

from mpqjax import atomic
from mpqjax.errors import UserInputError
from mpqjax.method import defaults


def add_arguments(p: argparse.ArgumentParser) -> None:
  from mpqjax import generate_cli
  generate_cli.add_method_arguments(p, model_required=False)
  p.set_defaults(steps=3)
  p.add_argument("--precision", choices=generate_cli.PRECISIONS, default="mixed",
                 help="activation precision of the block linears (default mixed)")
  p.add_argument("--calibration", metavar="FILE", help="DMPQ calibration JSON (mixed)")
  p.add_argument("--tau", type=float, default=None, help="predictor threshold")
  p.add_argument("--tdc", action=argparse.BooleanOptionalAction, default=True,
                 help="Temporal Delta Cache (default on)")
  p.add_argument("--tdc-threshold", type=float, default=None,
                 help=f"tau_tdc (default {defaults.DEFAULT_TDC_THRESHOLD:g})")
  p.add_argument("--tdc-warmup", type=int, default=None,
                 help="first steps that always compute (default max(2, 10%% of steps))")
  p.add_argument("--attention", choices=("bf16", "int8"), default="bf16",
                 help="attention precision (default bf16)")
  p.add_argument("--gap-threshold-us", type=float, default=5.0,
                 help="idle gaps longer than this are counted (default 5 us)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="mpqjax-profile",
                 help="trace and profile.json folder (default ./mpqjax-profile)")
  p.set_defaults(negative_prompt="", progress=False, outlier_threshold=None)


def run(args: argparse.Namespace) -> int:
  from mpqjax import generate_cli
  generate_cli.check_common(args)
  if args.steps > 50:
    raise UserInputError(f"--steps {args.steps}: profile a few steps (at most 50); the trace of "
                         "every kernel grows with each step")
  if args.tdc_threshold is not None and not args.tdc_threshold >= 0:
    raise UserInputError(f"--tdc-threshold must be >= 0, got {args.tdc_threshold}")
  if args.tdc_warmup is not None and args.tdc_warmup < 0:
    raise UserInputError(f"--tdc-warmup must be >= 0, got {args.tdc_warmup}")
  if not args.gap_threshold_us >= 0:
    raise UserInputError(f"--gap-threshold-us must be >= 0, got {args.gap_threshold_us}")
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise NotADirectoryError(f"--out {args.out} exists and is not a folder")
  shape = generate_cli.parse_latent_shape(args.latent_shape)
  if args.model is None:
    from mpqjax.toyvideo import cli as toy
    toy.apply_defaults(args)
  from mpqjax.method.calibration import Calibration
  calib = Calibration.load(args.calibration) if args.calibration else None
  if calib is not None and args.precision != "mixed":
    raise UserInputError(f"--calibration is for --precision mixed, not {args.precision}")
  model, pos, neg, _, sched = generate_cli.load_for_method(args,
                                                           quantized=args.precision != "bf16")
  if pos.shape[0] != 1:
    raise UserInputError(f"profile takes one prompt; got {pos.shape[0]}")
  from mpqjax import profiling
  kw = {k: getattr(args, k) for k in ("tdc_threshold", "tdc_warmup")
        if getattr(args, k) is not None}
  report = profiling.profile_generate(
      model, pos[0], args.out, steps=args.steps, gap_threshold_us=args.gap_threshold_us,
      negative_emb=None if neg is None else neg[0], latent_shape=shape, seed=args.seed,
      guidance=args.guidance, dynamic_cfg=args.dynamic_cfg, scheduler=sched,
      precision=args.precision, calibration=calib, tau=args.tau, tdc=args.tdc,
      implementation=args.implementation, attention_precision=args.attention, **kw)
  path = os.path.join(args.out, "profile.json")
  atomic.write_json(path, report, default=str)
  print(profiling.format_report(report))
  print(f"trace: {report['trace']} (open in ui.perfetto.dev; the .xplane.pb beside it in "
        f"TensorBoard/XProf)\nreport: {path}")
  return 0
