"""An independent numpy/ml_dtypes implementation of the NVFP4 and INT8 conventions, used
only by tests. It relies on ml_dtypes' own float8_e4m3fn and float4_e2m1fn casts (round to
nearest even, e2m1 saturating) rather than on mpqjax's encoder."""
import ml_dtypes
import numpy as np


def nvfp4(x: np.ndarray):
  """-> (codes uint8[..., K] unpacked, scales uint8 bytes [..., K/16], g float32)."""
  x = np.asarray(x, np.float32)
  amax = np.float32(np.max(np.abs(x)))
  g = np.float32(1.0) if amax == 0 else np.float32(amax / np.float32(6 * 448))
  blocks = x.reshape(*x.shape[:-1], -1, 16)
  amax_b = np.max(np.abs(blocks), axis=-1, keepdims=True)
  s = np.minimum(amax_b / (np.float32(6) * g), np.float32(448)).astype(np.float32)
  s8 = s.astype(ml_dtypes.float8_e4m3fn)
  s32 = s8.astype(np.float32)
  with np.errstate(divide="ignore", invalid="ignore"):
    y = blocks / (s32 * g)
  codes = y.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
  codes = np.where(s32 == 0, 0, codes).astype(np.uint8)
  return codes.reshape(x.shape), s8[..., 0].view(np.uint8), g


def e2m1_value(codes: np.ndarray) -> np.ndarray:
  return codes.astype(np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)


def nvfp4_dequant(codes, scale_bytes, g):
  s = scale_bytes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
  v = e2m1_value(codes).reshape(*codes.shape[:-1], -1, 16) * s[..., None]
  return (v * np.float32(g)).reshape(codes.shape)


def pack(codes: np.ndarray) -> np.ndarray:
  return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def int8(x: np.ndarray, axis=-1):
  x = np.asarray(x, np.float32)
  amax = np.max(np.abs(x), axis=axis, keepdims=True)
  scale = np.where(amax == 0, np.float32(1), amax / np.float32(127)).astype(np.float32)
  q = np.clip(np.round(x / scale), -127, 127).astype(np.int8)
  return q, scale


def outlier_input(rng, m, k, n_channels, magnitude):
  """Gaussian activations with `n_channels` channels scaled by `magnitude` (DiT-like)."""
  x = rng.standard_normal((m, k)).astype(np.float32)
  x[:, rng.choice(k, n_channels, replace=False)] *= magnitude
  return x
