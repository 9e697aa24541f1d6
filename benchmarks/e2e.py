"""End to end on one GPU: CogVideoX-2B and 5B (every block) through mpqjax's jitted generate
(one lax.scan over the DDIM steps) in each precision, against diffusers' PyTorch
CogVideoXTransformer3DModel in bf16 at the same shapes, in the same run.

  # 1. on the CPU, once: the demo model's skip ratio and mode mix (drives the GPU schedule)
  python benchmarks/e2e.py demo-schedule --out benchmarks/results/e2e-demo-schedule.json
  # 2. on the GPU machine (diffusers carried as a wheel, see RESULTS.md):
  python benchmarks/e2e.py run --presets cogvideox-2b,cogvideox-5b --out DIR
  # tiny CPU check of the whole harness:
  python benchmarks/e2e.py run --presets cogvideox-2b --layers 2 --heads 2 --latent-shape 3,8,8 \
      --text-tokens 8 --steps 6 --short-steps 3 --out /tmp/e2e

Processes: diffusers, mpqjax bf16 and the quantized modes each run in a fresh subprocess, so
JAX's peak device memory (memory_stats "peak_bytes_in_use", which cannot be reset) belongs to one
weight set. Within the quantized process the no-TDC modes (nvfp4, int8, mixed, w4a16) are ONE
compiled program (the precision is a knob array, mpqjax.generate) and run first; mixed+TDC, whose
program also holds the TDC cache, runs after them. Each compiled program's memory analysis
(arguments + outputs + temporaries) is recorded too, which does not depend on the order.

Weights are random (models.cogvideox.params.init_params' distributions, drawn on the device) in
the real dtype layout: bf16 for the baseline, NVFP4 block linears (codes, e4m3 scales, f32
per-channel INT8 scale and bias) plus bf16 elsewhere for the quantized modes. Random weights make
the DMPQ predictor's and TDC's decisions meaningless, so the schedule is fixed and stated:
  * mixed: a calibration with α = 0 and β = ±1, τ = 0 sends, for each linear name, the share of
    blocks to INT8 that the demo model's predictor sent there (the rest NVFP4). The demo's BF16
    decisions (its outlier rule) count as INT8: per linear, only INT8/NVFP4 can be fixed. The
    run-time rules stay live (INT8 at the first step and after a skip, BF16 above the outlier
    ratio 25 of the random-weight activations).
  * TDC: τ_tdc = B = 1e9 (always stable), warm-up W and N_max chosen so that every block skips
    the number of steps that gives the demo model's skip ratio (skip, compute, skip, ... from
    step W to S − 2 with N_max = 1; skip, skip, compute, ... with N_max = 2 above ~48%). The
    demo numbers come from `demo-schedule` (the shipped toy model with its shipped
    calibration and generate's defaults, on the CPU).
Timing: compile time is the trace + lowering + XLA compile of a program's first call
(jax.monitoring). A --steps run (bf16 and mixed+TDC at 50 steps) is the first call of its
program: its latency is that call's wall time minus its compile time (generate returns host
arrays, so the device work is complete; the short program ran before it in the same process, so
libraries and kernels are warm). The no-TDC modes run at --short-steps as ONE compiled program
and are timed as that program alone (one more warm execution of the jitted generate with the
same arguments), which keeps generate's per-call host work (~0.1 s) out of short runs.
Per step = latency / steps. Peak memory: JAX's peak_bytes_in_use of the mode's process and each
compiled program's memory analysis (arguments, outputs, temporaries); diffusers:
torch.cuda.max_memory_allocated after the model is built.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

def routed_names() -> tuple[str, ...]:
  """The block linears the DMPQ predictor routes (all but the modulation linears)."""
  from models.cogvideox.params import LINEAR_NAMES, MODULATION_LINEARS
  return tuple(n for i, n in enumerate(LINEAR_NAMES) if i not in MODULATION_LINEARS)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: str, obj) -> None:
  from mpqjax import atomic  # here: the parent process does not import jax
  atomic.write_json(path, obj, default=float)


# ---------------------------------------------------------------------------------------------
# 1. The demo model's schedule (CPU)
# ---------------------------------------------------------------------------------------------

def schedule_stats(computed, modes) -> dict:
  """Skip ratio and mode shares of one generate run's stats.

  computed bool[S, L]; modes int[S, L, 8] (-1 for skipped blocks). A decision is "fresh" when
  the block also computed at the previous step (the predictor had a Γ); the others (first step,
  right after a skip) are forced to INT8 by the method. Returns counts per routed linear name
  of the fresh decisions by mode, the number of forced decisions, and the skip ratio."""
  import numpy as np

  from models.cogvideox.params import LINEAR_NAMES
  from mpqjax.qlinear import Mode
  computed = np.asarray(computed, bool)
  modes = np.asarray(modes)
  fresh = np.zeros_like(computed)
  fresh[1:] = computed[1:] & computed[:-1]
  out = {"skip_ratio": float(1 - computed.mean()), "skips_per_block": (~computed).sum(0).tolist(),
         "fresh": {}, "forced_decisions": int((computed & ~fresh).sum()) * len(routed_names())}
  for name in routed_names():
    m = modes[..., LINEAR_NAMES.index(name)][fresh]
    out["fresh"][name] = {mode.name.lower(): int((m == int(mode)).sum()) for mode in Mode}
  return out


# TDC settings timed besides generate's defaults: the previous default (τ_tdc 0.05, B 0.1)
DEMO_TDC_SETTINGS = {"tau_tdc=0.05 B=0.1": {"tdc_threshold": 0.05, "tdc_error_bound": 0.1}}


def demo_schedule(args) -> int:
  """Run the shipped toy model (mixed+TDC with its calibration: generate's defaults and the
  DEMO_TDC_SETTINGS alternatives) on prompts and record skip ratio and mode mix."""
  import jax
  import numpy as np

  from mpqjax.generate import generate
  from mpqjax.toyvideo import weights
  sys.path.insert(0, HERE)
  from quality import eval_prompts  # the quality benchmark's prompts and seeds
  model = weights.load(quantize="nvfp4")
  calib = model.calibration()
  settings = {"default": {}, **DEMO_TDC_SETTINGS}
  out = {"benchmark": "e2e-demo-schedule", "date": _now(), "device": jax.devices()[0].device_kind,
         "jax_version": jax.__version__,
         "command": " ".join(["python", os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
         "model": "mpqjax/toyvideo (shipped), its calibration.json", "steps": args.steps,
         "prompts": [p for p, _ in eval_prompts(args.prompts)], "settings": {}}
  for name, extra in settings.items():
    runs = []
    for prompt, seed in eval_prompts(args.prompts):
      pos, neg = model.encode([prompt])
      r = generate(model, pos[0], negative_emb=neg[0], seed=seed, steps=args.steps,
                   scheduler=model.scheduler_config(), precision="mixed", calibration=calib,
                   tdc=True, **extra)
      runs.append(schedule_stats(r.stats["computed"], r.stats["modes"]))
      runs[-1]["avg_activation_bits"] = r.summary["avg_activation_bits"]
    fresh = {n: {m: sum(r["fresh"][n][m] for r in runs) for m in runs[0]["fresh"][n]}
             for n in routed_names()}
    agg = {"tdc_knobs": extra or "generate defaults", "skip_ratio": float(np.mean(
        [r["skip_ratio"] for r in runs])), "avg_activation_bits": float(np.mean(
        [r["avg_activation_bits"] for r in runs])), "fresh_mode_counts": fresh,
           "int8_share_of_fresh": {n: c["int8"] / max(1, sum(c.values())) for n, c in fresh.items()},
           "bf16_share_of_fresh": {n: c["bf16"] / max(1, sum(c.values())) for n, c in fresh.items()},
           "per_prompt": runs}
    out["settings"][name] = agg
    print(f"{name}: skip ratio {agg['skip_ratio']:.4f}, bits {agg['avg_activation_bits']:.2f}, "
          f"int8 share {agg['int8_share_of_fresh']}, bf16 share {agg['bf16_share_of_fresh']}",
          flush=True)
  _write_json(args.out, out)
  print(f"wrote {args.out}")
  return 0


# ---------------------------------------------------------------------------------------------
# 2. The mpqjax side (one subprocess per group of modes)
# ---------------------------------------------------------------------------------------------

def model_config(preset: str, layers: int | None, heads: int | None, text_tokens: int | None):
  """The preset's config with optional tiny overrides (for CPU checks of the harness)."""
  from models.cogvideox.config import PRESETS
  cfg = PRESETS[preset]
  kw = {}
  if layers:
    kw["num_layers"] = layers
  if heads:
    kw["num_attention_heads"] = heads
  if text_tokens:
    kw["max_text_seq_length"] = text_tokens
  return cfg.replace(**kw) if kw else cfg


