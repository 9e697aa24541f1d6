"""The decoder of diffusers' AutoencoderKLCogVideoX as pure functions over a params pytree.

Layout as in diffusers: latents z [B, C_lat, F, h, w] -> video [B, 3, F', 8h, 8w] (F' = 4(F-1)+1
for the released configs when F is odd), everything NCTHW, weights in torch layout.
Params are nested dicts whose paths are the diffusers state-dict names split at the dots
(params["decoder"]["up_blocks"]["0"]["resnets"]["1"]["conv1"]["conv"]["weight"] <-
"decoder.up_blocks.0.resnets.1.conv1.conv.weight"); the decoder's blocks differ in width, so
nothing is stacked.

Temporal causality: every 3x3x3 CogVideoXCausalConv3d pads time on the left with its conv
cache (the last 2 frames it saw) or, on the first frame batch, with copies of the first frame.
`decode_batch` is one call of diffusers' decoder on a frame batch and returns the new caches;
`decode` reproduces AutoencoderKLCogVideoX._decode / tiled_decode (frame batches of 2 latent
frames, the first one taking the odd remainder; overlapping spatial tiles blended linearly).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from mpqjax.errors import UserInputError

CLASS_NAME = "AutoencoderKLCogVideoX"


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of diffusers' AutoencoderKLCogVideoX config that the decoder uses."""
  latent_channels: int = 16
  out_channels: int = 3
  block_out_channels: tuple = (128, 256, 256, 512)
  layers_per_block: int = 3
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  temporal_compression_ratio: float = 4
  sample_height: int = 480
  sample_width: int = 720
  scaling_factor: float = 1.15258426

  @property
  def spatial_scale(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, d: dict, source: str = "config") -> "VAEConfig":
    name = d.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
      raise UserInputError(f"{source}: _class_name {name!r} is not {CLASS_NAME}")
    if d.get("use_post_quant_conv") or d.get("use_quant_conv"):
      raise UserInputError(f"{source}: use_(post_)quant_conv=true is not supported (no released "
                           "CogVideoX VAE uses it)")
    act = d.get("act_fn", "silu")
    if act != "silu":
      raise UserInputError(f"{source}: act_fn {act!r} is not supported (only 'silu')")
    ups = d.get("up_block_types", ("CogVideoXUpBlock3D",))
    if any(u != "CogVideoXUpBlock3D" for u in ups):
      raise UserInputError(f"{source}: up_block_types {ups} (only CogVideoXUpBlock3D exists)")
    if d.get("shift_factor") not in (None, 0, 0.0):
      raise UserInputError(f"{source}: shift_factor {d['shift_factor']} is not supported")
    kw = {}
    for f in dataclasses.fields(cls):
      if f.name in d and d[f.name] is not None:
        kw[f.name] = tuple(int(c) for c in d[f.name]) if f.name == "block_out_channels" \
            else type(f.default)(d[f.name])
    cfg = cls(**kw)
    if len(ups) != len(cfg.block_out_channels):
      raise UserInputError(f"{source}: {len(ups)} up blocks for {len(cfg.block_out_channels)} "
                           "block_out_channels")
    if any(c % cfg.norm_num_groups for c in cfg.block_out_channels):
      raise UserInputError(f"{source}: block_out_channels {cfg.block_out_channels} are not all "
                           f"divisible by norm_num_groups={cfg.norm_num_groups}")
    return cfg

  @classmethod
  def from_file(cls, path: str) -> "VAEConfig":
    try:
      with open(path, encoding="utf-8") as f:
        d = json.load(f)
    except json.JSONDecodeError as e:
      raise UserInputError(f"{path}: not valid JSON ({e})") from None
    return cls.from_dict(d, source=path)


def param_shapes(cfg: VAEConfig) -> dict:
  """{diffusers name: shape} of every decoder parameter."""
  shapes: dict = {}

  def conv(name, cin, cout, k, causal=True):
    kk = (k, k, k) if causal else (k, k)
    pre = name + (".conv" if causal else "")
    shapes[pre + ".weight"] = (cout, cin, *kk)
    shapes[pre + ".bias"] = (cout,)

  def snorm(name, c):
    shapes[name + ".norm_layer.weight"] = (c,)
    shapes[name + ".norm_layer.bias"] = (c,)
    conv(name + ".conv_y", cfg.latent_channels, c, 1)
    conv(name + ".conv_b", cfg.latent_channels, c, 1)

  def resnet(name, cin, cout):
    snorm(name + ".norm1", cin)
    conv(name + ".conv1", cin, cout, 3)
    snorm(name + ".norm2", cout)
    conv(name + ".conv2", cout, cout, 3)
    if cin != cout:
      shapes[name + ".conv_shortcut.weight"] = (cout, cin, 1, 1, 1)
      shapes[name + ".conv_shortcut.bias"] = (cout,)

  ch = list(reversed(cfg.block_out_channels))
  conv("decoder.conv_in", cfg.latent_channels, ch[0], 3)
  for j in range(2):
    resnet(f"decoder.mid_block.resnets.{j}", ch[0], ch[0])
  prev = ch[0]
  for i, c in enumerate(ch):
    for j in range(cfg.layers_per_block + 1):
      resnet(f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else c, c)
    prev = c
    if i < len(ch) - 1:
      conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3, causal=False)
  snorm("decoder.norm_out", ch[-1])
  conv("decoder.conv_out", ch[-1], cfg.out_channels, 3)
  return shapes


