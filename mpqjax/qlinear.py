"""The quantized-linear API: one weight in NVFP4 (or INT8), three activation modes.

  quantize_linear(weight[N, K], bias[N] | None) -> QuantizedLinear
  qlinear(x[..., K], layer, mode) -> bf16[..., N]

`mode` may be a traced int32 scalar: dispatch is a `lax.switch` over the three modes,
so one compiled function serves all of them. Implementations follow tokamax's layout:
"xla" (mpqjax.qlinear_xla) runs everywhere and is the reference; "mosaic"
(pallas_kernels) holds Hopper kernels; None picks the best available and falls back.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from mpqjax import formats


class Mode(enum.IntEnum):
  """Activation precision of one linear. The weight is always stored in 4 bits."""
  NVFP4 = 0  # W4A4: activations NVFP4
  INT8 = 1   # W4A8: activations INT8 per token, weight re-expressed as INT8 per channel
  BF16 = 2   # W4A16: bf16 activations, weight decoded


MODE_ACTIVATION_BITS = {Mode.NVFP4: 4.5, Mode.INT8: 8.0, Mode.BF16: 16.0}
WEIGHT_FORMATS = ("nvfp4", "int8")
HADAMARD_BLOCK = 128


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("weight", "w_int8_scale", "bias"),
                   meta_fields=("hadamard_block", "weight_format"))
@dataclasses.dataclass(frozen=True)
class QuantizedLinear:
  """A linear layer whose only persistent weight copy is in `weight_format`.

  weight:        NVFP4Tensor (codes u8[N, K/2], scales e4m3[N, K/16], global f32[])
                 or Int8Tensor (values s8[N, K], scales f32[N, 1]).
  w_int8_scale:  f32[N, 1], the per-output-channel scale that re-expresses the weight in
                 INT8 for Mode.INT8 (for an int8-format weight, its own scales).
  bias:          f32[N] or None.
  hadamard_block: 0 for no rotation; else the weight is stored rotated (W @ H) and
                 activations are rotated online, which leaves the float output unchanged.
  Leading axes (a stacked layer axis) are allowed on every array field.
  """
  weight: formats.NVFP4Tensor | formats.Int8Tensor
  w_int8_scale: jax.Array
  bias: jax.Array | None
  hadamard_block: int = 0
  weight_format: str = "nvfp4"

  @property
  def in_features(self) -> int:
    return self.weight.shape[-1]

  @property
  def out_features(self) -> int:
    return self.weight.shape[-2]

  @property
  def nbytes(self) -> int:
    """Device bytes of everything the layer keeps resident."""
    leaves = jax.tree_util.tree_leaves(self)
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in leaves)


def _check_finite(name: str, a) -> None:
  a = np.asarray(a, np.float32)
  if not np.isfinite(a).all():
    bad = int((~np.isfinite(a)).sum())
    raise ValueError(f"{name} has {bad} non-finite value(s); refusing to quantize it")


def pick_hadamard_block(k: int, max_block: int = HADAMARD_BLOCK) -> int:
  """Largest power of two <= max_block that divides k (0 if below 16)."""
  b = max_block
  while b >= 16:
    if k % b == 0:
      return b
    b //= 2
  return 0


def quantize_linear(weight, bias=None, *, hadamard: bool | int = True,
                    weight_format: str = "nvfp4", name: str = "weight") -> QuantizedLinear:
  """Quantize a PyTorch-layout weight[N, K] (and bias[N]) into a QuantizedLinear.

  hadamard: True for the 128-block rotation, False/0 for none, or an int block size.
  Eager only: rejects non-finite weights, naming `name`.
  """
  if weight_format not in WEIGHT_FORMATS:
    raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
  w = jnp.asarray(weight, jnp.float32)
  if w.ndim != 2:
    raise ValueError(f"{name}: expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
  _check_finite(name, w)
  if bias is not None:
    bias = jnp.asarray(bias, jnp.float32)
    if bias.shape != (w.shape[0],):
      raise ValueError(f"{name}: bias shape {tuple(bias.shape)} does not match N={w.shape[0]}")
    _check_finite(f"{name} (bias)", bias)
  block = HADAMARD_BLOCK if hadamard is True else int(hadamard or 0)
  if block:
    w = formats.hadamard(w, block)
  if weight_format == "nvfp4":
    if w.shape[-1] % formats.NVFP4_BLOCK:
      raise ValueError(f"{name}: K must be a multiple of 16 for NVFP4, got shape {tuple(w.shape)}")
    q = formats.quantize_nvfp4(w)
    w_deq = formats.dequantize_nvfp4(q)
    w_int8_scale = formats.quantize_int8(w_deq, axis=-1).scales
  else:
    q = formats.quantize_int8(w, axis=-1)
    w_int8_scale = q.scales
  return QuantizedLinear(q, w_int8_scale, bias, block, weight_format)


class Implementation(Protocol):
  """One backend: a matmul per mode on 2-D x[M, K] -> bf16[M, N], bias included."""
  def w4a4(self, x: jax.Array, layer: QuantizedLinear) -> jax.Array: ...
  def w4a8(self, x: jax.Array, layer: QuantizedLinear) -> jax.Array: ...
  def w4a16(self, x: jax.Array, layer: QuantizedLinear) -> jax.Array: ...


# name -> (module, attribute); imported lazily so the GPU kernels cost nothing on CPU.
_IMPLEMENTATIONS = {
    "xla": ("mpqjax.qlinear_xla", "XLA"),
    "mosaic": ("pallas_kernels.qlinear_mosaic", "MOSAIC"),
}


def _load(name: str):
  mod, attr = _IMPLEMENTATIONS[name]
  return getattr(importlib.import_module(mod), attr)


@functools.cache
def _mosaic_usable() -> bool:
  try:
    impl = _load("mosaic")
  except ImportError:
    return False
  return bool(getattr(impl, "available", lambda: False)())


def resolve_implementation(implementation: str | None) -> Implementation:
  if implementation is None:
    return _load("mosaic") if _mosaic_usable() else _load("xla")
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"implementation must be None or one of {sorted(_IMPLEMENTATIONS)}, "
                     f"got {implementation!r}")
  if implementation == "mosaic" and not _mosaic_usable():
    raise NotImplementedError("implementation='mosaic' needs a Hopper GPU and the Mosaic GPU "
                              "kernels in pallas_kernels; use None to fall back to 'xla'")
  return _load(implementation)


def qlinear(x: jax.Array, layer: QuantizedLinear, mode, *,
            implementation: str | None = None) -> jax.Array:
  """y[..., N] = x[..., K] @ W.T + b in bf16, with activations in `mode` (a Mode, int,
  or traced int32 scalar).

  An int8-format layer asked for Mode.NVFP4 computes as INT8 (W8A8).
  """
  k = layer.in_features
  if x.shape[-1] != k:
    raise ValueError(f"qlinear: x has K={x.shape[-1]} (shape {tuple(x.shape)}) but the layer "
                     f"expects K={k}")
  impl = resolve_implementation(implementation)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)
  nvfp4_branch = impl.w4a4 if layer.weight_format == "nvfp4" else impl.w4a8
  branches: list[Callable] = [nvfp4_branch, impl.w4a8, impl.w4a16]
  if isinstance(mode, (int, np.integer)):  # static: no switch to trace
    y = branches[int(mode)](x2, layer)
  else:
    mode = jnp.clip(jnp.asarray(mode, jnp.int32), 0, len(branches) - 1)
    y = jax.lax.switch(mode, [functools.partial(b, layer=layer) for b in branches], x2)
  return y.reshape(*lead, layer.out_features)


def linear(x: jax.Array, weight: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """The unquantized baseline: x[..., K] @ weight[N, K].T + bias, computed and returned in
  weight's dtype (bf16 for the baseline, f32 for parity checks), accumulated in f32."""
  dt = weight.dtype
  prec = jax.lax.Precision.HIGHEST if dt == jnp.float32 else None
  y = jnp.einsum("...k,nk->...n", x.astype(dt), weight, precision=prec,
                 preferred_element_type=jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(dt)
