"""diffusers' AutoencoderKLCogVideoX (decoder, and optionally encoder) as pure functions over a
params pytree.

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
frames, the first one taking the odd remainder; overlapping spatial tiles blended linearly);
`encode` likewise _encode / tiled_encode (frame batches of 8), returning the latent moments.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mpqjax.errors import UserInputError
from mpqjax.jsonio import read_json_object

CLASS_NAME = "AutoencoderKLCogVideoX"


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of diffusers' AutoencoderKLCogVideoX config that the decoder uses."""
  latent_channels: int = 16
  in_channels: int = 3
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
    downs = d.get("down_block_types", ("CogVideoXDownBlock3D",) * len(cfg.block_out_channels))
    if any(u != "CogVideoXDownBlock3D" for u in downs) or len(downs) != len(cfg.block_out_channels):
      raise UserInputError(f"{source}: down_block_types {downs} (only CogVideoXDownBlock3D, one "
                           "per block_out_channels)")
    if len(ups) != len(cfg.block_out_channels):
      raise UserInputError(f"{source}: {len(ups)} up blocks for {len(cfg.block_out_channels)} "
                           "block_out_channels")
    if any(c % cfg.norm_num_groups for c in cfg.block_out_channels):
      raise UserInputError(f"{source}: block_out_channels {cfg.block_out_channels} are not all "
                           f"divisible by norm_num_groups={cfg.norm_num_groups}")
    return cfg

  @classmethod
  def from_file(cls, path: str) -> "VAEConfig":
    return cls.from_dict(read_json_object(path), source=path)


def param_shapes(cfg: VAEConfig, encoder: bool = False) -> dict:
  """{diffusers name: shape} of every decoder parameter (and the encoder's if `encoder`)."""
  shapes: dict = {}

  def conv(name, cin, cout, k, causal=True):
    kk = (k, k, k) if causal else (k, k)
    pre = name + (".conv" if causal else "")
    shapes[pre + ".weight"] = (cout, cin, *kk)
    shapes[pre + ".bias"] = (cout,)

  def gnorm(name, c):
    shapes[name + ".weight"] = (c,)
    shapes[name + ".bias"] = (c,)

  def snorm(name, c):
    gnorm(name + ".norm_layer", c)
    conv(name + ".conv_y", cfg.latent_channels, c, 1)
    conv(name + ".conv_b", cfg.latent_channels, c, 1)

  def resnet(name, cin, cout, norm=snorm):
    norm(name + ".norm1", cin)
    conv(name + ".conv1", cin, cout, 3)
    norm(name + ".norm2", cout)
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
  if encoder:
    ch = list(cfg.block_out_channels)
    conv("encoder.conv_in", cfg.in_channels, ch[0], 3)
    prev = ch[0]
    for i, c in enumerate(ch):
      for j in range(cfg.layers_per_block):
        resnet(f"encoder.down_blocks.{i}.resnets.{j}", prev if j == 0 else c, c, gnorm)
      prev = c
      if i < len(ch) - 1:
        conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3, causal=False)
    for j in range(2):
      resnet(f"encoder.mid_block.resnets.{j}", ch[-1], ch[-1], gnorm)
    gnorm("encoder.norm_out", ch[-1])
    conv("encoder.conv_out", ch[-1], 2 * cfg.latent_channels, 3)
  return shapes


# ------------------------------------------------------------------------------ layers
def _prec(x):
  return jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


