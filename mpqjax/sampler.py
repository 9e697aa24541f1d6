"""The denoising loop: classifier-free guidance + a scheduler, as ONE `lax.scan` over timesteps.

  latents, model_state, per_step = sample(model_fn, model_state, latents, sched_cfg, schedule,
                                          guidance, do_cfg=True, noise=key_or_table)

`model_fn(model_state, x[Bm, F, C, H, W] f32, t[Bm] int32, i int32) -> (out f32 like x,
model_state, stats)` is the denoiser (the transformer plus the method's per-step logic); Bm is 2B
with CFG (the unconditional half first, as diffusers' CogVideoXPipeline concatenates
[negative, positive]) and B without. Everything the loop needs per step is an array, so the loop
is traced once and runs with no host round trip per step.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from mpqjax import schedulers


def cfg_combine(out: jax.Array, scale) -> jax.Array:
  """out[2B, ...] = [uncond; cond] -> uncond + scale * (cond - uncond), in f32 (diffusers
  casts the model output to float before guidance)."""
  out = out.astype(jnp.float32)
  uncond, cond = jnp.split(out, 2, axis=0)
  return uncond + scale * (cond - uncond)


def step_noise(noise, i, shape) -> jax.Array | None:
  """The scheduler noise of step i: `noise` is None (DDIM), a PRNG key (fresh normal draw per
  step, folded with i; a typed key from jax.random.key), or a recorded table f32[S, *shape]."""
  if noise is None:
    return None
  if jax.dtypes.issubdtype(noise.dtype, jax.dtypes.prng_key):
    return jax.random.normal(jax.random.fold_in(noise, i), shape, jnp.float32)
  return noise[i].astype(jnp.float32)


def sample(model_fn: Callable, model_state: Any, latents: jax.Array,
           sched_cfg: schedulers.SchedulerConfig, schedule: schedulers.Schedule,
           guidance: jax.Array, *, do_cfg: bool, noise=None):
  """Run the whole trajectory; a pure function of arrays (jit it, or call it inside a jit).

  latents: f32[B, F, C, H, W] initial noise (init_noise_sigma is 1 for these schedulers).
  guidance: f32[S] CFG scale per step (see schedulers.guidance_scales); ignored if not do_cfg.
  noise: None, a PRNG key, or f32[S, B, F, C, H, W] (DPM only).
  Returns (final latents f32, final model_state, stacked per-step stats of model_fn).
  """
  if sched_cfg.kind == "dpm" and noise is None:
    raise ValueError("the DPM scheduler needs `noise` (a PRNG key or a recorded table)")
  latents = latents.astype(jnp.float32)
  carry0 = (latents, schedulers.init_state(sched_cfg, latents), model_state)

  def body(carry, i):
    x, sstate, mstate = carry
    t = schedule.timesteps[i]
    x_in = jnp.concatenate([x, x], axis=0) if do_cfg else x
    t_in = jnp.full((x_in.shape[0],), t, jnp.int32)
    out, mstate, stats = model_fn(mstate, x_in, t_in, i)
    with jax.named_scope("guidance"):
      v = cfg_combine(out, guidance[i]) if do_cfg else out.astype(jnp.float32)
    x, sstate, _ = schedulers.step(sched_cfg, schedule, i, sstate, v, x,
                                   step_noise(noise, i, x.shape))
    return (x, sstate, mstate), stats

  steps = jnp.arange(schedule.num_steps, dtype=jnp.int32)
  (x, _, mstate), per_step = jax.lax.scan(body, carry0, steps)
  return x, mstate, per_step
