"""Convert a transformers T5EncoderModel folder (config.json + safetensors, sharded or not) into
the stacked params pytree of models.t5, streaming tensor by tensor.

  cfg, params = convert_t5(folder, dtype=np.float32)   # numpy leaves

Host memory: the output arrays (allocated once, filled layer by layer) plus one tensor.
Also holds the small helpers the VAE converter shares: key checking and nesting.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from checkpoints_convert.safetensors_stream import CheckpointError, open_checkpoint
from models.t5.model import T5Config, param_shapes

DTYPES = {"fp32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16),
          "float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}

# T5EncoderModel checkpoints may carry the tied input embedding a second time, and a full T5
# checkpoint its decoder and LM head; none of them is used by the encoder.
T5_IGNORED = (re.compile(r"^encoder\.embed_tokens\.weight$"), re.compile(r"^decoder\."),
              re.compile(r"^lm_head\."))


def check_keys(ckpt, expected: Mapping[str, tuple], ignored: Iterable[re.Pattern] = (),
               source: str = "") -> None:
  """One CheckpointError listing every missing, unexpected and mis-shaped tensor."""
  have = set(ckpt.keys())
  ignored = tuple(ignored)
  missing = sorted(set(expected) - have)
  unexpected = sorted(k for k in have - set(expected) if not any(p.search(k) for p in ignored))
  misshaped = sorted(f"{k}: {list(ckpt.shape(k))} (expected {list(expected[k])})"
                     for k in set(expected) & have if tuple(ckpt.shape(k)) != tuple(expected[k]))
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing: {', '.join(missing)}")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected: {', '.join(unexpected)}")
  if misshaped:
    problems.append(f"{len(misshaped)} mis-shaped: {'; '.join(misshaped)}")
  if problems:
    raise CheckpointError(f"{source}: checkpoint does not match its config.json: "
                          + " | ".join(problems))


def read_finite(ckpt, key: str, dtype: np.dtype) -> np.ndarray:
  """ckpt[key] cast to dtype; non-finite weights are rejected naming the tensor."""
  a = ckpt.read(key)
  if a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16:
    if not np.isfinite(a.astype(np.float32)).all():
      raise CheckpointError(f"{ckpt.file_of(key)}: tensor {key!r} has non-finite values")
  return a.astype(dtype)


def dtype_and_config(folder: str, dtype, config_cls, layout_hint: str):
  """(numpy dtype, config_cls.from_file(folder/config.json)); dtype: a numpy dtype or one of
  DTYPES' names. Errors name the folder and, for a missing config, the expected layout."""
  np_dtype = DTYPES.get(dtype, None) if isinstance(dtype, str) else np.dtype(dtype)
  if np_dtype is None:
    raise CheckpointError(f"dtype must be one of {sorted(DTYPES)}")
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{folder}: no config.json ({layout_hint})")
  return np_dtype, config_cls.from_file(cfg_path)


def set_path(tree: dict, path: Iterable[str], value) -> None:
  *head, last = list(path)
  for k in head:
    tree = tree.setdefault(k, {})
  tree[last] = value


def convert_t5(folder: str, dtype=np.float32,
               progress: Callable[[str], None] | None = None) -> tuple[T5Config, dict]:
  """(T5Config, params) from a T5EncoderModel folder. dtype: numpy dtype or 'bf16'/'fp32'."""
  dtype, cfg = dtype_and_config(folder, dtype, T5Config,
                                "a transformers T5EncoderModel folder has config.json and "
                                "model*.safetensors")
  expected = param_shapes(cfg)
  params: dict = {}
  with open_checkpoint(folder) as ckpt:
    check_keys(ckpt, expected, T5_IGNORED, source=folder)
    stacked = re.compile(r"^encoder\.block\.(\d+)\.(.*)$")
    for key in expected:
      m = stacked.match(key)
      if key.endswith("relative_attention_bias.weight"):
        set_path(params, ["encoder", "relative_attention_bias", "weight"],
                 read_finite(ckpt, key, dtype))
      elif m:
        i, rest = int(m.group(1)), m.group(2)
        path = ["encoder", "block", *rest.split(".")]
        node = params
        for k in path[:-1]:
          node = node.setdefault(k, {})
        if path[-1] not in node:
          node[path[-1]] = np.empty((cfg.num_layers, *expected[key]), dtype)
        node[path[-1]][i] = read_finite(ckpt, key, dtype)
      else:
        set_path(params, key.split("."), read_finite(ckpt, key, dtype))
      if progress is not None:
        progress(key)
  return cfg, params
