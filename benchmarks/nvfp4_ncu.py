"""Run the NVFP4 kernel at one shape a few times, for Nsight Compute (issue 7): where the
small-M kernel's time goes (stall reasons, tensor and ALU pipe use, issue slots).

  XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=. /usr/local/cuda/bin/ncu \\
    --kernel-name regex:nvfp4_matmul --launch-skip 1 --launch-count 1 \\
    --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \\
    --section SchedulerStats --section InstructionStats --section MemoryWorkloadAnalysis \\
    python3 benchmarks/nvfp4_ncu.py 64x3072x12288 > $OUT/ncu.txt

(preallocation off: otherwise ncu saves and restores the preallocated device memory on every
replay pass; NOTES.md, "Session 8"). Without ncu it prints the kernel's median device time.
Arguments: MxKxN [decode_chunks=C] [e4m3_scales=0|1] [tile_k=T] [max_concurrent_steps=S]
[k_splits=S]: pick_config's config with those fields replaced (nvfp4_matmul.replace_config).
"""
import sys

import jax

sys.path.insert(0, ".")
from benchmarks.kernels import make_problem, time_fn  # noqa: E402
from pallas_kernels import nvfp4_matmul as nm  # noqa: E402


def main(argv):
  if not argv or argv[0].count("x") != 2:
    sys.exit(f"usage: {sys.argv[0]} MxKxN [field=value ...]")
  m, k, n = (int(v) for v in argv[0].split("x"))
  changes = {}
  for arg in argv[1:]:
    field, _, value = arg.partition("=")
    if field not in {"decode_chunks", "e4m3_scales", "tile_k", "max_concurrent_steps", "k_splits"}:
      sys.exit(f"unknown field {field!r}")
    changes[field] = bool(int(value)) if field == "e4m3_scales" else int(value)
  cfg = nm.replace_config(nm.pick_config(m, n, k), **changes)
  p = make_problem(m, k, n, 0)
  w4, ws, gain = nm.weight_operands(p["layer"].weight, cfg.decode, cfg.e4m3_scales)
  x = jax.jit(nm.permute_k)(p["x"]) if cfg.decode == "perm" else p["x"]
  args = (x, w4, ws, p["layer"].weight.global_scale, p["bias"])
  f = jax.jit(lambda *a: nm.nvfp4_matmul(*a, config=cfg, gain=float(gain),
                                         x_permuted=cfg.decode == "perm"))
  for _ in range(3):  # compile, then the launches ncu picks from (--launch-skip 1)
    f(*args).block_until_ready()
  print(cfg)
  print(f"{m}x{k}x{n}: {time_fn(f, [args]) * 1e3:.2f} us", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
