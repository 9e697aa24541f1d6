"""`mpqjax profile` on the shipped toy model (CPU, 2 steps): a real jax.profiler trace is written
and parsed back into a time breakdown; bad input exits with code 2. Plus the trace-analysis
helpers on hand-made inputs."""
import gzip
import json
import os

import pytest

from mpqjax import cli, profiling

PROMPT = "a green square moving up"


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
  out = tmp_path_factory.mktemp("prof") / "p"
  rc = cli.main(["profile", "--prompt", PROMPT, "--steps", "2", "--out", str(out)])
  assert rc == 0
  with open(out / "profile.json") as f:
    return out, json.load(f)


def test_trace_files_are_written_and_readable(profiled):
  out, r = profiled
  assert r["trace"].startswith(str(out)) and os.path.getsize(r["trace"]) > 0
  assert r["xplane"] and all(os.path.getsize(p) > 0 for p in r["xplane"])
  with gzip.open(r["trace"], "rt") as f:
    events = json.load(f)["traceEvents"]
  ops = [e for e in events if (e.get("args") or {}).get("hlo_module", "").startswith(
      profiling.MODULE)]
  assert len(ops) >= r["ops"]  # control-flow ops are dropped from the count, never added


def test_breakdown_matches_what_ran(profiled, capsys):
  _, r = profiled
  assert r["where"] == "host (CPU runtime)" and r["steps"] == 2
  assert r["ops_without_hlo_match"] == 0  # every traced op maps to an instruction of the program
  cats = r["categories_ms_per_step"]
  assert set(cats) == set(profiling.CATEGORIES)
  assert all(v >= 0 for v in cats.values())
  for c in ("attention", "quantize/dequant/Hadamard", "norms+modulation", "TDC/DMPQ bookkeeping"):
    assert cats[c] > 0, c
  counts = r["linear_mode_counts"]  # the routed linears' modes as generate reports them
  for mode, cat in (("nvfp4", "linear W4A4 (nvfp4)"), ("int8", "linear W4A8 (int8)"),
                    ("bf16", "linear W4A16")):
    assert (cats[cat] > 0) == (counts[mode] > 0), (mode, cats[cat], counts[mode])
  assert cats["linear bf16"] == 0  # quantized weights: no unquantized block linear ran
  assert 0 < r["busy_ms_per_step"] <= r["span_ms_per_step"] + 1e-9
  assert r["idle_ms_per_step"] == pytest.approx(r["span_ms_per_step"] - r["busy_ms_per_step"])