def _device_rng(seed: int):
  """A numpy Generator whose standard_normal draws on the default JAX device: init_params then
  builds its usual distributions from device arrays (numpy would take minutes for 5B)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  class DeviceNormal(np.random.Generator):
    def __init__(self):
      super().__init__(np.random.PCG64(seed))
      self._key, self._n = jax.random.key(seed), 0

    def standard_normal(self, size=None, dtype=np.float32, out=None):
      self._n += 1
      return jax.random.normal(jax.random.fold_in(self._key, self._n), size, jnp.float32)

  return DeviceNormal()


def build_params(cfg, *, quantized: bool, seed: int = 0) -> dict:
  """Random CogVideoX parameters in the real dtype layout (bf16; block linears NVFP4 when
  quantized), built one block at a time on the device and staged through host memory, so the
  device never holds more than the final weights plus one block in flight (this keeps JAX's
  peak-memory counter, which cannot be reset, meaningful for the generate call that follows)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from models.cogvideox.params import BLOCKS, init_params, quantize_blocks
  one = cfg.replace(num_layers=1)
  outer, blocks, t0 = None, [], time.perf_counter()
  for layer in range(cfg.num_layers):
    p = init_params(one, _device_rng(seed * 1000 + layer), dtype=jnp.bfloat16)
    if quantized:
      p = quantize_blocks(p)
    if outer is None:
      outer = {k: v for k, v in p.items() if k != BLOCKS}
    blocks.append(jax.device_get(p[BLOCKS]))
    del p
    if layer in (0, cfg.num_layers - 1):
      print(f"  built block {layer + 1}/{cfg.num_layers} ({time.perf_counter() - t0:.1f} s)",
            flush=True)
  stacked = jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *blocks)
  del blocks
  return {**outer, BLOCKS: jax.device_put(stacked)}


