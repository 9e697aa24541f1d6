"""`mpqjax convert SRC DST [--quantize nvfp4|int8] [--dtype bf16|fp32] [--overwrite]`:
a diffusers CogVideoX transformer folder (config.json + safetensors, sharded or not) -> a
converted checkpoint loadable with `mpqjax.load_transformer(DST)`.

Streams tensor by tensor (see checkpoints_convert/cogvideox.py), writes atomically (see
checkpoints_convert/store.py) and reports the parameter count, the bytes in bf16 and as
stored (quantized), and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from mpqjax.errors import UserInputError


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("src", metavar="SRC",
                 help="diffusers transformer folder (config.json + *.safetensors [+ index]); a "
                      "pipeline folder with a transformer/ subfolder also works")
  p.add_argument("dst", metavar="DST", help="output folder (created atomically)")
  p.add_argument("--quantize", choices=("nvfp4", "int8"), default=None,
                 help="store the 8 linears of every block in this weight format "
                      "(default: unquantized)")
  p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                 help="dtype of everything not quantized (default bf16)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
  p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def resolve_source(src: str) -> str:
  if not os.path.exists(src):
    raise FileNotFoundError(f"source not found: {src}")
  if not os.path.isdir(src):
    raise UserInputError(f"source {src} is not a folder; pass the diffusers model folder "
                         "holding config.json and the safetensors files")
  if not os.path.isfile(os.path.join(src, "config.json")):
    sub = os.path.join(src, "transformer")
    if os.path.isfile(os.path.join(sub, "config.json")):
      return sub
    raise UserInputError(f"{src}: no config.json (pass the transformer folder of a diffusers "
                         "CogVideoX model)")
  return src


def peak_rss_bytes() -> int:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _fmt(n: int) -> str:
  for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if n >= size:
      return f"{n / size:.3f} {unit} ({n:,} bytes)"
  return f"{n} bytes"


class _Progress:
  def __init__(self, quiet: bool):
    self.quiet = quiet
    self.tty = sys.stderr.isatty()
    self.t0 = time.time()
    self.last = -1

  def __call__(self, done: int, total: int, key: str) -> None:
    if self.quiet:
      return
    step = max(1, total // 20)
    if self.tty:
      print(f"\r  [{done:>5}/{total}] {key[:70]:<70}", end="", file=sys.stderr, flush=True)
      if done == total:
        print(file=sys.stderr)
    elif done == total or done // step != self.last:
      self.last = done // step
      print(f"  [{done:>5}/{total}] {time.time() - self.t0:6.1f}s {key}", file=sys.stderr,
            flush=True)


def convert(src: str, dst: str, *, quantize: str | None = None, dtype: str = "bf16",
            overwrite: bool = False, progress=None) -> dict:
  """The conversion as a function; returns the manifest written."""
  from checkpoints_convert import store
  from checkpoints_convert.cogvideox import iter_groups, params_to_plain
  from checkpoints_convert.safetensors_stream import open_checkpoint
  from models.cogvideox.config import CogVideoXConfig

  src = resolve_source(src)
  store.check_destination(dst, overwrite, src)
  config = CogVideoXConfig.from_json(src)
  stats: dict = {}
  with open_checkpoint(src) as reader:
    def groups():  # plain values, holding no reference to a group once it is passed on
      for name, value in iter_groups(reader, config, dtype=dtype, quantize=quantize,
                                     progress=progress, stats=stats):
        plain = params_to_plain(value)
        del value
        yield name, plain
        del plain

    return store.write_converted(
        dst, groups(), config.to_dict(),
        lambda: {"model": "CogVideoXTransformer3DModel", "dtype": dtype, "quantize": quantize,
                 "source": os.path.abspath(src), **stats},
        overwrite=overwrite)


def run(args: argparse.Namespace) -> int:
  t0 = time.time()
  m = convert(args.src, args.dst, quantize=args.quantize, dtype=args.dtype,
              overwrite=args.overwrite, progress=_Progress(args.quiet))
  what = f"{args.quantize} block linears + {args.dtype}" if args.quantize else args.dtype
  print(f"converted {m['source']} -> {os.path.abspath(args.dst)} in {time.time() - t0:.1f}s")
  print(f"  parameters:      {m['param_count']:,}")
  print(f"  bytes in bf16:   {_fmt(m['bf16_bytes'])}")
  print(f"  bytes stored:    {_fmt(m['bytes'])} ({what}; bf16/stored = "
        f"{m['bf16_bytes'] / m['bytes']:.2f}x)")
  print(f"  peak RSS:        {_fmt(peak_rss_bytes())}")
  return 0
