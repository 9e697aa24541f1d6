"""Positional and timestep embeddings of CogVideoX (diffusers' embeddings.py conventions).

Positional tables depend only on static shapes, so they are computed on the host in float64
numpy (diffusers computes the sin-cos table in float64 as well) and enter the jitted graph
as float32 constants.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from models.cogvideox.config import CogVideoXConfig


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """[M] positions -> [M, dim] = [sin(pos*w), cos(pos*w)], w_i = 10000^(-2i/dim)."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_3d(embed_dim: int, grid_w: int, grid_h: int, frames: int,
              spatial_scale: float, temporal_scale: float) -> np.ndarray:
  """diffusers get_3d_sincos_pos_embed: [frames, grid_h*grid_w, embed_dim] (float64).

  Channels: [temporal (D/4) | spatial (3D/4)], the spatial half split [w-coord | h-coord];
  tokens within a frame are row-major (h, w).
  """
  d_sp, d_t = 3 * embed_dim // 4, embed_dim // 4
  hh, ww = np.meshgrid(np.arange(grid_h, dtype=np.float32) / np.float32(spatial_scale),
                       np.arange(grid_w, dtype=np.float32) / np.float32(spatial_scale),
                       indexing="ij")
  spatial = np.concatenate([sincos_1d(d_sp // 2, ww), sincos_1d(d_sp // 2, hh)], axis=1)
  t = np.arange(frames, dtype=np.float32) / np.float32(temporal_scale)
  temporal = sincos_1d(d_t, t)
  return np.concatenate([np.broadcast_to(temporal[:, None], (frames, grid_h * grid_w, d_t)),
                         np.broadcast_to(spatial[None], (frames, grid_h * grid_w, d_sp))],
                        axis=-1)


def video_pos_embedding(config: CogVideoXConfig, frames: int, height: int,
                        width: int) -> np.ndarray:
  """float32[frames*(height/p)*(width/p), inner_dim]: the sin-cos table for the video tokens
  of a latent of the given size (diffusers' CogVideoXPatchEmbed._get_positional_embeddings
  without its zero text rows)."""
  p = config.patch_size
  return sincos_3d(config.inner_dim, width // p, height // p, frames,
                   config.spatial_interpolation_scale,
                   config.temporal_interpolation_scale).reshape(-1, config.inner_dim).astype(
                       np.float32)


def resize_crop_region_for_grid(src: tuple[int, int], tgt_width: int, tgt_height: int):
  """diffusers' pipeline get_resize_crop_region_for_grid: ((top, left), (bottom, right))."""
  tw, th = tgt_width, tgt_height
  h, w = src
  if h / w > th / tw:
    rh, rw = th, int(round(th / h * w))
  else:
    rw, rh = tw, int(round(tw / w * h))
  top, left = int(round((th - rh) / 2.0)), int(round((tw - rw) / 2.0))
  return (top, left), (top + rh, left + rw)


def _rope_1d(dim: int, pos: np.ndarray, theta: float = 10000.0):
  freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  ang = np.outer(pos.astype(np.float64), freqs)
  # diffusers repeat_interleave_real: each frequency used for an adjacent (real, imag) pair
  return np.repeat(np.cos(ang), 2, axis=1), np.repeat(np.sin(ang), 2, axis=1)


def rotary_3d(config: CogVideoXConfig, frames: int, height: int, width: int):
  """(cos, sin), each float32[frames*(height/p)*(width/p), attention_head_dim]: the 3D RoPE
  the diffusers CogVideoX pipeline builds (_prepare_rotary_positional_embeddings with
  get_3d_rotary_pos_embed, grid_type "linspace", crop of the sample grid)."""
  p = config.patch_size
  gh, gw = height // p, width // p
  (top, left), (bottom, right) = resize_crop_region_for_grid(
      (gh, gw), config.sample_width // p, config.sample_height // p)
  grid_h = np.linspace(top, bottom * (gh - 1) / gh, gh)
  grid_w = np.linspace(left, right * (gw - 1) / gw, gw)
  grid_t = np.linspace(0, frames * (frames - 1) / frames, frames)
  d = config.attention_head_dim
  dt, dh, dw = d // 4, d // 8 * 3, d // 8 * 3
  parts = [_rope_1d(dt, grid_t), _rope_1d(dh, grid_h), _rope_1d(dw, grid_w)]

  def combine(t, h, w):
    shape = (frames, gh, gw)
    return np.concatenate([np.broadcast_to(t[:, None, None], (*shape, t.shape[-1])),
                           np.broadcast_to(h[None, :, None], (*shape, h.shape[-1])),
                           np.broadcast_to(w[None, None, :], (*shape, w.shape[-1]))],
                          axis=-1).reshape(frames * gh * gw, -1)

  cos = combine(parts[0][0], parts[1][0], parts[2][0])
  sin = combine(parts[0][1], parts[1][1], parts[2][1])
  return cos.astype(np.float32), sin.astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: int = 10000) -> jax.Array:
  """diffusers get_timestep_embedding: t[B] -> float32[B, dim]."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  emb = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x[B, S, H, D] rotated by (cos, sin)[S, D] on adjacent pairs (diffusers apply_rotary_emb
  with use_real_unbind_dim=-1), computed in float32, returned in x's dtype."""
  xf = x.astype(jnp.float32)
  pairs = xf.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
  return out.astype(x.dtype)
