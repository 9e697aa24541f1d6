"""Temporal Delta Cache (TDC) with the Purified Delta Refresh rules, per block.

State of block b (one `BlockState`, stacked [L, ...] for the whole model):
  Δ_b = (Δ_v, Δ_t)  cached residual Y − X of the video and text streams, from b's last computation
  c_b               relative change of Δ between b's last two computations (+∞ until two exist)
                    c_b = (‖Δ_v' − Δ_v‖₁ + ‖Δ_t' − Δ_t‖₁) / (‖Δ_v‖₁ + ‖Δ_t‖₁)   (' = new)
  E_b               accumulated error estimate E_acc,b
  k_b               consecutive skips so far
  Γ_b               block divergence at b's last computation (for the DMPQ predictor)

Decision at step i of S (W = warm-up steps, N_max = max consecutive skips, τ_tdc, B = bound):
  skip_b(i) = tdc_on ∧ i ≥ W ∧ i < S − 1 ∧ c_b < τ_tdc ∧ E_b + c_b < B ∧ k_b < N_max
Skip:     Y = X + Δ_b (no matmul runs; lax.cond), E_b ← E_b + c_b, k_b ← k_b + 1, Δ_b, c_b, Γ_b kept.
Compute:  Y = block(X), Δ_b ← Y − X, c_b ← change as above, E_b ← 0, k_b ← 0, Γ_b ← Γ(X, Y).
          PDR: when k_b > 0 (the previous step skipped b) no fresh Γ exists and the predictor
          sends every routed linear to INT8 (see predictor.predict_modes).

τ_tdc = 0 never skips (c_b ≥ 0), which makes the output bit-identical to TDC off.

Cache formats (TDC_CACHES): "bf16" keeps Δ in the residual stream's dtype; "int8" keeps it as
INT8 with one f32 scale per token (formats.quantize_int8 over the width): half the bytes. Then
a skip adds the dequantized Δ, and c_b compares the new exact Δ' with the dequantized cached Δ
(the error a skip with the cache would make now).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mpqjax import formats
from mpqjax.method.defaults import TDC_CACHES
from mpqjax.method.predictor import l1


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("gamma", "change", "e_acc", "skips", "count", "delta_video",
                                "delta_text", "video_scale", "text_scale"),
                   meta_fields=())
@dataclasses.dataclass(frozen=True)
class BlockState:
  """Per-block method state; every field has a leading [L] axis when stacked.

  gamma f32, change f32, e_acc f32, skips int32, count int32 (computations so far);
  delta_video [Bm, N, D] / delta_text [Bm, T, D] in the residual stream's dtype (or s8 with
  the "int8" cache), None when TDC is off (then nothing large is carried);
  video_scale [Bm, N, 1] / text_scale [Bm, T, 1] f32 per-token scales of the "int8" cache, else
  None.
  """
  gamma: Any
  change: Any
  e_acc: Any
  skips: Any
  count: Any
  delta_video: Any
  delta_text: Any
  video_scale: Any = None
  text_scale: Any = None


def init_state(num_layers: int, video_shape, text_shape, dtype, *, tdc: bool,
               cache: str = "bf16") -> BlockState:
  """Zero state for L blocks; video_shape [Bm, N, D], text_shape [Bm, T, D]; cache one of
  TDC_CACHES."""
  if cache not in TDC_CACHES:
    raise ValueError(f"TDC cache must be one of {TDC_CACHES}, got {cache!r}")
  L = num_layers
  int8 = tdc and cache == "int8"
  store = jnp.int8 if int8 else dtype
  scale = lambda shape: jnp.zeros((L, *shape[:-1], 1), jnp.float32) if int8 else None
  return BlockState(
      gamma=jnp.zeros((L,), jnp.float32),
      change=jnp.full((L,), jnp.inf, jnp.float32),
      e_acc=jnp.zeros((L,), jnp.float32),
      skips=jnp.zeros((L,), jnp.int32),
      count=jnp.zeros((L,), jnp.int32),
      delta_video=jnp.zeros((L, *video_shape), store) if tdc else None,
      delta_text=jnp.zeros((L, *text_shape), store) if tdc else None,
      video_scale=scale(video_shape), text_scale=scale(text_shape))


def state_nbytes(state) -> dict[str, int]:
  """Device bytes of a (stacked) state: total and the TDC delta cache alone."""
  def nb(tree):
    return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize
                   for a in jax.tree_util.tree_leaves(tree)))
  return {"state_bytes": nb(state), "tdc_cache_bytes": nb(
      (state.delta_video, state.delta_text, state.video_scale, state.text_scale))}


def cached_deltas(s: BlockState, dtype) -> tuple[jax.Array, jax.Array]:
  """(Δ_v, Δ_t) of one block's state in `dtype` (dequantized from the "int8" cache)."""
  if s.video_scale is None:
    return s.delta_video.astype(dtype), s.delta_text.astype(dtype)
  return (formats.dequantize_int8(formats.Int8Tensor(s.delta_video, s.video_scale), dtype),
          formats.dequantize_int8(formats.Int8Tensor(s.delta_text, s.text_scale), dtype))


