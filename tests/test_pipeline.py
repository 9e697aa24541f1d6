"""The pipeline folder loader (mpqjax.pipeline) on the tiny random CogVideoX pipeline that
tests/fixtures/make_pipeline_fixtures.py builds with diffusers/transformers: prompt embeddings
and decoded frames against diffusers' CogVideoXPipeline, the conversion cache, video writing,
and the errors for broken folders."""
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from mpqjax import pipeline as pl
from mpqjax.errors import UserInputError
from mpqjax.video import to_uint8, write_video
from mpqjax.testing import rel_err

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "pipeline")
FOLDER = os.path.join(FIX, "tiny_cogvideox")


@pytest.fixture(scope="module")
def ref():
  with open(os.path.join(FIX, "reference.json")) as f:
    meta = json.load(f)
  return meta, load_file(os.path.join(FIX, "reference.safetensors"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


def test_encode_prompt_matches_diffusers_and_caches(ref, cache_dir):
  meta, r = ref
  logs = []
  pipe = pl.load_pipeline(FOLDER, dtype="fp32", cache_dir=cache_dir, log=logs.append)
  with pytest.warns(UserWarning, match="truncated"):  # the long prompt
    emb = np.asarray(pipe.encode_prompt(meta["prompts"]))
  assert emb.shape == r["prompt_embeds"].shape == (len(meta["prompts"]), 226, 32)
  assert rel_err(emb, r["prompt_embeds"]) <= 1e-5
  assert any("converting" in s for s in logs)
  cached = [d for d in os.listdir(cache_dir) if d.startswith("text_encoder-")]
  assert len(cached) == 1
  # second pipeline: served from the cache (no conversion), same numbers
  logs.clear()
  again = pl.load_pipeline(FOLDER, dtype="fp32", cache_dir=cache_dir, log=logs.append)
  assert rel_err(again.encode_prompt(meta["prompts"][:2]), r["prompt_embeds"][:2]) <= 1e-5
  assert not logs


def test_decode_latents_matches_diffusers(ref, cache_dir):
  _, r = ref
  pipe = pl.load_pipeline(FOLDER, dtype="fp32", cache_dir=cache_dir)
  frames, video = pipe.decode_latents(r["latents"], return_float=True)
  assert video.shape == r["video"].shape
  assert rel_err(video, r["video"]) <= 1e-4
  assert frames.dtype == np.uint8 and frames.shape == r["frames_u8"].shape
  diff = np.abs(frames.astype(int) - r["frames_u8"])
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # rounding ties only


def test_cache_key_follows_dtype_and_files(tmp_path):
  folder = tmp_path / "vae"
  shutil.copytree(os.path.join(FOLDER, "vae"), folder)
  k32, k16 = pl._source_key(str(folder), "fp32"), pl._source_key(str(folder), "bf16")
  assert k32 != k16
  os.utime(folder / "config.json", ns=(1, 1))
  assert pl._source_key(str(folder), "fp32") != k32


@pytest.mark.filterwarnings("ignore:os.fork")  # imageio-ffmpeg starts ffmpeg
def test_write_video_mp4_and_gif_fallback(tmp_path, rng, monkeypatch):
  import imageio.v2 as imageio
  frames = to_uint8(rng.random((5, 32, 48, 3)))
  out = write_video(frames, str(tmp_path / "v.mp4"), fps=8)
  assert out.endswith("v.mp4") and os.path.getsize(out) > 0
  back = np.stack([f for f in imageio.get_reader(out, format="FFMPEG")])
  assert back.shape == frames.shape
  assert not [p for p in os.listdir(tmp_path) if "partial" in p]

  def broken(*a, **k):
    raise RuntimeError("no ffmpeg here")
  monkeypatch.setattr(imageio, "get_writer", broken)
  with pytest.warns(UserWarning, match="GIF"):
    out = write_video(frames, str(tmp_path / "w.mp4"))
  assert out.endswith("w.gif")
  monkeypatch.undo()
  gif = np.stack([f for f in imageio.get_reader(out, format="GIF")])
  assert gif.shape[0] == 5 and gif.shape[1:3] == (32, 48)


def test_write_video_rejects_bad_frames(tmp_path, rng):
  with pytest.raises(UserInputError, match="uint8"):
    write_video(rng.random((2, 8, 8, 3)).astype(np.float32), str(tmp_path / "x.mp4"))


def _broken_copy(tmp_path, edit):
  dst = tmp_path / "pipe"
  shutil.copytree(FOLDER, dst)
  edit(dst)
  return str(dst)


def _edit_json(path, **changes):
  with open(path) as f:
    d = json.load(f)
  d.update(changes)
  with open(path, "w") as f:
    json.dump(d, f)


@pytest.mark.parametrize("edit,match", [
    (lambda d: shutil.rmtree(d / "vae"), "vae/ folder is missing"),
    (lambda d: _edit_json(d / "model_index.json", _class_name="StableDiffusionPipeline"),
     "StableDiffusionPipeline"),
    (lambda d: _edit_json(d / "model_index.json", vae=["diffusers", "AutoencoderKL"]),
     "AutoencoderKL"),
    (lambda d: _edit_json(d / "text_encoder" / "config.json", d_model=48),
     "text_embed_dim"),
    (lambda d: _edit_json(d / "vae" / "config.json", latent_channels=8), "latent_channels"),
    (lambda d: (d / "tokenizer" / "spiece.model").unlink(), "spiece.model"),
    (lambda d: (d / "model_index.json").unlink(), "model_index.json"),
    (lambda d: (d / "vae" / "diffusion_pytorch_model.safetensors").rename(
        d / "vae" / "diffusion_pytorch_model.bin"), "vae/ has no safetensors.*pickled"),
])
def test_broken_pipeline_folders_are_rejected(tmp_path, edit, match):
  with pytest.raises(UserInputError, match=match):
    pl.inspect_pipeline(_broken_copy(tmp_path, edit))


def test_every_problem_is_listed_at_once(tmp_path):
  def edit(d):
    shutil.rmtree(d / "vae")
    _edit_json(d / "model_index.json", tokenizer=["transformers", "BertTokenizer"])
  with pytest.raises(UserInputError) as e:
    pl.inspect_pipeline(_broken_copy(tmp_path, edit))
  assert "vae/" in str(e.value) and "BertTokenizer" in str(e.value)


def test_generate_video_end_to_end(cache_dir):
  """Prompt -> frames through the method's generate, on the tiny pipeline (2 steps)."""
  pipe = pl.load_pipeline(FOLDER, dtype="fp32", cache_dir=cache_dir)
  frames, result = pl.generate_video(pipe, "a panda plays guitar", steps=2, precision="bf16",
                                     quantize=None, tdc=False)
  tr = pipe.spec.transformer
  assert frames.dtype == np.uint8
  assert frames.shape == (tr.sample_frames, tr.sample_height * 8, tr.sample_width * 8, 3)
  assert frames.std() > 0
  assert result.latents.shape[2] == tr.in_channels
  assert pipe._vae_params is None  # freed after decoding
  assert [d for d in os.listdir(cache_dir) if d.startswith("transformer-")]  # converted once


def test_t5_is_freed_after_encoding(cache_dir):
  import jax
  pipe = pl.load_pipeline(FOLDER, dtype="fp32", cache_dir=cache_dir)
  before = {id(a) for a in jax.live_arrays()}
  emb = pipe.encode_prompt(["a red car", "snow"])
  new = [a for a in jax.live_arrays() if id(a) not in before]
  assert sum(a.nbytes for a in new) == emb.nbytes  # only the embeddings stay on the device


def test_cli_exits_2_on_a_broken_pipeline_folder(tmp_path, capsys):
  from mpqjax.cli import main
  folder = _broken_copy(tmp_path, lambda d: _edit_json(d / "text_encoder" / "config.json",
                                                       d_model=48))
  rc = main(["generate", "--model", folder, "--prompt", "a cat", "--out",
             str(tmp_path / "out")])
  assert rc == 2
  assert "text_embed_dim" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()
