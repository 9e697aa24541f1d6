"""CogVideoX VAE decoder parity against diffusers' AutoencoderKLCogVideoX.decode (fixtures from
tests/fixtures/make_pipeline_fixtures.py: frame batching, conv caches, tiling), and the
converter's errors."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from checkpoints_convert.safetensors_stream import CheckpointError
from checkpoints_convert.vae import convert_vae
from models.cogvideox_vae import Tiling, VAEConfig, decode, encode, frame_batches, latent_mode
from mpqjax.errors import UserInputError
from mpqjax.testing import rel_err

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "vae", "tiny")
with open(os.path.join(FIX, "cases.json")) as _f:
  CASES = json.load(_f)


@pytest.fixture(scope="module")
def vae():
  cfg, params = convert_vae(FIX)
  return cfg, jax.tree.map(jnp.asarray, params)


def _tiling(info: dict):
  """The Tiling diffusers used for a fixture case (False: untiled)."""
  if not info["tiled"]:
    return False
  return Tiling(info["tile_sample_min_height"], info["tile_sample_min_width"],
                info["tile_overlap_factor_height"], info["tile_overlap_factor_width"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_vae_decode_matches_diffusers(vae, case):
  cfg, params = vae
  info = CASES[case]
  io = load_file(os.path.join(FIX, f"io_{case}.safetensors"))
  tiling = _tiling(info)
  out = decode(params, io["z"], cfg, tiling=tiling,
               frame_batch=info["num_latent_frames_batch_size"])
  assert out.shape[2] == info["num_frames"]
  out = out[:, :, info["frames"]]  # the fixture stores these frames
  assert out.shape == io["sample"].shape
  assert rel_err(out, io["sample"]) <= 1e-4


def test_tiled_case_really_tiles(vae):
  """The fixture's tiled case would decode differently untiled (so tiling is exercised)."""
  cfg, params = vae
  io = load_file(os.path.join(FIX, "io_tiled.safetensors"))
  z = io["z"][:, :, :2]  # one frame batch keeps this cheap
  info = CASES["tiled"]
  tiling = Tiling(info["tile_sample_min_height"], info["tile_sample_min_width"],
                  info["tile_overlap_factor_height"], info["tile_overlap_factor_width"])
  a = decode(params, z, cfg, tiling=tiling)
  b = decode(params, z, cfg, tiling=False)
  assert a.shape == b.shape and rel_err(a, b) > 1e-3


def test_frame_batches_cover_every_frame_once():
  for n in range(1, 30):
    sl = frame_batches(n)
    covered = [f for s, e in sl for f in range(s, min(e, n))]
    assert covered == list(range(n))
    assert all(e - s == 2 for s, e in sl[1:])


def test_vae_rejects_bad_latents(vae):
  cfg, params = vae
  with pytest.raises(UserInputError, match="latents"):
    decode(params, np.ones((1, cfg.latent_channels + 1, 1, 2, 2), np.float32), cfg)


def test_vae_converter_lists_bad_keys(tmp_path, rng):
  folder = tmp_path / "vae"
  shutil.copytree(FIX, folder, ignore=shutil.ignore_patterns("io_*"))
  path = folder / "diffusion_pytorch_model.safetensors"
  sd = load_file(str(path))
  del sd["decoder.up_blocks.1.upsamplers.0.conv.bias"]
  sd["decoder.conv_out.conv.weight"] = rng.standard_normal((3, 4, 3, 3)).astype(np.float32)
  save_file(sd, str(path))
  with pytest.raises(CheckpointError) as e:
    convert_vae(str(folder))
  assert "decoder.up_blocks.1.upsamplers.0.conv.bias" in str(e.value)
  assert "decoder.conv_out.conv.weight" in str(e.value)


def test_vae_config_rejects_other_models():
  with open(os.path.join(FIX, "config.json")) as f:
    d = json.load(f)
  with pytest.raises(UserInputError, match="AutoencoderKLCogVideoX"):
    VAEConfig.from_dict(dict(d, _class_name="AutoencoderKL"))
  with pytest.raises(UserInputError, match="norm_num_groups"):
    VAEConfig.from_dict(dict(d, norm_num_groups=3))


with open(os.path.join(FIX, "encode_cases.json")) as _f:
  ENCODE_CASES = json.load(_f)


@pytest.fixture(scope="module")
def vae_with_encoder():
  cfg, params = convert_vae(FIX, encoder=True)
  return cfg, jax.tree.map(jnp.asarray, params)


@pytest.mark.parametrize("case", sorted(ENCODE_CASES))
def test_vae_encode_matches_diffusers(vae_with_encoder, case):
  """Latent moments of AutoencoderKLCogVideoX.encode (frame batches of 8 with caches, tiling)."""
  cfg, params = vae_with_encoder
  info = ENCODE_CASES[case]
  io = load_file(os.path.join(FIX, f"enc_{case}.safetensors"))
  tiling = _tiling(info)
  out = encode(params, io["x"], cfg, tiling=tiling,
               frame_batch=info["num_sample_frames_batch_size"])
  assert out.shape == io["moments"].shape
  assert rel_err(out, io["moments"]) <= 1e-4
  np.testing.assert_array_equal(latent_mode(out), out[:, :cfg.latent_channels])


def test_decoder_only_params_refuse_encoding(vae):
  cfg, params = vae
  with pytest.raises(UserInputError, match="encoder"):
    encode(params, np.zeros((1, 3, 1, 16, 16), np.float32), cfg)
