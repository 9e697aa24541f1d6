"""CogVideoX transformer (diffusers CogVideoXTransformer3DModel, 1.0 checkpoints) as pure
functions over the parameter pytree described in models/cogvideox/params.py.

  embed(params, latents[B,F,C,H,W], timestep[B], text_emb[B,T,Dt], config)
      -> hidden[B, N, D], encoder_hidden[B, T, D], temb f32[B, time_embed_dim], rotary|None
  block(params_l, hidden, encoder_hidden, temb, rotary, modes_l, *, config, ...)
      -> hidden', encoder_hidden', aux            (ONE block; params_l = per-layer slice)
  unembed(params, hidden, temb, config, latents_shape) -> out[B, F, C_out, H, W]
  forward(params, latents, timestep, text_emb, *, config, modes[L, 8] | None, ...) -> out

N = F*(H/p)*(W/p) video tokens (frame-major, then row-major), D = inner_dim. rotary is
(cos, sin) f32[N, head_dim] for RoPE configs (5B), else None.

Numerics follow diffusers: LayerNorms, the AdaLN modulation arithmetic, RoPE, gelu and the
timestep embedding run in float32; matmuls run in the weights' dtype (bf16 baseline, f32 for
parity) or through qlinear (quantized, bf16 out). The residual streams keep the dtype of the
patch embedding's weights.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from models.cogvideox import embeddings
from models.cogvideox.config import CogVideoXConfig
from models.cogvideox.params import BLOCKS, LINEAR_NAMES, MODULATION_LINEARS, get_path
from mpqjax import attention as attention_lib
from mpqjax.errors import UserInputError
from mpqjax.qlinear import Mode, QuantizedLinear, linear, qlinear

__all__ = ["LINEAR_NAMES", "MODULATION_LINEARS", "embed", "block", "unembed", "forward",
           "outlier_ratio", "modes_for_precision"]

# Reported in aux["modes"] for unquantized (baseline) linears: they run at full width.
UNQUANTIZED_MODE = int(Mode.BF16)
PRECISION_MODES = {"nvfp4": Mode.NVFP4, "int8": Mode.INT8, "bf16": Mode.BF16}


def layer_norm(x: jax.Array, weight, bias, eps: float) -> jax.Array:
  """LayerNorm over the last axis in float32 (biased variance, as torch); returns f32."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps)
  if weight is not None:
    y = y * weight.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y


def _norm_params(p: dict, name: str):
  n = p.get(name, {}) if isinstance(p, dict) else {}
  return n.get("weight"), n.get("bias")


def _act(name: str, x: jax.Array) -> jax.Array:
  if name in ("silu", "swish"):
    return jax.nn.silu(x)
  if name == "gelu":
    return jax.nn.gelu(x, approximate=False)
  if name == "gelu-approximate":
    return jax.nn.gelu(x, approximate=True)
  if name == "relu":
    return jax.nn.relu(x)
  if name == "mish":
    return x * jnp.tanh(jax.nn.softplus(x))
  raise ValueError(f"unknown activation {name!r}")


def _dense(p: dict, x: jax.Array) -> jax.Array:
  """A plain (never quantized) linear {"weight": [N, K], "bias": [N]}."""
  return linear(x, p["weight"], p.get("bias"))


def outlier_ratio(x: jax.Array) -> jax.Array:
  """max|x| / mean|x| over the whole tensor, f32 scalar (inf-safe for an all-zero x)."""
  a = jnp.abs(x.astype(jnp.float32))
  return jnp.max(a) / jnp.maximum(jnp.mean(a), jnp.finfo(jnp.float32).tiny)


def _rel_fro(a: jax.Array, b: jax.Array) -> jax.Array:
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.linalg.norm((a - b).ravel()) / jnp.maximum(jnp.linalg.norm(b.ravel()),
                                                          jnp.finfo(jnp.float32).tiny)


