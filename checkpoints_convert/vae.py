"""Convert a diffusers AutoencoderKLCogVideoX folder (config.json + safetensors) into the params
pytree of models.cogvideox_vae, streaming tensor by tensor.

  cfg, params = convert_vae(folder, dtype=np.float32)                # decoder only
  cfg, params = convert_vae(folder, dtype=np.float32, encoder=True)  # and the encoder

Without encoder=True the encoder's weights are neither checked nor read.
"""
from __future__ import annotations

import re
from typing import Callable

import numpy as np

from checkpoints_convert.safetensors_stream import open_checkpoint
from checkpoints_convert.t5 import check_keys, dtype_and_config, read_finite, set_path
from models.cogvideox_vae.model import VAEConfig, param_shapes

VAE_IGNORED = (re.compile(r"^quant_conv\."),)
ENCODER = re.compile(r"^encoder\.")


def convert_vae(folder: str, dtype=np.float32, progress: Callable[[str], None] | None = None,
                encoder: bool = False) -> tuple[VAEConfig, dict]:
  """(VAEConfig, params) from an AutoencoderKLCogVideoX folder. dtype: numpy dtype or
  'bf16'/'fp32'."""
  dtype, cfg = dtype_and_config(folder, dtype, VAEConfig,
                                "a diffusers AutoencoderKLCogVideoX folder has config.json and "
                                "diffusion_pytorch_model.safetensors")
  expected = param_shapes(cfg, encoder=encoder)
  params: dict = {}
  with open_checkpoint(folder) as ckpt:
    check_keys(ckpt, expected, VAE_IGNORED + (() if encoder else (ENCODER,)), source=folder)
    for key in expected:
      set_path(params, key.split("."), read_finite(ckpt, key, dtype))
      if progress is not None:
        progress(key)
  return cfg, params
