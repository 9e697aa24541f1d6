"""CogVideoX's DDIM and DPM-Solver++(2M) schedulers as pure state-transition functions.

They follow diffusers' `CogVideoXDDIMScheduler` and `CogVideoXDPMScheduler` (0.42):
v-prediction, zero-terminal-SNR rescaling, trailing timestep spacing and `snr_shift_scale`.

  cfg = SchedulerConfig.preset("cogvideox-2b")            # or SchedulerConfig(kind="dpm", ...)
  sched = make_schedule(cfg, num_steps)                     # host, float64 -> per-step f32 tables
  state = init_state(cfg, latents)                          # pytree (DPM keeps the previous x0)
  latents, state, x0 = step(cfg, sched, i, state, v, latents, noise)   # jit/scan friendly

Precision follows diffusers exactly: every coefficient is computed on the host in float64
(diffusers keeps `alphas_cumprod` in float64 and its coefficients are 0-d float64 tensors), then
rounded to f32 and applied to the f32 tensors in the same order of operations. `i` may be traced,
so one compiled step serves every timestep (coefficients are gathered from the tables).

The DPM scheduler is stochastic: diffusers adds fresh Gaussian noise every step whatever `eta`
is. Here the noise is an explicit argument (`step(..., noise)`), so a caller can replay a recorded
noise sequence (the parity fixture does) or draw it from a `jax.random` key (the sampler does).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("ddim", "dpm")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SPACINGS = ("linspace", "leading", "trailing")
BETA_SCHEDULES = ("linear", "scaled_linear")

# diffusers class name -> kind
_DIFFUSERS_CLASSES = {"CogVideoXDDIMScheduler": "ddim", "CogVideoXDPMScheduler": "dpm"}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """Static scheduler settings; field names are diffusers' config keys (plus `kind`)."""
  kind: str = "ddim"
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  prediction_type: str = "v_prediction"
  set_alpha_to_one: bool = True
  steps_offset: int = 0
  timestep_spacing: str = "trailing"
  rescale_betas_zero_snr: bool = True
  snr_shift_scale: float = 3.0

  def __post_init__(self):
    checks = [("kind", self.kind, KINDS), ("prediction_type", self.prediction_type, PREDICTION_TYPES),
              ("timestep_spacing", self.timestep_spacing, SPACINGS),
              ("beta_schedule", self.beta_schedule, BETA_SCHEDULES)]
    for name, value, allowed in checks:
      if value not in allowed:
        raise ValueError(f"scheduler {name} must be one of {allowed}, got {value!r}")
    if self.num_train_timesteps < 1:
      raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
    if not self.snr_shift_scale > 0:
      raise ValueError(f"snr_shift_scale must be > 0, got {self.snr_shift_scale}")

  @classmethod
  def preset(cls, name: str, kind: str = "ddim") -> "SchedulerConfig":
    """The released scheduler configs: "cogvideox-2b" (snr_shift_scale 3) or "cogvideox-5b" (1)."""
    if name not in PRESETS:
      raise ValueError(f"unknown scheduler preset {name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], kind=kind)

  @classmethod
  def from_diffusers(cls, config: dict[str, Any]) -> "SchedulerConfig":
    """From a diffusers scheduler_config.json dict. Keys the CogVideoX step ignores
    (clip_sample, thresholding, ...) are ignored here too; trained_betas is rejected."""
    name = config.get("_class_name")
    if name is not None and name not in _DIFFUSERS_CLASSES:
      raise ValueError(f"unsupported scheduler class {name!r}; expected one of "
                       f"{sorted(_DIFFUSERS_CLASSES)}")
    if config.get("trained_betas") is not None:
      raise ValueError("trained_betas is not supported")
    fields = {f.name for f in dataclasses.fields(cls)} - {"kind"}
    kw = {k: v for k, v in config.items() if k in fields}
    return cls(kind=_DIFFUSERS_CLASSES.get(name, "ddim"), **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


PRESETS = {
    "cogvideox-2b": SchedulerConfig(snr_shift_scale=3.0),
    "cogvideox-5b": SchedulerConfig(snr_shift_scale=1.0),
}


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
  """float64[num_train_timesteps]: cumulative alphas after the SNR shift and, if enabled,
  the zero-terminal-SNR rescale (Lin et al. 2023, Algorithm 1)."""
  n = cfg.num_train_timesteps
  if cfg.beta_schedule == "linear":
    betas = np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float32).astype(np.float64)
  else:
    betas = np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=np.float64) ** 2
  ac = np.cumprod(1.0 - betas)
  ac = ac / (cfg.snr_shift_scale + (1 - cfg.snr_shift_scale) * ac)
  if cfg.rescale_betas_zero_snr:
    s = np.sqrt(ac)
    s0, sT = s[0], s[-1]
    s = (s - sT) * (s0 / (s0 - sT))
    ac = s ** 2
  return ac


