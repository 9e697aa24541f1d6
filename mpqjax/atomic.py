"""Atomic file writes: a temporary file beside the target, then a rename, so no reader (and no
crash) ever sees a half-written file."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Callable


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path: str, write: Callable[[str], None], mode: int | None = None) -> str:
  """write(tmp) fills a temporary file in path's folder (created if missing), which then
  replaces path. The temporary name ends with path's base name, so writers that pick the
  format by extension (imageio, savefig) see the right one. mode: the file's permissions
  (default: 0666 less the umask). Returns path."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)  # mkstemp makes 0600
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def write_bytes(path: str, data: bytes, mode: int | None = None) -> str:
  def write(tmp):
    with open(tmp, "wb") as f:
      f.write(data)
  return atomic_write(path, write, mode)


def write_json(path: str, obj, mode: int | None = None, **dump_kwargs) -> str:
  """json.dump(obj, indent=1, **dump_kwargs) to path, atomically."""
  dump_kwargs.setdefault("indent", 1)
  def write(tmp):
    with open(tmp, "w") as f:
      json.dump(obj, f, **dump_kwargs)
  return atomic_write(path, write, mode)
