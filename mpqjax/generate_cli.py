"""`mpqjax generate`: run the method (DMPQ mixed precision + Temporal Delta Cache) end to end.

  mpqjax generate --model CKPT --prompt-embeds emb.npy [--precision mixed --calibration c.json]
                  [--tdc/--no-tdc --tdc-threshold 0.15] [--steps 50 --guidance 6 --seed 0]
                  --out DIR
  mpqjax generate --model PIPELINE_FOLDER --prompt "a panda ..." --out DIR

--model is a converted transformer (`mpqjax convert`; no text encoder or decoder: text comes as
embeddings from a .npy and the output is DIR/latents.npy) or a diffusers CogVideoX pipeline
folder (model_index.json: T5 + transformer + VAE; the output is DIR/video.mp4 and the latents).
Both write DIR/report.json: the settings, summaries (skip ratio, average activation bits,
weight bytes and bits, TDC memory) and the per-step, per-block stats. Files are written
atomically. Bad input (missing model, wrong shapes, a calibration for another model or
version, bad flags) exits with code 2 and a message naming the culprit.
"""
from __future__ import annotations

import argparse
import json
import os

from mpqjax import atomic
from mpqjax.errors import UserInputError
from mpqjax.method import defaults

PRECISIONS = ("bf16", "nvfp4", "int8", "mixed")


def add_method_arguments(p: argparse.ArgumentParser, *, model_required: bool = True) -> None:
  """Flags shared by generate and calibrate: model, text, sampling."""
  p.add_argument("--model", required=model_required, default=None,
                 help="converted transformer folder (mpqjax convert) or diffusers pipeline folder"
                      + ("" if model_required else
                         "; default: the shipped toy text-to-video model (mpqjax/toyvideo)"))
  p.add_argument("--prompt-embeds", metavar="FILE.npy",
                 help="text embeddings [T, D] or [N, T, D] (for a converted transformer)")
  p.add_argument("--negative-embeds", metavar="FILE.npy",
                 help="negative-prompt embeddings, same shape (default: zeros)")
  p.add_argument("--prompt", action="append", metavar="TEXT",
                 help="prompt text (pipeline folders only; repeat for several)")
  p.add_argument("--negative-prompt", default="", help="negative prompt text (pipelines)")
  p.add_argument("--steps", type=int, default=50, help="denoising steps (default %(default)s)")
  p.add_argument("--guidance", type=float, default=6.0,
                 help="CFG scale (default 6; <= 1 disables CFG)")
  p.add_argument("--dynamic-cfg", action="store_true", help="diffusers' dynamic CFG schedule")
  p.add_argument("--scheduler", choices=("ddim", "dpm"), default=None,
                 help="default: the pipeline's scheduler, else CogVideoX DDIM")
  p.add_argument("--latent-shape", metavar="F,H,W",
                 help="latent frames,height,width (default: the model's sample size)")
  p.add_argument("--implementation", choices=("xla", "mosaic"), default=None,
                 help="qlinear backend (default: best available)")


def add_arguments(p: argparse.ArgumentParser) -> None:
  add_method_arguments(p, model_required=False)
  p.add_argument("--precision", choices=PRECISIONS, default="mixed",
                 help="activation precision of the block linears (default mixed)")
  p.add_argument("--calibration", metavar="FILE",
                 help="DMPQ calibration JSON from `mpqjax calibrate` (mixed)")
  p.add_argument("--tau", type=float, default=None,
                 help="predictor threshold (overrides the calibration's; without a calibration "
                      "the predictor is Gamma itself)")
  p.add_argument("--outlier-threshold", type=float, default=None,
                 help="max|x|/mean|x| above which a linear runs BF16 (default 25 for mixed, off "
                      "otherwise; 'inf' disables)")
  p.add_argument("--tdc", action=argparse.BooleanOptionalAction, default=True,
                 help="Temporal Delta Cache (default on)")
  p.add_argument("--tdc-threshold", type=float, default=None,
                 help=f"tau_tdc (default {defaults.DEFAULT_TDC_THRESHOLD:g})")
  p.add_argument("--tdc-error-bound", type=float, default=None,
                 help=f"E_acc bound (default {defaults.DEFAULT_TDC_ERROR_BOUND:g})")
  p.add_argument("--tdc-max-skips", type=int, default=None,
                 help=f"N_max (default {defaults.DEFAULT_TDC_MAX_SKIPS})")
  p.add_argument("--tdc-warmup", type=int, default=None,
                 help="first steps that always compute (default max(2, 10%% of steps))")
  p.add_argument("--tdc-cache", choices=defaults.TDC_CACHES, default=defaults.TDC_CACHES[0],
                 help="how the cache stores each block's delta: bf16, or int8 with one scale "
                      "per token (half the cache memory) (default bf16)")
  p.add_argument("--attention", choices=("bf16", "int8"), default="bf16",
                 help="attention precision: int8 = INT8 QK^T / FP8 PV (SageAttention-style) in "
                      "every block except the first and last --attention-edge-steps steps "
                      "(default bf16)")
  p.add_argument("--attention-pv", choices=defaults.ATTENTION_PVS,
                 default=defaults.ATTENTION_PVS[0],
                 help="PV format of --attention int8: fp8 (fastest), fp8x2 (V as two e4m3 "
                      "terms: more accurate, 17-45%% slower attention) or bf16 (default fp8)")
  p.add_argument("--attention-edge-steps", type=int, default=1,
                 help="first and last steps that keep bf16 attention with --attention int8 "
                      "(default 1)")
  p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                 help="per-step progress on stderr (default: when stderr is a terminal)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="mpqjax-out", help="output folder (default ./mpqjax-out)")


