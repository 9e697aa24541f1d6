"""Attention entry point used by the model blocks.

  attention(q, k, v, *, precision="bf16", implementation=None) -> [B, T, H, D]
  attention_switch(q, k, v, precision_index, *, implementation=None) -> [B, T, H, D]

q: [B, T, H, D], k, v: [B, S, H, D] (the layout of jax.nn.dot_product_attention), non-causal,
softmax scale 1/sqrt(D). Output dtype is q's dtype.

precision:
  "bf16": plain attention (bf16 operands, f32 softmax).
  "int8": SageAttention-style quantized attention. K is smoothed by subtracting its per-head mean
    over tokens (softmax is invariant to adding q.c to every score of a row, so this changes
    nothing mathematically and removes K's channel outliers); Q and K are quantized to INT8 with
    one scale per block of tokens (BLOCK_Q = 64 query rows, BLOCK_KV = 256 keys) per head;
    S = QK^T is exact in int32; the softmax is f32; P is rounded to FP8 e4m3 (scaled by 448) and
    V to FP8 e4m3 with one scale per channel; PV accumulates in fp32 and the softmax denominator
    is the sum of the rounded P (so the output is an exact convex combination of the FP8 V).
implementation:
  "xla": pure jnp (runs everywhere, materializes [B, H, T, S]); for "int8" it computes the
    quantized algorithm exactly (the CPU reference of the kernel's numerics).
  "cudnn": jax.nn.dot_product_attention's cuDNN flash attention (bf16 only).
  "mosaic": the Pallas Mosaic GPU kernel in pallas_kernels/attention_mosaic.py (Hopper only).
  None: "mosaic" on Hopper at D in (64, 128) for int8 and for 16-bit float inputs (measured
    faster than cuDNN, see benchmarks/results/attention-h200.json); else "bf16" -> cuDNN on GPU
    where it applies, else xla; "int8" -> xla.
"""
from __future__ import annotations

import functools
import math
import sys
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

PRECISIONS = ("bf16", "int8")  # attention_switch's precision_index indexes this tuple.
IMPLEMENTATIONS = ("xla", "cudnn", "mosaic")
BLOCK_Q = 64     # query rows per INT8 scale (one kernel warpgroup tile)
BLOCK_KV = 256   # keys per INT8 scale (one kernel pipeline step; 256 measured faster than 128)
SEQ_MULTIPLE = 128  # both sequence axes are padded to a multiple of this (and of block_kv)


def _bf16_block_kv(head_dim: int) -> int:
  """bf16 kernel keys per step: 256 measured faster at D = 64; 256 x 128 K+V tiles overflow SMEM."""
  return 256 if head_dim == 64 else 128
