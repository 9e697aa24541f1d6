"""DMPQ: the block divergence Γ, the per-linear error predictor and its calibration fit.

  Γ_b(t)  = (‖Y_v − X_v‖₁ + ‖Y_t − X_t‖₁) / (‖X_v‖₁ + ‖X_t‖₁)
            X, Y: block b's input and output hidden states at step t; v = video tokens,
            t = text tokens; sums run over the whole CFG batch (both branches pooled), in f32.
  pred(l) = α_l · Γ_b(t−1) + β_l, or +∞ when no fresh Γ exists (the first step, and the step
            right after a TDC skip: Purified Delta Refresh runs those blocks in INT8)
  mode(l) = INT8 if pred(l) > τ else NVFP4; modulation linears always BF16 (W4A16).

With this convention τ = −∞ routes everything to INT8 and τ = +∞ everything to NVFP4 (the
first step included), so the uniform precisions are the same compiled program as "mixed".
See docs/METHOD.md for why Γ pools both streams and both CFG branches.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mpqjax.qlinear import Mode

# Nominal activation bits per mode, used for the "average activation bits" target and report
# (the paper's W4A6 counts NVFP4 as 4 bits); MODE_ACTIVATION_BITS in qlinear adds scale overhead.
NOMINAL_BITS = {int(Mode.NVFP4): 4.0, int(Mode.INT8): 8.0, int(Mode.BF16): 16.0}


def l1(x: jax.Array) -> jax.Array:
  return jnp.sum(jnp.abs(x.astype(jnp.float32)))


def block_divergence(x_video, x_text, y_video, y_text) -> jax.Array:
  """Γ (f32 scalar) of one block: relative L1 change of both streams, pooled over the batch."""
  with jax.named_scope("gamma"):
    num = l1(y_video.astype(jnp.float32) - x_video.astype(jnp.float32))
    num = num + l1(y_text.astype(jnp.float32) - x_text.astype(jnp.float32))
    den = l1(x_video) + l1(x_text)
    return num / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)


def predict_modes(gamma_prev, fresh, alpha, beta, tau, routed) -> jax.Array:
  """int32[n]: each linear's mode at this step.

  gamma_prev: f32 scalar Γ_b(t−1); fresh: bool scalar, False -> predicted error +∞ (INT8 unless
  τ = +∞); alpha, beta: f32[n]; tau: f32 scalar; routed: bool[n] static mask of the linears the
  predictor routes (False: modulation linears, always BF16).
  """
  pred = jnp.where(fresh, alpha * gamma_prev + beta, jnp.inf)
  mode = jnp.where(pred > tau, int(Mode.INT8), int(Mode.NVFP4))
  return jnp.where(jnp.asarray(routed), mode, int(Mode.BF16)).astype(jnp.int32)


def fit_linear(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
  """Least-squares y ≈ α x + β and Pearson r, in float64. Degenerate x (constant) gives α = 0,
  β = mean(y), r = nan."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.size < 2:
    return 0.0, float(np.mean(y)) if y.size else 0.0, float("nan")
  xm, ym = x.mean(), y.mean()
  sxx = np.sum((x - xm) ** 2)
  syy = np.sum((y - ym) ** 2)
  sxy = np.sum((x - xm) * (y - ym))
  if sxx <= 0:
    return 0.0, float(ym), float("nan")
  alpha = sxy / sxx
  r = sxy / np.sqrt(sxx * syy) if syy > 0 else float("nan")
  return float(alpha), float(ym - alpha * xm), float(r)


def tau_for_target_bits(pred: np.ndarray, target_bits: float, forced_int8: int = 0) -> float:
  """τ such that the share of INT8 decisions gives `target_bits` nominal average bits.

  pred: float[n], the predicted errors of every routed (linear, step) decision that has a fresh
  Γ; forced_int8: decisions without one (first step), which are INT8 whatever τ is.
  A decision goes INT8 when pred > τ; the INT8 share p must satisfy 4 + 4 p = target_bits.
  """
  lo, hi = NOMINAL_BITS[int(Mode.NVFP4)], NOMINAL_BITS[int(Mode.INT8)]
  if not lo <= target_bits <= hi:
    raise ValueError(f"target bits must be in [{lo}, {hi}], got {target_bits}")
  pred = np.sort(np.asarray(pred, np.float64).ravel())
  total = pred.size + forced_int8
  want = int(round((target_bits - lo) / (hi - lo) * total)) - forced_int8
  want = min(max(want, 0), pred.size)
  if want == 0:
    return float("inf")
  if want == pred.size:
    return float("-inf")
  # midpoint between the (n - want)-th and the next value: exactly `want` values lie above it
  k = pred.size - want
  return float(0.5 * (pred[k - 1] + pred[k]))
