"""diffusers CogVideoXTransformer3DModel safetensors -> the mpqjax parameter pytree.

  check_keys(reader, config)                 one UserInputError listing every missing,
                                             unexpected and mis-shaped tensor
  build_params(reader, config, dtype=..., quantize=None|"nvfp4"|"int8", progress=None)
      -> (params, stats)                     numpy leaves; blocks stacked [L, ...]

Streaming: tensors are read one at a time (a quantized linear: its weight and bias) and
written into preallocated stacked output arrays, so host memory holds the output plus about
one tensor. Every tensor is checked for non-finite values, naming it and its file.
Quantization applies to the 8 linears of each block (models.cogvideox.LINEAR_NAMES);
everything else is stored in `dtype`.
"""
from __future__ import annotations

from typing import Callable

import jax
import ml_dtypes
import numpy as np

from checkpoints_convert.safetensors_stream import CheckpointReader
from models.cogvideox.config import CogVideoXConfig
from models.cogvideox.params import (BLOCKS, LINEAR_NAMES, block_param_shapes, checkpoint_shapes,
                                     quantize_block_linear, set_path)
from mpqjax.errors import UserInputError
from mpqjax.qlinear import QuantizedLinear

DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp32": np.dtype(np.float32)}
_FLOAT_KINDS = ("f", "V")  # V: ml_dtypes (bf16, f8) report kind 'V'


def check_keys(reader: CheckpointReader, config: CogVideoXConfig) -> None:
  """All problems at once: missing, unexpected and mis-shaped keys."""
  expected = checkpoint_shapes(config)
  have = set(reader.keys())
  missing = sorted(set(expected) - have)
  unexpected = sorted(have - set(expected))
  misshaped = sorted(f"{k}: checkpoint {list(reader.shape(k))}, config expects {list(v)}"
                     for k, v in expected.items() if k in have and reader.shape(k) != v)
  if missing or unexpected or misshaped:
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("mis-shaped", misshaped)):
      if items:
        parts.append(f"{len(items)} {title} key(s):\n    " + "\n    ".join(items))
    raise UserInputError(f"checkpoint {reader.source} does not match its config "
                         f"(CogVideoX, {config.num_layers} layers, inner_dim "
                         f"{config.inner_dim}):\n  " + "\n  ".join(parts))


def _read_float(reader: CheckpointReader, key: str) -> np.ndarray:
  """The tensor as float32, rejecting non-finite values (naming tensor and file)."""
  a = reader.read(key)
  if a.dtype.kind not in _FLOAT_KINDS:
    raise UserInputError(f"{key} in {reader.file_of(key)} has dtype {a.dtype}; expected a "
                         "floating-point tensor")
  a = a.astype(np.float32)
  if not np.isfinite(a).all():
    n = int((~np.isfinite(a)).sum())
    raise UserInputError(f"tensor {key} in {reader.file_of(key)} has {n} non-finite value(s) "
                         "(NaN/Inf); refusing to convert")
  return a


def build_params(reader: CheckpointReader, config: CogVideoXConfig, *, dtype: str = "bf16",
                 quantize: str | None = None,
                 progress: Callable[[int, int, str], None] | None = None):
  """Stream the checkpoint into the parameter pytree (numpy leaves).

  Returns (params, stats): stats = {"param_count", "bf16_bytes" (all parameters in bf16),
  "bytes" (as stored: quantized block linears + the rest in dtype),
  "quantized_linears": {name: {"hadamard_block", "weight_format"}} }.
  """
  if dtype not in DTYPES:
    raise UserInputError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
  if quantize not in (None, "nvfp4", "int8"):
    raise UserInputError(f"quantize must be None, 'nvfp4' or 'int8', got {quantize!r}")
  check_keys(reader, config)
  out_dt = DTYPES[dtype]
  n_layers = config.num_layers
  block_shapes = block_param_shapes(config)
  quantized = set(LINEAR_NAMES) if quantize else set()
  keys = reader.keys()
  total, done = len(keys), 0
  params: dict = {}
  stacks: dict[str, np.ndarray] = {}
  qstacks: dict[str, object] = {}  # linear name -> QuantizedLinear of stacked numpy arrays
  qmeta: dict[str, dict] = {}

  def tick(key):
    nonlocal done
    done += 1
    if progress:
      progress(done, total, key)

  for key in keys:
    if not key.startswith(BLOCKS + "."):
      set_path(params, key, _read_float(reader, key).astype(out_dt))
      tick(key)
      continue
    _, idx, sub = key.split(".", 2)
    i = int(idx)
    owner = sub.rsplit(".", 1)[0]
    if owner in quantized:
      if sub.endswith(".bias"):
        continue  # read together with its weight
      w = _read_float(reader, key)
      bkey = f"{BLOCKS}.{i}.{owner}.bias"
      b = _read_float(reader, bkey) if bkey in reader else None
      q = jax.device_get(quantize_block_linear(w, b, weight_format=quantize, name=key))
      del w, b
      if owner not in qstacks:
        qstacks[owner] = jax.tree.map(
            lambda a: np.empty((n_layers, *np.shape(a)), np.asarray(a).dtype), q)
        qmeta[owner] = {"hadamard_block": q.hadamard_block, "weight_format": q.weight_format}

      def put(dst, src, i=i):
        dst[i] = src
      jax.tree.map(put, qstacks[owner], q)
      tick(key)
      if bkey in reader:
        tick(bkey)
      continue
    if sub not in stacks:
      stacks[sub] = np.empty((n_layers, *block_shapes[sub]), out_dt)
    stacks[sub][i] = _read_float(reader, key).astype(out_dt)
    tick(key)

  blocks: dict = {}
  for sub, arr in stacks.items():
    set_path(blocks, sub, arr)
  for owner, q in qstacks.items():
    set_path(blocks, owner, q)
  params[BLOCKS] = blocks

  leaves = jax.tree_util.tree_leaves(params)
  stored = sum(a.nbytes for a in leaves)
  count = sum(int(np.prod(s)) for s in checkpoint_shapes(config).values())
  stats = {"param_count": count, "bf16_bytes": 2 * count, "bytes": int(stored),
           "quantized_linears": qmeta}
  return params, stats


def params_to_plain(params: dict) -> dict:
  """QuantizedLinear leaves -> plain nested dicts of arrays (for storage)."""
  def conv(x):
    if isinstance(x, QuantizedLinear):
      d = {"weight": dict(x.weight._asdict()), "w_int8_scale": x.w_int8_scale}
      if x.bias is not None:
        d["bias"] = x.bias
      return d
    if isinstance(x, dict):
      return {k: conv(v) for k, v in x.items()}
    return x
  return conv(params)


def params_from_plain(plain: dict, quantized_linears: dict) -> dict:
  """Inverse of params_to_plain, given {linear name: {"hadamard_block", "weight_format"}}."""
  from mpqjax import formats
  from models.cogvideox.params import get_path

  def copy(x):
    return {k: copy(v) for k, v in x.items()} if isinstance(x, dict) else x
  params = copy(plain)
  for name, meta in quantized_linears.items():
    d = get_path(params[BLOCKS], name)
    fmt = meta["weight_format"]
    w = (formats.NVFP4Tensor(**d["weight"]) if fmt == "nvfp4"
         else formats.Int8Tensor(**d["weight"]))
    set_path(params[BLOCKS], name,
             QuantizedLinear(w, d["w_int8_scale"], d.get("bias"), int(meta["hadamard_block"]),
                             fmt))
  return params