def schedule_calibration(cfg, int8_share: dict):
  """A Calibration that fixes the predictor's choice per (block, linear): α = 0, β = +1 (INT8)
  or −1 (NVFP4), τ = 0. For each routed linear name, round(share · L) blocks, evenly spread,
  get INT8."""
  import numpy as np

  from models.cogvideox.params import LINEAR_NAMES
  from mpqjax.method.calibration import Calibration, model_signature
  L, n = cfg.num_layers, len(LINEAR_NAMES)
  beta = np.full((L, n), np.nan)
  for name, share in int8_share.items():
    j = LINEAR_NAMES.index(name)
    k = int(round(share * L))
    beta[:, j] = -1.0
    if k:
      beta[np.floor((np.arange(k) + 0.5) * L / k).astype(int), j] = 1.0
  alpha = np.where(np.isnan(beta), np.nan, 0.0)
  return Calibration(model=model_signature(cfg, LINEAR_NAMES), alpha=alpha, beta=beta, tau=0.0,
                     target_bits=float("nan"), pearson_r=np.full((L, n), np.nan),
                     pearson_r_overall=float("nan"),
                     extra={"note": "fixed schedule for timing on random weights (e2e.py)"})


def planned_skips(steps: int, warmup: int, max_skips: int) -> int:
  """Skips per block under mpqjax.method.tdc's rule when every delta is stable: from step
  `warmup` to steps − 2, at most `max_skips` in a row (then one computation)."""
  skips, run = 0, 0
  for i in range(steps):
    if warmup <= i < steps - 1 and run < max_skips:
      skips, run = skips + 1, run + 1
    else:
      run = 0
  return skips


def tdc_schedule(skip_ratio: float, steps: int) -> dict:
  """generate kwargs that make every block skip k = round(skip_ratio · steps) steps (≥ 1 when
  the ratio is > 0): always-stable TDC (τ_tdc = B = 1e9) with N_max = 1 (skip, compute, ...)
  while k fits in that pattern, else N_max = 2 (skip, skip, compute, ...), and the latest
  warm-up W that gives k skips before the last step. k is capped at what N_max = 2 allows."""
  k = max(1, int(round(skip_ratio * steps))) if skip_ratio > 0 else 0
  stable = {"tdc": True, "tdc_threshold": 1e9, "tdc_error_bound": 1e9}
  if k == 0:
    return {**stable, "tdc_max_skips": 1, "tdc_warmup": steps, "skips_per_block": 0}
  k = min(k, planned_skips(steps, 1, 2))  # step 0 always computes (no delta yet)
  for n_max in (1, 2):
    for w in range(steps - 1, 0, -1):
      if planned_skips(steps, w, n_max) == k:
        return {**stable, "tdc_max_skips": n_max, "tdc_warmup": w, "skips_per_block": k}
  raise AssertionError(f"no schedule for {k} skips in {steps} steps")


class CompileClock:
  """Sums JAX's trace / lowering / XLA compile durations (jax.monitoring) between resets."""

  EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    import jax
    self.total = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on)

  def _on(self, name, seconds, **_):
    if name in self.EVENTS:
      self.total += seconds

  def take(self) -> float:
    t, self.total = self.total, 0.0
    return t