def parse_latent_shape(s: str | None):
  if s is None:
    return None
  try:
    shape = tuple(int(v) for v in s.split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) <= 0:
    raise UserInputError(f"--latent-shape must be three positive integers F,H,W, got {s!r}")
  return shape


def load_npy(path: str, what: str):
  import numpy as np
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} file not found: {path}")
  try:
    return np.load(path, allow_pickle=False)
  except ValueError as e:
    raise UserInputError(f"{path}: not a plain .npy array ({e})") from None


def load_for_method(args, *, quantized: bool):
  """-> (model, pos [N, T, D], neg [N, T, D] | None, pipe | None, scheduler kind or config).
  quantized: the block linears must be quantized (an unquantized converted checkpoint is
  quantized to NVFP4 on load)."""
  import numpy as np

  from mpqjax import pipeline as pl
  if args.model is None:  # the shipped toy model (mpqjax/toyvideo/cli.py)
    from mpqjax.toyvideo import cli as toy
    return toy.load_for_method(args, quantized=quantized)
  if not os.path.exists(args.model):
    raise FileNotFoundError(f"model not found: {args.model}")
  if pl.is_pipeline_folder(args.model):
    if not args.prompt:
      raise UserInputError("a pipeline folder needs --prompt TEXT")
    pipe = pl.load_pipeline(args.model, log=lambda s: print(s, flush=True))
    emb = np.asarray(pipe.encode_prompt([args.negative_prompt, *args.prompt]).astype("float32"))
    neg = np.broadcast_to(emb[:1], emb[1:].shape)
    model = pipe.load_transformer(quantize="nvfp4" if quantized else None)
    sched = pipe.spec.scheduler
    if args.scheduler:
      import dataclasses
      sched = dataclasses.replace(sched, kind=args.scheduler)
    return model, emb[1:], neg, pipe, sched
  if args.prompt:
    raise UserInputError(f"{args.model} is a converted transformer with no text encoder: pass "
                         "--prompt-embeds FILE.npy instead of --prompt")
  if not args.prompt_embeds:
    raise UserInputError("--prompt-embeds FILE.npy is required for a converted transformer")
  from mpqjax.loading import load_transformer
  model = load_transformer(args.model)
  from models.cogvideox.params import is_quantized, quantize_blocks
  if quantized and not is_quantized(model.params):
    print(f"{args.model} is unquantized: quantizing its block linears to NVFP4", flush=True)
    model.params = quantize_blocks(model.params)
  pos = load_npy(args.prompt_embeds, "--prompt-embeds").astype(np.float32)
  pos = pos[None] if pos.ndim == 2 else pos
  d = model.config.text_embed_dim
  if pos.ndim != 3 or pos.shape[-1] != d:
    raise UserInputError(f"--prompt-embeds {args.prompt_embeds}: expected [T, {d}] or "
                         f"[N, T, {d}], got shape {pos.shape}")
  neg = None
  if args.negative_embeds:
    neg = load_npy(args.negative_embeds, "--negative-embeds").astype(np.float32)
    neg = neg[None] if neg.ndim == 2 else neg
    if neg.shape[1:] != pos.shape[1:] or neg.shape[0] not in (1, pos.shape[0]):
      raise UserInputError(f"--negative-embeds shape {neg.shape} does not match "
                           f"--prompt-embeds {pos.shape}")
    neg = np.broadcast_to(neg, pos.shape)
  return model, pos, neg, None, args.scheduler or "ddim"


def check_common(args) -> None:
  if args.steps < 1:
    raise UserInputError(f"--steps must be >= 1, got {args.steps}")
  if not args.guidance >= 0:
    raise UserInputError(f"--guidance must be >= 0, got {args.guidance}")


def atomic_save_npy(path: str, array) -> None:
  import io

  import numpy as np
  buf = io.BytesIO()
  np.save(buf, np.asarray(array), allow_pickle=False)
  atomic.write_bytes(path, buf.getvalue())


