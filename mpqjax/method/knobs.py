"""The method's run-time settings as ONE pytree of arrays, so changing any of them (thresholds,
predictor coefficients, TDC bounds, mode override) reuses the compiled `generate`."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mpqjax.method.defaults import (DEFAULT_ATTENTION_EDGE_STEPS, DEFAULT_TDC_ERROR_BOUND,
                                    DEFAULT_TDC_MAX_SKIPS, DEFAULT_TDC_THRESHOLD)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("tau", "alpha", "beta", "mode_override", "outlier_threshold",
                                "tdc_threshold", "tdc_error_bound", "tdc_max_skips",
                                "tdc_warmup", "attention_int8", "attention_edge_steps"),
                   meta_fields=())
@dataclasses.dataclass(frozen=True)
class MethodKnobs:
  """tau f32[]: predictor threshold (E_rel units; −inf = all INT8, +inf = all NVFP4).
  alpha, beta f32[L, 8]: predictor coefficients per block linear (LINEAR_NAMES order).
  mode_override int32[]: −1 = predictor; 0/1/2 = every quantized linear in that Mode.
  outlier_threshold f32[]: max|x|/mean|x| above which a linear runs BF16 (+inf disables).
  tdc_threshold f32[] (τ_tdc), tdc_error_bound f32[] (B), tdc_max_skips int32[] (N_max),
  tdc_warmup int32[] (W).
  attention_int8 bool[L]: blocks whose attention may run INT8/FP8 (used only when generate's
  attention precision is "int8"); attention_edge_steps int32[]: that many first and last steps
  keep bf16 attention in every block."""
  tau: Any
  alpha: Any
  beta: Any
  mode_override: Any
  outlier_threshold: Any
  tdc_threshold: Any
  tdc_error_bound: Any
  tdc_max_skips: Any
  tdc_warmup: Any
  attention_int8: Any
  attention_edge_steps: Any


def make_knobs(num_layers: int, num_linears: int, *, tau=float("inf"), alpha=None, beta=None,
               mode_override: int = -1, outlier_threshold=float("inf"),
               tdc_threshold=DEFAULT_TDC_THRESHOLD, tdc_error_bound=DEFAULT_TDC_ERROR_BOUND,
               tdc_max_skips=DEFAULT_TDC_MAX_SKIPS, tdc_warmup=2, attention_int8=None,
               attention_edge_steps=DEFAULT_ATTENTION_EDGE_STEPS) -> MethodKnobs:
  shape = (num_layers, num_linears)
  def coef(a, name):
    a = np.zeros(shape, np.float32) if a is None else np.asarray(a, np.float32)
    if a.shape != shape:
      raise ValueError(f"{name} must have shape {shape}, got {a.shape}")
    return jnp.asarray(a)
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  i32 = lambda v: jnp.asarray(v, jnp.int32)
  return MethodKnobs(tau=f32(tau), alpha=coef(alpha, "alpha"), beta=coef(beta, "beta"),
                     mode_override=i32(mode_override), outlier_threshold=f32(outlier_threshold),
                     tdc_threshold=f32(tdc_threshold), tdc_error_bound=f32(tdc_error_bound),
                     tdc_max_skips=i32(tdc_max_skips), tdc_warmup=i32(tdc_warmup),
                     attention_int8=_block_mask(attention_int8, num_layers),
                     attention_edge_steps=i32(attention_edge_steps))


def _block_mask(blocks, num_layers: int) -> jax.Array:
  """bool[L] from None (every block) or an iterable of block indices."""
  mask = np.zeros(num_layers, bool)
  if blocks is None:
    mask[:] = True
  else:
    blocks = [int(b) for b in blocks]
    bad = [b for b in blocks if not 0 <= b < num_layers]
    if bad:
      raise ValueError(f"attention blocks {bad} out of range for {num_layers} blocks")
    mask[blocks] = True
  return jnp.asarray(mask)
