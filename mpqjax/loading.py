"""`load_transformer(path)`: a converted checkpoint (`mpqjax convert`) as a callable model.

  model = mpqjax.load_transformer("ckpt/cogvideox-2b-nvfp4")
  out = model(latents[B,F,C,H,W], timestep[B], text_emb[B,T,D], precision="bf16")
  model.config   # models.cogvideox.CogVideoXConfig
  model.params   # the parameter pytree (blocks stacked [L, ...]; see models/cogvideox)

`out` is diffusers' CogVideoXTransformer3DModel forward output (for RoPE models, with the
rotary table the diffusers pipeline would pass), in the checkpoint's activation dtype.
precision: "bf16" (default; W4A16 for a quantized checkpoint, the plain float baseline
otherwise), "int8" (W4A8) or "nvfp4" (W4A4) — the last two need a quantized checkpoint.
"""
from __future__ import annotations

import functools

from mpqjax.errors import UserInputError


class TransformerModel:
  """A loaded transformer: callable, with .config, .params and .manifest."""

  def __init__(self, config, params, manifest: dict, path: str):
    self.config = config
    self.params = params
    self.manifest = manifest
    self.path = path
    self._fns = {}

  @property
  def quantized(self) -> bool:
    return self.manifest.get("quantize") is not None

  def __repr__(self) -> str:
    c = self.config
    return (f"TransformerModel({self.path!r}, {c.num_layers} layers x {c.inner_dim}, "
            f"dtype={self.manifest['dtype']}, quantize={self.manifest['quantize']})")

  def _fn(self, precision: str):
    import jax

    from models.cogvideox import model as cogvideox
    if precision not in cogvideox.PRECISION_MODES:
      raise UserInputError(f"precision must be one of {tuple(cogvideox.PRECISION_MODES)}, "
                           f"got {precision!r}")
    if precision != "bf16" and not self.quantized:
      raise UserInputError(f"precision={precision!r} needs a quantized checkpoint; {self.path} "
                           "is unquantized (convert with --quantize nvfp4)")
    if precision not in self._fns:
      modes = cogvideox.modes_for_precision(self.config, precision)
      self._fns[precision] = jax.jit(functools.partial(cogvideox.forward, config=self.config,
                                                       modes=modes))
    return self._fns[precision]

  def __call__(self, latents, timestep, text_emb, *, precision: str = "bf16"):
    import jax.numpy as jnp

    from models.cogvideox.model import check_inputs
    latents, timestep, text_emb = (jnp.asarray(a) for a in (latents, timestep, text_emb))
    if timestep.ndim == 0:
      timestep = jnp.broadcast_to(timestep, latents.shape[:1])
    check_inputs(self.config, latents.shape, timestep.shape, text_emb.shape)
    return self._fn(precision)(self.params, latents, timestep, text_emb)


def load_transformer(path) -> TransformerModel:
  """Load a converted checkpoint (see module doc). Clear errors for a missing path, a folder
  that is not a converted checkpoint, or a format-version mismatch."""
  import os

  import jax.numpy as jnp

  from checkpoints_convert import store
  from checkpoints_convert.cogvideox import params_from_plain
  from models.cogvideox.config import CogVideoXConfig

  path = os.fspath(path)
  manifest = store.read_manifest(path)
  if manifest["model"] != "CogVideoXTransformer3DModel":
    raise UserInputError(f"{path}: model {manifest['model']!r} is not supported")
  config = CogVideoXConfig.from_json(os.path.join(path, store.CONFIG))
  plain = store.read_plain_params(path, manifest, leaf_fn=jnp.asarray)
  params = params_from_plain(plain, manifest["quantized_linears"])
  return TransformerModel(config, params, manifest, path)
