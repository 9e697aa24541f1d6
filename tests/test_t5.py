"""T5 encoder and tokenizer parity against transformers (fixtures from
tests/fixtures/make_pipeline_fixtures.py), and the converter's errors."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from checkpoints_convert.safetensors_stream import CheckpointError
from checkpoints_convert.t5 import convert_t5
from models.t5 import T5Config, T5Tokenizer, encode
from models.t5.model import encode_jit
from mpqjax.errors import UserInputError
from mpqjax.testing import rel_err

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
T5_CASES = ("seq226", "masked")


@pytest.mark.parametrize("case", T5_CASES)
def test_t5_encoder_matches_transformers(case):
  folder = os.path.join(FIX, "t5", case)
  cfg, params = convert_t5(folder)
  io = load_file(os.path.join(folder, "io.safetensors"))
  mask = io.get("attention_mask")
  out = encode_jit(
      jax.tree.map(jnp.asarray, params), jnp.asarray(io["input_ids"]), cfg,
      None if mask is None else jnp.asarray(mask))
  assert out.shape == io["last_hidden_state"].shape and out.dtype == jnp.float32
  assert rel_err(out, io["last_hidden_state"]) <= 1e-5


def test_t5_params_are_stacked_with_hf_names():
  cfg, params = convert_t5(os.path.join(FIX, "t5", "masked"))
  blk = params["encoder"]["block"]["layer"]
  assert blk["0"]["SelfAttention"]["q"]["weight"].shape == (cfg.num_layers, cfg.inner_dim,
                                                            cfg.d_model)
  assert blk["1"]["DenseReluDense"]["wo"]["weight"].shape == (cfg.num_layers, cfg.d_model,
                                                              cfg.d_ff)
  sd = load_file(os.path.join(FIX, "t5", "masked", "model.safetensors"))
  np.testing.assert_array_equal(blk["1"]["DenseReluDense"]["wi_1"]["weight"][2],
                                sd["encoder.block.2.layer.1.DenseReluDense.wi_1.weight"])


def test_t5_bf16_conversion_runs_in_bf16():
  cfg, params = convert_t5(os.path.join(FIX, "t5", "masked"), dtype="bf16")
  io = load_file(os.path.join(FIX, "t5", "masked", "io.safetensors"))
  out = encode(jax.tree.map(jnp.asarray, params), jnp.asarray(io["input_ids"]), cfg,
               jnp.asarray(io["attention_mask"]))
  assert out.dtype == jnp.bfloat16
  assert rel_err(out, io["last_hidden_state"]) < 0.05  # bf16 weights and activations


def test_tokenizer_matches_transformers_t5tokenizer():
  ref = load_file(os.path.join(FIX, "pipeline", "reference.safetensors"))
  with open(os.path.join(FIX, "pipeline", "reference.json")) as f:
    prompts = json.load(f)["prompts"]
  tok = T5Tokenizer.from_folder(os.path.join(FIX, "pipeline", "tiny_cogvideox", "tokenizer"))
  with pytest.warns(UserWarning, match="prompt 4 .* truncated"):
    ids = tok(prompts)
  assert ids.shape == (len(prompts), 226) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids, ref["input_ids"])
  assert (ids[-1] != 0).all() and ids[-1, -1] == 1  # the long prompt: truncated, </s> kept


def _copy(src, tmp_path):
  dst = tmp_path / "t5"
  shutil.copytree(src, dst)
  return str(dst)


def test_t5_converter_lists_every_bad_key(tmp_path, rng):
  folder = _copy(os.path.join(FIX, "t5", "masked"), tmp_path)
  path = os.path.join(folder, "model.safetensors")
  sd = load_file(path)
  del sd["encoder.block.1.layer.0.SelfAttention.k.weight"]
  sd["encoder.block.0.layer.1.DenseReluDense.wo.weight"] = rng.standard_normal(
      (5, 5)).astype(np.float32)
  sd["encoder.block.9.surprise.weight"] = rng.standard_normal(3).astype(np.float32)
  save_file(sd, path)
  with pytest.raises(CheckpointError) as e:
    convert_t5(folder)
  msg = str(e.value)
  for k in ("encoder.block.1.layer.0.SelfAttention.k.weight",
            "encoder.block.0.layer.1.DenseReluDense.wo.weight", "encoder.block.9.surprise"):
    assert k in msg


def test_t5_converter_rejects_non_finite(tmp_path, rng):
  folder = _copy(os.path.join(FIX, "t5", "masked"), tmp_path)
  path = os.path.join(folder, "model.safetensors")
  sd = load_file(path)
  w = sd["encoder.final_layer_norm.weight"]
  w[rng.integers(w.size)] = np.inf
  save_file(sd, path)
  with pytest.raises(CheckpointError, match="encoder.final_layer_norm.weight"):
    convert_t5(folder)


@pytest.mark.parametrize("change,match", [
    ({"feed_forward_proj": "relu"}, "feed_forward_proj"),
    ({"model_type": "bert"}, "model_type"),
])
def test_t5_config_rejects_other_models(change, match):
  with open(os.path.join(FIX, "t5", "masked", "config.json")) as f:
    d = json.load(f)
  d.update(change)
  with pytest.raises(UserInputError, match=match):
    T5Config.from_dict(d)


def test_tokenizer_folder_without_spiece(tmp_path):
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(UserInputError, match="spiece.model"):
    T5Tokenizer.from_folder(str(tmp_path))
