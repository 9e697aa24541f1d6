"""On-disk format of a converted transformer (what `mpqjax convert` writes).

  DST/
    manifest.json   {"format": "mpqjax-transformer", "format_version": 1, "model":
                     "CogVideoXTransformer3DModel", "dtype": "bf16"|"fp32",
                     "quantize": null|"nvfp4"|"int8", "quantized_linears": {name:
                     {"hadamard_block", "weight_format"}}, "param_count", "bf16_bytes",
                     "bytes", "source", "mpqjax_version"}
    config.json     the diffusers transformer config (CogVideoXConfig.to_dict())
    params/         orbax checkpoint of the parameter pytree, QuantizedLinear leaves stored
                    as plain dicts {"weight": {"codes", "scales", "global_scale"} |
                    {"values", "scales"}, "w_int8_scale", "bias"?} (rebuilt from the manifest)

write_converted() builds everything in a hidden temporary folder next to DST and renames it
into place, so an interrupted or failed run leaves no DST behind; replacing an existing DST
needs overwrite=True.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid

from mpqjax._version import __version__
from mpqjax.errors import UserInputError

FORMAT = "mpqjax-transformer"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
PARAMS = "params"


def _orbax():
  import logging
  import orbax.checkpoint as ocp
  logging.getLogger("absl").setLevel(logging.WARNING)
  return ocp


def check_destination(dst: str, overwrite: bool, src: str | None = None) -> None:
  """Fail early (before any conversion work) on a DST that may not be written."""
  dst_real = os.path.realpath(dst)
  if src is not None:
    src_real = os.path.realpath(src)
    if dst_real == src_real or src_real.startswith(dst_real + os.sep):
      raise UserInputError(f"destination {dst} would overwrite the source {src}")
  if os.path.lexists(dst) and not overwrite:
    raise FileExistsError(f"destination {dst} exists; pass --overwrite to replace it")
  parent = os.path.dirname(dst_real)
  if not os.path.isdir(parent):
    raise FileNotFoundError(f"parent folder of the destination does not exist: {parent}")


def write_converted(dst: str, plain_params: dict, config_dict: dict, manifest: dict, *,
                    overwrite: bool = False) -> None:
  """Atomically write DST (see module doc). `plain_params`: nested dict of numpy arrays."""
  check_destination(dst, overwrite)
  dst = os.path.abspath(dst)
  parent, name = os.path.split(dst)
  tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
  os.mkdir(tmp)
  try:
    ocp = _orbax()
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(tmp, PARAMS), plain_params)
    ckpt.wait_until_finished()
    ckpt.close()
    with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
      json.dump(config_dict, f, indent=2)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "mpqjax_version": __version__, **manifest}
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=2)
    old = None
    if os.path.lexists(dst):
      if not overwrite:  # appeared meanwhile
        raise FileExistsError(f"destination {dst} exists; pass --overwrite to replace it")
      old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
      os.replace(dst, old)
    os.replace(tmp, dst)
    if old is not None:
      if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
      else:
        os.remove(old)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def read_manifest(path: str) -> dict:
  """The manifest of a converted checkpoint, validated (clear errors for wrong paths and
  format/version mismatches)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"converted checkpoint not found: {path}")
  if not os.path.isdir(path):
    raise UserInputError(f"{path} is not a folder; expected the output of `mpqjax convert`")
  mpath = os.path.join(path, MANIFEST)
  if not os.path.isfile(mpath):
    hint = ""
    if os.path.isfile(os.path.join(path, CONFIG)) and any(
        n.endswith(".safetensors") or n.endswith(".index.json") for n in os.listdir(path)):
      hint = (f" It looks like a diffusers model folder: convert it first with "
              f"`mpqjax convert {path} DST`.")
    raise UserInputError(f"{path} is not an mpqjax converted checkpoint (no {MANIFEST}).{hint}")
  try:
    with open(mpath, encoding="utf-8") as f:
      m = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserInputError(f"{mpath}: not valid JSON ({e})") from None
  if not isinstance(m, dict) or m.get("format") != FORMAT:
    raise UserInputError(f"{mpath}: format is {m.get('format') if isinstance(m, dict) else m!r}"
                         f", expected {FORMAT!r}")
  if m.get("format_version") != FORMAT_VERSION:
    raise UserInputError(
        f"{mpath}: format version {m.get('format_version')!r} (written by mpqjax "
        f"{m.get('mpqjax_version', '?')}) but this mpqjax {__version__} reads version "
        f"{FORMAT_VERSION}; re-run `mpqjax convert` on the diffusers checkpoint")
  for k in ("model", "dtype", "quantize", "quantized_linears"):
    if k not in m:
      raise UserInputError(f"{mpath}: missing field {k!r}")
  if not os.path.isdir(os.path.join(path, PARAMS)):
    raise UserInputError(f"{path}: the {PARAMS}/ checkpoint folder is missing")
  return m


def read_plain_params(path: str) -> dict:
  """The stored nested dict of numpy arrays."""
  ocp = _orbax()
  ckpt = ocp.StandardCheckpointer()
  try:
    return ckpt.restore(os.path.join(os.path.abspath(path), PARAMS))
  except Exception as e:  # orbax raises many kinds for damaged folders
    raise UserInputError(f"{path}: cannot read the {PARAMS}/ checkpoint ({e})") from e
  finally:
    ckpt.close()
