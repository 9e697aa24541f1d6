"""Inputs and references shared by the tests and the benchmarks (one copy of each)."""
from __future__ import annotations

import numpy as np


def rel_err(out, ref) -> float:
  """||out - ref||_F / ||ref||_F in float64; inf when out is not finite (so a bound fails)."""
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  if not np.isfinite(out).all():
    return float("inf")
  return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def derotated_block_values_f64(t, block: int) -> np.ndarray:
  """float64 [N, K]: an NVFP4Tensor's exact block values (no tensor scale) times the
  orthonormal block Hadamard (block 0: not rotated)."""
  from mpqjax import formats
  w = np.asarray(formats.nvfp4_block_values(t), np.float64)
  if not block:
    return w
  n, k = w.shape
  return (w.reshape(n, -1, block) @ formats.hadamard_matrix(block).astype(np.float64)
          ).reshape(n, k)


def w4a16_exact_f64(x, layer) -> np.ndarray:
  """float64 [M, N]: x . W^T + bias with the layer's exact quantized NVFP4 weight (block values
  times the tensor scale, rotated back by its Hadamard block): the product W4A16 approximates
  in either of its forms (qlinear_xla.w4a16_folds_rotation)."""
  w = (derotated_block_values_f64(layer.weight, layer.hadamard_block)
       * float(layer.weight.global_scale))
  y = np.asarray(x, np.float64) @ w.T
  return y if layer.bias is None else y + np.asarray(layer.bias, np.float64)


def attention_outlier_inputs(key, shape, n_outliers: int = 4, magnitude: float = 4.0, dtype=None):
  """q, k, v [B, T, H, D] ~ N(0, 1); q and k get `n_outliers` channels with large offsets and
  gains, as DiT activations have (k shares q's offsets, scaled by 0.7)."""
  import jax
  import jax.numpy as jnp
  dtype = dtype or jnp.bfloat16
  ks = jax.random.split(key, 6)
  q, k, v = (jax.random.normal(kk, shape, jnp.float32) for kk in ks[:3])
  ch = jax.random.choice(ks[3], shape[-1], (n_outliers,), replace=False)
  off = jax.random.normal(ks[4], (n_outliers,)) * magnitude
  gain = 1 + jnp.abs(jax.random.normal(ks[5], (n_outliers,))) * magnitude / 2
  q = q.at[..., ch].set(q[..., ch] * gain + off)
  k = k.at[..., ch].set(k[..., ch] * gain + 0.7 * off)
  return tuple(x.astype(dtype) for x in (q, k, v))


def attention_reference_f64(q, k, v) -> np.ndarray:
  """softmax(q k^T / sqrt(D)) v in float64, [B, T, H, D]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)


def cosine_and_rel_l1(out, ref) -> tuple[float, float]:
  """(cosine similarity, relative L1) of out against ref, flattened; NaNs if out is not finite."""
  o = np.asarray(out, np.float64).ravel()
  r = np.asarray(ref, np.float64).ravel()
  if not np.all(np.isfinite(o)):
    return float("nan"), float("nan")
  cos = float(o @ r / (np.linalg.norm(o) * np.linalg.norm(r)))
  return cos, float(np.abs(o - r).sum() / np.abs(r).sum())
