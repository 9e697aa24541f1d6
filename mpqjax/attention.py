"""Attention entry point used by the model blocks.

  attention(q, k, v, *, precision="bf16", implementation=None) -> [B, T, H, D]

q, k, v: [B, T, H, D] (the layout of jax.nn.dot_product_attention), non-causal.
implementation: "xla" (pure jnp, runs everywhere), "cudnn" (jax.nn.dot_product_attention's
cuDNN flash attention), or None: cuDNN on GPU where it applies, else xla.
The softmax scale is 1/sqrt(D). Output dtype is q's dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

PRECISIONS = ("bf16", "int8")
IMPLEMENTATIONS = ("xla", "cudnn", "mosaic")


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


def _cudnn_ok(q: jax.Array) -> bool:
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, precision: str = "bf16",
              implementation: str | None = None) -> jax.Array:
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"attention: expected q [B, T, H, D] and k, v [B, S, H, D] with matching "
                     f"B, H, D; got {q.shape}, {k.shape}, {v.shape}")
  if precision not in PRECISIONS:
    raise ValueError(f"attention precision must be one of {PRECISIONS}, got {precision!r}")
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(f"attention implementation must be None or one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  if precision != "bf16" or implementation == "mosaic":
    raise NotImplementedError("quantized / Mosaic GPU attention is not available yet")
  if implementation == "cudnn" or (implementation is None and _cudnn_ok(q)):
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  return attention_reference(q, k, v)