def _env() -> dict:
  import jax
  return {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
          "jax_version": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _memory() -> dict:
  import jax
  s = jax.devices()[0].memory_stats() or {}
  return {k: s.get(k) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}


def load_demo_schedule(path: str, steps: int) -> dict:
  """{'mixed': int8 shares per routed linear, 'tdc': {name: (skip ratio, kwargs)}} from the
  demo-schedule JSON. The demo's BF16 decisions (its outlier rule) count as INT8 here."""
  with open(path) as f:
    d = json.load(f)
  default = d["settings"]["default"]
  counts = default["fresh_mode_counts"]
  share = {n: (c["int8"] + c["bf16"]) / max(1, sum(c.values())) for n, c in counts.items()}
  tdc = {"mixed+tdc" if name == "default" else f"mixed+tdc({name})":
         (v["skip_ratio"], tdc_schedule(v["skip_ratio"], steps))
         for name, v in d["settings"].items()}
  return {"int8_share": share, "tdc": tdc, "source": os.path.relpath(path, ROOT),
          "demo_avg_bits": default["avg_activation_bits"]}


def worker(args) -> int:
  """One group of modes in this (fresh) process; writes its results JSON to args.json."""
  import types

  import jax
  import numpy as np

  from mpqjax import generate as G
  clock = CompileClock()
  cfg = model_config(args.preset, args.layers, args.heads, args.text_tokens)
  shape = tuple(int(v) for v in args.latent_shape.split(","))
  sched = load_demo_schedule(args.demo_schedule, args.steps)
  t0 = time.perf_counter()
  params = build_params(cfg, quantized=args.group != "bf16")
  jax.block_until_ready(params)
  setup_s = time.perf_counter() - t0
  clock.take()
  mem_setup = _memory()
  text = np.random.default_rng(1).standard_normal(
      (cfg.max_text_seq_length, cfg.text_embed_dim)).astype(np.float32)
  model = types.SimpleNamespace(config=cfg, params=params)
  calib = schedule_calibration(cfg, sched["int8_share"])
  out = {"group": args.group, "env": _env(), "setup_seconds": setup_s,
         "memory_after_setup": mem_setup, "modes": {}}

  programs = {}

  def call(steps, program_time=False, **kw):
    """generate(...) -> (result, wall s, compile s, program memory); with program_time, the
    result also gets .program_seconds: one more execution of exactly the compiled program
    (no host-side wrapper work), which short runs need to keep that overhead out."""
    from mpqjax.profiling import capture_call
    t = time.perf_counter()
    with capture_call() as seen:
      r = G.generate(model, text, latent_shape=shape, steps=steps, seed=0,
                     implementation=args.implementation, **kw)
    wall = time.perf_counter() - t
    compile_s = clock.take()
    if program_time:
      t = time.perf_counter()
      jax.block_until_ready(G.generate_latents(*seen["args"], **seen["kwargs"]))
      r.program_seconds = time.perf_counter() - t
      if clock.take() > 0:
        raise RuntimeError("the program timing recompiled: the timing would include it")
    key = (steps, bool(kw.get("tdc")), kw.get("tdc_cache", "bf16"),
           kw.get("attention_precision", "bf16"))
    if key not in programs:  # the compiled program's own buffers, independent of run order
      ma = G.generate_latents.lower(*seen["args"], **seen["kwargs"]).compile().memory_analysis()
      programs[key] = {f: getattr(ma, f, None) for f in (
          "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
          "alias_size_in_bytes", "generated_code_size_in_bytes")} if ma is not None else None
      clock.take()
    return r, wall, compile_s, programs[key]

  def record(name, steps, r, wall, compile_s, program, first_call, extra=None):
    s = r.summary
    latency = wall - compile_s if first_call else wall
    prog = getattr(r, "program_seconds", None)
    row = {"steps": steps, "seconds": latency,
           "seconds_per_step": (prog if prog is not None else latency) / steps,
           "program_seconds": prog,
           "timing": ("compiled program alone, warm" if prog is not None else
                      "first call minus its compile time" if first_call else "warm call"),
           "compile_seconds": compile_s if first_call else None,
           "skip_ratio": s["skip_ratio"], "avg_activation_bits": s["avg_activation_bits"],
           "mode_counts": s["linear_mode_counts"], "tdc_cache_bytes": s["tdc_cache_bytes"],
           "state_bytes": s["state_bytes"], "weight_bytes": s["weight_bytes"],
           "weight_bytes_bf16": s["weight_bytes_bf16"],
           "block_linear_weight_bits": s["block_linear_weight_bits"],
           "memory": _memory(), "program_memory": program,
           "finite": bool(np.isfinite(r.latents).all()), **(extra or {})}
    out["modes"][name] = row
    print(f"[{args.preset}] {name:24s} {row['seconds_per_step'] * 1e3:9.1f} ms/step over {steps} "
          f"steps ({row['timing']}), compile {compile_s:6.1f} s, skip {s['skip_ratio']:.3f}, "
          f"peak {(row['memory']['peak_bytes_in_use'] or 0) / 2**30:.2f} GiB", flush=True)
    _write_json(args.json, out)

  def profile(name, steps, warmup=False, exact=True, **kw):
    """A jax.profiler trace of `steps` steps (after a warm-up call) and its breakdown."""
    from mpqjax import profiling
    t = time.perf_counter()
    trace_dir = os.path.join(args.trace_dir, f"{args.preset}-{args.group}-{name}")
    try:
      rep = profiling.profile_generate(model, text, trace_dir, steps=steps, latent_shape=shape,
                                       seed=0, implementation=args.implementation,
                                       warmup=warmup, exact_attribution=exact, **kw)
    except Exception as e:  # a profiling failure must not cost the timings that follow
      import traceback
      traceback.print_exc()
      out.setdefault("profiles", {})[name] = {"error": repr(e)}
      _write_json(args.json, out)
      return
    rep["compile_seconds"] = clock.take()
    rep["wall_seconds"] = time.perf_counter() - t
    out.setdefault("profiles", {})[name] = rep
    print(f"[{args.preset}] profile {name}:\n{profiling.format_report(rep)}", flush=True)
    _write_json(args.json, out)

  # Order in both groups: the short program first (it also warms the libraries and kernels up),
  # then the --steps run (a first call of its program: its compile time is subtracted), then
  # the extras. Each program's own memory comes from its compiled memory analysis.
  if args.group == "bf16":
    if args.short_steps and args.bf16_short:
      r, wall0, c, prog = call(args.short_steps, precision="bf16", tdc=False)
      out["short_compile_seconds"] = c
      r, wall, c2, prog = call(args.short_steps, True, precision="bf16", tdc=False)
      record("bf16@short", args.short_steps, r, wall, c2, prog, False)
      # what a program's first run costs beyond its compile (code loading, first launches)
      out["first_call_overhead_seconds"] = wall0 - c - wall
    r, wall, c, prog = call(args.steps, precision="bf16", tdc=False)
    record("bf16", args.steps, r, wall, c, prog, True)
    if args.int8_attention:  # its own program: the attention precision is static
      r, wall, c, prog = call(args.steps, precision="bf16", tdc=False, attention_precision="int8")
      record("bf16 (int8 attention)", args.steps, r, wall, c, prog, True,
             {"attention_precision": "int8"})
    if args.profile and args.short_steps and args.bf16_short:
      profile("bf16", args.short_steps, exact=False, precision="bf16", tdc=False)
    return 0

  def tdc_run(name, first, label=None, **extra):
    ratio, kw = sched["tdc"][name]
    kw = dict(kw)
    k = kw.pop("skips_per_block")
    r, wall, c, prog = call(args.steps, precision="mixed", calibration=calib, **kw, **extra)
    record(label or name, args.steps, r, wall, c, prog, first,
           {"demo_skip_ratio": ratio, "schedule": {**kw, "skips_per_block": k}, **extra})

  # the no-TDC modes are ONE compiled program (precision is a knob array)
  short = [("nvfp4", dict(precision="nvfp4")), ("int8", dict(precision="int8")),
           ("mixed", dict(precision="mixed", calibration=calib)),
           ("w4a16", dict(precision="bf16"))]
  short = [m for m in short if m[0] in args.short_modes.split(",")]
  if args.group == "flags":
    short = [m for m in short if m[0] == "mixed"]
  if args.group == "quant" and args.tdc_first:  # under a tight deadline: the bar's mode first
    tdc_run("mixed+tdc", True)
  if args.short_steps and short:
    r, wall0, c0, prog = call(args.short_steps, tdc=False, **short[0][1])  # compile + first run
    out["short_compile_seconds"] = c0
    for i, (name, kw) in enumerate(short):
      r, wall, c, prog = call(args.short_steps, True, tdc=False, **kw)
      record(name, args.short_steps, r, wall, c, prog, False, {"shares_compiled_program": True})
      if i == 0:
        out["first_call_overhead_seconds"] = wall0 - c0 - wall
  if args.group == "quant" and not args.tdc_first:
    tdc_run("mixed+tdc", True)
  if args.profile and args.short_steps and any(m[0] == "mixed" for m in short):
    profile("mixed", args.short_steps, precision="mixed", calibration=calib, tdc=False)
  if args.group == "quant" and args.all_tdc:
    for name in sched["tdc"]:
      if name != "mixed+tdc":
        tdc_run(name, False)
  if args.group == "quant" and args.int8_cache:  # its own program: the cache's dtype is static
    tdc_run("mixed+tdc", True, label="mixed+tdc (int8 cache)", tdc_cache="int8")
  if args.group == "quant" and args.int8_attention:
    tdc_run("mixed+tdc", True, label="mixed+tdc (int8 attention)", attention_precision="int8")
  if args.profile_tdc and args.short_steps and args.group == "quant":  # every block skips once
    profile("mixed+tdc", args.short_steps, warmup=True, precision="mixed", calibration=calib,
            **{k: v for k, v in tdc_schedule(1 / args.short_steps, args.short_steps).items()
               if k != "skips_per_block"})
  return 0


# ---------------------------------------------------------------------------------------------
# 3. diffusers (PyTorch) at the same shapes
# ---------------------------------------------------------------------------------------------

def diffusers_worker(args) -> int:
  """diffusers' CogVideoXTransformer3DModel in bf16 (random init on the GPU), one forward with
  the CFG batch of 2 per denoising step: median of CUDA-event timings after warm-up."""
  import dataclasses
  # benchmarks/kernels.py would shadow the `kernels` package diffusers probes for
  sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

  import diffusers
  import numpy as np
  import torch
  from diffusers import CogVideoXTransformer3DModel

  from models.cogvideox import embeddings
  cfg = model_config(args.preset, args.layers, args.heads, args.text_tokens)
  f, h, w = (int(v) for v in args.latent_shape.split(","))
  cuda = torch.cuda.is_available()
  dev = torch.device("cuda" if cuda else "cpu")  # the CPU only for checks of this harness
  torch.manual_seed(0)
  torch.set_default_dtype(torch.bfloat16)  # parameters are created in bf16, on the GPU
  t0 = time.perf_counter()
  with dev:
    model = CogVideoXTransformer3DModel(**{x.name: getattr(cfg, x.name)
                                           for x in dataclasses.fields(cfg)}).eval()
  torch.set_default_dtype(torch.float32)
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  sync()
  setup_s = time.perf_counter() - t0
  weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
  g = torch.Generator(device=dev).manual_seed(1)
  x = torch.randn((2, f, cfg.in_channels, h, w), generator=g, device=dev, dtype=torch.bfloat16)
  txt = torch.randn((2, cfg.max_text_seq_length, cfg.text_embed_dim), generator=g, device=dev,
                    dtype=torch.bfloat16)
  t = torch.full((2,), 999, device=dev, dtype=torch.long)
  rope = None
  if cfg.use_rotary_positional_embeddings:
    cos, sin = embeddings.rotary_3d(cfg, f, h, w)
    rope = (torch.from_numpy(cos).to(dev), torch.from_numpy(sin).to(dev))
  if cuda:
    torch.cuda.reset_peak_memory_stats()
  resident = torch.cuda.memory_allocated() if cuda else None

  def step():
    return model(hidden_states=x, encoder_hidden_states=txt, timestep=t, image_rotary_emb=rope,
                 return_dict=False)[0]

  times = []
  with torch.inference_mode():
    for _ in range(args.warmup):
      y = step()
    for _ in range(args.reps):
      if cuda:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y = step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
      else:
        t1 = time.perf_counter()
        y = step()
        times.append(time.perf_counter() - t1)
  out = {"diffusers_version": diffusers.__version__, "torch_version": torch.__version__,
         "device": torch.cuda.get_device_name() if cuda else "cpu", "setup_seconds": setup_s,
         "seconds_per_step_median": float(np.median(times)), "seconds_per_step_all": times,
         "warmup": args.warmup, "reps": args.reps, "weight_bytes": weight_bytes,
         "memory_allocated_after_setup": resident,
         "max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else None,
         "max_memory_reserved": torch.cuda.max_memory_reserved() if cuda else None,
         "finite": bool(torch.isfinite(y).all()), "output_shape": list(y.shape)}
  print(f"[{args.preset}] diffusers bf16 {out['seconds_per_step_median'] * 1e3:9.1f} ms/step "
        f"(median of {args.reps}), peak {(out['max_memory_allocated'] or 0) / 2**30:.2f} GiB",
        flush=True)
  _write_json(args.json, out)
  return 0


# ---------------------------------------------------------------------------------------------
# 4. The driver
# ---------------------------------------------------------------------------------------------

def _spawn(argv: list[str], json_path: str, timeout: float,
           xla_flags: str | None = None) -> tuple[dict | None, str]:
  """Run this script with argv in a fresh process; (its JSON or None, status)."""
  if timeout < 10:
    return None, "skipped: out of time"
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  if xla_flags is not None:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
  try:
    rc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env=env,
                        timeout=timeout).returncode
    status = "ok" if rc == 0 else f"exit code {rc}"
  except subprocess.TimeoutExpired:
    status = f"killed after {timeout:.0f} s (deadline)"
  data = None
  if os.path.isfile(json_path):
    with open(json_path) as f:
      data = json.load(f)
  return data, status


