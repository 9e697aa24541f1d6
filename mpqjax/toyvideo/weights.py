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


def _unflatten(flat: dict[str, np.ndarray], prefix: str) -> dict:
  from models.cogvideox.params import set_path
  out: dict = {}
  for k, v in flat.items():
    if k.startswith(prefix):
      set_path(out, k[len(prefix):], v)
  return out


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
    tp = quantize_blocks(tp, weight_format=quantize)
  tp = jax.tree.map(lambda a: a if isinstance(a, QuantizedLinear) else a.astype(dtype), tp,
                    is_leaf=lambda a: isinstance(a, QuantizedLinear))
  xp = jax.tree.map(jnp.asarray, _unflatten(flat, "text."))
  return ToyModel(config=config, params=tp, text_params=xp, meta=meta, folder=folder)
