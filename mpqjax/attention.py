"""Attention entry point used by the model blocks.

  attention(q, k, v, *, precision="bf16", implementation=None, int8_pv=None) -> [B, T, H, D]
  attention_switch(q, k, v, precision_index, *, implementation=None, int8_pv=None) -> [B, T, H, D]

q: [B, T, H, D], k, v: [B, S, H, D] (the layout of jax.nn.dot_product_attention), non-causal,
softmax scale 1/sqrt(D). Output dtype is q's dtype.

precision:
  "bf16": plain attention (bf16 operands, f32 softmax).
  "int8": SageAttention-style quantized attention. K is smoothed by subtracting its per-head mean
    over tokens (softmax is invariant to adding q.c to every score of a row, so this changes
    nothing mathematically and removes K's channel offsets); Q and K are rotated along D by the
    same block Hadamard matrix (QH (KH)^T = QK^T: it spreads the outlier channels over all
    channels, "incoherent processing" as in FlashAttention-3's FP8 path) and quantized to INT8
    with one scale per block of tokens (BLOCK_Q = 64 query rows, 256 keys; 128 keys for bf16 PV
    at D > 64) per head;
    S = QK^T is exact in int32; the softmax is f32 with the kernel's running row max per KV
    block; then PV in `int8_pv` (default INT8_PV_DEFAULT = "fp8"):
      "fp8": P is rounded to FP8 e4m3 (scaled by 448 against the running max) and V to FP8 e4m3
        with one scale per channel (fp8 tensor cores, promoted to fp32 every KV block);
      "fp8x2": as "fp8", with V as the sum of two e4m3 terms (hi = e4m3(V / s), lo =
        e4m3(V / s - hi)), one fp8 wgmma per term with the same P: V's rounding error drops
        from 2^-4 to ~2^-8 relative for one more fp8 wgmma per block;
      "bf16": P and V in bf16 (bf16 tensor cores, fp32 accumulation).
    The softmax denominator is the sum of the rounded P (so the output is an exact convex
    combination of the rounded V). Accuracy (pallas_kernels/NOTES.md): e4m3 P and V alone cost
    ~0.027 rel. L1 on N(0, 1) V (at the issue's 0.03 bar), about half of it V's rounding;
    "fp8x2" (0.012-0.027 on the H200) and "bf16" meet the bars with margin.
implementation:
  "xla": pure jnp (runs everywhere, materializes [B, H, T, S]); for "int8" it emulates the
    Mosaic kernel's numerics (same operands, same rounded P against the same running max per
    block of keys, one bf16 rounding of the normalized output times the V scale); what
    it does not emulate: f32 rounding order (the kernel fuses multiply-adds and rescales its
    accumulator block by block), the kernel's approximate exp2 (ex2.approx, rel. error ~2^-22)
    and the tensor cores' reduced-precision FP8 accumulation within one KV block.
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
import numpy as np
from jax import lax

from mpqjax import formats
from mpqjax.method.defaults import ATTENTION_PVS

PRECISIONS = ("bf16", "int8")  # attention_switch's precision_index indexes this tuple.
IMPLEMENTATIONS = ("xla", "cudnn", "mosaic")
BLOCK_Q = 64     # query rows per INT8 scale (one kernel warpgroup tile)
BLOCK_KV = 256   # keys per INT8 scale (one kernel pipeline step; 256 measured faster than 128)
SEQ_MULTIPLE = 128  # both sequence axes are padded to a multiple of this (and of block_kv)
INT8_PVS = ATTENTION_PVS  # the PV operand formats of precision "int8"
INT8_PV_DEFAULT = INT8_PVS[0]
_PV_DTYPES = {"fp8": jnp.float8_e4m3fn, "fp8x2": jnp.float8_e4m3fn, "bf16": jnp.bfloat16}
_V_TERMS = {"fp8": 1, "fp8x2": 2, "bf16": 1}


def _bf16_block_kv(head_dim: int) -> int:
  """bf16 kernel keys per step: 256 measured faster at D = 64; 256 x 128 K+V tiles overflow SMEM."""
  return 256 if head_dim == 64 else 128
_LOG2E = math.log2(math.e)
_E4M3_MAX = 448.0
_LOG2_P_SCALE = math.log2(_E4M3_MAX)  # P in [0, 1] is stored as P * 448 in e4m3


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

  q8: s8 [B, Tp, H, D] of the rotated Q (Q H, H the +-1 block Hadamard matrix of
    `rotation_block(D)`); q_scale: f32 [B, H, Tp/BLOCK_Q], includes 1/b (H H^T = b I),
    1/sqrt(D) and log2(e), so q8 . k8 * q_scale * k_scale is the score in base-2 logits.
  k8: s8 [B, Sp, H, D] of the mean-smoothed, rotated K; k_scale: f32 [B, H, Sp/block_kv].
  v8: the PV operand [B, Sp, H, D]: f8e4m3 with v_scale f32 [B, H, D] one scale per channel
    (V ~= v8 * v_scale), or bf16 V with v_scale = 1; for "fp8x2" [B, Sp, H, 2 D], the e4m3
    terms hi and lo concatenated (V ~= (hi + lo) * v_scale).
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


def rotation_block(head_dim: int) -> int:
  """Size of the Hadamard blocks that rotate Q and K: the largest power of two dividing D
  (D itself for 32, 64, 128; 1 = no rotation for odd D)."""
  return head_dim & -head_dim


def _rotate(x: jax.Array) -> jax.Array:
  """x [..., D] -> f32 x H with H = blockdiag(+-1 Sylvester matrices of rotation_block(D)).

  +-1 is exact in every float dtype, so 16-bit inputs multiply exactly in their own dtype
  (f32 accumulation); the 1/sqrt(b) normalization is left to the quantization scale.
  """
  d = x.shape[-1]
  b = rotation_block(d)
  if b == 1:
    return x.astype(jnp.float32)
  dt = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
  h = jnp.asarray(np.sign(formats.hadamard_matrix(b)), dt)
  xb = x.astype(dt).reshape(*x.shape[:-1], d // b, b)
  y = jnp.einsum("...nb,bc->...nc", xb, h, preferred_element_type=jnp.float32,
                 precision=lax.Precision.HIGHEST)
  return y.reshape(x.shape)


def _quantize_int8_blocks(x: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
  """x f32 [B, Tp, H, D] -> (s8 [B, Tp, H, D], scale f32 [B, H, Tp/block]), symmetric per block:
  scale = max(amax, 1e-30) * (1/127), q = round(x * (1/scale)). The reciprocals are spelled out
  so that XLA (which rewrites divisions by constants and broadcasts) and the Mosaic pre-pass
  kernel compute the same values."""
  b, t, h, d = x.shape
  xb = x.reshape(b, t // block, block, h, d)
  amax = jnp.max(jnp.abs(xb), axis=(2, 4))  # [B, nb, H]
  scale = jnp.maximum(amax, 1e-30) * np.float32(1.0 / 127.0)
  inv = 1.0 / scale
  q = jnp.round(xb * inv[:, :, None, :, None]).clip(-127, 127).astype(jnp.int8)
  return q.reshape(b, t, h, d), jnp.moveaxis(scale, 1, 2)


def quantize_blocks_xla(x: jax.Array, center: jax.Array | None, *, block_rows: int,
                        t_pad: int) -> tuple[jax.Array, jax.Array]:
  """x [B, T, H, D] -> (s8 [B, t_pad, H, D], scale f32 [B, H, t_pad / block_rows]): the rotated
  x minus center (f32 [B, H, D], or None), zero-padded to t_pad rows, INT8 per block of
  block_rows tokens per head (the reference of pallas_kernels.attention_quant_mgpu)."""
  y = _rotate(x)
  if center is not None:
    y = y - center[:, None]
  return _quantize_int8_blocks(_pad_seq(y, t_pad), block_rows)


PREPASSES = ("xla", "mosaic")
# The operand pre-pass of the Mosaic int8 path. "mosaic" reads Q, K and V once each
# (pallas_kernels.attention_quant_mgpu and attention_vt_mgpu): 1.06 vs 1.97 ms for XLA's at
# the 2B shape on an H200 (benchmarks/results/attention-h200.prepass-mosaic.json).
PREPASS_DEFAULT = "mosaic"


def _quantize_blocks(x: jax.Array, center: jax.Array | None, *, block_rows: int, t_pad: int,
                     prepass: str, interpret: bool) -> tuple[jax.Array, jax.Array]:
  if prepass not in PREPASSES:
    raise ValueError(f"attention prepass must be one of {PREPASSES}, got {prepass!r}")
  if prepass == "mosaic":
    from pallas_kernels import attention_quant_mgpu as aq
    if aq.supported(x, block_rows):
      return aq.quantize_blocks_mgpu(x, center, block_rows=block_rows, t_pad=t_pad,
                                     interpret=_interpret_params(interpret))
  return quantize_blocks_xla(x, center, block_rows=block_rows, t_pad=t_pad)


def _interpret_params(interpret: bool):
  """The pre-pass kernels' interpret argument for attention's interpret flag."""
  from pallas_kernels import qlinear_mosaic
  return qlinear_mosaic.interpret_params() if interpret else None


def quantize_operands(q: jax.Array, k: jax.Array, v: jax.Array, *, block_kv: int = BLOCK_KV,
                      pv: str = INT8_PV_DEFAULT, prepass: str = "xla",
                      interpret: bool = False,
                      q_multiple: int | None = None) -> Int8Operands:
  """Smooths K, rotates Q and K, quantizes them to INT8 per block and V to the PV format
  `pv` (FP8 per channel, or bf16; see Int8Operands).

  block_kv: keys per K scale (the kernel's block_kv); both sequence axes are padded to
  max(SEQ_MULTIPLE, block_kv), or the queries to q_multiple (a multiple of BLOCK_Q) if given
  (the kernel's CTA query tile). prepass: "xla", or "mosaic" for Q and K through
  pallas_kernels.attention_quant_mgpu where it applies (bf16, D = 64 or 128); interpret: run
  that kernel in Mosaic GPU's interpret mode (CPU tests).
  """
  with jax.named_scope("attention_quantize"):
    f32 = jnp.float32
    d = q.shape[-1]
    mult = max(SEQ_MULTIPLE, block_kv)
    t_p = _round_up(q.shape[1], q_multiple or mult)
    s_p = _round_up(k.shape[1], mult)
    # Smoothing: the per-(batch, head) token mean of K, rotated (rotation is linear: the mean
    # of the rotated K) and subtracted from the rotated K; padding rows stay 0.
    center = _rotate(jnp.mean(k.astype(f32), axis=1))  # [B, H, D]
    blocks = functools.partial(_quantize_blocks, prepass=prepass, interpret=interpret)
    q8, q_scale = blocks(q, None, block_rows=BLOCK_Q, t_pad=t_p)
    k8, k_scale = blocks(k, center, block_rows=block_kv, t_pad=s_p)
    # 1/b undoes the unnormalized rotation (exact: b is a power of two).
    q_scale = q_scale * (d ** -0.5 * _LOG2E / rotation_block(d))
    if pv == "bf16":
      v_scale = jnp.ones((v.shape[0], v.shape[2], d), f32)
      v8 = _pad_seq(v.astype(jnp.bfloat16), s_p)
    else:
      vf = v.astype(f32)
      v_scale = jnp.maximum(jnp.max(jnp.abs(vf), axis=1), 1e-30) / _E4M3_MAX  # [B, H, D]
      # times the reciprocal, spelled out (as the Mosaic V^T kernel computes it)
      x = vf * (1.0 / v_scale)[:, None]
      v8 = formats.narrowed(x, jnp.float8_e4m3fn)
      if pv == "fp8x2":  # the rounding error of hi, itself in e4m3
        lo = formats.narrowed(x - v8.astype(f32), jnp.float8_e4m3fn)
        v8 = jnp.concatenate([v8, lo], axis=-1)
      v8 = _pad_seq(v8, s_p)
    return Int8Operands(q8, q_scale, k8, k_scale, v8, v_scale)


def int8_probabilities(q8: jax.Array, k8: jax.Array, q_scale: jax.Array, k_scale: jax.Array, *,
                       kv_len: int, block_q: int = BLOCK_Q, block_kv: int = BLOCK_KV,
                       p_dtype=jnp.float8_e4m3fn) -> jax.Array:
  """The int8 kernel's unnormalized FP8 probabilities, f32 [B, H, Tp, Sp] (the one jnp copy of
  its softmax numerics, shared by the xla path and the kernel's reference).

  Scores x = (q8 . k8) * (q_scale * k_scale) in base-2 logits (keys >= kv_len masked); the
  kernel walks the keys in blocks of block_kv with a running row max m_j (max over blocks
  <= j), rounds P8_j = p_dtype(exp2(x - m_j + log2(448))) and rescales its accumulator by
  exp2(m_j - m_final) as the max grows. Returns alpha_j * P8_j with alpha_j = exp2(m_j -
  m_final): sum(out, -1) is the kernel's softmax denominator and out @ V8 its numerator.
  """
  f32 = jnp.float32
  s = jnp.einsum("bthd,bshd->bhts", q8.astype(f32), k8.astype(f32),
                 precision=lax.Precision.HIGHEST)  # exact: |s| < 2^24
  c = (jnp.repeat(q_scale, block_q, axis=2)[..., :, None]
       * jnp.repeat(k_scale, block_kv, axis=2)[..., None, :])  # the kernel's c = c_q * k_scale
  x = jnp.where(jnp.arange(s.shape[-1]) < kv_len, s * c, -jnp.inf)
  xb = x.reshape(*x.shape[:-1], -1, block_kv)  # [B, H, Tp, nkv, block_kv]
  m_run = lax.cummax(xb.max(axis=-1), axis=x.ndim - 1)  # [B, H, Tp, nkv]
  p8 = formats.narrowed(jnp.exp2(xb - (m_run - _LOG2_P_SCALE)[..., None]), p_dtype)
  alpha = jnp.exp2(m_run - m_run[..., -1:])
  return (p8.astype(f32) * alpha[..., None]).reshape(x.shape)


def _int8_block_kv(head_dim: int, pv: str) -> int:
  """int8 kernel keys per step: 256 (measured faster than 128 with fp8 PV); with bf16 or
  two-term fp8 PV at D = 128 a 256-key V^T ring does not fit SMEM next to K."""
  v_bytes = jnp.dtype(_PV_DTYPES[pv]).itemsize * _V_TERMS[pv]  # per V element in the ring
  return 128 if v_bytes > 1 and head_dim > 64 else BLOCK_KV


def _int8_xla(q: jax.Array, k: jax.Array, v: jax.Array, *, pv: str = INT8_PV_DEFAULT
              ) -> jax.Array:
  """The int8 kernel's algorithm in jnp (see the module docstring for what is emulated)."""
  t, s_len = q.shape[1], k.shape[1]
  block_kv = _int8_block_kv(q.shape[-1], pv)
  ops = quantize_operands(q, k, v, block_kv=block_kv, pv=pv)
  p8 = int8_probabilities(ops.q8, ops.k8, ops.q_scale, ops.k_scale, kv_len=s_len,
                          block_kv=block_kv, p_dtype=_PV_DTYPES[pv])
  l = p8.sum(axis=-1)  # [B, H, Tp]; the kernel gets it from V^T's row of ones
  v_terms = jnp.split(ops.v8.astype(jnp.float32), _V_TERMS[pv], axis=-1)
  o = jnp.einsum("bhts,bshd->bthd", p8, sum(v_terms), precision=lax.Precision.HIGHEST)
  o = (o / jnp.moveaxis(l, 1, 2)[..., None]) * ops.v_scale[:, None]
  return formats.narrowed(o[:, :t], jnp.bfloat16).astype(q.dtype)  # the kernel's bf16 output


def kernel_config(precision: str, head_dim: int, *, pv: str = INT8_PV_DEFAULT,
                  interpret: bool = False, **overrides):
  """The pallas_kernels.attention_mosaic.AttentionConfig that attention() runs (overrides:
  AttentionConfig fields, for benchmarks and tests)."""
  from pallas_kernels import attention_mosaic as am
  if precision == "int8":
    # Measured on H200 (benchmarks/results/attention-h200.json): the accumulator-init
    # int->float wins with fp8 PV at D = 64 (1.14x cuDNN vs 1.07x) but takes 2.4x longer
    # (spills) at D = 128, and with bf16 PV at block_kv 256 (25 ms vs 11.9 ms at 2B).
    # No ping-pong: the softmax, not the tensor cores, bounds the int8 kernel, so the two
    # warpgroups' softmaxes should overlap each other (kernel alone, 2B: 8.24 vs 10.33 ms,
    # head_dim 128: 13.84 vs 15.66 ms; attention_diag-h200.json). bf16 keeps it (1.18x vs
    # 1.07x cuDNN at 2B; attention-h200.pingpong.json).
    config = {"block_kv": _int8_block_kv(head_dim, pv),
              "int8_convert": "magic_init" if head_dim == 64 and pv != "bf16" else "magic",
              "pv_dtype": jnp.dtype(_PV_DTYPES[pv]).name, "pingpong": False,
              "v_terms": _V_TERMS[pv]}
  else:
    config = {"block_kv": _bf16_block_kv(head_dim)}
  return am.AttentionConfig(precision=precision, block_q=BLOCK_Q, interpret=interpret,
                            **{**config, **overrides})


def _vt_operand(v: jax.Array, ops: Int8Operands, *, pv: str, prepass: str,
                interpret: bool) -> jax.Array:
  """The int8 kernel's V^T operand [B, H, terms * (D + 8), Sp]: from ops.v8 in XLA, or with
  prepass "mosaic" and fp8 PV straight from bf16 v by pallas_kernels.attention_vt_mgpu (one
  pass; ops.v8 is then dead code)."""
  from pallas_kernels import attention_mosaic as am
  if prepass == "mosaic" and pv != "bf16":
    from pallas_kernels import attention_vt_mgpu as av
    s_pad = ops.k8.shape[1]
    if av.supported(v) and s_pad % av.BLOCK_TOKENS == 0:
      return av.transposed_fp8_v_mgpu(v, 1.0 / ops.v_scale, s_pad=s_pad, terms=_V_TERMS[pv],
                                      interpret=_interpret_params(interpret))
  return am.prepare_vt(ops.v8, _V_TERMS[pv])


def _int8_mosaic(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False,
                 pv: str = INT8_PV_DEFAULT, prepass: str = PREPASS_DEFAULT,
                 fold_v_scale: bool = True, **config) -> jax.Array:
  """fold_v_scale=False: V's scales and the crop as a separate XLA pass after the kernel (the
  session-5 path, kept for benchmarks/attention.py's same-run comparison)."""
  from pallas_kernels import attention_mosaic as am
  t, s_len = q.shape[1], k.shape[1]
  cfg = kernel_config("int8", q.shape[-1], pv=pv, interpret=interpret, **config)
  ops = quantize_operands(q, k, v, block_kv=cfg.block_kv, pv=pv, prepass=prepass,
                          interpret=interpret, q_multiple=cfg.q_multiple)
  with jax.named_scope("attention_quantize"):
    vt8 = _vt_operand(v, ops, pv=pv, prepass=prepass, interpret=interpret)
  if not fold_v_scale:
    o = am.flash_attention(ops.q8, ops.k8, vt8, ops.q_scale, ops.k_scale, kv_len=s_len,
                           config=cfg)
    return (o[:, :t].astype(jnp.float32) * ops.v_scale[:, None]).astype(q.dtype)
  # V's scales and the crop to t rows happen in the kernel's epilogue
  o = am.flash_attention(ops.q8, ops.k8, vt8, ops.q_scale, ops.k_scale, kv_len=s_len, config=cfg,
                         v_scale=ops.v_scale, q_len=t)
  return o.astype(q.dtype)


def _bf16_mosaic(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False,
                 **config) -> jax.Array:
  from pallas_kernels import attention_mosaic as am
  t, s_len = q.shape[1], k.shape[1]
  dt = q.dtype if q.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
  cfg = kernel_config("bf16", q.shape[-1], interpret=interpret, **config)
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
  from pallas_kernels import hopper_unavailable_reason
  if why := hopper_unavailable_reason():
    return why
  if q.shape[-1] not in (64, 128):
    return f"needs head_dim 64 or 128, got {q.shape[-1]}"
  return None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, precision: str = "bf16",
              implementation: str | None = None, int8_pv: str | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(D)) v for q [B, T, H, D], k, v [B, S, H, D]; returns q.dtype.

  int8_pv: the PV format of precision "int8" ("fp8" or "bf16"; None = INT8_PV_DEFAULT).
  """
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"attention: expected q [B, T, H, D] and k, v [B, S, H, D] with matching "
                     f"B, H, D; got {q.shape}, {k.shape}, {v.shape}")
  if precision not in PRECISIONS:
    raise ValueError(f"attention precision must be one of {PRECISIONS}, got {precision!r}")
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(f"attention implementation must be None or one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  if int8_pv not in (None, *INT8_PVS):
    raise ValueError(f"attention int8_pv must be None or one of {INT8_PVS}, got {int8_pv!r}")
  pv = int8_pv or INT8_PV_DEFAULT
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
      return _int8_mosaic(q, k, v, pv=pv) if precision == "int8" else _bf16_mosaic(q, k, v)
    return _int8_xla(q, k, v, pv=pv) if precision == "int8" else attention_reference(q, k, v)


def attention_switch(q: jax.Array, k: jax.Array, v: jax.Array, precision_index: jax.Array, *,
                     implementation: str | None = None, int8_pv: str | None = None) -> jax.Array:
  """attention() with the precision picked at run time: precision_index is a traced int32
  index into PRECISIONS (0 = "bf16", 1 = "int8"); both branches are compiled, one runs.
  int8_pv: the "int8" branch's PV format (see attention())."""
  branches = [functools.partial(attention, precision=p, implementation=implementation,
                                int8_pv=int8_pv) for p in PRECISIONS]
  return lax.switch(jnp.asarray(precision_index, jnp.int32), branches, q, k, v)


class _CallableModule(types.ModuleType):
  """Makes `mpqjax.attention(q, k, v, ...)` call attention() while `mpqjax.attention` stays this
  module (the model blocks use `mpqjax.attention.attention`; exporting the function under the
  module's own name would shadow the module)."""

  def __call__(self, *args, **kwargs):
    return attention(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