def _summary(res: dict) -> dict:
  """Ratios within one run, per preset."""
  out = {}
  for preset, r in res.items():
    modes = (r.get("bf16") or {}).get("modes", {})
    modes = {**modes, **(r.get("quant") or {}).get("modes", {})}
    d = r.get("diffusers") or {}
    s = {}
    bf = modes.get("bf16")
    if bf and d.get("seconds_per_step_median"):
      s["mpqjax_bf16_vs_diffusers_speed"] = d["seconds_per_step_median"] / bf["seconds_per_step"]
    for name, m in modes.items():
      base = (modes.get("bf16@short") or bf) if m["steps"] != (bf or {}).get("steps") else bf
      if base and name not in ("bf16", "bf16@short"):
        s[f"{name}_speed_vs_bf16"] = base["seconds_per_step"] / m["seconds_per_step"]
    tdc = [m for n, m in modes.items() if n.startswith("mixed+tdc") and m["steps"] == (
        bf or {}).get("steps")]
    if bf and len(tdc) >= 2:  # per-step time is linear in the skip ratio: T(s) = a + b s
      (s1, t1), (s2, t2) = sorted((m["skip_ratio"], m["seconds_per_step"]) for m in tdc)[:2]
      if s2 > s1:
        b = (t2 - t1) / (s2 - s1)
        a = t1 - b * s1
        target = bf["seconds_per_step"] / 1.92
        s["mixed+tdc_time_vs_skip_ratio"] = {
            "a_seconds": a, "b_seconds": b, "speed_at_no_skip": bf["seconds_per_step"] / a,
            "skip_ratio_for_1.5x": (bf["seconds_per_step"] / 1.5 - a) / b if b else None,
            "skip_ratio_for_1.92x": (target - a) / b if b else None}
    q = modes.get("mixed+tdc") or modes.get("int8")
    if bf and q:
      s["dit_weight_reduction"] = bf["weight_bytes"] / q["weight_bytes"]
      s["block_linear_weight_bits"] = q["block_linear_weight_bits"]
    out[preset] = s
  return out


