"""diffusers CogVideoXTransformer3DModel safetensors -> the mpqjax parameter pytree.

  check_keys(reader, config)                 one UserInputError listing every missing,
                                             unexpected and mis-shaped tensor
  iter_groups(reader, config, dtype=..., quantize=None|"nvfp4"|"int8", progress=None,
              stats=None) -> (name, value) groups, one stacked block parameter at a time
  build_params(reader, config, ...) -> (params, stats)   the same, assembled in memory

Streaming: tensors are read one at a time (a quantized linear: its weight and bias) into a
preallocated stacked array; `mpqjax convert` writes each group out before reading the next,
so host memory holds about one stacked group plus one tensor. Every tensor is checked for non-finite values, naming it and its file.
Quantization applies to the 8 linears of each block (models.cogvideox.LINEAR_NAMES);
everything else is stored in `dtype`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np

from checkpoints_convert.safetensors_stream import CheckpointReader
from models.cogvideox.config import CogVideoXConfig
from models.cogvideox.params import (BLOCKS, LINEAR_NAMES, block_param_shapes, checkpoint_shapes,
                                     outer_param_shapes, quantize_block_linear, set_path)
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


def iter_groups(reader: CheckpointReader, config: CogVideoXConfig, *, dtype: str = "bf16",
                quantize: str | None = None,
                progress: Callable[[int, int, str], None] | None = None,
                stats: dict | None = None) -> Iterator[tuple[str, Any]]:
  """Stream the checkpoint as (dotted name, value) groups, in this order: every tensor
  outside the blocks (value: np.ndarray in `dtype`), then one group per block parameter,
  stacked over the layers ("transformer_blocks.attn1.norm_q.weight": [L, ...]) or, for a
  quantized linear, "transformer_blocks.attn1.to_q": a QuantizedLinear of stacked numpy
  arrays. The layers of one group are read one at a time; a group is complete (and can be
  written and dropped) before the next one is read, so memory holds one group + one tensor.

  `stats`, if given, is filled once the generator is exhausted: "param_count", "bf16_bytes"
  (all parameters in bf16), "bytes" (as stored), "quantized_linears": {name:
  {"hadamard_block", "weight_format"}}.
  """
  if dtype not in DTYPES:
    raise UserInputError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
  if quantize not in (None, "nvfp4", "int8"):
    raise UserInputError(f"quantize must be None, 'nvfp4' or 'int8', got {quantize!r}")
  check_keys(reader, config)
  out_dt = DTYPES[dtype]
  n_layers = config.num_layers
  quantized = set(LINEAR_NAMES) if quantize else set()
  total, done, stored = len(reader.keys()), 0, 0
  qmeta: dict[str, dict] = {}

  def tick(key):
    nonlocal done
    done += 1
    if progress:
      progress(done, total, key)

  for key, _ in sorted(outer_param_shapes(config).items()):
    a = _read_float(reader, key).astype(out_dt)
    tick(key)
    stored += a.nbytes
    yield key, a
    del a  # drop our reference: the writer frees the group once written

  for sub, shape in sorted(block_param_shapes(config).items()):
    owner = sub.rsplit(".", 1)[0]
    name = f"{BLOCKS}.{sub}"
    if owner not in quantized:
      stack = np.empty((n_layers, *shape), out_dt)
      for i in range(n_layers):
        key = f"{BLOCKS}.{i}.{sub}"
        stack[i] = _read_float(reader, key).astype(out_dt)
        tick(key)
      stored += stack.nbytes
      yield name, stack
      del stack
      continue
    if not sub.endswith(".weight"):
      continue  # a quantized linear's bias is read with its weight
    qstack = None
    for i in range(n_layers):
      key, bkey = f"{BLOCKS}.{i}.{sub}", f"{BLOCKS}.{i}.{owner}.bias"
      w = _read_float(reader, key)
      b = _read_float(reader, bkey) if bkey in reader else None
      q = jax.device_get(quantize_block_linear(w, b, weight_format=quantize, name=key))
      del w, b
      if qstack is None:
        qstack = jax.tree.map(lambda a: np.empty((n_layers, *np.shape(a)), np.asarray(a).dtype),
                              q)
        qmeta[owner] = {"hadamard_block": q.hadamard_block, "weight_format": q.weight_format}

      def put(dst, src, i=i):
        dst[i] = src
      jax.tree.map(put, qstack, q)
      tick(key)
      if bkey in reader:
        tick(bkey)
    stored += sum(a.nbytes for a in jax.tree_util.tree_leaves(qstack))
    yield f"{BLOCKS}.{owner}", qstack
    del qstack

  if stats is not None:
    count = sum(int(np.prod(s)) for s in checkpoint_shapes(config).values())
    stats.update({"param_count": count, "bf16_bytes": 2 * count, "bytes": int(stored),
                  "quantized_linears": qmeta})


def build_params(reader: CheckpointReader, config: CogVideoXConfig, **kw):
  """The whole parameter pytree in memory (numpy leaves): (params, stats). See iter_groups."""
  stats: dict = {}
  params: dict = {}
  for name, value in iter_groups(reader, config, stats=stats, **kw):
    set_path(params, name, value)
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
