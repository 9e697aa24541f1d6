"""The default model of `mpqjax generate` (used when no --model is given): the shipped toy
text-to-video model (weights.py). generate_cli calls three hooks:

  apply_defaults(args)                 before anything loads: the shipped calibration for mixed
  load_for_method(args, quantized)     -> (model, pos, neg, pipe, scheduler config)
  pipe.decode_latents(latents)         -> uint8 frames (upscaled for viewing), used for video.mp4
  pipe.write_strip(latents, path)      -> a PNG strip of all frames side by side

Progress: a stage bar on stderr (load, encode, compile + denoise, write).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from mpqjax.errors import UserInputError

UPSCALE = 8  # 32x32 frames -> 256x256 in the written MP4 / PNG (nearest neighbour)
STAGES = ("load model", "encode prompt", "compile + denoise", "write video")


class StageBar:
  """A one-line progress bar over named stages, on stderr (plain lines when not a TTY)."""

  def __init__(self, stages=STAGES, stream=None, width: int = 24):
    self.stages, self.stream, self.width = list(stages), stream or sys.stderr, width
    self.i, self.t0 = 0, time.perf_counter()

  def _draw(self, label: str, end: str = "") -> None:
    n = len(self.stages)
    fill = int(self.width * self.i / n)
    bar = "#" * fill + "-" * (self.width - fill)
    tty = getattr(self.stream, "isatty", lambda: False)()
    line = f"[{bar}] {self.i}/{n} {label} ({time.perf_counter() - self.t0:.1f}s)"
    self.stream.write(("\r" + line.ljust(78) if tty else line + "\n") + end)
    self.stream.flush()

  def start(self, stage: str) -> None:
    self._draw(stage + " ...")

  def done(self) -> None:
    self.i += 1
    if self.i >= len(self.stages):
      self._draw("done", end="\n" if getattr(self.stream, "isatty", lambda: False)() else "")


_BAR: StageBar | None = None


def apply_defaults(args) -> None:
  """Fill flags the user left unset with the toy model's defaults (shipped calibration)."""
  from mpqjax.toyvideo import weights
  global _BAR
  if not weights.available():
    raise FileNotFoundError(f"the default toy model's weights are missing from {weights.WEIGHTS_DIR}"
                            " (a broken install?); pass --model")
  if args.precision == "mixed" and not args.calibration and args.tau is None:
    path = weights.calibration_path()
    if os.path.isfile(path):
      args.calibration = path
  if not args.prompt:
    raise UserInputError("--prompt TEXT is required, e.g. --prompt \"a red circle moving left\"")
  import json

  from mpqjax.toyvideo import text
  with open(weights.weights_path()[1], encoding="utf-8") as f:
    max_tokens = int(json.load(f)["text_encoder"]["max_tokens"])
  for p in [*args.prompt, args.negative_prompt]:  # fail fast, before loading anything heavy
    text.tokenize(p, max_tokens)
  _BAR = StageBar()
  _BAR.start(STAGES[0])
  if args.prompt_embeds or args.negative_embeds:
    raise UserInputError("--prompt-embeds/--negative-embeds need --model (the default toy model "
                         "has its own text encoder: use --prompt)")


class ToyPipe:
  """decode_latents / write_strip for generate_cli (the toy model works in pixel space)."""

  def __init__(self, model):
    self.model = model

  @staticmethod
  def upscale(frames: np.ndarray) -> np.ndarray:
    return frames.repeat(UPSCALE, axis=-3).repeat(UPSCALE, axis=-2)

  def decode_latents(self, latents) -> np.ndarray:
    if _BAR is not None:
      _BAR.done()
      _BAR.start(STAGES[3])
    return self.upscale(self.model.to_frames(latents))

  @staticmethod
  def memory_report() -> dict:
    from mpqjax.pipeline import device_peak_bytes, peak_host_rss_bytes
    return {"peak_host_rss_bytes": peak_host_rss_bytes(), "peak_device_bytes": device_peak_bytes()}

  def write_strip(self, latents, path: str) -> str:
    from mpqjax.atomic import atomic_write
    frames = self.upscale(self.model.to_frames(latents))[0]   # [F, H, W, 3]
    strip = np.concatenate(list(frames), axis=1)

    def w(tmp):
      import imageio.v2 as imageio
      imageio.imwrite(tmp, strip, format="PNG")
    atomic_write(path, w)
    if _BAR is not None:
      _BAR.done()
    return path


def load_for_method(args, *, quantized: bool):
  """(model, pos [1, T, D], neg [1, T, D], pipe, scheduler config) for the toy model."""
  from mpqjax.toyvideo import weights
  if len(args.prompt) != 1:
    raise UserInputError(f"generate takes one prompt; got {len(args.prompt)}")
  model = weights.load(quantize="nvfp4" if quantized else None)
  if _BAR is not None:
    _BAR.done()
    _BAR.start(STAGES[1])
  pos, neg = model.encode(args.prompt)
  if args.negative_prompt:
    neg, _ = model.encode([args.negative_prompt])
  if _BAR is not None:
    _BAR.done()
    _BAR.start(STAGES[2])
  sched = model.scheduler_config()
  if args.scheduler:
    import dataclasses
    sched = dataclasses.replace(sched, kind=args.scheduler)
  return model, pos, neg, ToyPipe(model), sched
