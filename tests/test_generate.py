"""generate() on a tiny random CogVideoX (2 layers, 8 video + 4 text tokens), CPU.

The §9 invariants of issue 4: τ_tdc = 0 is bit-identical to TDC off; mixed with τ = −∞ / +∞
(TDC and the outlier rule off) equals the plain model forward with every linear INT8 / NVFP4,
bit for bit; a skipped block runs no linear; the jaxpr has one scan over the timesteps; knob
changes do not recompile. Few steps, and the compiled programs are shared between tests.
"""
import types

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from models.cogvideox import model as cog
from models.cogvideox.params import init_params
from mpqjax import generate as G
from mpqjax import sampler, schedulers
from mpqjax.qlinear import Mode
from tests.generate_tiny import CFG, STEPS, run as _run


def test_tdc_threshold_zero_is_bit_identical_to_tdc_off(model, text):
  off = _run(model, text, precision="mixed", tau=0.3, tdc=False)
  zero = _run(model, text, precision="mixed", tau=0.3, tdc=True, tdc_threshold=0.0,
              tdc_error_bound=np.inf)
  assert zero.summary["skip_ratio"] == 0.0
  np.testing.assert_array_equal(zero.latents, off.latents)
  np.testing.assert_array_equal(zero.stats["modes"], off.stats["modes"])
  # ... and a permissive threshold does skip and changes the output
  on = _run(model, text, precision="mixed", tau=0.3, tdc=True, tdc_threshold=1e9,
            tdc_error_bound=1e9)
  assert on.summary["skip_ratio"] > 0
  assert not np.array_equal(on.latents, off.latents)


def test_int8_tdc_cache(model, text):
  """The INT8 cache: with no skips it is never read (bit-identical to TDC off); with skips the
  output stays close to the bf16 cache's but is not equal (the cached Δ is really INT8); the
  cache takes s8 values + one f32 scale per token."""
  off = _run(model, text, precision="mixed", tau=0.3, tdc=False)
  zero = _run(model, text, precision="mixed", tau=0.3, tdc=True, tdc_threshold=0.0,
              tdc_error_bound=np.inf, tdc_cache="int8")
  np.testing.assert_array_equal(zero.latents, off.latents)
  kw = dict(precision="mixed", tau=0.3, tdc=True, tdc_threshold=1e9, tdc_error_bound=1e9)
  bf, q = _run(model, text, **kw), _run(model, text, **kw, tdc_cache="int8")
  assert q.summary["skip_ratio"] == bf.summary["skip_ratio"] > 0
  np.testing.assert_array_equal(q.stats["computed"], bf.stats["computed"])
  assert not np.array_equal(q.latents, bf.latents)
  rel = np.abs(q.latents - bf.latents).mean() / np.abs(bf.latents - off.latents).mean()
  assert rel < 0.2, rel  # INT8's error is small next to what the skips themselves change
  assert q.summary["tdc_cache"] == "int8"
  tokens, width = 2 * (8 + 4), CFG.num_attention_heads * CFG.attention_head_dim  # CFG batch 2
  stream_bytes = np.dtype(model.params["patch_embed"]["text_proj"]["weight"].dtype).itemsize
  assert bf.summary["tdc_cache_bytes"] == CFG.num_layers * tokens * width * stream_bytes
  assert q.summary["tdc_cache_bytes"] == CFG.num_layers * tokens * (width + 4)
  from mpqjax.errors import UserInputError
  with pytest.raises(UserInputError, match="tdc_cache"):
    _run(model, text, precision="mixed", tdc_cache="fp4")


def _reference(model, text, modes):
  """The plain model forward (fixed modes, no method state) under the same sampler."""
  sched_cfg = schedulers.SchedulerConfig.preset("cogvideox-2b")
  sched = schedulers.make_schedule(sched_cfg, STEPS)
  g = jnp.asarray(schedulers.guidance_scales(6.0, np.asarray(sched.timesteps), STEPS))
  neg = jnp.zeros((1, 4, 32), jnp.float32)
  text_all = jnp.concatenate([neg, jnp.asarray(text)[None]], axis=0)
  key = jax.random.key(5)
  k_lat, _ = jax.random.split(key)
  lat = jax.random.normal(k_lat, (1, 2, 4, 4, 4), jnp.float32)

  @jax.jit
  def run(params, modes):
    fn = lambda s, x, t, i: (cog.forward(params, x, t, text_all, config=CFG, modes=modes), s, 0)
    return sampler.sample(fn, 0, lat, sched_cfg, sched, g, do_cfg=True)[0]
  return np.asarray(run(model.params, jnp.asarray(modes)))


def test_mixed_extreme_tau_equals_uniform_precisions(model, text):
  kw = dict(precision="mixed", tdc=False, outlier_threshold=np.inf)
  lo = _run(model, text, tau=-np.inf, **kw)
  hi = _run(model, text, tau=np.inf, **kw)
  routed = np.asarray(G.ROUTED)
  assert (lo.stats["modes"][..., routed] == int(Mode.INT8)).all()
  assert (hi.stats["modes"][..., routed] == int(Mode.NVFP4)).all()
  ref8 = _reference(model, text, cog.modes_for_precision(CFG, "int8"))
  ref4 = _reference(model, text, cog.modes_for_precision(CFG, "nvfp4"))
  np.testing.assert_array_equal(lo.latents, ref8)
  np.testing.assert_array_equal(hi.latents, ref4)
  assert not np.array_equal(ref8, ref4)
  # the CLI precisions are the same program: int8 / nvfp4 give the same bits
  np.testing.assert_array_equal(_run(model, text, precision="int8", tdc=False).latents, ref8)


