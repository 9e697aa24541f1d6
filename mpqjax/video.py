"""Writing decoded frames to disk: MP4 through imageio-ffmpeg, GIF when ffmpeg is unusable.

  path = write_video(frames_u8[F, H, W, 3], "out.mp4", fps=8)   # returns the path written

The file appears atomically (temporary name in the same folder, then a rename).
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from mpqjax.atomic import atomic_write
from mpqjax.errors import UserInputError


def to_uint8(video01: np.ndarray) -> np.ndarray:
  """Frames in [0, 1] (any float dtype) -> uint8, rounded as diffusers' numpy_to_pil does."""
  return (np.clip(np.asarray(video01, np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)


def write_video(frames: np.ndarray, path: str, fps: int = 8) -> str:
  """frames: uint8 [F, H, W, 3] (or [1, F, H, W, 3]). Writes an MP4 (H.264 via imageio-ffmpeg)
  when `path` ends in .mp4 and ffmpeg works, else a GIF next to it (path with .gif). Returns
  the path written. CogVideoX's own export uses fps=8."""
  frames = np.asarray(frames)
  if frames.ndim == 5 and frames.shape[0] == 1:
    frames = frames[0]
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not frames.size:
    raise UserInputError(f"write_video needs uint8 frames [F, H, W, 3], got {frames.dtype} "
                         f"{list(frames.shape)}")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"output folder does not exist: {folder}")
  import imageio.v2 as imageio
  if path.lower().endswith(".mp4"):
    try:
      def _write_mp4(tmp):
        with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264",
                                quality=8, macro_block_size=1 if _even(frames) else 16) as w:
          for f in frames:
            w.append_data(f)

      def mp4(tmp):
        # ffmpeg runs as a subprocess; JAX's at-fork hook warns about forking a threaded
        # process, which is harmless here (the child execs ffmpeg at once).
        with warnings.catch_warnings():
          warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
          _write_mp4(tmp)

      return atomic_write(path, mp4)
    except Exception as e:  # no ffmpeg binary, codec missing, ...
      warnings.warn(f"MP4 writing failed ({e!r}); writing a GIF instead")
      path = os.path.splitext(path)[0] + ".gif"

  def gif(tmp):
    imageio.mimsave(tmp, list(frames), format="GIF", duration=1000 / fps, loop=0)
  return atomic_write(path, gif)


def _even(frames: np.ndarray) -> bool:
  return frames.shape[1] % 2 == 0 and frames.shape[2] % 2 == 0
