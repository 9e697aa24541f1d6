"""On-disk format of a converted transformer (what `mpqjax convert` writes).

  DST/
    manifest.json   {"format": "mpqjax-transformer", "format_version": 1, "model":
                     "CogVideoXTransformer3DModel", "dtype": "bf16"|"fp32",
                     "quantize": null|"nvfp4"|"int8", "quantized_linears": {name:
                     {"hadamard_block", "weight_format"}}, "param_count", "bf16_bytes",
                     "bytes", "source", "mpqjax_version"}
    config.json     the diffusers transformer config (CogVideoXConfig.to_dict())
    params/part-NNNNN/   orbax checkpoints (StandardCheckpointer) that together hold the
                    parameter pytree: each is a nested dict, a part of the tree; loading
                    merges them. QuantizedLinear leaves are stored as plain dicts
                    {"weight": {"codes", "scales", "global_scale"} | {"values", "scales"},
                    "w_int8_scale", "bias"?} and rebuilt from the manifest's
                    quantized_linears. The manifest lists the parts ("parts").
    Parts exist so that the converter writes (and frees) its output as it goes: a part
    holds up to PART_BYTES (or one larger group); orbax's save makes a host copy of it.

write_converted() builds everything in a hidden temporary folder next to DST and renames it
into place, so an interrupted or failed run leaves no DST behind; replacing an existing DST
needs overwrite=True.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Callable, Iterable

import numpy as np

from mpqjax._version import __version__
from mpqjax.errors import UserInputError
from mpqjax.jsonio import read_json_object

FORMAT = "mpqjax-transformer"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
PARAMS = "params"
PART_BYTES = 512 * 1024 * 1024


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


def write_converted(dst: str, groups: Iterable[tuple[str, Any]], config_dict: dict,
                    manifest_fn: Callable[[], dict], *, overwrite: bool = False,
                    part_bytes: int | None = None) -> dict:
  """Atomically write DST (see module doc) from (dotted name, plain value) groups, which
  are consumed (and released) as they come. manifest_fn() is called after the last group
  (so it may report stats gathered while streaming). Returns the manifest written."""
  check_destination(dst, overwrite)
  part_bytes = PART_BYTES if part_bytes is None else part_bytes
  dst = os.path.abspath(dst)
  parent, name = os.path.split(dst)
  tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
  os.mkdir(tmp)
  try:
    ocp = _orbax()
    ckpt = ocp.StandardCheckpointer()
    parts: list[str] = []
    layer_slices: dict[str, list[int]] = {}
    pending: dict = {}
    pending_bytes = 0

    def save(tree: dict) -> str:
      part = f"part-{len(parts):05d}"
      ckpt.save(os.path.join(tmp, PARAMS, part), tree)
      ckpt.wait_until_finished()
      parts.append(part)
      return part

    def flush():
      nonlocal pending, pending_bytes
      save(pending)
      pending, pending_bytes = {}, 0
      _release_freed_memory()

    os.mkdir(os.path.join(tmp, PARAMS))
    for gname, value in groups:
      n = _nbytes(value)
      if pending and pending_bytes + n > part_bytes:
        flush()  # a part holds at most part_bytes, or one slice of a larger group
      if n > part_bytes:
        # A large group (all leaves share the leading layer axis) goes out in layer slices,
        # each its own part: orbax's host copy is then one slice, not the whole group.
        n_layers = _leading_dim(value, gname)
        per = max(1, int(n_layers * part_bytes // n))
        for start in range(0, n_layers, per):
          stop = min(start + per, n_layers)
          tree: dict = {}
          _set_path(tree, gname, _map_leaves(lambda a: a[start:stop], value))
          layer_slices[save(tree)] = [start, stop]
          del tree
        del value
        _release_freed_memory()
        continue
      _set_path(pending, gname, value)
      pending_bytes += n
      del value
      if pending_bytes >= part_bytes:
        flush()  # before the next group is built
    if pending:
      flush()
    ckpt.close()
    with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
      json.dump(config_dict, f, indent=2)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "mpqjax_version": __version__, **manifest_fn(), "parts": parts,
                "layer_slices": layer_slices}
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
    return manifest
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _release_freed_memory() -> None:
  """Return freed heap pages to the OS (glibc keeps them otherwise, inflating the RSS the
  converter reports and the peak of the next part). No-op where unavailable."""
  try:
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _set_path(tree: dict, dotted: str, value: Any) -> None:
  parts = dotted.split(".")
  for p in parts[:-1]:
    tree = tree.setdefault(p, {})
  tree[parts[-1]] = value


def _nbytes(value: Any) -> int:
  if isinstance(value, dict):
    return sum(_nbytes(v) for v in value.values())
  return int(getattr(value, "nbytes", 0))


def _leading_dim(value: Any, name: str) -> int:
  dims = {int(a.shape[0]) for a in _leaves(value) if getattr(a, "ndim", 0) >= 1}
  if len(dims) != 1:
    raise ValueError(f"{name}: leaves do not share one leading layer axis ({sorted(dims)})")
  return dims.pop()


def _leaves(tree: Any) -> list:
  if isinstance(tree, dict):
    return [x for v in tree.values() for x in _leaves(v)]
  return [tree]


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
  out = []
  for k, v in tree.items():
    if isinstance(v, dict):
      out.extend(_flatten(v, f"{prefix}{k}."))
    else:
      out.append((f"{prefix}{k}", v))
  return out


def _map_leaves(fn: Callable, tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _map_leaves(fn, v) for k, v in tree.items()}
  return fn(tree)


def _merge(into: dict, part: dict, where: str = "") -> None:
  for k, v in part.items():
    if isinstance(v, dict) and isinstance(into.get(k), dict):
      _merge(into[k], v, f"{where}{k}.")
    elif k in into:
      raise UserInputError(f"converted checkpoint: {where}{k} is stored twice")
    else:
      into[k] = v


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
  m = read_json_object(mpath)
  if m.get("format") != FORMAT:
    raise UserInputError(f"{mpath}: format is {m.get('format')!r}, expected {FORMAT!r}")
  if m.get("format_version") != FORMAT_VERSION:
    raise UserInputError(
        f"{mpath}: format version {m.get('format_version')!r} (written by mpqjax "
        f"{m.get('mpqjax_version', '?')}) but this mpqjax {__version__} reads version "
        f"{FORMAT_VERSION}; re-run `mpqjax convert` on the diffusers checkpoint")
  for k in ("model", "dtype", "quantize", "quantized_linears", "parts", "layer_slices"):
    if k not in m:
      raise UserInputError(f"{mpath}: missing field {k!r}")
  if not os.path.isdir(os.path.join(path, PARAMS)):
    raise UserInputError(f"{path}: the {PARAMS}/ checkpoint folder is missing")
  return m


def read_plain_params(path: str, manifest: dict, leaf_fn: Callable | None = None) -> dict:
  """The stored nested dict of arrays (all parts merged). leaf_fn (e.g. jnp.asarray) is
  applied part by part, so the host copies of one part are freed before the next is read."""
  ocp = _orbax()
  ckpt = ocp.StandardCheckpointer()
  plain: dict = {}
  slices = manifest.get("layer_slices", {})
  pieces: dict[str, list] = {}  # leaf path -> [(start, array)] for layer-sliced groups
  try:
    for part in manifest["parts"]:
      ppath = os.path.join(os.path.abspath(path), PARAMS, part)
      if not os.path.isdir(ppath):
        raise UserInputError(f"{path}: part {PARAMS}/{part} listed in the manifest is missing")
      try:
        tree = ckpt.restore(ppath)
      except Exception as e:  # orbax raises many kinds for damaged folders
        raise UserInputError(f"{path}: cannot read {PARAMS}/{part} ({e})") from e
      if part in slices:
        for leaf_path, a in _flatten(tree):
          pieces.setdefault(leaf_path, []).append((slices[part][0], a))
        del tree
        continue
      if leaf_fn is not None:
        tree = _map_leaves(leaf_fn, tree)
      _merge(plain, tree)
      del tree
    for leaf_path in list(pieces):
      ordered = [a for _, a in sorted(pieces.pop(leaf_path), key=lambda t: t[0])]
      a = np.concatenate(ordered, axis=0)
      del ordered
      tree = {}
      _set_path(tree, leaf_path, leaf_fn(a) if leaf_fn is not None else a)
      del a
      _merge(plain, tree)
  finally:
    ckpt.close()
  return plain