def timesteps(cfg: SchedulerConfig, num_steps: int) -> np.ndarray:
  """int64[num_steps], descending, as diffusers' set_timesteps."""
  n = cfg.num_train_timesteps
  if not 1 <= num_steps <= n:
    raise ValueError(f"num_steps must be in [1, {n}], got {num_steps}")
  if cfg.timestep_spacing == "linspace":
    t = np.linspace(0, n - 1, num_steps).round()[::-1].copy().astype(np.int64)
  elif cfg.timestep_spacing == "leading":
    ratio = n // num_steps
    t = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64) + cfg.steps_offset
  else:
    ratio = n / num_steps
    t = np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1
  return t


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("timesteps", "x0_sample", "x0_out", "c_sample", "c_x0", "c_noise",
                                "c_x0_new", "c_x0_old", "second_order"),
                   meta_fields=())
@dataclasses.dataclass(frozen=True)
class Schedule:
  """Per-step tables, all of length S = num_steps (f32 unless noted).

  timesteps:    int32[S], the model's timestep input.
  x0 = x0_sample * sample - x0_out * model_output        (v-prediction; see _pred_x0)
  DDIM: prev = c_sample * sample + c_x0 * x0               (c_noise = 0)
  DPM:  d = c_x0_new * x0 - c_x0_old * x0_prev where second_order, else x0
        prev = c_sample * sample - c_x0 * d + c_noise * noise
  second_order: bool[S], DPM's 2M update (not on the first or the last step).
  """
  timesteps: Any
  x0_sample: Any
  x0_out: Any
  c_sample: Any
  c_x0: Any
  c_noise: Any
  c_x0_new: Any
  c_x0_old: Any
  second_order: Any

  @property
  def num_steps(self) -> int:
    return int(self.timesteps.shape[0])


def make_schedule(cfg: SchedulerConfig, num_steps: int) -> Schedule:
  """Host-side float64 tables, as diffusers computes them, rounded to f32 at the end."""
  ac = alphas_cumprod(cfg)
  final = 1.0 if cfg.set_alpha_to_one else float(ac[0])
  ts = timesteps(cfg, num_steps)
  # diffusers steps back by num_train // num_steps whatever the spacing
  prev = ts - cfg.num_train_timesteps // num_steps
  a_t = ac[ts]
  a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final)
  b_t = 1 - a_t
  if cfg.prediction_type == "v_prediction":
    x0_sample, x0_out = a_t ** 0.5, b_t ** 0.5
  elif cfg.prediction_type == "epsilon":  # x0 = (sample - sqrt(b) eps) / sqrt(a)
    x0_sample, x0_out = a_t ** 0.5, b_t ** 0.5
  else:
    x0_sample, x0_out = np.zeros_like(a_t), np.zeros_like(a_t)
  ones, zeros = np.ones_like(a_t), np.zeros_like(a_t)
  with np.errstate(divide="ignore", invalid="ignore"):
    if cfg.kind == "ddim":
      at = ((1 - a_prev) / (1 - a_t)) ** 0.5
      c_sample, c_x0, c_noise = at, a_prev ** 0.5 - a_t ** 0.5 * at, zeros
      c_new, c_old, second = ones, zeros, np.zeros(num_steps, bool)
    else:
      # DPM-Solver++(2M); log-SNR lambda = log sqrt(a / (1 - a)) is -inf at zero terminal SNR
      # and +inf at a_prev = 1: IEEE arithmetic gives the same finite multipliers as torch.
      lam = np.log((a_t / (1 - a_t)) ** 0.5)
      lam_next = np.log((a_prev / (1 - a_prev)) ** 0.5)
      h = lam_next - lam
      c_sample = ((1 - a_prev) / (1 - a_t)) ** 0.5 * np.exp(-h)
      c_x0 = np.expm1(-2 * h) * a_prev ** 0.5
      c_noise = (1 - a_prev) ** 0.5 * (1 - np.exp(-2 * h)) ** 0.5
      # the look-back timestep of step i is the timestep of step i - 1
      lam_back = np.concatenate([[np.nan], lam[:-1]])
      r = (lam - lam_back) / h
      second = (np.arange(num_steps) > 0) & (prev >= 0)
      c_new = np.where(second, 1 + 1 / (2 * r), 1.0)
      c_old = np.where(second, 1 / (2 * r), 0.0)
  f32 = lambda a: jnp.asarray(np.asarray(a, np.float64).astype(np.float32))
  tables = dict(x0_sample=x0_sample, x0_out=x0_out, c_sample=c_sample, c_x0=c_x0, c_noise=c_noise,
                c_x0_new=c_new, c_x0_old=c_old)
  for name, a in tables.items():
    if not np.isfinite(a).all():
      raise ValueError(f"scheduler table {name} is not finite for {cfg} at {num_steps} steps")
  return Schedule(timesteps=jnp.asarray(ts.astype(np.int32)), second_order=jnp.asarray(second),
                  **{k: f32(v) for k, v in tables.items()})


