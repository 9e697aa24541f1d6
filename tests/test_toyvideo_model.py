"""The shipped toy model: its files load, its NVFP4 copy is what quantize_blocks makes, and the
default `mpqjax generate` writes a video from a prompt."""
import json
import os

import numpy as np
import pytest

from mpqjax.toyvideo import weights

pytestmark = pytest.mark.skipif(not weights.available(), reason="toy weights not shipped")


def test_shipped_files_are_small_and_described():
  st, js = weights.weights_path()
  total = sum(os.path.getsize(os.path.join(weights.WEIGHTS_DIR, f))
              for f in os.listdir(weights.WEIGHTS_DIR))
  assert total <= 30 * 2 ** 20
  meta = json.load(open(js))
  assert meta["format"] == "mpqjax-toyvideo" and meta["training"]["total_steps"] > 0
  assert meta["video"] == {**meta["video"], "frames": 8, "height": 32, "width": 32}


def test_prequantized_copy_matches_quantize_blocks():
  """The shipped NVFP4 file must equal quantizing the shipped f32 weights, bit for bit."""
  import jax
  from safetensors.numpy import load_file

  from models.cogvideox.params import BLOCKS, get_path, quantize_blocks
  m = weights.load()  # uses the pre-quantized file
  assert weights._load_prequantized(weights.WEIGHTS_DIR, weights.weights_path()[0],
                                    "nvfp4") is not None
  tp = weights._unflatten(load_file(weights.weights_path()[0]), "transformer.")
  names = ("attn1.to_q", "ff.net.2")  # two shapes, enough to catch a layout slip; keeps it fast
  ref = quantize_blocks(tp, linears=names)[BLOCKS]
  for name in names:
    a, b = get_path(m.params[BLOCKS], name), get_path(ref, name)
    assert a.hadamard_block == b.hadamard_block and a.weight_format == b.weight_format
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert x.dtype == y.dtype and x.shape == y.shape
      np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


def test_shipped_model_forward_shapes(rng):
  import jax.numpy as jnp

  from models.cogvideox import model as cog
  m = weights.load(quantize=None)
  pos, neg = m.encode(["a red circle moving left", ""])
  assert pos.shape == (2, m.max_tokens, m.config.text_embed_dim)
  np.testing.assert_array_equal(pos[1], neg[1])  # the empty prompt is the unconditional input
  f, h, w = m.video_shape
  x = jnp.asarray(rng.standard_normal((2, f, 3, h, w)), jnp.float32)
  out = cog.forward(m.params, x, jnp.asarray([500, 900], jnp.int32), jnp.asarray(pos),
                    config=m.config)
  assert out.shape == (2, f, 3, h, w)
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  frames = m.to_frames(out)
  assert frames.shape == (2, f, h, w, 3) and frames.dtype == np.uint8


def test_default_generate_cli_writes_video(tmp_path, capsys):
  """The README's main job at its defaults (50 steps, mixed + TDC): the prompt is recognizable."""
  from mpqjax import cli
  from mpqjax.toyvideo import analyze
  out = tmp_path / "o"
  rc = cli.main(["generate", "--prompt", "a blue square moving up", "--out", str(out)])
  assert rc == 0
  for f in ("video.mp4", "frames.png", "report.json", "latents.npy"):
    assert (out / f).is_file() or (f == "video.mp4" and (out / "video.gif").is_file())
  rep = json.load(open(out / "report.json"))
  assert rep["summary"]["precision"] == "mixed" and rep["summary"]["tdc"] is True
  assert rep["calibration"] and rep["calibration"].endswith("calibration.json")
  lat = np.load(out / "latents.npy")
  assert lat.shape == (1, 8, 3, 32, 32) and np.all(np.isfinite(lat))
  import imageio.v2 as imageio
  strip = imageio.imread(out / "frames.png")
  assert strip.shape == (32 * 8, 32 * 8 * 8, 3)
  frames = np.clip((np.transpose(lat[0], (0, 2, 3, 1)) + 1) / 2, 0, 1)
  result = analyze.analyze(frames)
  assert (result.color, result.direction) == ("blue", "up"), result


def test_default_generate_cli_bad_prompt(capsys):
  from mpqjax import cli
  rc = cli.main(["generate", "--prompt", "a purple dragon moving left", "--out", "/nonexistent"])
  assert rc == 2
  err = capsys.readouterr().err
  assert "'dragon'" in err and "circle" in err and "mpqjax generate: error" in err