def _store(s: BlockState, dv: jax.Array, dt: jax.Array) -> dict:
  """The cache fields that hold the new deltas dv, dt in s's cache format."""
  if s.video_scale is None:
    return dict(delta_video=dv.astype(s.delta_video.dtype),
                delta_text=dt.astype(s.delta_text.dtype))
  qv, qt = formats.quantize_int8(dv), formats.quantize_int8(dt)
  return dict(delta_video=qv.values, video_scale=qv.scales, delta_text=qt.values,
              text_scale=qt.scales)


def should_skip(s: BlockState, i, num_steps: int, knobs) -> jax.Array:
  """bool scalar: skip_b(i) as in the module docstring (one block's state `s`)."""
  return ((i >= knobs.tdc_warmup) & (i < num_steps - 1) & (s.change < knobs.tdc_threshold)
          & (s.e_acc + s.change < knobs.tdc_error_bound) & (s.skips < knobs.tdc_max_skips))


def skip(s: BlockState, x_video, x_text):
  """Y = X + Δ (in the stream's dtype) and the state after a skip."""
  with jax.named_scope("tdc_skip"):
    dv, dt = cached_deltas(s, s.delta_video.dtype if s.video_scale is None else jnp.float32)
    y_video = (x_video + dv).astype(x_video.dtype)
    y_text = (x_text + dt).astype(x_text.dtype)
    new = dataclasses.replace(s, e_acc=s.e_acc + s.change, skips=s.skips + 1)
    return y_video, y_text, new


def computed(s: BlockState, x_video, x_text, y_video, y_text, gamma, *, tdc: bool) -> BlockState:
  """The state after block b computed Y from X (Γ already measured)."""
  if not tdc:
    return dataclasses.replace(s, gamma=gamma, skips=jnp.zeros_like(s.skips),
                               count=s.count + 1)
  with jax.named_scope("tdc_update"):
    f32 = jnp.float32
    # the new Δ in the stream's dtype (as the bf16 cache stores it), compared in f32
    dv, dt = y_video - x_video, y_text - x_text
    if s.video_scale is None:
      dv, dt = dv.astype(s.delta_video.dtype), dt.astype(s.delta_text.dtype)
    old_v, old_t = cached_deltas(s, f32)
    num = l1(dv.astype(f32) - old_v) + l1(dt.astype(f32) - old_t)
    den = l1(old_v) + l1(old_t)
    change = jnp.where(s.count > 0, num / jnp.maximum(den, jnp.finfo(f32).tiny), jnp.inf)
    return dataclasses.replace(s, gamma=gamma, change=change, e_acc=jnp.zeros_like(s.e_acc),
                               skips=jnp.zeros_like(s.skips), count=s.count + 1,
                               **_store(s, dv, dt))
