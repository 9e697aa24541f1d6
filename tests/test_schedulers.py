"""Scheduler + CFG parity with diffusers' CogVideoXPipeline loop over full trajectories.

Fixtures: tests/fixtures/make_scheduler_fixtures.py (diffusers 0.42, torch CPU). The stand-in
model there outputs table[i] + feedback * latent_model_input; we replay it through
mpqjax.sampler.sample (one lax.scan) and compare the latents after every step.
"""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpqjax import sampler, schedulers

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "schedulers")
CASES = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(FIXTURES, "*.npz"))
               if not os.path.basename(p).startswith("pipeline_e2e_"))  # test_generate_diffusers


def _load(case):
  with open(os.path.join(FIXTURES, case + ".json")) as f:
    meta = json.load(f)
  arrays = dict(np.load(os.path.join(FIXTURES, case + ".npz"), allow_pickle=False))
  cfg = schedulers.SchedulerConfig.from_diffusers(
      {"_class_name": meta["scheduler_class"], **meta["scheduler_config"]})
  return meta, arrays, cfg


def test_fixtures_present():
  assert len(CASES) >= 4, CASES


@pytest.mark.parametrize("case", CASES)
def test_tables_match_diffusers(case):
  meta, a, cfg = _load(case)
  np.testing.assert_allclose(schedulers.alphas_cumprod(cfg), a["alphas_cumprod"], rtol=1e-12,
                             atol=1e-15)
  ts = schedulers.timesteps(cfg, meta["num_inference_steps"])
  np.testing.assert_array_equal(ts, a["scheduler_timesteps"])
  sched = schedulers.make_schedule(cfg, meta["num_inference_steps"])
  np.testing.assert_array_equal(np.asarray(sched.timesteps), a["scheduler_timesteps"])


@pytest.mark.parametrize("case", CASES)
def test_trajectory_matches_diffusers(case):
  meta, a, cfg = _load(case)
  steps = meta["num_inference_steps"]
  do_cfg = meta["guidance_scale"] > 1
  sched = schedulers.make_schedule(cfg, steps)
  guidance = schedulers.guidance_scales(meta["guidance_scale"], np.asarray(sched.timesteps),
                                        steps, meta["use_dynamic_cfg"])
  table = jnp.asarray(a["table"])
  feedback = meta["feedback"]

  def model_fn(state, x, t, i):
    return table[i] + feedback * x, state, t

  noise = jnp.asarray(a["noise"]) if cfg.kind == "dpm" else None

  @jax.jit
  def run(latents):
    def traj_fn(state, x, t, i):  # also record the latents the model saw
      out, state, t = model_fn(state, x, t, i)
      return out, state, (t, x)
    return sampler.sample(traj_fn, 0, latents, cfg, sched, jnp.asarray(guidance), do_cfg=do_cfg,
                          noise=noise)

  final, _, (t_seen, x_seen) = run(jnp.asarray(a["latents"]))
  # the model saw diffusers' timesteps, broadcast over the CFG batch
  np.testing.assert_array_equal(np.asarray(t_seen), a["model_timesteps"])
  # the latents fed at step i+1 are the latents after step i: compare the whole trajectory
  ref = a["trajectory"]
  x_seen = np.asarray(x_seen)[:, : ref.shape[1]]
  np.testing.assert_allclose(x_seen[1:], ref[:-1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(final), ref[-1], rtol=1e-5, atol=1e-5)
  err = np.linalg.norm(np.asarray(final) - ref[-1]) / np.linalg.norm(ref[-1])
  assert err < 5e-6, err


def test_dynamic_cfg_varies_and_static_is_constant():
  ts = schedulers.timesteps(schedulers.SchedulerConfig(), 50)
  dyn = schedulers.guidance_scales(6.0, ts, 50, dynamic=True)
  assert dyn.dtype == np.float32 and dyn.shape == (50,)
  assert np.all(dyn >= 1.0) and np.all(dyn <= 7.0) and np.ptp(dyn) > 0.5
  np.testing.assert_array_equal(schedulers.guidance_scales(6.0, ts, 50), np.full(50, 6, np.float32))


def test_cfg_combine_matches_float64(rng):
  out = rng.standard_normal((4, 2, 3, 2, 2)).astype(np.float32)
  scale = float(rng.uniform(1, 8))
  got = np.asarray(sampler.cfg_combine(jnp.asarray(out), scale))
  o = out.astype(np.float64)
  np.testing.assert_allclose(got, o[:2] + scale * (o[2:] - o[:2]), rtol=1e-5, atol=1e-5)


def test_bad_configs_are_rejected():
  with pytest.raises(ValueError, match="kind"):
    schedulers.SchedulerConfig(kind="euler")
  with pytest.raises(ValueError, match="prediction_type"):
    schedulers.SchedulerConfig(prediction_type="flow")
  with pytest.raises(ValueError, match="num_steps"):
    schedulers.timesteps(schedulers.SchedulerConfig(), 0)
  with pytest.raises(ValueError, match="unsupported scheduler class"):
    schedulers.SchedulerConfig.from_diffusers({"_class_name": "EulerDiscreteScheduler"})
  with pytest.raises(ValueError, match="preset"):
    schedulers.SchedulerConfig.preset("cogvideox-99b")


def test_dpm_needs_noise(rng):
  cfg = schedulers.SchedulerConfig(kind="dpm")
  sched = schedulers.make_schedule(cfg, 4)
  x = jnp.asarray(rng.standard_normal((1, 2, 2, 2, 2)).astype(np.float32))
  with pytest.raises(ValueError, match="noise"):
    schedulers.step(cfg, sched, 0, schedulers.init_state(cfg, x), x, x)