def run(args) -> int:
  start = time.perf_counter()
  presets = args.presets.split(",")
  os.makedirs(args.out, exist_ok=True)
  work = os.path.join(args.out, "parts")
  os.makedirs(work, exist_ok=True)
  common = ["--latent-shape", args.latent_shape, "--steps", str(args.steps),
            "--short-steps", str(args.short_steps), "--demo-schedule", args.demo_schedule]
  for flag in ("layers", "heads", "text_tokens"):
    if getattr(args, flag):
      common += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
  if args.implementation:
    common += ["--implementation", args.implementation]
  common += ["--short-modes", args.short_modes] + ([] if args.bf16_short else ["--no-bf16-short"])
  common += ["--tdc-first"] if args.tdc_first else []
  results: dict = {}
  status: dict = {}
  sched = load_demo_schedule(args.demo_schedule, args.steps)
  doc = {"benchmark": "e2e", "date": _now(),
         "command": " ".join(["python", os.path.relpath(os.path.abspath(__file__), ROOT),
                              *(args.argv or [])]),
         "shape": {"latent_shape": args.latent_shape, "cfg_batch": 2, "steps": args.steps,
                   "short_steps": args.short_steps, "scheduler": "ddim"},
         "schedule": {"source": sched["source"], "demo_avg_activation_bits": sched["demo_avg_bits"],
                      "mixed_int8_share_per_linear": sched["int8_share"],
                      "tdc": {k: {"demo_skip_ratio": v[0], **v[1]} for k, v in
                              sched["tdc"].items()},
                      "description": "fixed schedule, see the module docstring of e2e.py"},
         "results": results, "status": status}
  out_path = os.path.join(args.out, f"e2e-{args.tag}.json")
  for preset in presets:
    results[preset] = {}
    jobs = []
    if args.diffusers:
      jobs.append(("diffusers", ["_diffusers", "--preset", preset, "--warmup", str(args.warmup),
                                 "--reps", str(args.reps)], None))
    prof = ["--profile"] if args.profile else []
    attn8 = ["--int8-attention"] if args.int8_attention else []
    jobs.append(("bf16", ["_worker", "--group", "bf16", "--preset", preset, *prof, *attn8], None))
    jobs.append(("quant", ["_worker", "--group", "quant", "--preset", preset, *prof, *attn8]
                 + (["--all-tdc"] if args.all_tdc else [])
                 + (["--int8-cache"] if args.int8_cache else [])
                 + (["--profile-tdc"] if args.profile_tdc and preset == presets[0] else []), None))
    if preset == presets[0]:
      for i, flags in enumerate(args.flag_variant or []):
        jobs.append((f"flags{i}", ["_worker", "--group", "flags", "--preset", preset, *prof],
                     flags))
    for name, argv, flags in jobs:
      path = os.path.join(work, f"{preset}-{name}.json")
      if os.path.exists(path):
        os.remove(path)
      left = args.deadline - (time.perf_counter() - start)
      data, st = _spawn(argv + common + ["--json", path], path, left, flags)
      results[preset][name] = data
      status[f"{preset}/{name}"] = st
      doc["summary"] = _summary(results)
      _write_json(out_path, doc)
  # device and version facts from the workers (the driver never touches the GPU)
  for parts in results.values():
    for part in parts.values():
      if part and "env" in part:
        doc.setdefault("device", part["env"]["device"])
        doc.setdefault("jax_version", part["env"]["jax_version"])
        doc.setdefault("backend", part["env"]["backend"])
  doc["wall_seconds"] = time.perf_counter() - start
  doc["summary"] = _summary(results)
  _write_json(out_path, doc)
  print(json.dumps(doc["summary"], indent=1))
  print(f"wrote {out_path}")
  return 0