@pytest.mark.parametrize("argv, culprit", [
    (["--steps", "0"], "--steps"),
    (["--steps", "51"], "--steps"),
    (["--model", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (["--latent-shape", "3,x,4"], "--latent-shape"),
    (["--gap-threshold-us", "-1"], "--gap-threshold-us"),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, culprit):
  rc = cli.main(["profile", "--prompt", PROMPT, "--out", str(tmp_path / "o"), *argv])
  err = capsys.readouterr().err
  assert rc == 2 and "mpqjax profile: error:" in err and culprit in err, err


def test_out_that_is_a_file_exits_2(tmp_path, capsys):
  f = tmp_path / "file"
  f.write_text("x")
  assert cli.main(["profile", "--prompt", PROMPT, "--out", str(f)]) == 2
  assert str(f) in capsys.readouterr().err


def test_parse_hlo_reads_opcodes_and_scopes():
  text = "\n".join([
      'ENTRY %main {',
      '  %fusion.3 = bf16[8,4]{1,0} fusion(%p.1), kind=kLoop, calls=%fc, metadata={op_name="jit(f)/attn1/attention/exp" stack_frame_id=2}',
      '  %while.5 = (s32[], /*index=1*/f32[2]{0}) while(%tuple.1), condition=%c, body=%b',
      '  ROOT %dot.7 = f32[8,8]{1,0} dot(%a, %b), lhs_contracting_dims={1}, metadata={op_name="jit(f)/ff/ff.net.2/cond/branch_1_fun/dot_general"}',
      '}'])
  h = profiling.parse_hlo(text)
  assert h["fusion.3"] == ("fusion", "jit(f)/attn1/attention/exp")
  assert h["while.5"] == ("while", "")
  assert h["dot.7"] == ("dot", "jit(f)/ff/ff.net.2/cond/branch_1_fun/dot_general")


@pytest.mark.parametrize("op_name, category", [
    ("jit(g)/while/body/block/cond/branch_0_fun/attn1/attention/attention_bf16_cudnn/x", "attention"),
    ("jit(g)/block/cond/branch_0_fun/attn1/attention/attention_quantize/round",
     "quantize/dequant/Hadamard"),
    ("jit(g)/block/cond/branch_0_fun/ff/ff.net.2/cond/branch_0_fun/dot_general", "linear W4A4 (nvfp4)"),
    ("jit(g)/block/cond/branch_0_fun/ff/ff.net.2/cond/branch_1_fun/pallas_call", "linear W4A8 (int8)"),
    ("jit(g)/block/cond/branch_0_fun/ff/ff.net.2/cond/branch_2_fun/dot_general", "linear W4A16"),
    # the Mosaic GPU kernels: their body function's name, then mpmd_map (the CUDA lowering)
    ("jit(g)/block/cond/branch_0_fun/ff/ff.net.2/cond/branch_1_fun/w8a8_matmul_kernel/mpmd_map",
     "linear W4A8 (int8)"),
    ("jit(g)/block/cond/branch_0_fun/ff/ff.net.2/cond/branch_0_fun/nvfp4_matmul_kernel/mpmd_map",
     "linear W4A4 (nvfp4)"),
    ("jit(g)/block/cond/branch_0_fun/ff/ff.net.2/cond/branch_2_fun/nvfp4_matmul_kernel/mpmd_map",
     "linear W4A16"),
    ("jit(g)/block/cond/branch_0_fun/ff/ff.net.2/cond/branch_1_fun/int8_quant_kernel/mpmd_map",
     "quantize/dequant/Hadamard"),
    ("jit(g)/block/cond/branch_0_fun/ff/ff.net.2/cond/branch_0_fun/qdq_kernel/mpmd_map",
     "quantize/dequant/Hadamard"),
    ("jit(g)/block/cond/branch_0_fun/ff/ff.net.2/cond/branch_1_fun/...b,bc->...c/dot_general",
     "quantize/dequant/Hadamard"),
    ("jit(g)/block/cond/branch_0_fun/ff/ff.net.2/cond/branch_1_fun/round", "quantize/dequant/Hadamard"),
    ("jit(g)/block/attn1/attn1.to_q/...k,nk->...n/dot_general", "linear bf16"),
    ("jit(g)/block/cond/branch_0_fun/attn1/attn1.to_q/reduce_max", "TDC/DMPQ bookkeeping"),
    ("jit(g)/block/cond/branch_0_fun/norm1/norm1.linear/cond/branch_2_fun/dot_general",
     "norms+modulation"),
    ("jit(g)/block/cond/branch_0_fun/attn1/norm_q/rsqrt", "norms+modulation"),
    ("jit(g)/block/cond/branch_0_fun/tdc_update/abs", "TDC/DMPQ bookkeeping"),
    ("jit(g)/block/cond/branch_1_fun/tdc_skip/add", "TDC/DMPQ bookkeeping"),
    ("jit(g)/block/cond/branch_0_fun/ff/gelu/tanh", "other"),
])
def test_categorize(op_name, category):
  assert profiling.categorize(op_name) == category


def test_gaps_and_union_of_overlapping_intervals():
  iv = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (6.5, 7.0)]
  assert profiling._union_length(iv) == pytest.approx(4.5)
  assert profiling._gaps(iv) == pytest.approx([2.0, 0.5])


def test_analyze_gpu_trace_with_command_buffers():
  """A GPU-shaped trace: kernels inside a CUDA graph carry only the command buffer as hlo_op
  and are matched to instructions by kernel name; XLA's condition kernels count as control
  flow; library kernels that match nothing are unattributed. Times in us, 2 steps."""
  hlo = {"loop_add_fusion.3": ("fusion", "jit(g)/block/attn1/attention/exp"),
         "fusion.7": ("fusion", "jit(g)/block/ff/ff.net.2/cond/branch_1_fun/dot_general"),
         "custom-call.2": ("custom-call", "jit(g)/block/attn1/norm_q/mul")}
  procs = {1: "/device:GPU:0", 2: "/host:CPU"}

  def ev(name, ts, dur, hlo_op="command_buffer_1", pid=1):
    return {"ph": "X", "pid": pid, "tid": 7, "ts": ts, "dur": dur, "name": name,
            "args": {"hlo_module": "jit_generate_latents", "hlo_op": hlo_op}}
  events = [ev("loop_add_fusion_3", 0, 10), ev("set_case_condition", 12, 1),
            ev("fusion_7", 13, 20), ev("nvjet_sm90_gemm", 40, 5),
            ev("cutlass_kernel", 50, 4, hlo_op="custom-call.2"),
            ev("host_side", 0, 100, pid=2)]  # a host event of the module: ignored on a GPU
  r = profiling.analyze(events, procs, hlo, steps=2, gap_threshold_us=3)
  cats = r["categories_ms_per_step"]
  assert r["where"] == "device" and r["ops"] == 5
  assert cats["attention"] == pytest.approx(10e-3 / 2)
  assert cats["linear W4A8 (int8)"] == pytest.approx(20e-3 / 2)
  assert cats["control flow"] == pytest.approx(1e-3 / 2)
  assert cats["unattributed"] == pytest.approx(5e-3 / 2)
  assert cats["norms+modulation"] == pytest.approx(4e-3 / 2)
  assert r["span_ms_per_step"] == pytest.approx(54e-3 / 2)
  assert r["busy_ms_per_step"] == pytest.approx(40e-3 / 2)
  assert r["gaps_over_threshold_per_step"] == pytest.approx(2 / 2)  # 33->40 and 45->50


def test_mosaic_kernels_of_the_cuda_lowering_are_categorized(monkeypatch):
  """The op names the Hopper kernels get in a real CUDA lowering (lowered here on the CPU) land
  in the right categories: each mode's matmul kernel in its linear category, the quantizers in
  quantize/dequant/Hadamard."""
  import re
  import sys

  import jax
  import jax.numpy as jnp
  import numpy as np

  from mpqjax.qlinear import qlinear, quantize_linear
  from pallas_kernels import qlinear_mosaic as qm
  monkeypatch.setattr(qm, "interpret_params", lambda: None)  # the GPU kernels, not interpret
  # (the module, not the function mpqjax.qlinear that the package exports under its name)
  monkeypatch.setattr(sys.modules["mpqjax.qlinear"], "_mosaic_usable", lambda: True)
  rng = np.random.default_rng(3)
  layer = quantize_linear(rng.standard_normal((256, 256)).astype(np.float32), None,
                             hadamard=128)

  def f(x, mode):
    with jax.named_scope("ff.net.2"):
      return qlinear(x, layer, mode, implementation="mosaic")

  x = jnp.asarray(rng.standard_normal((2048, 256)), jnp.bfloat16)
  text = jax.jit(f).trace(x, jnp.int32(1)).lower(lowering_platforms=("cuda",)).as_text(
      debug_info=True)
  kernels = {n for n in re.findall(r'loc\("([^"]*/mpmd_map)"', text)}
  got = {re.search(r"branch_\d_fun/(\w+)/mpmd_map$", n).group(0): profiling.categorize(n)
         for n in kernels}
  assert got == {
      "branch_0_fun/amax_kernel/mpmd_map": "quantize/dequant/Hadamard",
      "branch_0_fun/qdq_kernel/mpmd_map": "quantize/dequant/Hadamard",
      "branch_0_fun/nvfp4_matmul_kernel/mpmd_map": "linear W4A4 (nvfp4)",
      "branch_1_fun/int8_quant_kernel/mpmd_map": "quantize/dequant/Hadamard",
      "branch_1_fun/w8a8_matmul_kernel/mpmd_map": "linear W4A8 (int8)",
      "branch_2_fun/nvfp4_matmul_kernel/mpmd_map": "linear W4A16"}