class _Linears:
  """Runs the block's linears by index and records aux per linear (mode, ratio, e_rel)."""

  def __init__(self, params_l, modes_l, outlier_threshold, collect_stats, implementation):
    self.params_l = params_l
    self.modes_l = modes_l
    self.threshold = outlier_threshold
    self.collect_stats = collect_stats
    self.impl = implementation
    n = len(LINEAR_NAMES)
    self.modes = [jnp.int32(UNQUANTIZED_MODE)] * n
    self.ratios = [jnp.float32(0)] * n
    self.e_rel = [jnp.float32(0)] * n

  def __call__(self, idx: int, x: jax.Array) -> jax.Array:
    name = LINEAR_NAMES[idx]
    p = get_path(self.params_l, name)
    with jax.named_scope(name):
      if not isinstance(p, QuantizedLinear):
        if self.collect_stats:  # the float baseline pays no extra reductions otherwise
          self.ratios[idx] = outlier_ratio(x)
        return linear(x, p["weight"], p.get("bias"))
      self.ratios[idx] = outlier_ratio(x)
      if idx in MODULATION_LINEARS:
        mode = jnp.int32(Mode.BF16)
      else:
        mode = jnp.asarray(self.modes_l[idx], jnp.int32)
        if self.threshold is not None:
          mode = jnp.where(self.ratios[idx] > self.threshold, jnp.int32(Mode.BF16), mode)
      self.modes[idx] = mode
      y = qlinear(x, p, mode, implementation=self.impl)
      if self.collect_stats:
        with jax.named_scope("e_rel"):
          y4 = qlinear(x, p, Mode.NVFP4, implementation=self.impl)
          y16 = qlinear(x, p, Mode.BF16, implementation=self.impl)
          self.e_rel[idx] = _rel_fro(y4, y16)
      return y

  def aux(self) -> dict:
    out = {"modes": jnp.stack(self.modes), "outlier_ratio": jnp.stack(self.ratios)}
    if self.collect_stats:
      out["e_rel"] = jnp.stack(self.e_rel)
    return out


def _modulated_norm(p_l: dict, norm: str, idx: int, lin: _Linears, hidden, encoder, temb,
                    eps):
  """CogVideoXLayerNormZero: returns norm'd+modulated (hidden, encoder) in f32 and the gates."""
  with jax.named_scope(norm):
    mod = lin(idx, jax.nn.silu(temb.astype(jnp.float32))).astype(jnp.float32)  # [B, 6D]
    shift, scale, gate, e_shift, e_scale, e_gate = jnp.split(mod, 6, axis=-1)
    w, b = _norm_params(p_l[norm], "norm")
    h = layer_norm(hidden, w, b, eps) * (1 + scale[:, None]) + shift[:, None]
    e = layer_norm(encoder, w, b, eps) * (1 + e_scale[:, None]) + e_shift[:, None]
    return h, e, gate[:, None], e_gate[:, None]


