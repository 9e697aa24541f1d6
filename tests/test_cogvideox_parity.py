"""Parity with diffusers' CogVideoXTransformer3DModel (the fixtures in
tests/fixtures/cogvideox, made by make_cogvideox_fixtures.py; no torch needed here).

Each fixture folder is converted with the real converter in float32, loaded with
load_transformer and run; the output must match diffusers' float64 forward with a relative
Frobenius error <= 1e-5. The positional tables are also compared to diffusers' own."""
import os

import numpy as np
import pytest

import mpqjax
from checkpoints_convert.cli import convert
from models.cogvideox import embeddings
from mpqjax.testing import rel_err as _rel

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "cogvideox")
CASES = sorted(n for n in os.listdir(FIXTURES) if os.path.isdir(os.path.join(FIXTURES, n)))


def test_fixture_set_is_complete():
  assert len(CASES) >= 6
  sharded = [c for c in CASES if any(f.endswith(".index.json")
                                     for f in os.listdir(os.path.join(FIXTURES, c)))]
  assert len(sharded) >= 2


@pytest.mark.parametrize("case", CASES)
def test_parity_fp32(case, tmp_path):
  src = os.path.join(FIXTURES, case)
  io = np.load(os.path.join(src, "io.npz"))
  convert(src, str(tmp_path / "ckpt"), dtype="fp32")
  model = mpqjax.load_transformer(tmp_path / "ckpt")
  out = model(io["latents"], io["timestep"], io["text_emb"])
  assert out.shape == io["out"].shape and out.dtype == np.float32
  rel = _rel(out, io["out"])
  assert rel <= 1e-5, f"{case}: relative Frobenius error {rel:.3e} vs diffusers"
  _, f, _, h, w = io["latents"].shape
  if "rope_cos" in io:
    cos, sin = embeddings.rotary_3d(model.config, f, h, w)
    np.testing.assert_allclose(cos, io["rope_cos"], atol=1e-6)
    np.testing.assert_allclose(sin, io["rope_sin"], atol=1e-6)
  if "pos_embedding" in io:
    np.testing.assert_allclose(embeddings.video_pos_embedding(model.config, f, h, w),
                               io["pos_embedding"], atol=1e-6)
