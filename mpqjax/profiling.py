"""Profile `generate`: capture a jax.profiler trace of a few denoising steps and read a time
breakdown out of it by the model's named scopes.

  report = profile_generate(model, text_emb, trace_dir, steps=3, **generate_kwargs)
  print(format_report(report))

The trace (`trace_dir/plugins/profile/<run>/`: *.xplane.pb for TensorBoard/XProf and
perfetto_trace.json.gz for ui.perfetto.dev) is read back from the Perfetto JSON. Every executed
op carries its HLO instruction name ("hlo_op"); the compiled HLO of generate's program maps that
to the instruction's opcode and its JAX name stack (metadata op_name), e.g.
  .../transformer_blocks/while/body/.../block/cond/branch_0_fun/attn1/attn1.to_q/cond/branch_1_fun/dot_general
which `categorize` turns into a category. A fused kernel is attributed to its root instruction's
name stack (the usual XLA convention), so a cheap elementwise op fused into a matmul's epilogue
counts as that matmul.

Device time: on a GPU, the kernels and copies on the GPU's streams; on the CPU, the ops the XLA
CPU runtime executes (control flow - while, conditional, call - excluded: they only contain
other ops). Idle = the span from the first to the last op of the program minus the union of op
intervals: on a GPU this is where the device waits for the host (launch latency, predicate reads
of lax.cond / lax.switch / while loops that command buffers do not cover).
"""
from __future__ import annotations

import contextlib
import glob
import gzip
import json
import os
import re
from typing import Any

CATEGORIES = ("attention", "linear W4A4 (nvfp4)", "linear W4A8 (int8)", "linear W4A16",
              "linear bf16", "quantize/dequant/Hadamard", "norms+modulation",
              "TDC/DMPQ bookkeeping", "control flow", "other", "unattributed")
# Kernels XLA:GPU adds inside command buffers (CUDA graphs) to run lax.cond / lax.switch /
# while loops on the device: the branch index and loop predicate never reach the host.
_CONTROL_KERNEL = re.compile(r"^(set_\w*condition\w*|memcpy\d*(_post)?|memset\d*)$")
# lax.switch branch index in qlinear -> category (qlinear's branches: W4A4, W4A8, W4A16)
_MODE_CATEGORY = {0: CATEGORIES[1], 1: CATEGORIES[2], 2: CATEGORIES[3]}
_CONTROL_OPCODES = frozenset({"while", "conditional", "call", "tuple", "get-tuple-element",
                              "parameter", "constant", "bitcast"})
_NORM_SCOPES = frozenset({"norm1", "norm2", "norm_q", "norm_k", "norm_final", "norm_out"})
_BOOKKEEPING_SCOPES = frozenset({"tdc_update", "tdc_skip", "gamma", "e_rel"})
# a Mosaic GPU kernel's name-stack entry is its body function's name (pallas_kernels/*.py)
_QUANT_SCOPES = frozenset({"int8_quant", "nvfp4_to_int8", "attention_quantize",
                           "int8_quant_kernel", "amax_kernel", "qdq_kernel"})
_HADAMARD_EINSUM = "...b,bc->...c"  # formats.hadamard's einsum (its name-stack entry)
_MATMUL_PRIMS = frozenset({"dot_general", "pallas_call", "custom_call", "mosaic_gpu_call"})
_MATMUL_KERNELS = frozenset({"w8a8_matmul_kernel", "nvfp4_matmul_kernel"})  # then "mpmd_map"
MODULE = "jit_generate_latents"


# ------------------------------------------------------------------ HLO: instruction -> scope

def kernel_name(instruction: str) -> str:
  """The GPU kernel name XLA gives an instruction's kernel ("loop_add_fusion.3" ->
  "loop_add_fusion_3"): how kernels inside command buffers are matched to instructions."""
  return re.sub(r"[^\w]", "_", instruction)


def parse_hlo(text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (opcode, metadata op_name or "")} from an HLO module's text."""
  out = {}
  for line in text.splitlines():
    m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if not m:
      continue
    rest = line[m.end():]
    if rest.startswith("("):  # a tuple shape: skip the balanced parentheses
      depth = 0
      for j, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
          rest = rest[j + 1:]
          break
    else:
      rest = rest.split(" ", 1)[1] if " " in rest else ""
    op = re.match(r"\s*([\w\-]+)\(", rest)
    if not op:
      continue
    name = re.search(r'op_name="([^"]*)"', line)
    out[m.group(1)] = (op.group(1), name.group(1) if name else "")
  return out


