"""The fixed schedule benchmarks/e2e.py drives the method with on random weights: through the real
generate path, every block must skip exactly the planned number of steps and the predictor must
route each linear to the planned mode on the steps it has a fresh Γ for (tiny config, CPU)."""
import os
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
import e2e  # noqa: E402

from models.cogvideox.config import PRESETS  # noqa: E402
from models.cogvideox.params import LINEAR_NAMES, init_params, quantize_blocks  # noqa: E402
from mpqjax.generate import generate  # noqa: E402
from mpqjax.qlinear import Mode  # noqa: E402


@pytest.mark.parametrize("ratio, steps, skips, n_max",
                         [(0.019, 50, 1, 1), (0.256, 50, 13, 1), (0.2, 10, 2, 1), (0.0, 10, 0, 1),
                          (0.5, 50, 25, 2), (0.6, 50, 30, 2), (0.9, 10, 6, 2)])
def test_tdc_schedule_plans_the_skip_count(ratio, steps, skips, n_max):
  kw = e2e.tdc_schedule(ratio, steps)
  assert kw["skips_per_block"] == skips
  assert kw["tdc_max_skips"] == n_max
  # the rule of mpqjax.method.tdc with always-stable deltas, written out step by step
  w = kw["tdc_warmup"]
  planned, run = 0, 0
  for i in range(steps):
    skip = w <= i < steps - 1 and run < n_max
    planned += skip
    run = run + 1 if skip else 0
  assert planned == skips


def test_schedule_runs_through_generate(rng):
  cfg = PRESETS["cogvideox-2b"].replace(num_layers=3, num_attention_heads=2, text_embed_dim=32,
                                        time_embed_dim=64, max_text_seq_length=4)
  params = quantize_blocks(init_params(cfg, rng, dtype=jnp.bfloat16))
  model = types.SimpleNamespace(config=cfg, params=params)
  share = {n: s for n, s in zip(e2e.routed_names(), rng.uniform(0, 1, len(e2e.routed_names())))}
  calib = e2e.schedule_calibration(cfg, share)
  steps = 10
  kw = e2e.tdc_schedule(0.2, steps)
  k = kw.pop("skips_per_block")
  text = rng.standard_normal((cfg.max_text_seq_length, cfg.text_embed_dim)).astype(np.float32)
  r = generate(model, text, latent_shape=(2, 4, 4), steps=steps, precision="mixed",
               calibration=calib, outlier_threshold=float("inf"), **kw)
  computed = np.asarray(r.stats["computed"], bool)
  assert (~computed).sum(axis=0).tolist() == [k] * cfg.num_layers
  stats = e2e.schedule_stats(r.stats["computed"], r.stats["modes"])
  fresh_steps = steps - 1 - 2 * k  # minus the first step and the step after each skip
  for name in e2e.routed_names():
    want_int8 = int(round(share[name] * cfg.num_layers))
    got = stats["fresh"][name]
    assert got["int8"] == want_int8 * fresh_steps, (name, got)
    assert got["nvfp4"] == (cfg.num_layers - want_int8) * fresh_steps, (name, got)
  # the steps without a fresh Γ (first, after a skip) run every routed linear in INT8
  modes = np.asarray(r.stats["modes"])
  routed = [LINEAR_NAMES.index(n) for n in e2e.routed_names()]
  assert (modes[0][:, routed] == int(Mode.INT8)).all()
  assert stats["skip_ratio"] == pytest.approx(k / steps)
