"""A deterministic analyzer: the dominant moving color and the motion direction of a toy video,
recovered from pixels alone (numpy, no learning).

  result = analyze(video)            # video [F, H, W, 3] in [0, 1] (float) or uint8
  result.color, result.direction    # names from data.COLOR_NAMES / data.DIRECTION_NAMES or None

Method:
1. Chroma: a pixel is "colored" when max(rgb) - min(rgb) > SAT_MIN (backgrounds of the set are
   below 0.12). Its normalized chroma (rgb - min) / (max - min) is matched to the nearest of the
   palette's 0/1 patterns (red = 100, yellow = 110, ...).
2. The dominant color is the palette color with the most colored pixels, each pixel weighted by
   how much that color's mask changes between neighbouring frames (so a static colored blob
   counts less than a moving one; a fully static video falls back to plain counts).
3. Direction: the centroid of the dominant color's mask in each frame where it is present; the
   least-squares slopes of x and y over time give the velocity. The larger axis and its sign give
   left/right/up/down; below MIN_SPEED px/frame the direction is None.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mpqjax.toyvideo import data

SAT_MIN = 0.3
MIN_SPEED = 0.25        # px / frame
MIN_PIXELS = 2          # a frame needs this many pixels of the color to give a centroid

_PATTERNS = np.array([data.COLORS[k] for k in data.COLOR_NAMES], np.float32)  # [C, 3] of 0/1


@dataclasses.dataclass(frozen=True)
class Analysis:
  color: str | None
  direction: str | None
  velocity: tuple[float, float]   # (vx, vy) px / frame; y grows downwards
  color_share: float              # the dominant color's share of the weighted colored pixels

  def matches(self, color: str, direction: str) -> bool:
    return self.color == color and self.direction == direction


def _to_float(video) -> np.ndarray:
  v = np.asarray(video)
  if v.ndim != 4 or v.shape[-1] != 3:
    raise ValueError(f"video must be [F, H, W, 3], got shape {v.shape}")
  if v.dtype == np.uint8:
    return v.astype(np.float32) / 255.0
  return np.clip(v.astype(np.float32), 0.0, 1.0)


def color_labels(video) -> np.ndarray:
  """int32[F, H, W]: palette index of each colored pixel, -1 for uncolored ones."""
  v = _to_float(video)
  hi, lo = v.max(-1), v.min(-1)
  sat = hi - lo
  chroma = (v - lo[..., None]) / np.maximum(sat, 1e-6)[..., None]
  dist = np.square(chroma[..., None, :] - _PATTERNS).sum(-1)         # [F, H, W, C]
  labels = np.argmin(dist, axis=-1).astype(np.int32)
  return np.where(sat > SAT_MIN, labels, -1)


def analyze(video) -> Analysis:
  labels = color_labels(video)
  f = labels.shape[0]
  masks = labels[None] == np.arange(len(data.COLOR_NAMES))[:, None, None, None]  # [C,F,H,W]
  counts = masks.sum((1, 2, 3)).astype(np.float64)
  if counts.sum() == 0:
    return Analysis(None, None, (0.0, 0.0), 0.0)
  if f > 1:
    change = np.abs(np.diff(masks.astype(np.int8), axis=1)).sum((1, 2, 3)).astype(np.float64)
  else:
    change = np.zeros_like(counts)
  score = change if change.sum() > 0 else counts
  c = int(np.argmax(score))
  share = float(score[c] / score.sum())
  m = masks[c]
  n_pix = m.sum((1, 2))
  ys, xs = np.mgrid[:m.shape[1], :m.shape[2]]
  present = np.nonzero(n_pix >= MIN_PIXELS)[0]
  if len(present) < 2:
    return Analysis(data.COLOR_NAMES[c], None, (0.0, 0.0), share)
  cx = (m[present] * xs).sum((1, 2)) / n_pix[present]
  cy = (m[present] * ys).sum((1, 2)) / n_pix[present]
  t = present.astype(np.float64)
  t = t - t.mean()
  vx = float((t * (cx - cx.mean())).sum() / (t * t).sum())
  vy = float((t * (cy - cy.mean())).sum() / (t * t).sum())
  if max(abs(vx), abs(vy)) < MIN_SPEED:
    direction = None
  elif abs(vx) >= abs(vy):
    direction = "right" if vx > 0 else "left"
  else:
    direction = "down" if vy > 0 else "up"
  return Analysis(data.COLOR_NAMES[c], direction, (vx, vy), share)


def prompt_target(prompt: str) -> tuple[str, str]:
  """(color, direction) named by a grammar prompt (the words of data.COLOR_NAMES/DIRECTIONS)."""
  words = prompt.lower().rstrip(".").split()
  color = next((w for w in words if w in data.COLORS), None)
  direction = next((w for w in words if w in data.DIRECTIONS), None)
  if color is None or direction is None:
    raise ValueError(f"prompt {prompt!r} names no color and direction of the toy grammar")
  return color, direction


def adherence(videos, prompts) -> float:
  """Share of videos [N, F, H, W, 3] whose analyzed (color, direction) match their prompt's."""
  hits = [analyze(v).matches(*prompt_target(p)) for v, p in zip(videos, prompts)]
  return float(np.mean(hits)) if hits else float("nan")
