"""The toy text-to-video model: dataset, tokenizer, analyzer, a CPU training smoke test, and the
shipped weights."""
import numpy as np
import pytest

from mpqjax.errors import UserInputError
from mpqjax.toyvideo import analyze, data, text


def test_dataset_is_seeded_and_varied():
  v1, c1, s1 = data.sample(123, 16)
  v2, c2, _ = data.sample(123, 16)
  v3, c3, _ = data.sample(124, 16)
  assert v1.shape == (16, 8, 32, 32, 3) and v1.dtype == np.float32
  np.testing.assert_array_equal(v1, v2)
  assert c1 == c2
  assert not np.array_equal(v1, v3)
  assert 0.0 <= v1.min() and v1.max() <= 1.0
  # every clip actually moves: consecutive frames differ
  assert np.all(np.abs(np.diff(v1, axis=1)).sum((2, 3, 4)) > 1.0)
  # backgrounds are low-saturation (the analyzer relies on it); shapes are saturated
  corner = v1[:, :, 0, 0]
  assert len({tuple(np.round(x, 3)) for x in corner[:, 0]}) > 8  # backgrounds vary
  # captions follow the grammar and name the spec's attributes
  for cap, i in zip(c1, range(16)):
    words = cap.split()
    assert words[0] == "a" and words[-2] == "moving"
    assert words[-1] == data.DIRECTION_NAMES[s1["direction"][i]]
    assert data.COLOR_NAMES[s1["color"][i]] in words


def test_dataset_jnp_render_matches_numpy():
  import jax.numpy as jnp
  specs = data.sample_specs(np.random.default_rng(5), 6)
  a = data.render(specs)
  b = np.asarray(data.render(specs, xp=jnp))
  np.testing.assert_allclose(a, b, atol=2e-5)


def test_dataset_fixed_attributes_and_bad_names():
  specs = data.sample_specs(np.random.default_rng(0), 10, color="blue", direction="up")
  assert set(specs["color"]) == {data.COLOR_NAMES.index("blue")}
  assert set(specs["direction"]) == {data.DIRECTION_NAMES.index("up")}
  with pytest.raises(ValueError, match="purple"):
    data.sample_specs(np.random.default_rng(0), 2, color="purple")


def test_tokenizer_roundtrip_and_errors():
  ids = text.tokenize("A small Red circle moving left.", 8)
  assert ids.dtype == np.int32 and ids.shape == (8,)
  assert [text.VOCAB[i] for i in ids[:6]] == ["a", "small", "red", "circle", "moving", "left"]
  assert np.all(ids[6:] == 0)
  assert np.all(text.tokenize("", 8) == 0)
  with pytest.raises(UserInputError) as e:
    text.tokenize("a purple dragon moving left", 8)
  msg = str(e.value)
  assert "'purple'" in msg and "'dragon'" in msg
  for w in ("red", "circle", "left", "moving"):  # the vocabulary is listed
    assert w in msg
  with pytest.raises(UserInputError, match="at most 8"):
    text.tokenize("a red red red red red circle moving left", 8)


def test_caption_ids_match_tokenizer():
  from mpqjax.toyvideo import train
  specs = data.sample_specs(np.random.default_rng(7), 32)
  np.testing.assert_array_equal(train.caption_ids(specs, 8),
                                text.tokenize_batch(data.captions(specs), 8))


def test_text_encoder_shapes_and_dependence():
  import jax
  import jax.numpy as jnp
  p = text.init_params(jax.random.key(3), dim=32, max_tokens=8)
  ids = jnp.asarray(text.tokenize_batch(["a red circle moving left", "a blue circle moving left"],
                                        8))
  out = text.encode(p, ids, heads=4)
  assert out.shape == (2, 8, 32) and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  # a changed word changes every position's embedding (attention mixes them)
  assert np.all(np.abs(np.asarray(out[0] - out[1])).sum(-1) > 1e-3)


def test_analyzer_scores_100_percent_on_dataset():
  videos, caps, _ = data.sample(2024, 300)
  assert analyze.adherence(videos, caps) == 1.0
  u8 = (videos[:20] * 255 + 0.5).astype(np.uint8)  # also on uint8 frames, as written to disk
  assert analyze.adherence(u8, caps[:20]) == 1.0


def test_analyzer_rejects_wrong_answers():
  videos, caps, specs = data.sample(99, 40)
  # reversing time flips the direction: adherence must collapse
  assert analyze.adherence(videos[:, ::-1], caps) == 0.0
  # a static video has no direction; a gray video has no color
  r = analyze.analyze(np.repeat(videos[:1, :1][0], 8, axis=0))
  assert r.direction is None
  gray = np.repeat(videos[0].mean(-1, keepdims=True), 3, -1)
  assert analyze.analyze(gray).color is None
  with pytest.raises(ValueError, match="shape"):
    analyze.analyze(videos[0, ..., :2])


def test_train_smoke_cpu():
  """Three steps of the CPU preset at batch 4: finite loss, params change, EMA lags."""
  import dataclasses

  import jax
  from mpqjax.toyvideo import train
  cfg = dataclasses.replace(train.preset_config("cpu-tiny"), batch=4, warmup=1)
  state, log = train.train(cfg, steps=3, seed=0, log_every=1, print_fn=lambda *a: None)
  assert state.step == 3 and log["steps_done"] == 3
  assert all(np.isfinite(log["loss"]))
  p0 = train.init_params(cfg, 0)
  diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(state.params))]
  assert max(diffs) > 1e-4
  # proj_out starts at zero (adaLN-Zero init) and must have moved
  assert float(np.abs(np.asarray(state.params["transformer"]["proj_out"]["weight"])).max()) > 0