def categorize(op_name: str, linear_names=None, modulation_names=None) -> str:
  """The category (one of CATEGORIES) of an op from its JAX name stack."""
  if linear_names is None:
    from models.cogvideox.params import LINEAR_NAMES, MODULATION_LINEARS
    linear_names = LINEAR_NAMES
    modulation_names = {LINEAR_NAMES[i] for i in MODULATION_LINEARS}
  path = op_name.split("/")
  scopes = set(path)
  if scopes & _BOOKKEEPING_SCOPES:
    return "TDC/DMPQ bookkeeping"
  if "attention" in scopes or "rope" in scopes:
    return "quantize/dequant/Hadamard" if "attention_quantize" in scopes else "attention"
  for i, part in enumerate(path):
    if part in linear_names:
      if part in (modulation_names or ()):
        return "norms+modulation"
      rest = path[i + 1:]
      if len(rest) >= 2 and rest[0] == "cond" and rest[1].startswith("branch_"):
        mode = int(rest[1].split("_")[1])
        body = rest[2:]
        if _HADAMARD_EINSUM in body or set(body) & _QUANT_SCOPES:
          return "quantize/dequant/Hadamard"
        if body and (body[-1] in _MATMUL_PRIMS or set(body) & _MATMUL_KERNELS):
          return _MODE_CATEGORY.get(mode, "other")
        return "quantize/dequant/Hadamard"  # activation quantization, weight decode, epilogue
      if rest and rest[-1] == "dot_general":
        return "linear bf16"  # an unquantized linear (the bf16 baseline)
      if "cond" in rest or rest[-1:] == ["clamp"]:
        return "TDC/DMPQ bookkeeping"  # the mode switch's index
      # ops in the linear's scope outside the mode switch: the outlier ratio that routes it
      return "TDC/DMPQ bookkeeping" if _quantized_scope(rest) else "other"
  if scopes & _NORM_SCOPES:
    return "norms+modulation"
  return "other"


def _quantized_scope(rest) -> bool:
  """Ops directly in a linear's scope (no deeper scope): the outlier-ratio reduction of a
  quantized linear, or the bias add / cast of an unquantized one."""
  return not rest or rest[-1] in ("abs", "reduce_max", "reduce_sum", "div", "max", "gt",
                                  "select_n", "jit(_where)", "mean", "convert_element_type")


# ------------------------------------------------------------------ the trace

def find_trace(trace_dir: str) -> str:
  """The newest perfetto_trace.json.gz under trace_dir."""
  paths = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz"))
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}/plugins/profile")
  return max(paths, key=os.path.getmtime)


def load_events(path: str) -> tuple[list[dict], dict[int, str], dict[tuple[int, int], str]]:
  """(complete events, {pid: process name}, {(pid, tid): thread name}) of a Perfetto JSON."""
  with gzip.open(path, "rt") as f:
    d = json.load(f)
  events = d["traceEvents"] if isinstance(d, dict) else d
  procs, threads, out = {}, {}, []
  for e in events:
    if e.get("ph") == "M":
      if e.get("name") == "process_name":
        procs[e["pid"]] = e["args"]["name"]
      elif e.get("name") == "thread_name":
        threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
    elif e.get("ph") == "X":
      out.append(e)
  return out, procs, threads


def _union_length(intervals: list[tuple[float, float]]) -> float:
  total, end = 0.0, float("-inf")
  for a, b in sorted(intervals):
    if b <= end:
      continue
    total += b - max(a, end)
    end = b
  return total


def _gaps(intervals: list[tuple[float, float]]) -> list[float]:
  """Lengths of the holes between merged intervals (sorted by start)."""
  out, end = [], None
  for a, b in sorted(intervals):
    if end is not None and a > end:
      out.append(a - end)
    end = b if end is None else max(end, b)
  return out


