"""The tiny random CogVideoX (2 layers, 8 video + 4 text tokens) that the generate tests share;
its `model` and `text` fixtures are in conftest.py."""
import types

import numpy as np

from models.cogvideox.config import CogVideoXConfig
from models.cogvideox.params import init_params, quantize_blocks
from mpqjax import generate as G

STEPS = 5
CFG = CogVideoXConfig(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                      time_embed_dim=16, text_embed_dim=32, num_layers=2, sample_width=4,
                      sample_height=4, sample_frames=5, max_text_seq_length=4)


def build_model() -> types.SimpleNamespace:
  """CFG with seed-7 random weights, block linears in NVFP4 (what generate runs)."""
  return types.SimpleNamespace(config=CFG, params=quantize_blocks(init_params(CFG, 7)))


def build_text() -> np.ndarray:
  """f32 [4, 32] text embeddings."""
  return np.random.default_rng(11).standard_normal((4, 32)).astype(np.float32)


def run(model, text, **kw):
  """generate() with the tests' steps, seed and TDC warm-up unless overridden."""
  kw = {"steps": STEPS, "seed": 5, "tdc_warmup": 2, **kw}
  return G.generate(model, text, **kw)
