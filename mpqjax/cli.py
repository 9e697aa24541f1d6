"""`mpqjax` command line. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when used,
except to build --help."""
from __future__ import annotations

import argparse
import importlib
import sys

from mpqjax._version import __version__
from mpqjax.errors import UserInputError

# name -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("mpqjax.demo", "quantize a random linear layer and compare the three modes"),
    "convert": ("checkpoints_convert.cli", "convert a diffusers CogVideoX transformer (safetensors) for mpqjax"),
    "generate": ("mpqjax.generate_cli", "generate with DMPQ mixed precision + Temporal Delta Cache"),
    "calibrate": ("mpqjax.calibrate_cli", "fit the DMPQ predictor (Gamma vs E_rel) and pick tau"),
    "profile": ("mpqjax.profile_cli", "trace a few denoising steps and break their time down by category"),
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="mpqjax",
      description="NVFP4/INT8 mixed-precision inference for video diffusion transformers.")
  parser.add_argument("--version", action="version", version=f"mpqjax {__version__}")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  for name, (module, help_text) in SUBCOMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(_module=module)
    importlib.import_module(module).add_arguments(p)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help()
    return 2
  try:
    return int(importlib.import_module(args._module).run(args) or 0)
  except (UserInputError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
    print(f"mpqjax {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"mpqjax {args.command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
