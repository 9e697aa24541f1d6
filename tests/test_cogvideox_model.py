"""The block interface of models/cogvideox on a tiny random config: structure, modes,
outlier rule, stats, and the config's validation."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.cogvideox import (LINEAR_NAMES, MODULATION_LINEARS, PRESETS, CogVideoXConfig, block,
                              embed, forward, init_params, modes_for_precision, quantize_blocks,
                              unembed)
from models.cogvideox.params import checkpoint_shapes
from mpqjax.errors import UserInputError
from mpqjax.qlinear import Mode, QuantizedLinear

CFG = CogVideoXConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                      out_channels=4, time_embed_dim=32, text_embed_dim=24, num_layers=2,
                      sample_width=8, sample_height=6, sample_frames=9, max_text_seq_length=5,
                      use_rotary_positional_embeddings=True)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng()
  k = jax.random.split(jax.random.key(rng.integers(2**31)), 4)
  params = init_params(CFG, rng)
  lat = jax.random.normal(k[1], (2, 3, 4, 6, 8))
  t = jax.random.uniform(k[2], (2,), minval=0, maxval=999)
  te = jax.random.normal(k[3], (2, 5, 24))
  return params, quantize_blocks(params), (lat, t, te)


def _layer(tree, i):
  return jax.tree.map(lambda a: a[i], tree)


def test_forward_is_embed_blocks_unembed(setup):
  params, _, (lat, t, te) = setup
  out = forward(params, lat, t, te, config=CFG)
  h, e, temb, rot = embed(params, lat, t, te, CFG)
  assert h.shape == (2, 3 * 3 * 4, 32) and e.shape == (2, 5, 32) and temb.shape == (2, 32)
  assert rot[0].shape == (36, 16)
  for i in range(CFG.num_layers):
    h, e, aux = block(_layer(params["transformer_blocks"], i), h, e, temb, rot, None,
                      config=CFG)
    np.testing.assert_array_equal(aux["modes"], np.full(8, Mode.BF16))
  manual = unembed(params, h, temb, CFG, lat.shape)
  assert out.shape == lat.shape
  np.testing.assert_allclose(out, manual, rtol=1e-5, atol=1e-5)


def test_quantized_modes_traced_and_outlier_rule(setup):
  params, qparams, (lat, t, te) = setup
  blocks = qparams["transformer_blocks"]
  assert isinstance(blocks["attn1"]["to_q"], QuantizedLinear)
  assert blocks["attn1"]["to_q"].weight.codes.shape[0] == CFG.num_layers
  h, e, temb, rot = embed(qparams, lat, t, te, CFG)
  f = jax.jit(lambda p, m, thr: block(p, h, e, temb, rot, m, config=CFG, outlier_threshold=thr,
                                      collect_stats=True))
  p0 = _layer(blocks, 0)
  modes = jnp.array([0, 0, 1, 0, 1, 0, 1, 0], jnp.int32)
  h_nv, _, aux = f(p0, modes, jnp.float32(jnp.inf))
  used = np.asarray(modes).copy()
  used[list(MODULATION_LINEARS)] = Mode.BF16
  np.testing.assert_array_equal(aux["modes"], used)
  assert np.all(np.asarray(aux["outlier_ratio"]) >= 1)
  e_rel = np.asarray(aux["e_rel"])
  assert np.all((e_rel > 0.01) & (e_rel < 0.5)), e_rel  # NVFP4 vs BF16: a few % to tens of %
  # threshold below every ratio: all linears forced to BF16 -> same as an all-BF16 run
  h_thr, _, aux2 = f(p0, modes, jnp.float32(0.5))
  np.testing.assert_array_equal(aux2["modes"], np.full(8, Mode.BF16))
  h_bf, _, _ = f(p0, jnp.full(8, Mode.BF16, jnp.int32), jnp.float32(jnp.inf))
  np.testing.assert_array_equal(h_thr, h_bf)
  assert not np.array_equal(h_nv, h_bf)
  # threshold between the ratios selects exactly the linears whose input ratio is above it. The
  # ratios are this run's: a linear forced to BF16 changes the inputs of the linears after it
  # (to_q/k/v -> attention -> to_out), so the first run's ratios need not hold here.
  thr = np.float32(np.median(np.asarray(aux["outlier_ratio"])))
  _, _, aux3 = f(p0, modes, thr)
  r3 = np.asarray(aux3["outlier_ratio"])
  assert (r3 > thr).any() and (r3 <= thr).any(), (r3, thr)
  np.testing.assert_array_equal(aux3["modes"], np.where(r3 > thr, Mode.BF16, used))


def test_quantized_forward_close_to_float(setup):
  params, qparams, (lat, t, te) = setup
  ref = forward(params, lat, t, te, config=CFG)
  f = jax.jit(lambda m: forward(qparams, lat, t, te, config=CFG, modes=m))
  rels = {}
  for prec in ("bf16", "int8", "nvfp4"):
    out = f(modes_for_precision(CFG, prec))
    rels[prec] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  # W4 weights everywhere: error grows as activations narrow
  assert rels["bf16"] < rels["nvfp4"] < 0.3 and rels["int8"] < rels["nvfp4"], rels


def test_linear_names_cover_the_block():
  shapes = checkpoint_shapes(CFG)
  for name in LINEAR_NAMES:
    assert f"transformer_blocks.0.{name}.weight" in shapes
  lin_weights = [k for k in shapes if k.startswith("transformer_blocks.0.")
                 and k.endswith(".weight") and len(shapes[k]) == 2]
  assert sorted(lin_weights) == sorted(f"transformer_blocks.0.{n}.weight" for n in LINEAR_NAMES)


def test_presets_match_released_sizes():
  two, five = PRESETS["cogvideox-2b"], PRESETS["cogvideox-5b"]
  assert (two.num_layers, two.inner_dim, two.use_rotary_positional_embeddings) == (30, 1920,
                                                                                   False)
  assert (five.num_layers, five.inner_dim, five.use_rotary_positional_embeddings) == (42, 3072,
                                                                                     True)
  n2 = sum(int(np.prod(s)) for s in checkpoint_shapes(two).values())
  n5 = sum(int(np.prod(s)) for s in checkpoint_shapes(five).values())
  assert 1.6e9 < n2 < 1.8e9 and 5.4e9 < n5 < 5.7e9, (n2, n5)


def test_config_errors(tmp_path):
  good = CFG.to_dict()
  assert CogVideoXConfig.from_dict(good) == CFG
  with pytest.raises(UserInputError, match="unknown .*frobnicate"):
    CogVideoXConfig.from_dict(dict(good, frobnicate=1))
  bad = dict(good)
  del bad["num_layers"], bad["patch_size"]
  with pytest.raises(UserInputError, match="num_layers, patch_size"):
    CogVideoXConfig.from_dict(bad)
  with pytest.raises(UserInputError, match="patch_size_t"):
    CogVideoXConfig.from_dict(dict(good, patch_size_t=2))
  with pytest.raises(UserInputError, match="ofs_embed_dim"):
    CogVideoXConfig.from_dict(dict(good, ofs_embed_dim=512))
  with pytest.raises(UserInputError, match="_class_name"):
    CogVideoXConfig.from_dict(dict(good, _class_name="AutoencoderKLCogVideoX"))
  p = tmp_path / "config.json"
  p.write_text("{not json")
  with pytest.raises(UserInputError, match="not valid JSON"):
    CogVideoXConfig.from_json(tmp_path)
  p.write_text(json.dumps(good))
  assert CogVideoXConfig.from_json(tmp_path) == CFG


def test_input_shape_errors(setup):
  params, _, (lat, t, te) = setup
  with pytest.raises(UserInputError, match="channels"):
    forward(params, lat[:, :, :3], t, te, config=CFG)
  with pytest.raises(UserInputError, match="patch_size"):
    forward(params, lat[..., :5], t, te, config=CFG)
  with pytest.raises(UserInputError, match="timestep"):
    forward(params, lat, t[:1], te, config=CFG)
  with pytest.raises(UserInputError, match="modes"):
    forward(params, lat, t, te, config=CFG, modes=jnp.zeros((3, 8), jnp.int32))


def test_named_scopes_reach_the_compiled_program(setup):
  """Profiles are read by these names: each linear, the norms and attention, per block."""
  _, qparams, (lat, t, te) = setup
  txt = jax.jit(lambda p: forward(p, lat, t, te, config=CFG)).lower(qparams).as_text(
      debug_info=True)
  for scope in ("transformer_blocks", "norm1", "norm2", "norm_q", "norm_k", "rope",
                "attn1/attention", "ff/gelu", "patch_embed", "time_embedding", "norm_final",
                "norm_out", "proj_out", *(n for n in LINEAR_NAMES)):
    assert scope in txt, scope
