"""`generate`: text embeddings -> latents with the method, as ONE jit whose body is a lax.scan
over the timesteps (mpqjax.sampler.sample). Per step: embed once, a lax.scan over the L blocks
in which each block is `lax.cond(skip, cached delta, compute)` (TDC) and each linear's precision
comes from the DMPQ predictor through qlinear's lax.switch, then unembed, CFG and the scheduler
step. The carry holds the latents, the scheduler state and the method state (tdc_lib.BlockState).

  result = generate(model, text_emb, precision="mixed", calibration=calib, tdc=True, steps=50)
  result.latents, result.stats (per step x block), result.summary (skip ratio, bits, memory)

Everything that may change between calls without a new trace is an array (MethodKnobs, the
schedule tables, per-step guidance, the PRNG key); `trace_count()` counts traces.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.cogvideox import model as cog
from models.cogvideox.params import BLOCKS, LINEAR_NAMES, MODULATION_LINEARS, is_quantized
from mpqjax import attention as attention_lib
from mpqjax import sampler, schedulers
from mpqjax.errors import UserInputError
from mpqjax.method import predictor
from mpqjax.method import tdc as tdc_lib
from mpqjax.method.calibration import Calibration
from mpqjax.method.defaults import (DEFAULT_ATTENTION_EDGE_STEPS, DEFAULT_OUTLIER_THRESHOLD,
                                    DEFAULT_TDC_ERROR_BOUND, DEFAULT_TDC_MAX_SKIPS,
                                    DEFAULT_TDC_THRESHOLD, DEFAULT_TDC_WARMUP_FRACTION)
from mpqjax.method.knobs import MethodKnobs, make_knobs
from mpqjax.qlinear import MODE_ACTIVATION_BITS, Mode, QuantizedLinear

PRECISIONS = ("bf16", "nvfp4", "int8", "mixed")
# routed[l]: the predictor decides linear l's mode (False: modulation linears, always BF16)
ROUTED = tuple(i not in MODULATION_LINEARS for i in range(len(LINEAR_NAMES)))
SKIPPED_MODE = -1  # stats: a skipped block runs no linear

_TRACES = [0]


def trace_count() -> int:
  """How many times the generate body has been traced (= compiled) in this process."""
  return _TRACES[0]


@dataclasses.dataclass(frozen=True)
class GenerateStatic:
  """Everything that shapes the compiled program (hashable; a change retraces)."""
  model_config: Any
  scheduler: schedulers.SchedulerConfig
  tdc: bool = True
  tdc_cache: str = "bf16"  # tdc_lib.TDC_CACHES
  do_cfg: bool = True
  collect_stats: bool = False
  implementation: str | None = None
  attention_precision: str = "bf16"
  attention_pv: str = attention_lib.INT8_PV_DEFAULT
  progress: bool = False  # a jax.debug.callback per step (opt-in: it reaches the host)


# The step hook the compiled program calls when GenerateStatic.progress: module-level, so that a
# new callable per call does not retrace; generate(on_step=...) sets it for the call's duration.
_ON_STEP = [None]


def _emit_step(i, n):
  hook = _ON_STEP[0]
  if hook is not None:
    hook(int(i), int(n))


def _denoiser(static: GenerateStatic, params, text_all, knobs: MethodKnobs):
  """model_fn(state, x, t, i, num_steps) -> (out, state, stats); sampler.sample gets it with
  num_steps bound."""
  config = static.model_config
  routed = jnp.asarray(ROUTED)
  run_block = functools.partial(cog.block, config=config, collect_stats=static.collect_stats,
                                implementation=static.implementation,
                                attention_pv=static.attention_pv)
  int8_attention = static.attention_precision == "int8"

  def model_fn(state: tdc_lib.BlockState, x, t, i, num_steps):
    if static.progress:
      jax.debug.callback(_emit_step, i, num_steps)
    hidden, encoder, temb, rotary = cog.embed(params, x, t, text_all, config)

    def block_body(carry, xs):
      # The stacked state rides in the carry and block l's slice is read and written in place
      # (dynamic slice / update), so the TDC cache is not copied into a second [L, ...] buffer.
      h, e, st = carry
      p_l, a_l, b_l, att_l, l = xs
      s_l = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, l, keepdims=False),
                                   st)

      def compute(h, e, s_l):
        fresh = (i > 0) & (s_l.skips == 0)
        modes = predictor.predict_modes(s_l.gamma, fresh, a_l, b_l, knobs.tau, routed)
        modes = jnp.where((knobs.mode_override >= 0) & routed, knobs.mode_override, modes)
        if int8_attention:  # index into attention.PRECISIONS: 1 = int8, 0 = bf16
          edge = knobs.attention_edge_steps
          att = (att_l & (i >= edge) & (i < num_steps - edge)).astype(jnp.int32)
        else:
          att = jnp.int32(0)
        h2, e2, aux = run_block(p_l, h, e, temb, rotary, modes,
                                outlier_threshold=knobs.outlier_threshold,
                                attention_precision=att if int8_attention else "bf16")
        gamma = predictor.block_divergence(h, e, h2, e2)
        s_new = tdc_lib.computed(s_l, h, e, h2, e2, gamma, tdc=static.tdc)
        stats = {"computed": jnp.bool_(True), "modes": aux["modes"].astype(jnp.int32),
                 "gamma": gamma, "change": s_new.change, "e_acc": s_l.e_acc,
                 "outlier_ratio": aux["outlier_ratio"], "attention": att}
        if static.collect_stats:
          stats["e_rel"] = aux["e_rel"]
        return h2, e2, s_new, stats

      def skipped(h, e, s_l):
        h2, e2, s_new = tdc_lib.skip(s_l, h, e)
        n = len(LINEAR_NAMES)
        stats = {"computed": jnp.bool_(False), "modes": jnp.full((n,), SKIPPED_MODE, jnp.int32),
                 "gamma": jnp.float32(jnp.nan), "change": s_l.change, "e_acc": s_new.e_acc,
                 "outlier_ratio": jnp.full((n,), jnp.nan, jnp.float32),
                 "attention": jnp.int32(-1)}
        if static.collect_stats:
          stats["e_rel"] = jnp.full((n,), jnp.nan, jnp.float32)
        return h2, e2, s_new, stats

      with jax.named_scope("block"):
        if static.tdc:
          skip = tdc_lib.should_skip(s_l, i, num_steps, knobs)
          h2, e2, s_new, stats = jax.lax.cond(skip, skipped, compute, h, e, s_l)
        else:
          h2, e2, s_new, stats = compute(h, e, s_l)
      st = jax.tree_util.tree_map(lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, l, 0),
                                  st, s_new)
      return (h2, e2, st), stats

    with jax.named_scope("transformer_blocks"):
      layers = jnp.arange(config.num_layers, dtype=jnp.int32)
      (hidden, encoder, state), stats = jax.lax.scan(
          block_body, (hidden, encoder, state),
          (params[BLOCKS], knobs.alpha, knobs.beta, knobs.attention_int8, layers))
    out = cog.unembed(params, hidden, temb, config, x.shape)
    return out, state, stats

  return model_fn


def init_method_state(static: GenerateStatic, params, latents_shape, text_shape) -> tdc_lib.BlockState:
  """The zero method state for this model and input size (shapes from jax.eval_shape)."""
  config = static.model_config
  bm = latents_shape[0] * (2 if static.do_cfg else 1)
  lat = jax.ShapeDtypeStruct((bm, *latents_shape[1:]), jnp.float32)
  txt = jax.ShapeDtypeStruct((bm, *text_shape[1:]), jnp.float32)
  t = jax.ShapeDtypeStruct((bm,), jnp.int32)
  h, e, _, _ = jax.eval_shape(lambda p, x, tt, c: cog.embed(p, x, tt, c, config), params, lat, t,
                              txt)
  return tdc_lib.init_state(config.num_layers, h.shape, e.shape, h.dtype, tdc=static.tdc,
                            cache=static.tdc_cache)


@functools.partial(jax.jit, static_argnames=("static",))
def generate_latents(params, text_all, latents, key, knobs: MethodKnobs,
                     schedule: schedulers.Schedule, guidance, *, static: GenerateStatic):
  """The compiled core. text_all: [Bm, T, Dt] ([negative; positive] with CFG), latents f32
  [B, F, C, H, W] (initial noise), key: typed PRNG key (DPM noise), guidance f32[S].
  Returns (latents f32, per-step stats: dict of [S, L, ...] arrays)."""
  _TRACES[0] += 1
  state0 = init_method_state(static, params, latents.shape, text_all.shape)
  fn = _denoiser(static, params, text_all, knobs)
  num_steps = schedule.num_steps
  model_fn = lambda s, x, t, i: fn(s, x, t, i, num_steps)
  noise = key if static.scheduler.kind == "dpm" else None
  x, _, stats = sampler.sample(model_fn, state0, latents, static.scheduler, schedule, guidance,
                               do_cfg=static.do_cfg, noise=noise)
  return x, stats


@dataclasses.dataclass
class GenerateResult:
  latents: np.ndarray          # f32[B, F, C, H, W]
  stats: dict[str, np.ndarray]  # per step x block (see summarize)
  summary: dict[str, Any]


def weight_report(params) -> dict[str, Any]:
  """Bytes of the parameters as stored vs the same parameters in bf16, and the bits per weight
  of the block linears."""
  stored = bf16 = lin_bits = lin_weights = 0
  for leaf in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, QuantizedLinear)):
    if isinstance(leaf, QuantizedLinear):
      n_w = int(np.prod(leaf.weight.shape))  # logical [.., N, K]
      nb = leaf.nbytes
      stored += nb
      bias_n = int(np.prod(leaf.bias.shape)) if leaf.bias is not None else 0
      bf16 += 2 * (n_w + bias_n)
      lin_weights += n_w
      wb = sum(int(np.prod(a.shape)) * a.dtype.itemsize
               for a in jax.tree_util.tree_leaves(leaf.weight))
      lin_bits += 8 * (wb + int(np.prod(leaf.w_int8_scale.shape)) * 4)
    else:
      n = int(np.prod(leaf.shape))
      stored += n * leaf.dtype.itemsize
      bf16 += 2 * n
  return {"weight_bytes": stored, "weight_bytes_bf16": bf16,
          "weight_reduction_vs_bf16": bf16 / stored if stored else float("nan"),
          "block_linear_weight_bits": (lin_bits / lin_weights) if lin_weights else None}


def summarize(stats: dict[str, np.ndarray]) -> dict[str, Any]:
  """Summaries over steps x blocks: skip ratio, activation bits of the routed linears that ran
  (nominal: NVFP4 4, INT8 8, BF16 16; and with scale overhead), mode counts."""
  computed = np.asarray(stats["computed"], bool)
  modes = np.asarray(stats["modes"])
  routed = np.asarray(ROUTED)
  ran = modes[..., routed][computed]  # [n_computed, n_routed]
  counts = {m.name.lower(): int((ran == int(m)).sum()) for m in Mode}
  total = max(ran.size, 1)
  nominal = sum(predictor.NOMINAL_BITS[int(m)] * counts[m.name.lower()] for m in Mode) / total
  effective = sum(MODE_ACTIVATION_BITS[m] * counts[m.name.lower()] for m in Mode) / total
  steps, layers = computed.shape
  return {"steps": steps, "layers": layers, "block_evaluations": int(computed.sum()),
          "skip_ratio": float(1 - computed.mean()),
          "skipped_per_step": (~computed).sum(axis=1).tolist(),
          "avg_activation_bits": float(nominal) if ran.size else None,
          "avg_activation_bits_with_scales": float(effective) if ran.size else None,
          "linear_mode_counts": counts,
          "attention_int8_fraction": (float((np.asarray(stats["attention"])[computed] == 1).mean())
                                      if computed.any() else None)}


def default_warmup(steps: int) -> int:
  return max(2, int(round(DEFAULT_TDC_WARMUP_FRACTION * steps)))


def make_method_knobs(config, params, *, precision: str, calibration: Calibration | None = None,
                      tau: float | None = None, outlier_threshold: float | None = None,
                      tdc_threshold: float = DEFAULT_TDC_THRESHOLD,
                      tdc_error_bound: float = DEFAULT_TDC_ERROR_BOUND,
                      tdc_max_skips: int = DEFAULT_TDC_MAX_SKIPS, tdc_warmup: int = 2,
                      attention_blocks=None,
                      attention_edge_steps: int = DEFAULT_ATTENTION_EDGE_STEPS
                      ) -> tuple[MethodKnobs, dict]:
  """Knobs for a precision. "mixed" needs a calibration (α, β, τ) or a user τ (then α = 1,
  β = 0: the predictor is Γ_b(t−1) itself). Returns (knobs, notes for the report)."""
  if precision not in PRECISIONS:
    raise UserInputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
  L, n = config.num_layers, len(LINEAR_NAMES)
  quantized = is_quantized(params)
  notes = {"precision": precision, "quantized_weights": quantized}
  alpha = beta = None
  override = -1
  if precision == "bf16":
    t, override = float("inf"), (int(Mode.BF16) if quantized else -1)
    notes["bf16_mode"] = "W4A16 (decoded NVFP4 weights)" if quantized else "unquantized weights"
  elif not quantized:
    raise UserInputError(f"precision {precision!r} needs quantized block linears; this model's "
                         "weights are unquantized (convert with --quantize nvfp4, or use bf16)")
  elif precision == "nvfp4":
    t = float("inf")
  elif precision == "int8":
    t = float("-inf")
  else:
    if calibration is not None:
      calibration.check_model(config, LINEAR_NAMES)
      alpha = np.nan_to_num(calibration.alpha, nan=0.0)
      beta = np.nan_to_num(calibration.beta, nan=0.0)
      t = calibration.tau if tau is None else tau
      notes["tau_source"] = "calibration" if tau is None else "user"
    elif tau is not None:
      alpha, beta, t = np.ones((L, n)), np.zeros((L, n)), tau
      notes["tau_source"] = "user (uncalibrated predictor: pred = Gamma_b(t-1))"
    else:
      raise UserInputError("precision 'mixed' needs a calibration file (mpqjax calibrate) or an "
                           "explicit tau")
  if outlier_threshold is None:
    outlier_threshold = DEFAULT_OUTLIER_THRESHOLD if precision == "mixed" else float("inf")
  notes.update(tau=t, outlier_threshold=outlier_threshold)
  knobs = make_knobs(L, n, tau=t, alpha=alpha, beta=beta, mode_override=override,
                     outlier_threshold=outlier_threshold, tdc_threshold=tdc_threshold,
                     tdc_error_bound=tdc_error_bound, tdc_max_skips=tdc_max_skips,
                     tdc_warmup=tdc_warmup,
                     attention_int8=attention_blocks, attention_edge_steps=attention_edge_steps)
  return knobs, notes


def _as_batch(name: str, a, text_dim: int) -> jax.Array:
  a = jnp.asarray(a)
  if a.ndim == 2:
    a = a[None]
  if a.ndim != 3 or a.shape[-1] != text_dim:
    raise UserInputError(f"{name} must be [T, {text_dim}] or [B, T, {text_dim}], got shape "
                         f"{tuple(a.shape)}")
  return a


def generate(model, text_emb, *, negative_emb=None, latents=None, latent_shape=None, seed: int = 0,
             steps: int = 50, guidance: float = 6.0, dynamic_cfg: bool = False,
             scheduler: schedulers.SchedulerConfig | str = "ddim", precision: str = "mixed",
             calibration: Calibration | None = None, tau: float | None = None, tdc: bool = True,
             tdc_threshold: float = DEFAULT_TDC_THRESHOLD,
             tdc_error_bound: float = DEFAULT_TDC_ERROR_BOUND,
             tdc_max_skips: int = DEFAULT_TDC_MAX_SKIPS, tdc_warmup: int | None = None,
             tdc_cache: str = "bf16", outlier_threshold: float | None = None,
             collect_stats: bool = False, implementation: str | None = None,
             attention_precision: str = "bf16", attention_blocks=None,
             attention_edge_steps: int = DEFAULT_ATTENTION_EDGE_STEPS,
             attention_pv: str = attention_lib.INT8_PV_DEFAULT,
             on_step=None) -> GenerateResult:
  """Run the method end to end on `model` (anything with .config and .params).

  text_emb: [T, Dt] or [B, T, Dt]; negative_emb: same shape (zeros when None: there is no text
  encoder here to encode the empty prompt). latents: initial noise f32[B, F, C, H, W]; else drawn
  from `seed` with latent_shape (F, H, W) (default: the config's sample size).
  on_step: optional callable(step, num_steps) called from the device loop as each step starts
  (a jax.debug.callback, e.g. for a progress bar; None: the loop never reaches the host).
  scheduler: "ddim", "dpm", or a SchedulerConfig (defaults: the CogVideoX-2b/5b release configs
  by the model's RoPE flag). CFG runs when guidance > 1 (batched, unconditional half first).
  tdc_cache: how the Temporal Delta Cache stores each block's Δ, "bf16" (the stream's dtype) or
  "int8" (per-token INT8: half the cache memory; see mpqjax.method.tdc).
  attention_precision "int8" runs the INT8/FP8 attention in `attention_blocks` (block indices,
  None = all) except during the first and last `attention_edge_steps` steps; both are knob
  arrays, so changing them does not recompile. attention_pv: its PV format, "fp8" (fastest),
  "fp8x2" (V as two e4m3 terms: within the accuracy bars, 17-45% slower attention) or "bf16"
  (see mpqjax.attention); static, so a new value compiles a new program.
  """
  if tdc_cache not in tdc_lib.TDC_CACHES:
    raise UserInputError(f"tdc_cache must be one of {tdc_lib.TDC_CACHES}, got {tdc_cache!r}")
  if attention_precision not in attention_lib.PRECISIONS:
    raise UserInputError(f"attention precision must be one of {attention_lib.PRECISIONS}, got "
                         f"{attention_precision!r}")
  if attention_pv not in attention_lib.INT8_PVS:
    raise UserInputError(f"attention_pv must be one of {attention_lib.INT8_PVS}, got "
                         f"{attention_pv!r}")
  config, params = model.config, model.params
  text = _as_batch("text_emb", text_emb, config.text_embed_dim)
  neg = jnp.zeros_like(text) if negative_emb is None else _as_batch(
      "negative_emb", negative_emb, config.text_embed_dim)
  if neg.shape != text.shape:
    raise UserInputError(f"negative_emb shape {tuple(neg.shape)} must match text_emb "
                         f"{tuple(text.shape)}")
  if isinstance(scheduler, str):
    preset = "cogvideox-5b" if config.use_rotary_positional_embeddings else "cogvideox-2b"
    scheduler = schedulers.SchedulerConfig.preset(preset, kind=scheduler)
  if not isinstance(steps, int) or steps < 1:
    raise UserInputError(f"steps must be a positive integer, got {steps!r}")
  key = jax.random.key(seed)
  k_lat, k_noise = jax.random.split(key)
  b = text.shape[0]
  if latents is None:
    f, h, w = latent_shape or ((config.sample_frames - 1) // config.temporal_compression_ratio
                               + 1, config.sample_height, config.sample_width)
    latents = jax.random.normal(k_lat, (b, f, config.in_channels, h, w), jnp.float32)
  latents = jnp.asarray(latents, jnp.float32)
  cog.check_inputs(config, latents.shape, (latents.shape[0],), text.shape)
  do_cfg = guidance > 1.0
  text_all = jnp.concatenate([neg, text], axis=0) if do_cfg else text
  text_all = text_all.astype(params["patch_embed"]["text_proj"]["weight"].dtype)
  sched = schedulers.make_schedule(scheduler, steps)
  g = jnp.asarray(schedulers.guidance_scales(guidance, np.asarray(sched.timesteps), steps,
                                             dynamic_cfg))
  warm = default_warmup(steps) if tdc_warmup is None else tdc_warmup
  knobs, notes = make_method_knobs(config, params, precision=precision, calibration=calibration,
                                   tau=tau, outlier_threshold=outlier_threshold,
                                   tdc_threshold=tdc_threshold, tdc_error_bound=tdc_error_bound,
                                   tdc_max_skips=tdc_max_skips, tdc_warmup=warm,
                                   attention_blocks=attention_blocks,
                                   attention_edge_steps=attention_edge_steps)
  static = GenerateStatic(config, scheduler, tdc=tdc, tdc_cache=tdc_cache, do_cfg=do_cfg,
                          collect_stats=collect_stats, implementation=implementation,
                          attention_precision=attention_precision, attention_pv=attention_pv,
                          progress=on_step is not None)
  _ON_STEP[0] = on_step
  try:
    x, stats = generate_latents(params, text_all, latents, k_noise, knobs, sched, g,
                                static=static)
    x = jax.block_until_ready(x)
  finally:
    _ON_STEP[0] = None
  stats = jax.tree_util.tree_map(np.asarray, jax.device_get(stats))
  state_shape = jax.eval_shape(lambda: init_method_state(static, params, latents.shape,
                                                         text_all.shape))
  summary = {**notes, **summarize(stats), **tdc_lib.state_nbytes(state_shape),
             **weight_report(params), "tdc": tdc, "tdc_cache": tdc_cache,
             "tdc_threshold": tdc_threshold,
             "tdc_error_bound": tdc_error_bound, "tdc_max_skips": tdc_max_skips,
             "tdc_warmup": warm, "scheduler": scheduler.to_dict(), "steps": steps,
             "guidance": guidance, "dynamic_cfg": dynamic_cfg, "seed": seed,
             "attention_precision": attention_precision, "attention_pv": attention_pv,
             "latents_shape": list(latents.shape)}
  for k, v in list(summary.items()):
    if isinstance(v, float) and not math.isfinite(v):
      summary[k] = str(v)
  return GenerateResult(latents=np.asarray(x), stats=stats, summary=summary)