def analyze(events, procs, hlo: dict[str, tuple[str, str]], *, steps: int,
            module: str = MODULE, gap_threshold_us: float = 5.0) -> dict[str, Any]:
  """Time per category and idle time, per denoising step, of `module`'s ops in the trace.
  Times in the report are milliseconds per step."""
  device_pids = {p for p, n in procs.items() if n.startswith("/device:")}
  mine = [e for e in events if (e.get("args") or {}).get("hlo_module", "").startswith(module)
          or (e.get("args") or {}).get("hlo_module", "") == module[len("jit_"):]]
  on_device = [e for e in mine if e["pid"] in device_pids]
  where = "device" if on_device else "host (CPU runtime)"
  ops = on_device or mine
  if not ops:
    raise ValueError(f"the trace holds no op of {module}: was it run inside the trace?")
  by_cat = {c: 0.0 for c in CATEGORIES}
  by_scope: dict[str, float] = {}
  unknown, leaves = 0, []
  by_kernel = {kernel_name(k): v for k, v in hlo.items()}
  for e in ops:
    name = e["args"].get("hlo_op") or e.get("name", "")
    opcode, op_name = hlo.get(name) or by_kernel.get(name) or ("", "")
    cat = None
    if name.startswith("command_buffer"):
      # a kernel inside a CUDA graph: only its kernel name identifies it
      kname = e.get("name", "")
      opcode, op_name = by_kernel.get(kname, ("", ""))
      if not opcode:
        cat = "control flow" if _CONTROL_KERNEL.match(kname) else "unattributed"
        opcode = "kernel"
    elif not opcode:
      unknown += 1
    if opcode in _CONTROL_OPCODES:
      continue
    dur = float(e.get("dur", 0.0))
    leaves.append((float(e["ts"]), float(e["ts"]) + dur))
    cat = cat or (categorize(op_name) if op_name else "other")
    by_cat[cat] += dur
    scope = _short_scope(op_name)
    by_scope[scope] = by_scope.get(scope, 0.0) + dur
  span = max(b for _, b in leaves) - min(a for a, _ in leaves)
  busy = _union_length(leaves)
  # everything else on the device's streams in that span (copies, memsets without an hlo_op)
  lo, hi = min(a for a, _ in leaves), max(b for _, b in leaves)
  extra: dict[str, int] = {}
  if on_device:
    for e in events:
      if e["pid"] in device_pids and e not in mine and lo <= float(e["ts"]) <= hi:
        key = re.sub(r"[\d_]+$", "", e.get("name", "?"))[:60]
        extra[key] = extra.get(key, 0) + 1
  gaps = [g for g in _gaps(leaves) if g > gap_threshold_us]
  ms = 1e-3 / steps
  total = sum(by_cat.values())
  return {"where": where, "steps": steps, "ops": len(leaves),
          "ops_per_step": len(leaves) / steps, "ops_without_hlo_match": unknown,
          "span_ms_per_step": span * ms, "busy_ms_per_step": busy * ms,
          "idle_ms_per_step": (span - busy) * ms,
          "idle_fraction": (span - busy) / span if span else 0.0,
          "gaps_over_threshold_per_step": len(gaps) / steps,
          "gap_threshold_us": gap_threshold_us,
          "gap_ms_per_step_over_threshold": sum(gaps) * ms,
          "categories_ms_per_step": {c: v * ms for c, v in by_cat.items()},
          "categories_fraction": {c: (v / total if total else 0.0) for c, v in by_cat.items()},
          "top_scopes_ms_per_step": dict(sorted(((k, v * ms) for k, v in by_scope.items()),
                                                key=lambda kv: -kv[1])[:15]),
          "other_device_events_per_step": {k: v / steps for k, v in
                                           sorted(extra.items(), key=lambda kv: -kv[1])[:8]}}


def _short_scope(op_name: str) -> str:
  """The model-level scope of an op: drop jit/while/body/eval_jaxpr/cond plumbing and the
  primitive, keep at most three scopes."""
  parts = [p for p in op_name.split("/")[:-1] if p and not p.startswith(("jit(", "branch_"))
           and p not in ("while", "body", "eval_jaxpr", "cond", "transformer_blocks", "block")]
  return "/".join(parts[:3]) or "(top level)"


# ------------------------------------------------------------------ capture

@contextlib.contextmanager
def capture_call():
  """Records the arguments of mpqjax.generate.generate_latents while active (to fetch the
  compiled program's HLO for exactly that call)."""
  from mpqjax import generate as G
  orig, seen = G.generate_latents, {}

  def spy(*args, **kwargs):
    seen["args"], seen["kwargs"], seen["jitted"] = args, kwargs, orig
    return orig(*args, **kwargs)

  G.generate_latents = spy
  try:
    yield seen
  finally:
    G.generate_latents = orig


def _trace_once(trace_dir: str, steps: int, gap_threshold_us: float, call) -> tuple[dict, Any]:
  """Run call() inside a trace; analyze it against the program call() ran."""
  import time

  import jax

  from mpqjax import generate as G
  os.makedirs(trace_dir, exist_ok=True)
  with capture_call() as seen:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      t0 = time.perf_counter()
      result = call()
      wall = time.perf_counter() - t0
    jitted = seen.get("jitted", G.generate_latents)
    hlo_text = jitted.lower(*seen["args"], **seen["kwargs"]).compile().as_text()
  path = find_trace(trace_dir)
  events, procs, _ = load_events(path)
  rep = analyze(events, procs, parse_hlo(hlo_text), steps=steps,
                gap_threshold_us=gap_threshold_us)
  rep.update(wall_ms_per_step_traced=wall * 1e3 / steps, trace=path,
             xplane=glob.glob(os.path.join(os.path.dirname(path), "*.xplane.pb")))
  return rep, result