def markdown(doc: dict) -> str:
  """The RESULTS.md tables of one e2e JSON."""
  gb = lambda b: "–" if b is None else f"{b / 1e9:.2f}"
  lines = []
  for preset, parts in doc["results"].items():
    modes = {**((parts.get("bf16") or {}).get("modes") or {}),
             **((parts.get("quant") or {}).get("modes") or {})}
    bf = modes.get("bf16")
    lines += [f"**{preset}**", "",
              "| mode | steps | ms / step | vs bf16 | compile s | latency s | skip ratio | "
              "avg act. bits | DiT weights GB | peak device GiB | TDC cache GB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    d = parts.get("diffusers")
    if d:
      ratio = (bf["seconds_per_step"] / d["seconds_per_step_median"]) if bf else None
      lines.append(f"| diffusers bf16 (PyTorch {d['torch_version'].split('+')[0]}) | "
                   f"{d['reps']} timed | {d['seconds_per_step_median'] * 1e3:.0f} | "
                   f"{'–' if ratio is None else f'{ratio:.2f}×'} | – | – | – | 16 | "
                   f"{gb(d['weight_bytes'])} | {(d['max_memory_allocated'] or 0) / 2**30:.1f} | – |")
    for name, m in modes.items():
      base = bf if bf and m["steps"] == bf["steps"] else (modes.get("bf16@short") or bf)
      ratio = base["seconds_per_step"] / m["seconds_per_step"] if base else None
      mem = (m.get("memory") or {}).get("peak_bytes_in_use")
      bits = m.get("avg_activation_bits")
      lines.append(
          f"| {name} | {m['steps']} | {m['seconds_per_step'] * 1e3:.0f} | "
          f"{'–' if ratio is None else f'{ratio:.2f}×'} | "
          f"{'–' if m.get('compile_seconds') is None else f'{m['compile_seconds']:.0f}'} | "
          f"{m['seconds']:.1f} | {m['skip_ratio']:.3f} | "
          f"{'–' if bits is None else f'{bits:.2f}'} | {gb(m['weight_bytes'])} | "
          f"{'–' if mem is None else f'{mem / 2**30:.1f}'} | {gb(m['tdc_cache_bytes'])} |")
    lines.append("")
    profs = {**((parts.get("bf16") or {}).get("profiles") or {}),
             **((parts.get("quant") or {}).get("profiles") or {})}
    for i in range(8):
      f = parts.get(f"flags{i}")
      if f and f.get("profiles"):
        profs[f"mixed, XLA_FLAGS={f['env']['xla_flags']}"] = f["profiles"]["mixed"]
    profs = {k: v for k, v in profs.items() if "error" not in v}
    if profs:
      from mpqjax.profiling import CATEGORIES
      names = list(profs)
      lines += [f"Where a step's device time goes ({preset}, ms per step from the trace, "
                f"{next(iter(profs.values()))['steps']} steps traced):", "",
                "| category | " + " | ".join(names) + " |",
                "|---|" + "---|" * len(names)]
      for c in CATEGORIES:
        lines.append(f"| {c} | " + " | ".join(
            f"{profs[n]['categories_ms_per_step'][c]:.1f}" for n in names) + " |")
      for part, suffix in (("graphs", ", as generate runs (command buffers)"),
                           ("no_command_buffers", ", command buffers off"), (None, "")):
        if part is not None and not any(part in profs[n] for n in names):
          continue
        if part is None and any("graphs" in profs[n] for n in names):
          continue
        get = lambda n: profs[n].get(part, profs[n]) if part else profs[n]
        for key, label in (("span_ms_per_step", "span (first to last op)"),
                           ("busy_ms_per_step", "busy (union of ops)"),
                           ("idle_ms_per_step", "idle between ops"),
                           ("gaps_over_threshold_per_step", "gaps > 5 µs per step"),
                           ("ops_per_step", "ops per step")):
          lines.append(f"| {label}{suffix} | " + " | ".join(
              f"{get(n)[key]:.1f}" for n in names) + " |")
      lines.append("")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  d = sub.add_parser("demo-schedule", help="measure the demo model's skip ratio and mode mix")
  d.add_argument("--prompts", type=int, default=10)
  d.add_argument("--steps", type=int, default=50)
  d.add_argument("--out", default=os.path.join(HERE, "results", "e2e-demo-schedule.json"))
  r = sub.add_parser("run", help="the benchmark (spawns one process per group of modes)")
  r.add_argument("--presets", default="cogvideox-2b,cogvideox-5b")
  r.add_argument("--tag", default="gpu", help="output file e2e-TAG.json")
  r.add_argument("--deadline", type=float, default=1e9, help="seconds for the whole run")
  r.add_argument("--diffusers", action=argparse.BooleanOptionalAction, default=True)
  r.add_argument("--warmup", type=int, default=2, help="diffusers warm-up steps")
  r.add_argument("--reps", type=int, default=5, help="diffusers timed steps")
  r.add_argument("--int8-cache", action="store_true",
                 help="also mixed+TDC with the INT8 TDC cache (one more compile)")
  r.add_argument("--int8-attention", action="store_true",
                 help="also bf16 and mixed+TDC with INT8/FP8 attention (generate's "
                      "attention_precision='int8'; one more compile each)")
  r.add_argument("--all-tdc", action="store_true",
                 help="also the DEMO_TDC_SETTINGS schedules (one more run at --steps each)")
  r.add_argument("--bf16-short", action=argparse.BooleanOptionalAction, default=True,
                 help="also time bf16 at --short-steps (else the short modes compare to the "
                      "per-step time of the --steps bf16 run)")
  r.add_argument("--short-modes", default="nvfp4,int8,mixed,w4a16")
  r.add_argument("--tdc-first", action="store_true",
                 help="run mixed+TDC before the short modes (a tight deadline keeps the bar's mode)")
  r.add_argument("--profile", action="store_true",
                 help="trace bf16 and mixed at --short-steps (mpqjax.profiling) and report them")
  r.add_argument("--profile-tdc", action="store_true",
                 help="also trace mixed+TDC at --short-steps (one more compile; first preset)")
  r.add_argument("--flag-variant", action="append", metavar="XLA_FLAGS",
                 help="re-run the mixed program of the first preset (timed and traced) in a "
                      "process with these extra XLA flags; repeatable")
  r.add_argument("--out", default=os.path.join(HERE, "results"))
  for p in (r, sub.add_parser("_worker"), sub.add_parser("_diffusers")):
    p.add_argument("--preset", default="cogvideox-2b")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (tiny checks)")
    p.add_argument("--heads", type=int, default=None, help="override num_attention_heads")
    p.add_argument("--text-tokens", type=int, default=None, help="override text tokens")
    p.add_argument("--latent-shape", default="13,60,90", help="F,H,W latents")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--short-steps", type=int, default=5,
                   help="steps for bf16@short and the no-TDC quantized modes (0: skip them)")
    p.add_argument("--demo-schedule", default=os.path.join(HERE, "results",
                                                           "e2e-demo-schedule.json"))
    p.add_argument("--implementation", default=None, help="qlinear implementation")
    if p is not r:
      p.add_argument("--json", required=True)
      p.add_argument("--group", choices=("bf16", "quant", "flags"), default="bf16")
      p.add_argument("--profile", action="store_true")
      p.add_argument("--profile-tdc", action="store_true")
      p.add_argument("--bf16-short", action=argparse.BooleanOptionalAction, default=True)
      p.add_argument("--tdc-first", action="store_true")
      p.add_argument("--short-modes", default="nvfp4,int8,mixed,w4a16")
      p.add_argument("--trace-dir", default="/tmp/e2e-traces")
      p.add_argument("--all-tdc", action="store_true")
      p.add_argument("--int8-cache", action="store_true")
      p.add_argument("--int8-attention", action="store_true")
      p.add_argument("--warmup", type=int, default=2)
      p.add_argument("--reps", type=int, default=5)
  mk = sub.add_parser("markdown", help="print the RESULTS.md tables of an e2e JSON")
  mk.add_argument("json")
  mg = sub.add_parser("merge", help="one JSON from the e2e JSONs of several device calls")
  mg.add_argument("parts", nargs="+")
  mg.add_argument("--out", required=True)
  args = ap.parse_args(argv)
  if args.cmd == "merge":
    docs = []
    for path in args.parts:
      with open(path) as f:
        docs.append(json.load(f))
    doc = {**docs[0], "results": {}, "status": {}, "summary": {},
           "calls": [{k: d.get(k) for k in ("date", "command", "device", "jax_version",
                                            "wall_seconds")} for d in docs],
           "note": "one device call per preset; every ratio is within one call"}
    for d in docs:
      for k in ("results", "status", "summary"):
        doc[k].update(d.get(k) or {})
    _write_json(args.out, doc)
    print(f"wrote {args.out}")
    return 0
  if args.cmd == "markdown":
    with open(args.json) as f:
      print(markdown(json.load(f)))
    return 0
  args.argv = list(sys.argv[1:] if argv is None else argv)
  if args.cmd == "demo-schedule":
    return demo_schedule(args)
  if args.cmd == "run":
    return run(args)
  if args.cmd == "_worker":
    return worker(args)
  return diffusers_worker(args)


if __name__ == "__main__":
  sys.exit(main())
