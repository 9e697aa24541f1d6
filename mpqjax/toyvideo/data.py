"""A procedural text-to-video set: one colored shape moving across a plain background.

  specs = sample_specs(np.random.default_rng(seed), n)     # host: a few numbers per clip
  video = render(specs)                                     # f32[n, F, H, W, 3] in [0, 1]
  text  = captions(specs)                                   # ["a big red circle moving left", ...]

`render(specs, xp=jnp)` is the same function in jnp, so training renders batches on the device
inside its jitted step (only the small spec arrays cross from the host). Everything is a pure
function of the seed.

Caption grammar:  "a" [SIZE] COLOR SHAPE "moving" DIRECTION
  SIZE in {small, big} (present in half the captions), COLOR in COLORS, SHAPE in SHAPES,
  DIRECTION in DIRECTIONS. Uncaptioned variety: exact radius, speed, start position,
  brightness of the shape, background gray level, tint and gradient.

Backgrounds are low-saturation (max-min channel <= 0.12) and shapes fully saturated, so color
is recoverable from pixels (see analyze.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np

# Fully saturated primaries/secondaries: the analyzer classifies chroma patterns among these.
COLORS = {
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0),
}
SHAPES = ("circle", "square", "triangle")
# Image axes: x to the right, y downwards.
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SIZES = {"small": (3.0, 4.5), "big": (5.5, 7.0)}  # radius range in pixels

COLOR_NAMES = tuple(COLORS)
DIRECTION_NAMES = tuple(DIRECTIONS)
SIZE_NAMES = tuple(SIZES)


@dataclasses.dataclass(frozen=True)
class VideoShape:
  frames: int = 8
  height: int = 32
  width: int = 32


DEFAULT_SHAPE = VideoShape()

# speed range in pixels per frame (clipped so the whole path stays inside the frame)
SPEED = (1.2, 2.5)
BG_GRAY = (0.05, 0.55)
BG_TINT = 0.03      # per-channel offset, +-
BG_GRADIENT = 0.06  # half amplitude of a linear ramp across the frame
BRIGHTNESS = (0.75, 1.0)


def sample_specs(rng: np.random.Generator, n: int, shape: VideoShape = DEFAULT_SHAPE,
                 *, color=None, shape_kind=None, direction=None, size=None) -> dict:
  """n random clip specs (numpy arrays of length n). color/shape_kind/direction/size, when given
  (names), fix that attribute for all n clips; the rest stays random."""
  def pick(values, fixed, what):
    if fixed is None:
      return rng.integers(0, len(values), n)
    if fixed not in values:
      raise ValueError(f"unknown {what} {fixed!r}; choose from {list(values)}")
    return np.full(n, list(values).index(fixed))

  c = pick(COLOR_NAMES, color, "color")
  s = pick(SHAPES, shape_kind, "shape")
  d = pick(DIRECTION_NAMES, direction, "direction")
  z = pick(SIZE_NAMES, size, "size")
  lo = np.array([SIZES[k][0] for k in SIZE_NAMES])[z]
  hi = np.array([SIZES[k][1] for k in SIZE_NAMES])[z]
  radius = lo + (hi - lo) * rng.random(n)
  f, h, w = shape.frames, shape.height, shape.width
  dirs = np.array([DIRECTIONS[k] for k in DIRECTION_NAMES])[d]  # [n, 2] (x, y)
  extent = np.where(dirs[:, 0] != 0, w, h)
  speed = np.minimum(SPEED[0] + (SPEED[1] - SPEED[0]) * rng.random(n),
                     (extent - 2 * radius) / max(f - 1, 1))
  travel = speed * (f - 1)
  # Start: along the motion axis, so that start..start+travel stays in [r, extent-r];
  # across it, anywhere in [r, extent-r].
  u, v = rng.random(n), rng.random(n)
  pos = []
  for axis, ext in ((0, w), (1, h)):
    moving = dirs[:, axis] != 0
    free = np.where(moving, ext - 2 * radius - travel, ext - 2 * radius)
    p0 = radius + (u if axis == 0 else v) * np.maximum(free, 0)
    # moving towards negative: start at the far end
    p0 = np.where(moving & (dirs[:, axis] < 0), ext - p0, p0)
    pos.append(p0)
  return {
      "color": c.astype(np.int32), "shape": s.astype(np.int32), "direction": d.astype(np.int32),
      "size": z.astype(np.int32), "say_size": rng.random(n) < 0.5,
      "radius": radius.astype(np.float32), "speed": speed.astype(np.float32),
      "x0": pos[0].astype(np.float32), "y0": pos[1].astype(np.float32),
      "brightness": (BRIGHTNESS[0] + (BRIGHTNESS[1] - BRIGHTNESS[0]) * rng.random(n)).astype(
          np.float32),
      "bg_gray": (BG_GRAY[0] + (BG_GRAY[1] - BG_GRAY[0]) * rng.random(n)).astype(np.float32),
      "bg_tint": (BG_TINT * (2 * rng.random((n, 3)) - 1)).astype(np.float32),
      "bg_angle": (2 * np.pi * rng.random(n)).astype(np.float32),
      "bg_gradient": (BG_GRADIENT * rng.random(n)).astype(np.float32),
  }


def caption(spec_i: dict) -> str:
  """One caption from a dict of scalars (one clip of sample_specs)."""
  words = ["a"]
  if spec_i["say_size"]:
    words.append(SIZE_NAMES[int(spec_i["size"])])
  words += [COLOR_NAMES[int(spec_i["color"])], SHAPES[int(spec_i["shape"])], "moving",
            DIRECTION_NAMES[int(spec_i["direction"])]]
  return " ".join(words)


def captions(specs: dict) -> list[str]:
  n = len(specs["color"])
  return [caption({k: v[i] for k, v in specs.items()}) for i in range(n)]


def render(specs: dict, shape: VideoShape = DEFAULT_SHAPE, xp=np):
  """Pixels f32[n, F, H, W, 3] in [0, 1]. `xp` is numpy or jax.numpy (jit friendly: the specs
  may be traced arrays). Edges are anti-aliased with a 1-pixel linear ramp."""
  f, h, w = shape.frames, shape.height, shape.width
  s = {k: xp.asarray(v) for k, v in specs.items()}
  palette = xp.asarray(np.array([COLORS[k] for k in COLOR_NAMES], np.float32))
  dirs = xp.asarray(np.array([DIRECTIONS[k] for k in DIRECTION_NAMES], np.float32))
  t = xp.arange(f, dtype=xp.float32)[None, :, None, None]                       # [1,F,1,1]
  yy = (xp.arange(h, dtype=xp.float32) + 0.5)[None, None, :, None]              # pixel centers
  xx = (xp.arange(w, dtype=xp.float32) + 0.5)[None, None, None, :]

  def col(name):  # [n] -> [n,1,1,1]
    return s[name].astype(xp.float32)[:, None, None, None]

  d = dirs[s["direction"]]
  cx = col("x0") + d[:, 0][:, None, None, None] * col("speed") * t
  cy = col("y0") + d[:, 1][:, None, None, None] * col("speed") * t
  dx, dy, r = xx - cx, yy - cy, col("radius")
  # signed distance-like field (negative inside) per shape kind
  circle = xp.sqrt(dx * dx + dy * dy) - r
  square = xp.maximum(xp.abs(dx), xp.abs(dy)) - 0.85 * r  # same area scale as the circle
  # upward-pointing equilateral triangle with circumradius ~1.2 r, centred at (cx, cy)
  rt = 1.2 * r
  tri = xp.maximum(dy - 0.5 * rt, xp.maximum(0.866 * dx - 0.5 * dy, -0.866 * dx - 0.5 * dy)
                   - 0.5 * rt)
  kind = s["shape"][:, None, None, None]
  sdf = xp.where(kind == 0, circle, xp.where(kind == 1, square, tri))
  alpha = xp.clip(0.5 - sdf, 0.0, 1.0)[..., None]                               # [n,F,H,W,1]

  ang = col("bg_angle")
  ramp = ((xx / w - 0.5) * xp.cos(ang) + (yy / h - 0.5) * xp.sin(ang)) * 2 * col("bg_gradient")
  bg = (col("bg_gray") + ramp)[..., None] + s["bg_tint"].astype(xp.float32)[:, None, None, None]
  fg = (palette[s["color"]] * s["brightness"].astype(xp.float32)[:, None])[:, None, None, None]
  return xp.clip(bg * (1 - alpha) + fg * alpha, 0.0, 1.0).astype(xp.float32)


def sample(seed: int, n: int, shape: VideoShape = DEFAULT_SHAPE, **fixed):
  """Convenience: (video f32[n,F,H,W,3], captions, specs) from a seed."""
  specs = sample_specs(np.random.default_rng(seed), n, shape, **fixed)
  return render(specs, shape), captions(specs), specs