def run(args: argparse.Namespace) -> int:
  from mpqjax.method.calibration import Calibration
  check_common(args)
  for flag in ("tdc_threshold", "tdc_error_bound"):
    v = getattr(args, flag)
    if v is not None and not v >= 0:
      raise UserInputError(f"--{flag.replace('_', '-')} must be >= 0, got {v}")
  if args.tdc_max_skips is not None and args.tdc_max_skips < 0:
    raise UserInputError(f"--tdc-max-skips must be >= 0, got {args.tdc_max_skips}")
  if args.tdc_warmup is not None and args.tdc_warmup < 0:
    raise UserInputError(f"--tdc-warmup must be >= 0, got {args.tdc_warmup}")
  if args.outlier_threshold is not None and not args.outlier_threshold > 0:
    raise UserInputError(f"--outlier-threshold must be > 0, got {args.outlier_threshold}")
  if args.attention_edge_steps < 0:
    raise UserInputError(f"--attention-edge-steps must be >= 0, got {args.attention_edge_steps}")
  if args.tau is not None and args.tau != args.tau:
    raise UserInputError("--tau must be a number or +-inf, got nan")
  shape = parse_latent_shape(args.latent_shape)
  if args.model is None:  # the shipped toy model: its calibration, a progress bar
    from mpqjax.toyvideo import cli as toy
    toy.apply_defaults(args)
  calib = Calibration.load(args.calibration) if args.calibration else None
  if calib is not None and args.precision != "mixed":
    raise UserInputError(f"--calibration is for --precision mixed, not {args.precision}")

  model, pos, neg, pipe, sched = load_for_method(args, quantized=args.precision != "bf16")
  if pos.shape[0] != 1:
    raise UserInputError(f"generate takes one prompt; --prompt-embeds holds {pos.shape[0]}")
  from mpqjax.generate import generate
  kw = {k: getattr(args, k) for k in ("tdc_threshold", "tdc_error_bound", "tdc_max_skips",
                                       "tdc_warmup") if getattr(args, k) is not None}
  os.makedirs(args.out, exist_ok=True)
  result = generate(model, pos[0], negative_emb=None if neg is None else neg[0],
                    latent_shape=shape, seed=args.seed, steps=args.steps, guidance=args.guidance,
                    dynamic_cfg=args.dynamic_cfg, scheduler=sched, precision=args.precision,
                    calibration=calib, tau=args.tau, tdc=args.tdc, tdc_cache=args.tdc_cache,
                    outlier_threshold=args.outlier_threshold,
                    implementation=args.implementation, attention_precision=args.attention,
                    attention_edge_steps=args.attention_edge_steps,
                    attention_pv=args.attention_pv, on_step=_progress_hook(args), **kw)
  files = {"latents": os.path.join(args.out, "latents.npy")}
  atomic_save_npy(files["latents"], result.latents)
  if pipe is not None:
    from mpqjax.video import write_video
    frames = pipe.decode_latents(result.latents)
    files["video"] = write_video(frames[0], os.path.join(args.out, "video.mp4"))
    if hasattr(pipe, "write_strip"):  # the toy model: a PNG strip of the frames too
      files["frames"] = pipe.write_strip(result.latents, os.path.join(args.out, "frames.png"))
  report = {"command": "generate",
            "model": os.path.abspath(args.model) if args.model else "toyvideo (shipped default)",
            "calibration": os.path.abspath(args.calibration) if args.calibration else None,
            "summary": result.summary, "files": files,
            "per_step": {"computed": result.stats["computed"].astype(int).tolist(),
                         "modes": result.stats["modes"].tolist(),
                         "gamma": _finite(result.stats["gamma"]),
                         "tdc_change": _finite(result.stats["change"]),
                         "attention": result.stats["attention"].tolist()},
            "per_step_legend": "[step][block]; modes [step][block][linear] in LINEAR_NAMES order, "
                               "0 NVFP4, 1 INT8, 2 BF16, -1 skipped (no linear ran); attention "
                               "[step][block] 0 bf16, 1 int8, -1 skipped"}
  if pipe is not None:  # pipeline folders: peak host RSS and device memory (issue 8)
    report["memory"] = pipe.memory_report()
  files["report"] = os.path.join(args.out, "report.json")
  atomic.write_bytes(files["report"], json.dumps(report, indent=1).encode())
  s = result.summary
  print(f"wrote {', '.join(files.values())}")
  bits = s["avg_activation_bits"]
  print(f"precision {s['precision']}, skip ratio {s['skip_ratio']:.3f}, avg activation bits "
        f"{'n/a' if bits is None else f'{bits:.2f}'}, TDC cache {s['tdc_cache_bytes']} bytes, "
        f"weights {s['weight_bytes']} bytes ({s['weight_reduction_vs_bf16']:.2f}x smaller than bf16)")
  return 0


def _progress_hook(args):
  """A per-step progress line on stderr, or None."""
  import sys
  import time
  show = args.progress if args.progress is not None else sys.stderr.isatty()
  if not show:
    return None
  start = [None]

  def hook(i: int, n: int) -> None:
    now = time.perf_counter()
    if start[0] is None:
      start[0] = now
    done = i  # steps finished before step i starts
    bar = "#" * int(30 * done / n)
    end = "\n" if not sys.stderr.isatty() else "\r"
    print(f"denoising [{bar:<30}] step {i + 1}/{n}  {now - start[0]:6.1f} s", end=end,
          file=sys.stderr, flush=True)
    if i == n - 1 and end == "\r":
      print(file=sys.stderr)
  return hook


def _finite(a):
  import numpy as np
  a = np.asarray(a, np.float64)
  return [[None if not np.isfinite(v) else float(v) for v in row] for row in a]
