"""The T5 v1.1 encoder (transformers' T5EncoderModel) as pure functions over a params pytree.

Parameter names map one-to-one to the transformers state dict; the blocks are stacked along a
leading layer axis L so that `lax.scan` runs them:

  shared/weight                                         [V, D]
  encoder/relative_attention_bias/weight                [num_buckets, H]
      <- encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight (block 0 only,
         shared by every layer)
  encoder/block/layer/0/SelfAttention/{q,k,v}/weight    [L, H*d_kv, D]
  encoder/block/layer/0/SelfAttention/o/weight          [L, D, H*d_kv]
  encoder/block/layer/0/layer_norm/weight               [L, D]
  encoder/block/layer/1/DenseReluDense/{wi_0,wi_1}/weight [L, d_ff, D]
  encoder/block/layer/1/DenseReluDense/wo/weight        [L, D, d_ff]
  encoder/block/layer/1/layer_norm/weight               [L, D]
  encoder/final_layer_norm/weight                       [D]
      <- encoder.block.{i}.<rest> stacked over i for the block entries.

Compute dtype = the weights' dtype (fp32 for parity, bf16 for the 4096-wide XXL encoder), with
the RMS statistics, attention logits and softmax in fp32 as transformers does.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from mpqjax.errors import UserInputError
from mpqjax.jsonio import read_json_object
from mpqjax.qlinear import linear


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The fields of transformers' T5Config the encoder uses (T5 v1.1: gated-gelu FFN)."""
  vocab_size: int = 32128
  d_model: int = 4096
  d_kv: int = 64
  d_ff: int = 10240
  num_layers: int = 24
  num_heads: int = 64
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @classmethod
  def from_dict(cls, d: dict, source: str = "config") -> "T5Config":
    """From a transformers config.json dict; rejects what this port does not implement."""
    mt = d.get("model_type", "t5")
    if mt not in ("t5", "umt5"):
      raise UserInputError(f"{source}: model_type {mt!r} is not a T5 encoder (expected 't5')")
    if mt == "umt5":
      raise UserInputError(f"{source}: UMT5 (per-layer relative bias) is not supported")
    ffp = d.get("feed_forward_proj", "relu")
    if ffp != "gated-gelu":
      raise UserInputError(f"{source}: feed_forward_proj {ffp!r} is not supported; the T5 v1.1 "
                           "encoder CogVideoX uses has 'gated-gelu'")
    try:
      return cls(**{f.name: type(f.default)(d[f.name]) for f in dataclasses.fields(cls)
                    if f.name in d})
    except (TypeError, ValueError) as e:
      raise UserInputError(f"{source}: malformed T5 config ({e})") from None

  @classmethod
  def from_file(cls, path: str) -> "T5Config":
    return cls.from_dict(read_json_object(path), source=path)


def param_shapes(cfg: T5Config) -> dict:
  """{transformers name: shape} for one unstacked T5EncoderModel state dict."""
  shapes = {"shared.weight": (cfg.vocab_size, cfg.d_model),
            "encoder.final_layer_norm.weight": (cfg.d_model,),
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                (cfg.relative_attention_num_buckets, cfg.num_heads)}
  for i in range(cfg.num_layers):
    p = f"encoder.block.{i}.layer."
    for n in "qkv":
      shapes[p + f"0.SelfAttention.{n}.weight"] = (cfg.inner_dim, cfg.d_model)
    shapes[p + "0.SelfAttention.o.weight"] = (cfg.d_model, cfg.inner_dim)
    shapes[p + "0.layer_norm.weight"] = (cfg.d_model,)
    shapes[p + "1.DenseReluDense.wi_0.weight"] = (cfg.d_ff, cfg.d_model)
    shapes[p + "1.DenseReluDense.wi_1.weight"] = (cfg.d_ff, cfg.d_model)
    shapes[p + "1.DenseReluDense.wo.weight"] = (cfg.d_model, cfg.d_ff)
    shapes[p + "1.layer_norm.weight"] = (cfg.d_model,)
  return shapes


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """Bidirectional T5 bucket of (key - query) positions: int32 [q_len, k_len].

  Same arithmetic as transformers' _relative_position_bucket (float32 log, truncation)."""
  rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
  nb = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * nb
  rel = np.abs(rel)
  max_exact = nb // 2
  is_small = rel < max_exact
  with np.errstate(divide="ignore"):
    large = (np.log(rel.astype(np.float32) / np.float32(max_exact))
             / np.float32(math.log(max_distance / max_exact)) * np.float32(nb - max_exact))
  large = max_exact + np.where(is_small, 0, large).astype(np.int64)
  large = np.minimum(large, nb - 1)
  return (buckets + np.where(is_small, rel, large)).astype(np.int32)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """T5LayerNorm: x / sqrt(mean(x^2) + eps) * weight, no mean subtraction, no bias; the
  statistic in fp32, the result cast to the weight's dtype if that is half precision."""
  with jax.named_scope("t5_rms_norm"):
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(var + eps)
    if weight.dtype in (jnp.bfloat16, jnp.float16):
      y = y.astype(weight.dtype)
    return weight * y


