"""Training of the toy text-to-video model: the models/cogvideox transformer in pixel space
(in_channels 3, patch 4) plus the small text encoder of text.py, trained jointly.

Objective: v-prediction on CogVideoX-2B's noise schedule (mpqjax.schedulers: scaled-linear betas,
snr_shift_scale 3, zero terminal SNR), which is exactly what `generate`'s DDIM sampler inverts:
  x_t = sqrt(ac_t) x0 + sqrt(1 - ac_t) eps,   v = sqrt(ac_t) eps - sqrt(1 - ac_t) x0,
t ~ U{0..999}, loss = mean (model(x_t, t, text) - v)^2. Captions are dropped (replaced by the
empty prompt) with probability `cfg_dropout` so classifier-free guidance works.
Optimizer: optax AdamW with linear warm-up then cosine decay, global-norm clipping; an EMA of the
parameters (decay min(ema, (1+n)/(10+n))) is what gets saved.

Batches are rendered on the device inside the jitted step from small spec arrays sampled on the
host (data.sample_specs with a numpy Generator seeded from (seed, step)), so a run is a pure
function of (preset, seed, steps) up to floating-point reduction order of the backend.

  state, log = train(preset_config("cpu-tiny"), steps=3, seed=0)
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.cogvideox import model as cog
from models.cogvideox.config import CogVideoXConfig
from models.cogvideox.params import init_params as init_transformer
from mpqjax import atomic, schedulers
from mpqjax.toyvideo import data, text


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  """Model + training hyper-parameters (model fields end up in the shipped config JSON)."""
  # transformer
  heads: int = 4
  head_dim: int = 32
  layers: int = 4
  time_embed_dim: int = 128
  patch_size: int = 4
  # text encoder
  text_dim: int = 64
  text_heads: int = 4
  max_tokens: int = 8
  # video
  frames: int = data.DEFAULT_SHAPE.frames
  height: int = data.DEFAULT_SHAPE.height
  width: int = data.DEFAULT_SHAPE.width
  # training
  batch: int = 64
  lr: float = 5e-4
  warmup: int = 300
  weight_decay: float = 0.01
  clip: float = 1.0
  ema: float = 0.999
  cfg_dropout: float = 0.1
  scheduler_preset: str = "cogvideox-2b"
  # dtype of the transformer's weights inside the step (the AdamW master copy stays f32):
  # bf16 runs the matmuls in bf16 and attention through cuDNN on GPU
  compute_dtype: str = "float32"

  @property
  def video_shape(self) -> data.VideoShape:
    return data.VideoShape(self.frames, self.height, self.width)

  def transformer_config(self) -> CogVideoXConfig:
    return CogVideoXConfig(
        num_attention_heads=self.heads, attention_head_dim=self.head_dim, in_channels=3,
        out_channels=3, time_embed_dim=self.time_embed_dim, text_embed_dim=self.text_dim,
        num_layers=self.layers, sample_width=self.width, sample_height=self.height,
        sample_frames=self.frames, patch_size=self.patch_size, temporal_compression_ratio=1,
        max_text_seq_length=self.max_tokens, spatial_interpolation_scale=1.0,
        temporal_interpolation_scale=1.0)

  def scheduler_config(self) -> schedulers.SchedulerConfig:
    return schedulers.SchedulerConfig.preset(self.scheduler_preset, kind="ddim")


PRESETS = {
    # the shipped model: stage 1 (f32 compute, 4000 steps), then stage 2 from its EMA weights
    # (bf16 compute, 12400 steps; --init), both on one H200; see docs/MODEL_CARD.md
    "gpu-stage1": ToyConfig(layers=6, batch=128, lr=5e-4),
    "gpu": ToyConfig(layers=6, batch=128, lr=6e-4, compute_dtype="bfloat16"),
    # a few minutes on 2 CPU cores: same architecture family, smaller
    "cpu-tiny": ToyConfig(heads=2, head_dim=32, layers=2, time_embed_dim=64, text_dim=32,
                          batch=8, warmup=20, ema=0.99),
}


def preset_config(name: str) -> ToyConfig:
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
  return PRESETS[name]


def init_params(cfg: ToyConfig, seed: int) -> dict:
  """{"transformer": CogVideoX pytree, "text": encoder pytree}, f32. adaLN-Zero style: the
  blocks' modulation linears, norm_out's modulation and proj_out start at zero, so every block
  starts as the identity and the model's first output is 0 (DiT's initialisation)."""
  tp = init_transformer(cfg.transformer_config(), np.random.default_rng([seed, 1]))
  blocks = tp["transformer_blocks"]
  for n in ("norm1", "norm2"):
    blocks[n]["linear"] = jax.tree.map(jnp.zeros_like, blocks[n]["linear"])
  tp["norm_out"]["linear"] = jax.tree.map(jnp.zeros_like, tp["norm_out"]["linear"])
  tp["proj_out"] = jax.tree.map(jnp.zeros_like, tp["proj_out"])
  for n in ("norm_q", "norm_k"):  # plain LayerNorm init for the qk norms
    blocks["attn1"][n] = {"weight": jnp.ones_like(blocks["attn1"][n]["weight"]),
                          "bias": jnp.zeros_like(blocks["attn1"][n]["bias"])}
  xp = text.init_params(jax.random.key(seed), dim=cfg.text_dim, max_tokens=cfg.max_tokens)
  return {"transformer": tp, "text": xp}


def caption_ids(specs: dict, max_tokens: int) -> np.ndarray:
  """int32[n, max_tokens]: the token ids of data.captions(specs), built without strings."""
  n = len(specs["color"])
  w = text.WORD_ID
  cols = [np.full(n, w["a"])]
  size_ids = np.array([w[s] for s in data.SIZE_NAMES])[specs["size"]]
  cols += [np.where(specs["say_size"], size_ids, -1),
           np.array([w[c] for c in data.COLOR_NAMES])[specs["color"]],
           np.array([w[s] for s in data.SHAPES])[specs["shape"]], np.full(n, w["moving"]),
           np.array([w[d] for d in data.DIRECTION_NAMES])[specs["direction"]]]
  words = np.stack(cols, 1)
  ids = np.zeros((n, max_tokens), np.int32)
  for i in range(n):  # drop the absent size word, left-align
    row = words[i][words[i] >= 0]
    ids[i, :len(row)] = row
  return ids


def to_model_layout(video) -> jax.Array:
  """[B, F, H, W, 3] in [0, 1] -> [B, F, 3, H, W] in [-1, 1] (the transformer's latents)."""
  return jnp.transpose(video, (0, 1, 4, 2, 3)) * 2.0 - 1.0


def to_pixels(latents) -> np.ndarray:
  """[B, F, 3, H, W] in [-1, 1] -> uint8 [B, F, H, W, 3]."""
  x = np.clip((np.asarray(latents, np.float32) + 1.0) * 127.5 + 0.5, 0, 255)
  return np.transpose(x, (0, 1, 3, 4, 2)).astype(np.uint8)


def learning_rate(cfg: ToyConfig, step: int, steps: int) -> float:
  """Linear warm-up to cfg.lr, then cosine decay to 0.1 lr at `steps` (host side, so the
  compiled step does not depend on the run length)."""
  warm = min(cfg.warmup, max(steps // 2, 1))
  if step < warm:
    return cfg.lr * (step + 1) / warm
  frac = min((step - warm) / max(steps - warm, 1), 1.0)
  return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def make_optimizer(cfg: ToyConfig) -> optax.GradientTransformation:
  """Global-norm clipping + AdamW whose learning rate is fed per step (inject_hyperparams)."""
  return optax.chain(optax.clip_by_global_norm(cfg.clip),
                     optax.inject_hyperparams(optax.adamw)(
                         learning_rate=cfg.lr, b1=0.9, b2=0.99, weight_decay=cfg.weight_decay))


def batch_inputs(cfg: ToyConfig, seed: int, step: int) -> dict:
  """Host side of one batch: spec arrays + token ids (caption dropout applied), all numpy."""
  rng = np.random.default_rng([seed, step])
  specs = data.sample_specs(rng, cfg.batch, cfg.video_shape)
  ids = caption_ids(specs, cfg.max_tokens)
  ids[rng.random(cfg.batch) < cfg.cfg_dropout] = 0  # the empty prompt
  specs = {k: v for k, v in specs.items() if k != "say_size"}
  return {"specs": specs, "ids": ids}


def model_apply(params: dict, cfg: ToyConfig, x, t, ids):
  emb = text.encode(params["text"], ids, heads=cfg.text_heads)
  tp = params["transformer"]
  if cfg.compute_dtype != "float32":
    tp = jax.tree.map(lambda a: a.astype(cfg.compute_dtype), tp)
  return cog.forward(tp, x, t, emb, config=cfg.transformer_config())


def loss_fn(params, cfg: ToyConfig, ac: jax.Array, batch: dict, key):
  x0 = to_model_layout(data.render(batch["specs"], cfg.video_shape, xp=jnp))
  k_t, k_n = jax.random.split(key)
  t = jax.random.randint(k_t, (x0.shape[0],), 0, ac.shape[0])
  eps = jax.random.normal(k_n, x0.shape, jnp.float32)
  a = ac[t][:, None, None, None, None]
  xt = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps
  v = jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0
  pred = model_apply(params, cfg, xt, t, batch["ids"])
  return jnp.mean(jnp.square(pred.astype(jnp.float32) - v))


@dataclasses.dataclass
class TrainState:
  step: int
  params: Any
  ema: Any
  opt_state: Any


@functools.lru_cache(maxsize=8)
def make_step(cfg: ToyConfig) -> Callable:
  """The jitted step: (params, ema, opt_state, batch, key, n, lr) -> (params, ema, opt_state,
  loss, grad_norm)."""
  ac = jnp.asarray(schedulers.alphas_cumprod(cfg.scheduler_config()), jnp.float32)
  optimizer = make_optimizer(cfg)

  @jax.jit
  def step_fn(params, ema, opt_state, batch, key, n, lr):
    loss, grads = jax.value_and_grad(loss_fn)(params, cfg, ac, batch, key)
    opt_state[1].hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    d = jnp.minimum(cfg.ema, (1.0 + n) / (10.0 + n))
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
    return params, ema, opt_state, loss, optax.tree.norm(grads)
  return step_fn


def hardware() -> dict:
  dev = jax.devices()[0]
  return {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
          "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
          "platform": platform.platform(), "jax": jax.__version__}


def train(cfg: ToyConfig, steps: int, seed: int = 0, *, log_every: int = 50,
          checkpoint_every: int = 0, on_checkpoint: Callable[[TrainState, dict], None] | None = None,
          time_limit_s: float | None = None, state: TrainState | None = None,
          print_fn=print, init: dict | None = None) -> tuple[TrainState, dict]:
  """Train for `steps` steps (or until time_limit_s). Returns (final state, log dict with the
  loss curve (the mean loss of each log interval), wall times, hardware). on_checkpoint(state, log) is called every
  checkpoint_every steps and at the end. init: starting parameters (default: init_params)."""
  optimizer = make_optimizer(cfg)
  key = jax.random.key(seed)
  if state is None:
    params = init_params(cfg, seed) if init is None else jax.tree.map(jnp.asarray, init)
    state = TrainState(0, params, jax.tree.map(jnp.array, params), optimizer.init(params))
  step_fn = make_step(cfg)
  log = {"config": dataclasses.asdict(cfg), "seed": seed, "steps_planned": steps,
         "hardware": hardware(), "loss_steps": [], "loss": [], "grad_norm": [],
         "wall_s": [], "compile_s": None}
  t0 = time.perf_counter()
  params, ema, opt_state = state.params, state.ema, state.opt_state
  n = state.step
  loss_sum, loss_count = jnp.float32(0), 0  # mean over the log interval, summed on the device
  while n < steps:
    batch = batch_inputs(cfg, seed, n)
    params, ema, opt_state, loss, gnorm = step_fn(params, ema, opt_state, batch,
                                                  jax.random.fold_in(key, n + 1), n,
                                                  learning_rate(cfg, n, steps))
    n += 1
    loss_sum, loss_count = loss_sum + loss, loss_count + 1
    if log["compile_s"] is None:
      loss.block_until_ready()
      log["compile_s"] = time.perf_counter() - t0
    if n % log_every == 0 or n == steps or n == 1:
      lv = float(loss_sum) / loss_count
      loss_sum, loss_count = jnp.float32(0), 0
      if not math.isfinite(lv):
        raise FloatingPointError(f"loss became {lv} at step {n}")
      log["loss_steps"].append(n)
      log["loss"].append(lv)
      log["grad_norm"].append(float(gnorm))
      log["wall_s"].append(time.perf_counter() - t0)
      print_fn(f"step {n}/{steps} loss {lv:.4f} |g| {float(gnorm):.3f} "
               f"{time.perf_counter() - t0:.1f}s")
    state = TrainState(n, params, ema, opt_state)
    out_of_time = time_limit_s is not None and time.perf_counter() - t0 > time_limit_s
    if on_checkpoint and ((checkpoint_every and n % checkpoint_every == 0) or n == steps
                          or out_of_time):
      log["steps_done"] = n
      log["train_s"] = time.perf_counter() - t0
      on_checkpoint(state, log)
    if out_of_time:
      print_fn(f"time limit reached after {n} steps")
      break
  log["steps_done"] = n
  log["train_s"] = time.perf_counter() - t0
  return TrainState(n, params, ema, opt_state), log


# ---------------------------------------------------------------------------------------------
# Saving: one safetensors file ("transformer.<diffusers name>" with blocks stacked [L, ...] as in
# models/cogvideox/params.py, and "text.<name>") + a JSON config.

def flatten_params(params: dict) -> dict[str, np.ndarray]:
  out = {}

  def rec(tree, prefix):
    for k, v in tree.items():
      if isinstance(v, dict):
        rec(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = np.asarray(v, np.float32)
  rec(params, "")
  return out


def model_json(cfg: ToyConfig, log: dict | None = None) -> dict:
  return {
      "format": "mpqjax-toyvideo", "version": 1,
      "transformer": cfg.transformer_config().to_dict(),
      "text_encoder": {"dim": cfg.text_dim, "heads": cfg.text_heads,
                       "max_tokens": cfg.max_tokens, "vocab": list(text.VOCAB)},
      "video": {"frames": cfg.frames, "height": cfg.height, "width": cfg.width,
                "channels_last_range": [0.0, 1.0], "model_range": [-1.0, 1.0]},
      "scheduler": cfg.scheduler_config().to_dict(),
      "train_config": dataclasses.asdict(cfg),
      "training": None if log is None else {
          k: log.get(k) for k in ("seed", "steps_done", "train_s", "compile_s", "hardware")}
      | {"final_loss": (log["loss"][-1] if log and log.get("loss") else None)},
  }


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
  atomic.atomic_write(path, write, mode=0o644)  # these files ship in the package


def save_model(out_dir: str, params: dict, cfg: ToyConfig, log: dict | None = None,
               name: str = "toyvideo") -> tuple[str, str]:
  """Write out_dir/{name}.safetensors (f32) and out_dir/{name}.json, each atomically."""
  from safetensors.numpy import save_file
  st = os.path.join(out_dir, f"{name}.safetensors")
  js = os.path.join(out_dir, f"{name}.json")
  _atomic_write(st, lambda p: save_file(flatten_params(params), p))

  atomic.write_json(js, model_json(cfg, log), mode=0o644)
  return st, js


def save_log(path: str, log: dict) -> None:
  atomic.write_json(path, log, mode=0o644)


def plot_loss_stages(path: str, logs: list[dict],
                     title: str = "toy text-to-video: training loss") -> None:
  """Several runs, each continuing from the previous one's weights, on one step axis."""
  merged = {"loss_steps": [], "loss": [], "train_s": sum(l["train_s"] for l in logs),
            "hardware": logs[-1].get("hardware", {})}
  offset = 0
  for l in logs:
    merged["loss_steps"] += [offset + s for s in l["loss_steps"]]
    merged["loss"] += l["loss"]
    offset += l["steps_done"]
  plot_loss(path, merged, title + f" ({len(logs)} stages)", marks=[
      sum(l["steps_done"] for l in logs[:i]) for i in range(1, len(logs))])


def plot_loss(path: str, log: dict, title: str = "toy text-to-video: training loss",
              marks=()) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
  ax.plot(log["loss_steps"], log["loss"], lw=1)
  for m in marks:  # stage boundaries
    ax.axvline(m, color="gray", ls="--", lw=0.8)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("v-prediction MSE")
  hw = log.get("hardware", {})
  ax.set_title(f"{title}\n{hw.get('device', '?')}, {log.get('train_s', 0):.0f} s", fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  _atomic_write(path, lambda p: fig.savefig(p, format="png"))
  plt.close(fig)