def block(params_l: dict, hidden: jax.Array, encoder_hidden: jax.Array, temb: jax.Array,
          rotary, modes_l, *, config: CogVideoXConfig, outlier_threshold=None,
          collect_stats: bool = False, implementation: str | None = None,
          attention_precision="bf16", attention_implementation: str | None = None,
          attention_pv: str | None = None):
  """One CogVideoXBlock. Pure; jit/scan/cond/switch friendly.

  params_l: the per-layer slice of params["transformer_blocks"].
  hidden [B, N, D], encoder_hidden [B, T, D] (residual streams), temb [B, time_embed_dim],
  rotary (cos, sin) f32[N, head_dim] or None, modes_l int32[8] (a Mode per LINEAR_NAMES entry,
  may be traced; ignored for unquantized linears and for the modulation linears, which
  always run Mode.BF16). outlier_threshold: optional f32 scalar (may be traced; +inf
  disables): a quantized linear whose input has max|x|/mean|x| > threshold runs Mode.BF16.
  attention_precision: "bf16" | "int8", or a traced int32 index into mpqjax.attention.PRECISIONS
  (then both attention precisions are compiled and lax.switch runs one). attention_pv: the
  INT8 attention's PV format (mpqjax.attention.INT8_PVS; None = its default).
  Returns (hidden', encoder_hidden', aux) with aux = {"modes": int32[8] actually used
  (UNQUANTIZED_MODE = Mode.BF16 for unquantized linears), "outlier_ratio": f32[8] (for
  unquantized linears only with collect_stats, else 0)} plus, when
  collect_stats (static), "e_rel": f32[8] = ||y_NVFP4 - y_BF16||_F / ||y_BF16||_F of each
  quantized linear on its actual input (0 for unquantized ones).
  """
  if modes_l is None:
    modes_l = jnp.full((len(LINEAR_NAMES),), Mode.BF16, jnp.int32)
  lin = _Linears(params_l, modes_l, outlier_threshold, collect_stats, implementation)
  dt_h, dt_e = hidden.dtype, encoder_hidden.dtype
  b, n_txt = encoder_hidden.shape[0], encoder_hidden.shape[1]
  heads, dh, eps = config.num_attention_heads, config.attention_head_dim, config.norm_eps
  attn_p = params_l["attn1"]

  h, e, gate, e_gate = _modulated_norm(params_l, "norm1", 0, lin, hidden, encoder_hidden,
                                       temb, eps)
  with jax.named_scope("attn1"):
    x = jnp.concatenate([e, h], axis=1).astype(dt_h)  # text first, as diffusers
    q, k, v = (lin(i, x).reshape(b, -1, heads, dh) for i in (1, 2, 3))
    with jax.named_scope("norm_q"):
      q = layer_norm(q, *_norm_params(attn_p, "norm_q"), 1e-6).astype(q.dtype)
    with jax.named_scope("norm_k"):
      k = layer_norm(k, *_norm_params(attn_p, "norm_k"), 1e-6).astype(k.dtype)
    if rotary is not None:
      with jax.named_scope("rope"):
        cos, sin = rotary
        q = q.at[:, n_txt:].set(embeddings.apply_rotary(q[:, n_txt:], cos, sin))
        k = k.at[:, n_txt:].set(embeddings.apply_rotary(k[:, n_txt:], cos, sin))
    with jax.named_scope("attention"):
      if isinstance(attention_precision, str):
        o = attention_lib.attention(q, k, v, precision=attention_precision,
                                    implementation=attention_implementation,
                                    int8_pv=attention_pv)
      else:  # a traced index into attention.PRECISIONS, chosen per block and step
        o = attention_lib.attention_switch(q, k, v, attention_precision,
                                           implementation=attention_implementation,
                                           int8_pv=attention_pv)
    o = lin(4, o.reshape(b, -1, heads * dh))
  hidden = (hidden.astype(jnp.float32) + gate * o[:, n_txt:].astype(jnp.float32)).astype(dt_h)
  encoder_hidden = (encoder_hidden.astype(jnp.float32)
                    + e_gate * o[:, :n_txt].astype(jnp.float32)).astype(dt_e)

  h, e, gate, e_gate = _modulated_norm(params_l, "norm2", 5, lin, hidden, encoder_hidden,
                                       temb, eps)
  with jax.named_scope("ff"):
    x = jnp.concatenate([e, h], axis=1).astype(dt_h)
    y = lin(6, x)
    with jax.named_scope("gelu"):
      y = _act(config.activation_fn, y.astype(jnp.float32)).astype(y.dtype)
    y = lin(7, y)
  hidden = (hidden.astype(jnp.float32) + gate * y[:, n_txt:].astype(jnp.float32)).astype(dt_h)
  encoder_hidden = (encoder_hidden.astype(jnp.float32)
                    + e_gate * y[:, :n_txt].astype(jnp.float32)).astype(dt_e)
  return hidden, encoder_hidden, lin.aux()