# ------------------------------------------------------------------------------ layers
def _prec(x):
  return jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


def conv3d(x: jax.Array, w: jax.Array, b: jax.Array, pad_hw: tuple[int, int]) -> jax.Array:
  """x [B, Ci, T, H, W] * w [Co, Ci, kt, kh, kw] -> [B, Co, T-kt+1, H', W'] in x's dtype,
  zero padding pad_hw on H and W only, no time padding; the bias is added in fp32."""
  # f32: exact f32 accumulation; bf16: cuDNN's own (f32-accumulating) bf16 convolution
  y = jax.lax.conv_general_dilated(
      x, w.astype(x.dtype), (1, 1, 1), [(0, 0), (pad_hw[0],) * 2, (pad_hw[1],) * 2],
      dimension_numbers=("NCDHW", "OIDHW", "NCDHW"), precision=_prec(x))
  return (y.astype(jnp.float32) + b.astype(jnp.float32)[None, :, None, None, None]
          ).astype(x.dtype)


def causal_conv3d(x: jax.Array, p: dict, cache: jax.Array | None):
  """CogVideoXCausalConv3d (pad_mode "first"): -> (y, new_cache or None).

  Time is padded on the left by the cache (the previous batch's last kt-1 padded-input
  frames) or by kt-1 copies of the first frame; diffusers pads H by (kw-1)//2 and W by
  (kh-1)//2 (its padding tuple is written (t, w, h)), equal for the square kernels used."""
  w = p["conv"]["weight"]
  kt, kh, kw = w.shape[2:]
  new_cache = None
  if kt > 1:
    left = cache if cache is not None else jnp.repeat(x[:, :, :1], kt - 1, axis=2)
    x = jnp.concatenate([left.astype(x.dtype), x], axis=2)
    new_cache = x[:, :, -(kt - 1):]
  return conv3d(x, w, p["conv"]["bias"], ((kw - 1) // 2, (kh - 1) // 2)), new_cache


def group_norm(x: jax.Array, w: jax.Array, b: jax.Array, groups: int, eps: float) -> jax.Array:
  """torch GroupNorm over [B, C, T, H, W] (statistics over C/G, T, H, W in fp32)."""
  bsz, c = x.shape[:2]
  xf = x.astype(jnp.float32).reshape(bsz, groups, -1)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
  shape = (1, c) + (1,) * (x.ndim - 2)
  return (y * w.astype(jnp.float32).reshape(shape) + b.astype(jnp.float32).reshape(shape)
          ).astype(x.dtype)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """Source indices of torch's F.interpolate(mode="nearest") from size n_in to n_out."""
  if n_out == n_in:
    return np.arange(n_out)
  scale = np.float32(n_in) / np.float32(n_out)
  idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, n_in - 1)


def interpolate_nearest(x: jax.Array, size: tuple[int, ...]) -> jax.Array:
  """F.interpolate(x, size=size) (nearest) over the trailing len(size) axes."""
  lead = x.ndim - len(size)
  for ax, n in enumerate(size):
    a = lead + ax
    if x.shape[a] != n:
      x = jnp.take(x, jnp.asarray(nearest_indices(x.shape[a], n)), axis=a)
  return x


def spatial_norm(f: jax.Array, zq: jax.Array, p: dict, cfg: VAEConfig, cache: dict | None):
  """CogVideoXSpatialNorm3D: GroupNorm(f) * conv_y(zq') + conv_b(zq'), zq' = zq resized to f
  (the first frame on its own when f has an odd frame count > 1)."""
  with jax.named_scope("spatial_norm"):
    t, h, w = f.shape[2:]
    if t > 1 and t % 2 == 1:
      zq = jnp.concatenate([interpolate_nearest(zq[:, :, :1], (1, h, w)),
                            interpolate_nearest(zq[:, :, 1:], (t - 1, h, w))], axis=2)
    else:
      zq = interpolate_nearest(zq, (t, h, w))
    zq = zq.astype(f.dtype)
    cy, _ = causal_conv3d(zq, p["conv_y"], None)  # 1x1x1: no cache
    cb, _ = causal_conv3d(zq, p["conv_b"], None)
    nl = p["norm_layer"]
    return group_norm(f, nl["weight"], nl["bias"], cfg.norm_num_groups, cfg.norm_eps) * cy + cb


def resnet_block(x: jax.Array, zq: jax.Array, p: dict, cfg: VAEConfig, cache: dict | None):
  """CogVideoXResnetBlock3D of the decoder (spatial norms, no temb): -> (y, new caches)."""
  cache = cache or {}
  with jax.named_scope("resnet"):
    h = jax.nn.silu(spatial_norm(x, zq, p["norm1"], cfg, None))
    h, c1 = causal_conv3d(h, p["conv1"], cache.get("conv1"))
    h = jax.nn.silu(spatial_norm(h, zq, p["norm2"], cfg, None))
    h, c2 = causal_conv3d(h, p["conv2"], cache.get("conv2"))
    if "conv_shortcut" in p:  # CogVideoXSafeConv3d 1x1x1 (not causal)
      sc = p["conv_shortcut"]
      x = conv3d(x, sc["weight"], sc["bias"], (0, 0))
    return h + x, {"conv1": c1, "conv2": c2}


def upsample(x: jax.Array, p: dict, compress_time: bool) -> jax.Array:
  """CogVideoXUpsample3D: nearest x2 in H, W (and in time, except the odd first frame, when
  compress_time), then a per-frame 3x3 conv2d with zero padding 1."""
  with jax.named_scope("upsample"):
    t = x.shape[2]
    up_hw = lambda a: jnp.repeat(jnp.repeat(a, 2, axis=-2), 2, axis=-1)
    if compress_time and t > 1:
      if t % 2 == 1:
        x = jnp.concatenate([up_hw(x[:, :, :1]), jnp.repeat(up_hw(x[:, :, 1:]), 2, axis=2)],
                            axis=2)
      else:
        x = jnp.repeat(up_hw(x), 2, axis=2)
    else:
      x = up_hw(x)
    w = p["conv"]["weight"][:, :, None]  # [Co, Ci, 1, 3, 3]: a 2D conv applied per frame
    kh, kw = w.shape[-2:]
    return conv3d(x, w, p["conv"]["bias"], ((kh - 1) // 2, (kw - 1) // 2))


def decode_batch(params: dict, z: jax.Array, cfg: VAEConfig, cache: dict | None = None):
  """One call of diffusers' CogVideoXDecoder3D on a frame batch z [B, C_lat, f, h, w]:
  -> (video [B, out_channels, f', 8h, 8w], caches). cache=None on the first batch."""
  d = params["decoder"]
  cache = cache or {}
  new: dict = {}
  z = z.astype(d["conv_in"]["conv"]["weight"].dtype)
  h, new["conv_in"] = causal_conv3d(z, d["conv_in"], cache.get("conv_in"))
  with jax.named_scope("mid_block"):
    mid = cache.get("mid_block", {})
    new["mid_block"] = {}
    for j in range(2):
      h, new["mid_block"][str(j)] = resnet_block(h, z, d["mid_block"]["resnets"][str(j)], cfg,
                                                mid.get(str(j)))
  n_up = len(cfg.block_out_channels)
  t_levels = int(np.log2(cfg.temporal_compression_ratio))
  new["up_blocks"] = {}
  for i in range(n_up):
    with jax.named_scope(f"up_block_{i}"):
      pb = d["up_blocks"][str(i)]
      cb = cache.get("up_blocks", {}).get(str(i), {})
      new["up_blocks"][str(i)] = {}
      for j in range(cfg.layers_per_block + 1):
        h, new["up_blocks"][str(i)][str(j)] = resnet_block(h, z, pb["resnets"][str(j)], cfg,
                                                          cb.get(str(j)))
      if i < n_up - 1:
        h = upsample(h, pb["upsamplers"]["0"], compress_time=i < t_levels)
  h = jax.nn.silu(spatial_norm(h, z, d["norm_out"], cfg, None))
  h, new["conv_out"] = causal_conv3d(h, d["conv_out"], cache.get("conv_out"))
  return h, new


# ---------------------------------------------------------------- frame batches, tiles
def frame_batches(num_frames: int, batch: int = 2) -> list[tuple[int, int]]:
  """(start, end) latent frame slices exactly as diffusers' _decode: batches of `batch`,
  the first one also taking the remainder num_frames % batch."""
  n = max(num_frames // batch, 1)
  rem = num_frames % batch
  return [(batch * i + (0 if i == 0 else rem), batch * (i + 1) + rem) for i in range(n)]


@functools.partial(jax.jit, static_argnums=(2,))
def _first_batch(params, z, cfg):
  return decode_batch(params, z, cfg, None)


@functools.partial(jax.jit, static_argnums=(3,))
def _later_batches(params, zs, cache, cfg):
  """lax.scan over equal-size frame batches zs [N, B, C, f, h, w], carrying the caches."""
  def step(c, z):
    y, c = decode_batch(params, z, cfg, c)
    return c, y
  _, ys = jax.lax.scan(step, cache, zs)
  return ys  # [N, B, 3, f', H, W]


def decode_frames(params: dict, z: jax.Array, cfg: VAEConfig,
                  frame_batch: int = 2) -> np.ndarray:
  """diffusers' _decode without tiling: z [B, C, F, h, w] -> float32 numpy [B, 3, F', H, W].

  The first batch is one jitted call; the remaining (equal-size) batches are one jitted
  lax.scan carrying the conv caches, so a video compiles twice per spatial shape."""
  slices = frame_batches(z.shape[2], frame_batch)
  s0, e0 = slices[0]
  y0, cache = _first_batch(params, z[:, :, s0:e0], cfg)
  outs = [np.asarray(y0, np.float32)]
  if len(slices) > 1:
    zs = jnp.stack([z[:, :, s:e] for s, e in slices[1:]])
    ys = np.asarray(_later_batches(params, zs, cache, cfg), np.float32)
    outs.extend(ys[k] for k in range(ys.shape[0]))
  return np.concatenate(outs, axis=2)


@dataclasses.dataclass(frozen=True)
class Tiling:
  """diffusers' enable_tiling() settings (defaults: half the config's sample size)."""
  tile_sample_min_height: int
  tile_sample_min_width: int
  tile_overlap_factor_height: float = 1 / 6
  tile_overlap_factor_width: float = 1 / 5

  @classmethod
  def default(cls, cfg: VAEConfig) -> "Tiling":
    return cls(cfg.sample_height // 2, cfg.sample_width // 2)


def _blend(a: np.ndarray, b: np.ndarray, extent: int, axis: int) -> np.ndarray:
  """diffusers' blend_v (axis 3) / blend_h (axis 4): ramp the first `extent` rows/columns of
  b from a's last ones to b's own (b modified in place and returned)."""
  extent = min(a.shape[axis], b.shape[axis], extent)
  for y in range(extent):
    ia = [slice(None)] * 5
    ib = [slice(None)] * 5
    ia[axis], ib[axis] = -extent + y, y
    b[tuple(ib)] = a[tuple(ia)] * (1 - y / extent) + b[tuple(ib)] * (y / extent)
  return b


def decode(params: dict, z, cfg: VAEConfig, tiling: Tiling | None | bool = True,
           frame_batch: int = 2) -> np.ndarray:
  """AutoencoderKLCogVideoX.decode(z).sample as float32 numpy [B, 3, F', 8h, 8w].

  tiling: True = diffusers' default tile sizes (what pipe.vae.enable_tiling() gives), a
  Tiling for others, False/None = untiled. As in diffusers, tiling only happens when the
  latent is larger than one tile; tiles are decoded one by one (device memory of one tile)
  and blended on the host.
  """
  z = jnp.asarray(z)
  if z.ndim != 5 or z.shape[1] != cfg.latent_channels:
    raise UserInputError(f"VAE latents must be [B, {cfg.latent_channels}, F, h, w], got "
                         f"{tuple(z.shape)}")
  if tiling is True:
    tiling = Tiling.default(cfg)
  if not tiling:
    return decode_frames(params, z, cfg, frame_batch)
  s = cfg.spatial_scale
  tlh = int(tiling.tile_sample_min_height / s)
  tlw = int(tiling.tile_sample_min_width / s)
  height, width = z.shape[3:]
  if not (width > tlw or height > tlh):
    return decode_frames(params, z, cfg, frame_batch)
  overlap_h = int(tlh * (1 - tiling.tile_overlap_factor_height))
  overlap_w = int(tlw * (1 - tiling.tile_overlap_factor_width))
  blend_h = int(tiling.tile_sample_min_height * tiling.tile_overlap_factor_height)
  blend_w = int(tiling.tile_sample_min_width * tiling.tile_overlap_factor_width)
  limit_h = tiling.tile_sample_min_height - blend_h
  limit_w = tiling.tile_sample_min_width - blend_w
  rows = []
  for i in range(0, height, overlap_h):
    rows.append([decode_frames(params, z[:, :, :, i:i + tlh, j:j + tlw], cfg, frame_batch)
                 for j in range(0, width, overlap_w)])
  out_rows = []
  for i, row in enumerate(rows):
    out_row = []
    for j, tile in enumerate(row):
      if i > 0:
        tile = _blend(rows[i - 1][j], tile, blend_h, 3)
      if j > 0:
        tile = _blend(row[j - 1], tile, blend_w, 4)
      out_row.append(tile[:, :, :, :limit_h, :limit_w])
    out_rows.append(np.concatenate(out_row, axis=4))
  return np.concatenate(out_rows, axis=3)