_LOG2E = math.log2(math.e)
_E4M3_MAX = 448.0


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Plain softmax(QK^T/sqrt(D))V with f32 softmax; materializes [B, H, T, S]."""
  scale = q.shape[-1] ** -0.5
  prec = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
  s = jnp.einsum("bthd,bshd->bhts", q, k, precision=prec,
                 preferred_element_type=jnp.float32) * scale
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.einsum("bhts,bshd->bthd", p.astype(v.dtype) if v.dtype != jnp.float32 else p, v,
                 precision=prec, preferred_element_type=jnp.float32)
  return o.astype(q.dtype)


class Int8Operands(NamedTuple):
  """Quantized attention operands, sequence axes zero-padded to SEQ_MULTIPLE.

  q8: s8 [B, Tp, H, D]; q_scale: f32 [B, H, Tp/BLOCK_Q], includes 1/sqrt(D) * log2(e), so
    q8 . k8 * q_scale * k_scale is the score in base-2 logits.
  k8: s8 [B, Sp, H, D] of the mean-smoothed K; k_scale: f32 [B, H, Sp/BLOCK_KV].
  v8: f8e4m3 [B, Sp, H, D]; v_scale: f32 [B, H, D] (V ~= v8 * v_scale).
  """
  q8: jax.Array
  q_scale: jax.Array
  k8: jax.Array
  k_scale: jax.Array
  v8: jax.Array
  v_scale: jax.Array


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _pad_seq(x: jax.Array, length: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def _quantize_int8_blocks(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """x f32 [B, Tp, H, D] -> (s8 [B, Tp, H, D], scale f32 [B, H, Tp/block]), symmetric per block."""
  b, t, h, d = x.shape
  xb = x.reshape(b, t // block, block, h, d)
  amax = jnp.max(jnp.abs(xb), axis=(2, 4))  # [B, nb, H]
  scale = jnp.maximum(amax, 1e-30) / 127.0
  q = jnp.round(xb / scale[:, :, None, :, None]).clip(-127, 127).astype(jnp.int8)
  return q.reshape(b, t, h, d), jnp.moveaxis(scale, 1, 2)


def quantize_operands(q: jax.Array, k: jax.Array, v: jax.Array, *, block_kv: int = BLOCK_KV
                      ) -> Int8Operands:
  """Smooths K, quantizes Q, K to INT8 per block and V to FP8 per channel (see Int8Operands).

  block_kv: keys per K scale (the kernel's block_kv); both sequence axes are padded to
  max(SEQ_MULTIPLE, block_kv).
  """
  with jax.named_scope("attention_quantize"):
    f32 = jnp.float32
    mult = max(SEQ_MULTIPLE, block_kv)
    t_p = _round_up(q.shape[1], mult)
    s_p = _round_up(k.shape[1], mult)
    kf = k.astype(f32)
    # Smoothing: the per-(batch, head) token mean of K; padding is added after, so it stays 0.
    kf = kf - jnp.mean(kf, axis=1, keepdims=True)
    q8, q_scale = _quantize_int8_blocks(_pad_seq(q.astype(f32), t_p), BLOCK_Q)
    k8, k_scale = _quantize_int8_blocks(_pad_seq(kf, s_p), block_kv)
    q_scale = q_scale * (q.shape[-1] ** -0.5 * _LOG2E)
    vf = v.astype(f32)
    v_scale = jnp.maximum(jnp.max(jnp.abs(vf), axis=1), 1e-30) / _E4M3_MAX  # [B, H, D]
    v8 = _pad_seq((vf / v_scale[:, None]).astype(jnp.float8_e4m3fn), s_p)
    return Int8Operands(q8, q_scale, k8, k_scale, v8, v_scale)


def _int8_xla(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """The quantized algorithm in jnp: exact int products, f32 softmax, e4m3 P, f32 PV."""
  t, s_len = q.shape[1], k.shape[1]
  ops = quantize_operands(q, k, v)
  f32, hi = jnp.float32, lax.Precision.HIGHEST
  s = jnp.einsum("bthd,bshd->bhts", ops.q8.astype(f32), ops.k8.astype(f32), precision=hi)
  s = (s * jnp.repeat(ops.q_scale, BLOCK_Q, axis=2)[..., :, None]
       * jnp.repeat(ops.k_scale, BLOCK_KV, axis=2)[..., None, :])
  s = jnp.where(jnp.arange(s.shape[-1]) < s_len, s, -jnp.inf)
  p = jnp.exp2(s - s.max(axis=-1, keepdims=True))
  p8 = (p * _E4M3_MAX).astype(jnp.float8_e4m3fn).astype(f32)
  l = p8.sum(axis=-1)  # [B, H, Tp]; the kernel gets it from V^T's row of ones
  o = jnp.einsum("bhts,bshd->bthd", p8, ops.v8.astype(f32), precision=hi)
  o = o / jnp.moveaxis(l, 1, 2)[..., None] * ops.v_scale[:, None]
  return o[:, :t].astype(q.dtype)


def _int8_mosaic(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False,
                 **config) -> jax.Array:
  from pallas_kernels import attention_mosaic as am
  t, s_len = q.shape[1], k.shape[1]
  # Measured on H200 (benchmarks/results/attention-h200.json): the accumulator-init int->float
  # wins at D = 64 (1.21x cuDNN vs 1.10x) but spills at D = 128 (0.66x vs 1.43x).
  config = {"block_kv": BLOCK_KV,
            "int8_convert": "magic_init" if q.shape[-1] == 64 else "magic", **config}
  ops = quantize_operands(q, k, v, block_kv=config["block_kv"])
  with jax.named_scope("attention_quantize"):
    vt8 = am.prepare_vt(ops.v8)  # [B, H, D + 8, Sp]
  cfg = am.AttentionConfig(precision="int8", block_q=BLOCK_Q, interpret=interpret, **config)
  o = am.flash_attention(ops.q8, ops.k8, vt8, ops.q_scale, ops.k_scale, kv_len=s_len, config=cfg)
  o = o[:, :t].astype(jnp.float32) * ops.v_scale[:, None]
  return o.astype(q.dtype)


def _bf16_mosaic(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False,
                 **config) -> jax.Array:
  from pallas_kernels import attention_mosaic as am
  t, s_len = q.shape[1], k.shape[1]
  dt = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
  config = {"block_kv": _bf16_block_kv(q.shape[-1]), **config}
  cfg = am.AttentionConfig(precision="bf16", block_q=BLOCK_Q, interpret=interpret, **config)
  t_p, s_p = _round_up(t, cfg.q_multiple), _round_up(s_len, cfg.block_kv)
  qp, kp, vp = (_pad_seq(x.astype(dt), n) if x.shape[1] != n else x.astype(dt)
                for x, n in ((q, t_p), (k, s_p), (v, s_p)))
  o = am.flash_attention(qp, kp, vp, kv_len=s_len, config=cfg)
  return (o[:, :t] if t_p != t else o).astype(q.dtype)


def _cudnn_ok(q: jax.Array) -> bool:
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def mosaic_unavailable_reason(q: jax.Array) -> str | None:
  """None if the Mosaic GPU kernel applies to q on the default device, else why not."""
  if jax.default_backend() != "gpu":
    return f"needs a GPU, default backend is {jax.default_backend()}"
  cc = str(getattr(jax.devices()[0], "compute_capability", ""))
  if not cc.startswith("9"):
    return f"needs a Hopper GPU (compute capability 9.x), got {cc or 'unknown'}"
  if q.shape[-1] not in (64, 128):
    return f"needs head_dim 64 or 128, got {q.shape[-1]}"
  return None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, precision: str = "bf16",
              implementation: str | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v for q [B, T, H, D], k, v [B, S, H, D]; returns q.dtype."""
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"attention: expected q [B, T, H, D] and k, v [B, S, H, D] with matching "
                     f"B, H, D; got {q.shape}, {k.shape}, {v.shape}")
  if precision not in PRECISIONS:
    raise ValueError(f"attention precision must be one of {PRECISIONS}, got {precision!r}")
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(f"attention implementation must be None or one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  if implementation == "cudnn" and precision != "bf16":
    raise ValueError(f"attention implementation 'cudnn' supports precision 'bf16' only, "
                     f"got {precision!r}")
  if implementation == "mosaic" and (why := mosaic_unavailable_reason(q)):
    raise ValueError(f"attention implementation 'mosaic' is unavailable: {why}")
  if implementation is None:
    # f32 inputs keep the exact xla path for bf16 precision (the kernel would round to bf16).
    if mosaic_unavailable_reason(q) is None and (
        precision == "int8" or q.dtype in (jnp.bfloat16, jnp.float16)):
      implementation = "mosaic"
    elif precision == "bf16" and _cudnn_ok(q):
      implementation = "cudnn"
    else:
      implementation = "xla"
  with jax.named_scope(f"attention_{precision}_{implementation}"):
    if implementation == "cudnn":
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if implementation == "mosaic":
      return (_int8_mosaic if precision == "int8" else _bf16_mosaic)(q, k, v)
    return (_int8_xla if precision == "int8" else attention_reference)(q, k, v)


def attention_switch(q: jax.Array, k: jax.Array, v: jax.Array, precision_index: jax.Array, *,
                     implementation: str | None = None) -> jax.Array:
  """attention() with the precision picked at run time: precision_index is a traced int32
  index into PRECISIONS (0 = "bf16", 1 = "int8"); both branches are compiled, one runs."""
  branches = [functools.partial(attention, precision=p, implementation=implementation)
              for p in PRECISIONS]
  return lax.switch(jnp.asarray(precision_index, jnp.int32), branches, q, k, v)


class _CallableModule(types.ModuleType):
  """Makes `mpqjax.attention(q, k, v, ...)` call attention() while `mpqjax.attention` stays this
  module (the model blocks use `mpqjax.attention.attention`; exporting the function under the
  module's own name would shadow the module)."""

  def __call__(self, *args, **kwargs):
    return attention(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
