"""The toy model's text side: a word tokenizer over the caption grammar's vocabulary and a small
learned encoder (token + position embeddings, one pre-LN transformer layer, a final LayerNorm)
that plays the part T5 plays for CogVideoX: ids int32[B, T] -> embeddings f32[B, T, D].

Prompts are padded with PAD to `max_tokens` (as CogVideoX pads T5 input to 226 tokens; the
transformer attends to every text position, pads included). The empty prompt is all PAD: the
unconditional input of classifier-free guidance.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mpqjax.errors import UserInputError
from mpqjax.toyvideo import data

PAD = "<pad>"
VOCAB = (PAD, "a", *data.SIZE_NAMES, *data.COLOR_NAMES, *data.SHAPES, "moving",
         *data.DIRECTION_NAMES)
WORD_ID = {w: i for i, w in enumerate(VOCAB)}


def tokenize(prompt: str, max_tokens: int) -> np.ndarray:
  """int32[max_tokens]. Case-insensitive, splits on whitespace, ignores a final '.'.
  Unknown words or too many words: UserInputError naming them and listing the vocabulary."""
  if not isinstance(prompt, str):
    raise UserInputError(f"prompt must be a string, got {type(prompt).__name__}")
  words = prompt.lower().strip().rstrip(".").split()
  unknown = [w for w in words if w not in WORD_ID or w == PAD]
  if unknown:
    raise UserInputError(
        f"prompt {prompt!r}: unknown word(s) {', '.join(repr(w) for w in unknown)}. The default "
        f"model knows only this vocabulary: {' '.join(VOCAB[1:])} (prompts like "
        f"\"a red circle moving left\" or \"a small blue square moving up\")")
  if len(words) > max_tokens:
    raise UserInputError(f"prompt {prompt!r} has {len(words)} words; at most {max_tokens}")
  ids = np.zeros(max_tokens, np.int32)
  ids[:len(words)] = [WORD_ID[w] for w in words]
  return ids


def tokenize_batch(prompts, max_tokens: int) -> np.ndarray:
  return np.stack([tokenize(p, max_tokens) for p in prompts]).astype(np.int32)


def init_params(key: jax.Array, *, dim: int, max_tokens: int, mlp_ratio: int = 2) -> dict:
  """Random encoder parameters (f32). Linear weights are [out, in] like the rest of mpqjax."""
  ks = jax.random.split(key, 6)

  def dense(k, n_out, n_in):
    return {"weight": jax.random.normal(k, (n_out, n_in)) / np.sqrt(n_in),
            "bias": jnp.zeros((n_out,))}

  def ln():
    return {"weight": jnp.ones((dim,)), "bias": jnp.zeros((dim,))}

  return {
      "token_embedding": 0.5 * jax.random.normal(ks[0], (len(VOCAB), dim)),
      "position_embedding": 0.1 * jax.random.normal(ks[1], (max_tokens, dim)),
      "ln1": ln(), "qkv": dense(ks[2], 3 * dim, dim), "out": dense(ks[3], dim, dim),
      "ln2": ln(), "fc1": dense(ks[4], mlp_ratio * dim, dim),
      "fc2": dense(ks[5], dim, mlp_ratio * dim), "ln_final": ln(),
  }


def _ln(x, p, eps=1e-5):
  m = jnp.mean(x, -1, keepdims=True)
  v = jnp.mean(jnp.square(x - m), -1, keepdims=True)
  return (x - m) * jax.lax.rsqrt(v + eps) * p["weight"] + p["bias"]


def _dense(x, p):
  return x @ p["weight"].T + p["bias"]


def encode(params: dict, ids: jax.Array, *, heads: int) -> jax.Array:
  """ids int32[B, T] -> f32[B, T, D]."""
  with jax.named_scope("toy_text_encoder"):
    x = params["token_embedding"][ids] + params["position_embedding"][None, :ids.shape[1]]
    b, t, d = x.shape
    qkv = _dense(_ln(x, params["ln1"]), params["qkv"]).reshape(b, t, 3, heads, d // heads)
    o = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    x = x + _dense(o.reshape(b, t, d), params["out"])
    x = x + _dense(jax.nn.gelu(_dense(_ln(x, params["ln2"]), params["fc1"])), params["fc2"])
    return _ln(x, params["ln_final"])