def check_inputs(config: CogVideoXConfig, latents_shape, timestep_shape, text_shape) -> None:
  """Shape checks with clear errors (UserInputError)."""
  if len(latents_shape) != 5:
    raise UserInputError(f"latents must be [B, F, C, H, W], got shape {tuple(latents_shape)}")
  bsz, f, c, h, w = latents_shape
  p = config.patch_size
  if c != config.in_channels:
    raise UserInputError(f"latents have {c} channels (shape {tuple(latents_shape)}), the model "
                         f"expects in_channels={config.in_channels}")
  if h % p or w % p:
    raise UserInputError(f"latent height/width {h}x{w} must be multiples of patch_size={p}")
  if tuple(timestep_shape) != (bsz,):
    raise UserInputError(f"timestep must have shape [B]=({bsz},), got {tuple(timestep_shape)}")
  if len(text_shape) != 3 or text_shape[0] != bsz or text_shape[2] != config.text_embed_dim:
    raise UserInputError(f"text_emb must be [B={bsz}, T, {config.text_embed_dim}], got "
                         f"{tuple(text_shape)}")
  if config.use_learned_positional_embeddings:
    frames = (f - 1) * config.temporal_compression_ratio + 1
    if (h, w, frames) != (config.sample_height, config.sample_width, config.sample_frames) \
        or text_shape[1] != config.max_text_seq_length:
      raise UserInputError(
          "learned positional embeddings only cover the sample size: latents "
          f"{config.sample_height}x{config.sample_width} with "
          f"{(config.sample_frames - 1) // config.temporal_compression_ratio + 1} frames and "
          f"{config.max_text_seq_length} text tokens; got {h}x{w}, {f} frames, "
          f"{text_shape[1]} tokens")