def init_state(cfg: SchedulerConfig, latents: jax.Array) -> dict:
  """The scheduler's carried state: DPM's previous x0 (zeros before the first step)."""
  del cfg
  return {"x0_prev": jnp.zeros(latents.shape, jnp.float32)}


def _pred_x0(cfg: SchedulerConfig, sched: Schedule, i, model_output, sample):
  if cfg.prediction_type == "v_prediction":
    return sched.x0_sample[i] * sample - sched.x0_out[i] * model_output
  if cfg.prediction_type == "epsilon":
    return (sample - sched.x0_out[i] * model_output) / sched.x0_sample[i]
  return model_output


def step(cfg: SchedulerConfig, sched: Schedule, i, state: dict, model_output: jax.Array,
         sample: jax.Array, noise: jax.Array | None = None):
  """One reverse step x_t -> x_{t-1}.

  i: int32 scalar step index (may be traced). model_output, sample: f32[...], same shape.
  noise: f32 like sample, used by DPM only (None is allowed for DDIM).
  Returns (prev_sample f32, new state, predicted x0 f32).
  """
  with jax.named_scope("scheduler_step"):
    sample = sample.astype(jnp.float32)
    model_output = model_output.astype(jnp.float32)
    x0 = _pred_x0(cfg, sched, i, model_output, sample)
    if cfg.kind == "ddim":
      prev = sched.c_sample[i] * sample + sched.c_x0[i] * x0
    else:
      if noise is None:
        raise ValueError("the DPM scheduler needs `noise` (f32, shaped like the sample)")
      second = sched.c_x0_new[i] * x0 - sched.c_x0_old[i] * state["x0_prev"]
      d = jnp.where(sched.second_order[i], second, x0)
      prev = sched.c_sample[i] * sample - sched.c_x0[i] * d + sched.c_noise[i] * noise
    return prev, {"x0_prev": x0}, x0


def guidance_scales(guidance_scale: float, ts: np.ndarray, num_steps: int,
                    dynamic: bool = False) -> np.ndarray:
  """float32[S]: the CFG scale per step. Dynamic CFG is diffusers' CogVideoXPipeline rule,
  1 + w * (1 - cos(pi * ((S - t) / S) ** 5)) / 2 with t the timestep *value*, evaluated in
  float64 on the host (the argument is huge, f32 cos would be off)."""
  ts = np.asarray(ts)
  if not dynamic:
    return np.full(ts.shape, guidance_scale, np.float32)
  out = [1 + guidance_scale * ((1 - math.cos(math.pi * ((num_steps - int(t)) / num_steps) ** 5.0)) / 2)
         for t in ts]
  return np.asarray(out, np.float64).astype(np.float32)