def _attention(x: jax.Array, p: dict, bias: jax.Array, cfg: T5Config) -> jax.Array:
  """Self-attention without 1/sqrt(d) scaling; bias [B|1, H, T, T] (position + mask), fp32."""
  b, t, _ = x.shape
  with jax.named_scope("t5_qkv"):
    q, k, v = (linear(x, p[n]["weight"]).reshape(b, t, cfg.num_heads, cfg.d_kv) for n in "qkv")
  with jax.named_scope("t5_attention"):
    prec = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    s = jnp.einsum("bthd,bshd->bhts", q, k, precision=prec,
                   preferred_element_type=jnp.float32) + bias
    w = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bhts,bshd->bthd", w, v, precision=prec,
                   preferred_element_type=jnp.float32).astype(x.dtype)
  with jax.named_scope("t5_o"):
    return linear(o.reshape(b, t, cfg.inner_dim), p["o"]["weight"])


def _ffn(x: jax.Array, p: dict) -> jax.Array:
  """T5DenseGatedActDense: wo(gelu_new(wi_0 x) * wi_1 x); gelu_new is the tanh form."""
  with jax.named_scope("t5_ffn"):
    h = jax.nn.gelu(linear(x, p["wi_0"]["weight"]), approximate=True)
    h = h * linear(x, p["wi_1"]["weight"])
    return linear(h, p["wo"]["weight"])


def block(h: jax.Array, p: dict, bias: jax.Array, cfg: T5Config) -> jax.Array:
  """One T5Block (pre-norm attention then pre-norm FFN, residuals) for one layer's params."""
  l0, l1 = p["layer"]["0"], p["layer"]["1"]
  h = h + _attention(rms_norm(h, l0["layer_norm"]["weight"], cfg.layer_norm_epsilon),
                     l0["SelfAttention"], bias, cfg)
  h = h + _ffn(rms_norm(h, l1["layer_norm"]["weight"], cfg.layer_norm_epsilon),
               l1["DenseReluDense"])
  return h


def encode(params: dict, input_ids: jax.Array, cfg: T5Config,
           attention_mask: jax.Array | None = None) -> jax.Array:
  """last_hidden_state [B, T, D] (weights' dtype) for int input_ids [B, T].

  attention_mask: optional [B, T] (1 = attend); CogVideoX passes none, so its padding tokens
  are attended to like any other token.
  """
  if input_ids.ndim != 2:
    raise UserInputError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
  t = input_ids.shape[1]
  enc = params["encoder"]
  emb = params["shared"]["weight"]
  h = jnp.take(emb, input_ids, axis=0)
  buckets = relative_position_buckets(t, t, cfg.relative_attention_num_buckets,
                                      cfg.relative_attention_max_distance)
  rel = enc["relative_attention_bias"]["weight"]  # [num_buckets, H]
  bias = jnp.transpose(jnp.take(rel, jnp.asarray(buckets), axis=0), (2, 0, 1))[None]
  bias = bias.astype(jnp.float32)
  if attention_mask is not None:
    neg = jnp.finfo(jnp.float32).min
    bias = bias + jnp.where(attention_mask[:, None, None, :].astype(bool), 0.0, neg)

  def step(h, p):
    return block(h, p, bias, cfg), None

  h, _ = jax.lax.scan(step, h, enc["block"])
  return rms_norm(h, enc["final_layer_norm"]["weight"], cfg.layer_norm_epsilon)


# encode compiled once per (config, batch, length); the mask is optional (None or [B, T])
encode_jit = jax.jit(encode, static_argnums=(2,))