def embed(params: dict, latents: jax.Array, timestep: jax.Array, text_emb: jax.Array,
          config: CogVideoXConfig):
  """Patch, text and timestep embeddings. See the module docstring for shapes."""
  check_inputs(config, latents.shape, timestep.shape, text_emb.shape)
  bsz, f, c, h, w = latents.shape
  p, d = config.patch_size, config.inner_dim
  pe = params["patch_embed"]
  dt = pe["proj"]["weight"].dtype
  with jax.named_scope("time_embedding"):
    t = embeddings.timestep_embedding(jnp.asarray(timestep), d,
                                      flip_sin_to_cos=config.flip_sin_to_cos,
                                      freq_shift=config.freq_shift)
    te = params["time_embedding"]
    temb = _dense(te["linear_1"], t.astype(dt))
    temb = _act(config.timestep_activation_fn, temb.astype(jnp.float32)).astype(dt)
    temb = _dense(te["linear_2"], temb).astype(jnp.float32)
  with jax.named_scope("patch_embed"):
    # Conv2d(kernel=stride=p) == a linear over (C, p, p) patches.
    x = latents.astype(dt).reshape(bsz, f, c, h // p, p, w // p, p)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6).reshape(bsz, f * (h // p) * (w // p), c * p * p)
    hidden = linear(x, pe["proj"]["weight"].reshape(d, -1), pe["proj"]["bias"])
    encoder = _dense(pe["text_proj"], text_emb)
    if config.use_learned_positional_embeddings:
      pos = pe["pos_embedding"][0].astype(jnp.float32)
      encoder = (encoder.astype(jnp.float32) + pos[:config.max_text_seq_length]).astype(dt)
      hidden = (hidden.astype(jnp.float32) + pos[config.max_text_seq_length:]).astype(dt)
    elif not config.use_rotary_positional_embeddings:
      # diffusers adds a joint table whose text rows are zero: only video tokens change.
      pos = embeddings.video_pos_embedding(config, f, h, w)
      hidden = (hidden.astype(jnp.float32) + pos).astype(dt)
  rotary = None
  if config.use_rotary_positional_embeddings:
    cos, sin = embeddings.rotary_3d(config, f, h, w)
    rotary = (jnp.asarray(cos), jnp.asarray(sin))
  return hidden, encoder, temb, rotary


def unembed(params: dict, hidden: jax.Array, temb: jax.Array, config: CogVideoXConfig,
            latents_shape) -> jax.Array:
  """norm_final, norm_out (AdaLayerNorm, shift before scale), proj_out, unpatchify.
  hidden [B, N, D] -> out [B, F, C_out, H, W] in hidden's dtype."""
  bsz, f, _, h, w = latents_shape
  p, eps = config.patch_size, config.norm_eps
  with jax.named_scope("norm_final"):
    x = layer_norm(hidden, *_norm_params(params, "norm_final"), eps)
  with jax.named_scope("norm_out"):
    no = params["norm_out"]
    mod = _dense(no["linear"], jax.nn.silu(temb.astype(jnp.float32)).astype(
        no["linear"]["weight"].dtype)).astype(jnp.float32)
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = layer_norm(x, *_norm_params(no, "norm"), eps) * (1 + scale[:, None]) + shift[:, None]
  with jax.named_scope("proj_out"):
    wt = params["proj_out"]["weight"]
    y = linear(x.astype(wt.dtype), wt, params["proj_out"]["bias"])
  y = y.reshape(bsz, f, h // p, w // p, -1, p, p).transpose(0, 1, 4, 2, 5, 3, 6)
  return y.reshape(bsz, f, -1, h, w).astype(hidden.dtype)


def modes_for_precision(config: CogVideoXConfig, precision: str) -> jax.Array:
  """int32[L, 8] with every linear in the given precision ("nvfp4" | "int8" | "bf16")."""
  if precision not in PRECISION_MODES:
    raise UserInputError(f"precision must be one of {tuple(PRECISION_MODES)}, got {precision!r}")
  return jnp.full((config.num_layers, len(LINEAR_NAMES)), PRECISION_MODES[precision], jnp.int32)


def forward(params: dict, latents: jax.Array, timestep: jax.Array, text_emb: jax.Array, *,
            config: CogVideoXConfig, modes=None, outlier_threshold=None,
            implementation: str | None = None, attention_precision: str = "bf16",
            attention_implementation: str | None = None, attention_pv: str | None = None,
            collect_stats: bool = False, return_aux: bool = False):
  """embed -> lax.scan(block) over the stacked layers -> unembed.

  modes: int32[L, 8] (None: all Mode.BF16). attention_precision / attention_pv: as block().
  Returns out [B, F, C_out, H, W] (the residual stream's dtype), or (out, aux) with aux's leaves
  stacked [L, ...] when return_aux.
  """
  if modes is None:
    modes = modes_for_precision(config, "bf16")
  modes = jnp.asarray(modes, jnp.int32)
  if modes.shape != (config.num_layers, len(LINEAR_NAMES)):
    raise UserInputError(f"modes must be int32[{config.num_layers}, {len(LINEAR_NAMES)}], got "
                         f"shape {tuple(modes.shape)}")
  hidden, encoder, temb, rotary = embed(params, latents, timestep, text_emb, config)
  run_block = functools.partial(block, config=config, outlier_threshold=outlier_threshold,
                                collect_stats=collect_stats, implementation=implementation,
                                attention_precision=attention_precision,
                                attention_implementation=attention_implementation,
                                attention_pv=attention_pv)

  def body(carry, xs):
    params_l, modes_l = xs
    h, e, aux = run_block(params_l, carry[0], carry[1], temb, rotary, modes_l)
    return (h, e), aux

  with jax.named_scope("transformer_blocks"):
    (hidden, encoder), aux = jax.lax.scan(body, (hidden, encoder), (params[BLOCKS], modes))
  out = unembed(params, hidden, temb, config, latents.shape)
  return (out, aux) if return_aux else out
