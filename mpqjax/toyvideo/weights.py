"""The shipped toy model: loading its weights and turning prompts into videos.

Files (inside the package, mpqjax/toyvideo/weights/):
  toyvideo.safetensors   f32 EMA weights: "transformer.<diffusers name>" (blocks stacked [L, ...]
                         as in models/cogvideox/params.py) and "text.<name>" (text.py's encoder)
  toyvideo.json          configs: transformer (diffusers CogVideoXTransformer3DModel fields), text
                         encoder, video size, scheduler, and how it was trained
  calibration.json       the DMPQ calibration of this model (mpqjax calibrate's format)

  model = load(quantize="nvfp4")         # .config, .params (for mpqjax.generate), .text_params
  emb, neg = model.encode(["a red circle moving left"])   # f32 [B, T, D] each (neg: empty prompt)
  frames = model.to_frames(latents)      # [B, F, 3, H, W] in [-1, 1] -> uint8 [B, F, H, W, 3]
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from mpqjax.errors import UserInputError

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
NAME = "toyvideo"
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 6.0


def weights_path(folder: str = WEIGHTS_DIR) -> tuple[str, str]:
  return os.path.join(folder, f"{NAME}.safetensors"), os.path.join(folder, f"{NAME}.json")


def calibration_path(folder: str = WEIGHTS_DIR) -> str:
  return os.path.join(folder, "calibration.json")


def available(folder: str = WEIGHTS_DIR) -> bool:
  return all(os.path.isfile(p) for p in weights_path(folder))


@dataclasses.dataclass
class ToyModel:
  config: Any            # models.cogvideox.CogVideoXConfig
  params: dict           # transformer pytree (block linears quantized unless quantize=None)
  text_params: dict
  meta: dict             # toyvideo.json
  folder: str

  @property
  def max_tokens(self) -> int:
    return int(self.meta["text_encoder"]["max_tokens"])

  @property
  def video_shape(self) -> tuple[int, int, int]:
    v = self.meta["video"]
    return int(v["frames"]), int(v["height"]), int(v["width"])

  def scheduler_config(self):
    from mpqjax import schedulers
    return schedulers.SchedulerConfig(**self.meta["scheduler"])

  def encode(self, prompts):
    """prompts (list of str) -> (emb, neg) f32 [B, T, D]: the prompts and the empty prompt."""
    import jax.numpy as jnp

    from mpqjax.toyvideo import text
    ids = text.tokenize_batch(list(prompts), self.max_tokens)
    heads = int(self.meta["text_encoder"]["heads"])
    emb = text.encode(self.text_params, jnp.asarray(ids), heads=heads)
    neg = text.encode(self.text_params, jnp.zeros_like(jnp.asarray(ids)), heads=heads)
    return np.asarray(emb, np.float32), np.asarray(neg, np.float32)

  @staticmethod
  def to_frames(latents) -> np.ndarray:
    from mpqjax.toyvideo.train import to_pixels
    return to_pixels(latents)

  def calibration(self):
    """The shipped Calibration, or None when the file is absent."""
    path = calibration_path(self.folder)
    if not os.path.isfile(path):
      return None
    from mpqjax.method.calibration import Calibration
    return Calibration.load(path)


def prequantized_path(folder: str = WEIGHTS_DIR, weight_format: str = "nvfp4") -> str:
  return os.path.join(folder, f"{NAME}.{weight_format}.safetensors")


def _sha256(path: str) -> str:
  import hashlib
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


_QL_FIELDS = ("codes", "scales", "global_scale", "w_int8_scale", "bias")


def save_prequantized(folder: str = WEIGHTS_DIR, weight_format: str = "nvfp4") -> str:
  """Quantize the block linears of folder's f32 weights (quantize_blocks) and store the result,
  so loading needs no eager quantization (~7 s of op-by-op compilation on CPU). The file records
  the sha256 of the f32 file it was made from; load() ignores it when they differ."""
  import jax
  from safetensors.numpy import load_file, save_file

  from models.cogvideox.params import BLOCKS, LINEAR_NAMES, get_path, quantize_blocks
  from mpqjax.atomic import atomic_write
  if weight_format != "nvfp4":
    raise ValueError("only the nvfp4 copy is shipped")
  st, _ = weights_path(folder)
  flat = {}
  tp = jax.tree.map(np.asarray, _unflatten(load_file(st), "transformer."))
  q = quantize_blocks(tp, weight_format=weight_format)[BLOCKS]
  meta = {"source_sha256": _sha256(st), "weight_format": weight_format}
  for name in LINEAR_NAMES:
    ql = get_path(q, name)
    arrays = {"codes": ql.weight.codes, "scales": np.asarray(ql.weight.scales).view(np.uint8),
              "global_scale": ql.weight.global_scale, "w_int8_scale": ql.w_int8_scale,
              "bias": ql.bias}
    for field, a in arrays.items():
      if a is not None:
        flat[f"{name}.{field}"] = np.ascontiguousarray(np.asarray(a))
    meta[f"{name}.hadamard_block"] = str(ql.hadamard_block)
  path = prequantized_path(folder, weight_format)
  atomic_write(path, lambda p: save_file(flat, p, metadata=meta), mode=0o644)  # shipped
  return path


def _load_prequantized(folder: str, source: str, weight_format: str):
  """{linear name: stacked QuantizedLinear} from the shipped copy, or None when absent or made
  from other weights."""
  path = prequantized_path(folder, weight_format)
  if not os.path.isfile(path):
    return None
  import jax.numpy as jnp
  import ml_dtypes
  from safetensors import safe_open

  from models.cogvideox.params import LINEAR_NAMES
  from mpqjax.formats import NVFP4Tensor
  from mpqjax.qlinear import QuantizedLinear
  with safe_open(path, framework="numpy") as f:
    meta = f.metadata() or {}
    if meta.get("source_sha256") != _sha256(source) or meta.get("weight_format") != weight_format:
      return None
    keys = set(f.keys())
    out = {}
    for name in LINEAR_NAMES:
      g = lambda field: f.get_tensor(f"{name}.{field}") if f"{name}.{field}" in keys else None
      w = NVFP4Tensor(jnp.asarray(g("codes")),
                      jnp.asarray(g("scales").view(ml_dtypes.float8_e4m3fn)),
                      jnp.asarray(g("global_scale")))
      bias = g("bias")
      out[name] = QuantizedLinear(w, jnp.asarray(g("w_int8_scale")),
                                  None if bias is None else jnp.asarray(bias),
                                  int(meta[f"{name}.hadamard_block"]), weight_format)
  return out


def _unflatten(flat: dict[str, np.ndarray], prefix: str) -> dict:
  from models.cogvideox.params import set_path
  out: dict = {}
  for k, v in flat.items():
    if k.startswith(prefix):
      set_path(out, k[len(prefix):], v)
  return out


def load_params(path: str) -> dict:
  """The raw f32 training pytree {"transformer": ..., "text": ...} of a toyvideo.safetensors."""
  from safetensors.numpy import load_file
  flat = load_file(path)
  return {"transformer": _unflatten(flat, "transformer."), "text": _unflatten(flat, "text.")}


def load(folder: str = WEIGHTS_DIR, *, quantize: str | None = "nvfp4",
         dtype: str = "bfloat16") -> ToyModel:
  """Load the toy model. quantize: "nvfp4" (block linears in NVFP4: the method's weights),
  "int8", or None (unquantized: the bf16 baseline). Every other transformer weight is cast to
  `dtype` (bf16: the baseline and the streams of the quantized model; "float32" for exact
  checks); block linears are quantized from the stored f32 weights. The text encoder stays f32."""
  import jax
  import jax.numpy as jnp
  from safetensors.numpy import load_file

  from models.cogvideox.config import CogVideoXConfig
  from models.cogvideox.params import checkpoint_shapes, quantize_blocks
  st, js = weights_path(folder)
  for p in (st, js):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"toy model file missing: {p}")
  with open(js, encoding="utf-8") as f:
    meta = json.load(f)
  if meta.get("format") != "mpqjax-toyvideo" or meta.get("version") != 1:
    raise UserInputError(f"{js}: not an mpqjax-toyvideo v1 config")
  config = CogVideoXConfig.from_dict(meta["transformer"], source=js)
  flat = load_file(st)
  tp = _unflatten(flat, "transformer.")
  # shape check against the config (stacked blocks: [L, ...])
  expected = {}
  for k, shape in checkpoint_shapes(config).items():
    if k.startswith("transformer_blocks."):
      parts = k.split(".")
      if parts[1] != "0":
        continue
      k = ".".join([parts[0]] + parts[2:])
      shape = (config.num_layers, *shape)
    expected["transformer." + k] = tuple(shape)
  got = {k: tuple(v.shape) for k, v in flat.items() if k.startswith("transformer.")}
  if got != expected:
    bad = sorted(set(got) ^ set(expected)) + sorted(
        k for k in set(got) & set(expected) if got[k] != expected[k])
    raise UserInputError(f"{st}: tensors do not match the config: {', '.join(bad[:10])}")
  from mpqjax.qlinear import QuantizedLinear
  tp = jax.tree.map(jnp.asarray, tp)
  if quantize is not None:
    pre = _load_prequantized(folder, st, quantize)
    if pre is not None:  # the shipped NVFP4 copy (made by save_prequantized from the same file)
      from models.cogvideox.params import BLOCKS, set_path
      for name, ql in pre.items():
        set_path(tp[BLOCKS], name, ql)
    else:
      tp = quantize_blocks(tp, weight_format=quantize)
  tp = jax.tree.map(lambda a: a if isinstance(a, QuantizedLinear) else a.astype(dtype), tp,
                    is_leaf=lambda a: isinstance(a, QuantizedLinear))
  xp = jax.tree.map(jnp.asarray, _unflatten(flat, "text."))
  return ToyModel(config=config, params=tp, text_params=xp, meta=meta, folder=folder)
