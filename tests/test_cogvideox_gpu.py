"""GPU-only: the bf16 CogVideoX forward with cuDNN attention and the quantized modes, against
diffusers' float64 output (the fixtures). Skipped without a GPU."""
import os

import jax
import numpy as np
import pytest

import mpqjax
from checkpoints_convert.cli import convert
from mpqjax.testing import rel_err as _rel

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "cogvideox")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")]


@pytest.mark.parametrize("case", ["rope_nonsquare_sharded", "sincos_nonsquare"])
def test_bf16_and_quantized_on_gpu(case, tmp_path):
  src = os.path.join(FIXTURES, case)
  io = np.load(os.path.join(src, "io.npz"))
  args = (io["latents"], io["timestep"], io["text_emb"])
  convert(src, str(tmp_path / "bf16"))
  out = mpqjax.load_transformer(tmp_path / "bf16")(*args)
  assert _rel(out, io["out"]) < 0.02  # CPU measures 5.5e-3..6.2e-3
  convert(src, str(tmp_path / "q"), quantize="nvfp4")
  m = mpqjax.load_transformer(tmp_path / "q")
  errs = {p: _rel(m(*args, precision=p), io["out"]) for p in ("bf16", "int8", "nvfp4")}
  assert max(errs.values()) < 0.1, errs  # CPU measures 3.3e-2..5.2e-2