def conv3d(x: jax.Array, w: jax.Array, b: jax.Array, pad_hw: tuple[int, int],
           stride_hw: int = 1) -> jax.Array:
  """x [B, Ci, T, H, W] * w [Co, Ci, kt, kh, kw] -> [B, Co, T-kt+1, H', W'] in x's dtype,
  zero padding pad_hw on H and W only, no time padding; the bias is added in fp32."""
  # f32: exact f32 accumulation; bf16: cuDNN's own (f32-accumulating) bf16 convolution
  y = jax.lax.conv_general_dilated(
      x, w.astype(x.dtype), (1, stride_hw, stride_hw),
      [(0, 0), (pad_hw[0],) * 2, (pad_hw[1],) * 2],
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


def resnet_block(x: jax.Array, zq: jax.Array | None, p: dict, cfg: VAEConfig,
                 cache: dict | None):
  """CogVideoXResnetBlock3D without temb: -> (y, new caches). Its norms are spatial norms
  conditioned on zq in the decoder, plain GroupNorms (zq None) in the encoder."""
  cache = cache or {}

  def norm(h, pn):
    if zq is not None:
      return spatial_norm(h, zq, pn, cfg, None)
    return group_norm(h, pn["weight"], pn["bias"], cfg.norm_num_groups, cfg.norm_eps)

  with jax.named_scope("resnet"):
    h = jax.nn.silu(norm(x, p["norm1"]))
    h, c1 = causal_conv3d(h, p["conv1"], cache.get("conv1"))
    h = jax.nn.silu(norm(h, p["norm2"]))
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


# ---------------------------------------------------------------------------- encoder
def downsample(x: jax.Array, p: dict, compress_time: bool) -> jax.Array:
  """CogVideoXDownsample3D: average frame pairs (the odd first frame kept) when
  compress_time, pad W and H by one on the right/bottom, then a per-frame 3x3 conv, stride 2."""
  with jax.named_scope("downsample"):
    if compress_time:
      t = x.shape[2]
      pairs = lambda a: (a[:, :, 0::2] + a[:, :, 1::2]) / 2 if a.shape[2] else a
      if t % 2 == 1:
        x = jnp.concatenate([x[:, :, :1], pairs(x[:, :, 1:])], axis=2)
      else:
        x = pairs(x)
    x = jnp.pad(x, [(0, 0)] * 3 + [(0, 1), (0, 1)])
    return conv3d(x, p["conv"]["weight"][:, :, None], p["conv"]["bias"], (0, 0), stride_hw=2)


def encode_batch(params: dict, x: jax.Array, cfg: VAEConfig, cache: dict | None = None):
  """One call of diffusers' CogVideoXEncoder3D on a frame batch x [B, 3, f, H, W]:
  -> (moments [B, 2 * latent_channels, f', H/8, W/8] (mean then logvar), caches)."""
  e = params["encoder"]
  cache = cache or {}
  new: dict = {}
  x = x.astype(e["conv_in"]["conv"]["weight"].dtype)
  h, new["conv_in"] = causal_conv3d(x, e["conv_in"], cache.get("conv_in"))
  t_levels = int(np.log2(cfg.temporal_compression_ratio))
  n = len(cfg.block_out_channels)
  new["down_blocks"] = {}
  for i in range(n):
    with jax.named_scope(f"down_block_{i}"):
      pb = e["down_blocks"][str(i)]
      cb = cache.get("down_blocks", {}).get(str(i), {})
      new["down_blocks"][str(i)] = {}
      for j in range(cfg.layers_per_block):
        h, new["down_blocks"][str(i)][str(j)] = resnet_block(h, None, pb["resnets"][str(j)], cfg,
                                                            cb.get(str(j)))
      if i < n - 1:
        h = downsample(h, pb["downsamplers"]["0"], compress_time=i < t_levels)
  with jax.named_scope("mid_block"):
    mid = cache.get("mid_block", {})
    new["mid_block"] = {}
    for j in range(2):
      h, new["mid_block"][str(j)] = resnet_block(h, None, e["mid_block"]["resnets"][str(j)], cfg,
                                                mid.get(str(j)))
  no = e["norm_out"]
  h = jax.nn.silu(group_norm(h, no["weight"], no["bias"], cfg.norm_num_groups, 1e-6))
  h, new["conv_out"] = causal_conv3d(h, e["conv_out"], cache.get("conv_out"))
  return h, new


# ---------------------------------------------------------------- frame batches, tiles
def frame_batches(num_frames: int, batch: int = 2) -> list[tuple[int, int]]:
  """(start, end) frame slices exactly as diffusers' _decode (batch 2 latent frames) and
  _encode (batch 8 frames): the first batch also takes the remainder num_frames % batch."""
  n = max(num_frames // batch, 1)
  rem = num_frames % batch
  return [(batch * i + (0 if i == 0 else rem), batch * (i + 1) + rem) for i in range(n)]


_STAGES = {"decode": decode_batch, "encode": encode_batch}


@functools.partial(jax.jit, static_argnums=(2, 3))
def _first_batch(params, x, cfg, stage):
  return _STAGES[stage](params, x, cfg, None)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _later_batches(params, xs, cache, cfg, stage):
  """lax.scan over equal-size frame batches xs [N, B, C, f, h, w], carrying the caches."""
  def step(c, x):
    y, c = _STAGES[stage](params, x, cfg, c)
    return c, y
  _, ys = jax.lax.scan(step, cache, xs)
  return ys  # [N, B, C', f', H', W']


def _batched(params: dict, x: jax.Array, cfg: VAEConfig, stage: str,
             frame_batch: int) -> np.ndarray:
  """The frame-batch loop of diffusers' _decode / _encode: the first batch is one jitted call;
  the remaining (equal-size) batches are one jitted lax.scan carrying the conv caches, so a
  video compiles twice per spatial shape. Returns float32 numpy."""
  slices = frame_batches(x.shape[2], frame_batch)
  s0, e0 = slices[0]
  y0, cache = _first_batch(params, x[:, :, s0:e0], cfg, stage)
  outs = [np.asarray(y0, np.float32)]
  if len(slices) > 1:
    xs = jnp.stack([x[:, :, s:e] for s, e in slices[1:]])
    ys = np.asarray(_later_batches(params, xs, cache, cfg, stage), np.float32)
    outs.extend(ys[k] for k in range(ys.shape[0]))
  return np.concatenate(outs, axis=2)


def decode_frames(params: dict, z: jax.Array, cfg: VAEConfig,
                  frame_batch: int = 2) -> np.ndarray:
  """diffusers' _decode without tiling: z [B, C, F, h, w] -> float32 numpy [B, 3, F', H, W]."""
  return _batched(params, jnp.asarray(z), cfg, "decode", frame_batch)


def encode_frames(params: dict, x: jax.Array, cfg: VAEConfig,
                  frame_batch: int = 8) -> np.ndarray:
  """diffusers' _encode without tiling: x [B, 3, F, H, W] -> moments [B, 2C, F', h, w]."""
  return _batched(params, jnp.asarray(x), cfg, "encode", frame_batch)


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


def _tiled(fn, x, tile_in: tuple[int, int], tile_out: tuple[int, int], tiling: Tiling):
  """diffusers' tiled_decode / tiled_encode: run fn on overlapping input tiles of tile_in
  (stepping by tile_in * (1 - overlap factor)), blend each output tile into its upper and left
  neighbours over tile_out * factor rows/columns, keep tile_out - blend of each, concatenate."""
  fh, fw = tiling.tile_overlap_factor_height, tiling.tile_overlap_factor_width
  step_h, step_w = int(tile_in[0] * (1 - fh)), int(tile_in[1] * (1 - fw))
  blend_h, blend_w = int(tile_out[0] * fh), int(tile_out[1] * fw)
  limit_h, limit_w = tile_out[0] - blend_h, tile_out[1] - blend_w
  height, width = x.shape[3:]
  rows = [[fn(x[:, :, :, i:i + tile_in[0], j:j + tile_in[1]]) for j in range(0, width, step_w)]
          for i in range(0, height, step_h)]
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


def _tile_sizes(cfg: VAEConfig, tiling: Tiling):
  s = cfg.spatial_scale
  sample = (tiling.tile_sample_min_height, tiling.tile_sample_min_width)
  latent = (int(sample[0] / s), int(sample[1] / s))
  return sample, latent


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
  fn = functools.partial(decode_frames, params, cfg=cfg, frame_batch=frame_batch)
  if not tiling:
    return fn(z)
  sample, latent = _tile_sizes(cfg, tiling)
  if not (z.shape[4] > latent[1] or z.shape[3] > latent[0]):
    return fn(z)
  return _tiled(fn, z, latent, sample, tiling)


def encode(params: dict, x, cfg: VAEConfig, tiling: Tiling | None | bool = True,
           frame_batch: int = 8) -> np.ndarray:
  """AutoencoderKLCogVideoX.encode(x).latent_dist.parameters as float32 numpy: x
  [B, 3, F, H, W] in [-1, 1] -> moments [B, 2 * latent_channels, F', H/8, W/8], the mean in
  the first half of the channels and the log-variance (unclamped) in the second. Frame
  batches of 8 and tiling (over sample-sized tiles) as diffusers' _encode / tiled_encode."""
  x = jnp.asarray(x)
  if x.ndim != 5 or x.shape[1] != cfg.in_channels:
    raise UserInputError(f"VAE input video must be [B, {cfg.in_channels}, F, H, W], got "
                         f"{tuple(x.shape)}")
  if "encoder" not in params:
    raise UserInputError("these VAE params hold no encoder (convert with encoder=True)")
  if tiling is True:
    tiling = Tiling.default(cfg)
  fn = functools.partial(encode_frames, params, cfg=cfg, frame_batch=frame_batch)
  if not tiling:
    return fn(x)
  sample, latent = _tile_sizes(cfg, tiling)
  if not (x.shape[4] > sample[1] or x.shape[3] > sample[0]):
    return fn(x)
  return _tiled(fn, x, sample, latent, tiling)


def latent_mode(moments: np.ndarray) -> np.ndarray:
  """DiagonalGaussianDistribution(moments).mode(): the mean half of the channels."""
  return moments[:, :moments.shape[1] // 2]