def test_skipped_block_runs_no_linear(model, text):
  r = _run(model, text, precision="mixed", tau=0.3, tdc=True, tdc_threshold=1e9,
           tdc_error_bound=1e9, tdc_max_skips=2)
  comp = r.stats["computed"]
  assert (~comp).any() and comp.any()
  # skipped: no linear ran (mode -1, no outlier ratio measured); computed: every linear ran
  assert (r.stats["modes"][~comp] == G.SKIPPED_MODE).all()
  assert np.isnan(r.stats["outlier_ratio"][~comp]).all()
  assert (r.stats["modes"][comp] >= 0).all() and np.isfinite(r.stats["outlier_ratio"][comp]).all()
  # warm-up and last step always compute; never more than N_max = 2 consecutive skips
  assert comp[:2].all() and comp[-1].all()
  run = np.zeros(comp.shape[1], int)
  for row in comp:
    run = np.where(row, 0, run + 1)
    assert (run <= 2).all()
  # PDR: the block computed right after a skip runs its routed linears in INT8
  routed = np.asarray(G.ROUTED)
  after = comp[1:] & ~comp[:-1]
  assert after.any()
  assert (r.stats["modes"][1:][after][:, routed] == int(Mode.INT8)).all()
  # summary is consistent with the stats
  assert r.summary["skip_ratio"] == pytest.approx(1 - comp.mean())
  assert r.summary["tdc_cache_bytes"] == 2 * 2 * (8 + 4) * 16 * 4  # L x CFG x tokens x D x f32


def _eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for sub in jax.extend.core.jaxprs_in_params(e.params):
      yield from _eqns(sub)


def _prims(jaxpr):
  return {e.primitive.name for e in _eqns(jaxpr)}


def test_jaxpr_one_scan_over_timesteps_and_skip_branch_has_no_matmul(model, text):
  static = G.GenerateStatic(CFG, schedulers.SchedulerConfig(), tdc=True, do_cfg=True)
  knobs, _ = G.make_method_knobs(CFG, model.params, precision="mixed", tau=0.3)
  sched = schedulers.make_schedule(static.scheduler, STEPS)
  text_all = jnp.zeros((2, 4, 32), jnp.float32)
  lat = jnp.zeros((1, 2, 4, 4, 4), jnp.float32)
  fn = lambda p, t, x, k, kn, s, g: G.generate_latents.__wrapped__(p, t, x, k, kn, s, g,
                                                                     static=static)
  jaxpr = jax.make_jaxpr(fn)(model.params, text_all, lat, jax.random.key(0), knobs, sched,
                             jnp.ones(STEPS)).jaxpr
  top_scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
  all_scans = [e for e in _eqns(jaxpr) if e.primitive.name == "scan"]
  assert len(top_scans) == 1 and top_scans[0].params["length"] == STEPS
  # inside: the scan over the L blocks, holding the skip/compute cond
  inner = [e for e in _eqns(top_scans[0].params["jaxpr"].jaxpr) if e.primitive.name == "scan"]
  assert any(e.params["length"] == CFG.num_layers for e in inner)
  assert sum(e.params["length"] == STEPS for e in all_scans) == 1
  conds = [e for e in _eqns(jaxpr) if e.primitive.name == "cond"
           and any("dot_general" in _prims(b.jaxpr) for b in e.params["branches"])
           and any("dot_general" not in _prims(b.jaxpr) for b in e.params["branches"])]
  # the TDC cond: one branch (skip) with no matmul at all, one (compute) with the block's
  assert len(conds) == 1
  compute_branch, skip_branch = conds[0].params["branches"]  # (false, true) branches
  assert "dot_general" not in _prims(skip_branch.jaxpr)
  assert "dot_general" in _prims(compute_branch.jaxpr)


def test_changing_knobs_does_not_recompile(model, text):
  _run(model, text, precision="mixed", tau=0.3, tdc=True)
  n = G.trace_count()
  a = _run(model, text, precision="mixed", tau=0.05, tdc=True, tdc_threshold=0.5, seed=9)
  b = _run(model, text, precision="int8", tdc=True, tdc_threshold=0.01, guidance=4.5,
           dynamic_cfg=True, tdc_max_skips=1, outlier_threshold=3.0)
  c = _run(model, text, precision="nvfp4", tdc=True, tdc_warmup=3, tdc_error_bound=0.2)
  assert G.trace_count() == n
  assert not np.array_equal(a.latents, b.latents) and not np.array_equal(b.latents, c.latents)
  # a static change (stats collection) does trace again: the counter is live (lowered only,
  # to save the compile)
  static = G.GenerateStatic(CFG, schedulers.SchedulerConfig(), tdc=True, collect_stats=True)
  knobs, _ = G.make_method_knobs(CFG, model.params, precision="mixed", tau=0.3)
  sched = schedulers.make_schedule(static.scheduler, STEPS)
  G.generate_latents.lower(model.params, jnp.zeros((2, 4, 32)), jnp.zeros((1, 2, 4, 4, 4)),
                           jax.random.key(0), knobs, sched, jnp.ones(STEPS), static=static)
  assert G.trace_count() == n + 1


def test_generate_input_errors(model, text):
  from mpqjax.errors import UserInputError
  with pytest.raises(UserInputError, match="text_emb"):
    _run(model, text[:, :16])
  with pytest.raises(UserInputError, match="mixed.*calibration"):
    _run(model, text, precision="mixed")
  with pytest.raises(UserInputError, match="precision"):
    _run(model, text, precision="fp8")
  raw = types.SimpleNamespace(config=CFG, params=init_params(CFG, 1))
  with pytest.raises(UserInputError, match="unquantized"):
    _run(raw, text, precision="int8")