@contextlib.contextmanager
def _without_command_buffers():
  """generate's program compiled with XLA:GPU command buffers off (each kernel its own thunk,
  named by its HLO instruction in the trace), for as long as the context is active."""
  import jax

  from mpqjax import generate as G
  orig = G.generate_latents
  G.generate_latents = jax.jit(orig.__wrapped__, static_argnames=("static",),
                               compiler_options={"xla_gpu_enable_command_buffer": ""})
  try:
    yield
  finally:
    G.generate_latents = orig


def profile_generate(model, text_emb, trace_dir: str, *, steps: int = 3,
                     gap_threshold_us: float = 5.0, warmup: bool = True,
                     exact_attribution: bool = True, **kwargs) -> dict:
  """Compile and run generate once (unless warmup=False: the caller already ran this exact
  program), then run it inside jax.profiler.trace(trace_dir) and analyze the trace. kwargs go
  to mpqjax.generate.generate.

  On a GPU, XLA runs most of the program as command buffers (CUDA graphs), whose kernels the
  trace names only by kernel name: library kernels (cuBLAS, Mosaic, cuDNN) then cannot be
  attributed. With exact_attribution, a second capture runs the same program compiled with
  command buffers off, where every kernel carries its HLO instruction; its categories are the
  report's, and the idle time of both captures is reported (the first is what generate runs).
  Returns the report (analyze's, plus "graphs" / "no_command_buffers" on a GPU)."""
  import jax

  from mpqjax import generate as G
  run = lambda: G.generate(model, text_emb, steps=steps, **kwargs)
  if warmup:
    run()  # compile + warm up
  report, result = _trace_once(os.path.join(trace_dir, "default"), steps, gap_threshold_us, run)
  if jax.default_backend() == "gpu" and exact_attribution:
    with _without_command_buffers():
      run()  # compile + warm up
      exact, _ = _trace_once(os.path.join(trace_dir, "no_command_buffers"), steps,
                             gap_threshold_us, run)
    report = {**exact, "categories_from": "capture without command buffers",
              "graphs": report, "no_command_buffers": exact}
  report.update(skip_ratio=result.summary["skip_ratio"],
                linear_mode_counts=result.summary["linear_mode_counts"],
                backend=jax.default_backend(), device=jax.devices()[0].device_kind)
  return report


def format_report(r: dict) -> str:
  lines = [f"time per denoising step on the {r['where']} ({r['steps']} steps traced, "
           f"{r['ops_per_step']:.0f} ops/step):"]
  total = sum(r["categories_ms_per_step"].values())
  for c, v in r["categories_ms_per_step"].items():
    lines.append(f"  {c:28s} {v:10.3f} ms  {100 * v / total if total else 0:5.1f}%")
  lines.append(f"  {'(sum of op time)':28s} {total:10.3f} ms")
  lines.append(f"busy {r['busy_ms_per_step']:.3f} ms, idle between ops {r['idle_ms_per_step']:.3f}"
               f" ms ({100 * r['idle_fraction']:.1f}% of the {r['span_ms_per_step']:.3f} ms span); "
               f"{r['gaps_over_threshold_per_step']:.0f} gaps > {r['gap_threshold_us']:g} us per "
               f"step, {r['gap_ms_per_step_over_threshold']:.3f} ms")
  for key, label in (("graphs", "as generate runs it (command buffers)"),
                     ("no_command_buffers", "command buffers off")):
    g = r.get(key)
    if g:
      lines.append(f"{label}: span {g['span_ms_per_step']:.3f} ms/step, idle "
                   f"{g['idle_ms_per_step']:.3f} ms ({100 * g['idle_fraction']:.1f}%), "
                   f"{g['gaps_over_threshold_per_step']:.0f} gaps > {g['gap_threshold_us']:g} us, "
                   f"control flow {g['categories_ms_per_step']['control flow']:.3f} ms, "
                   f"unattributed {g['categories_ms_per_step']['unattributed']:.3f} ms")
  if r.get("other_device_events_per_step"):
    lines.append("other device events per step: " + ", ".join(
        f"{k} {v:.0f}" for k, v in r["other_device_events_per_step"].items()))
  return "\n".join(lines)
