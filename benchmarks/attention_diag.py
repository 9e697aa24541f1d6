"""Where the INT8 attention kernel's time goes (kernel alone, pre-quantized operands).

  PYTHONPATH=. python3 benchmarks/attention_diag.py [--shapes cogvideox-2b,wan-1.3b-480p]

Two tables, one run, next to cuDNN bf16 of the same run:
  * a config sweep: block_kv x int8_convert x max_concurrent_steps, warpgroup ping-pong off
    (and on for the default's convert), each output checked against the first config's bits
    (the same block_kv gives the same bits: the schedule only reorders whole wgmmas);
  * "exp2 as fmul": the same kernels with every jnp.exp2 traced as x * 0.5, so the softmax
    costs one FMUL instead of one MUFU ex2 per score. Its outputs are wrong by design; it
    only bounds what a cheaper exponential could save.
Writes attention_diag-<device>.json (device, JAX version, date, command, all times in ms).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types

from attention import SHAPES, outlier_inputs, run_metadata, time_fn
from mpqjax import atomic


def exp2_as_fmul(jnp_module):
  """A stand-in for the kernel module's jnp with exp2(x) = x * 0.5 (timing only)."""
  class Proxy(types.ModuleType):
    def __getattr__(self, name):
      return getattr(jnp_module, name)
  proxy = Proxy("jnp_exp2_as_fmul")
  proxy.exp2 = lambda x: x * 0.5
  return proxy


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--shapes", default="cogvideox-2b,wan-1.3b-480p")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from mpqjax import attention as A
  from pallas_kernels import attention_mosaic as am

  result = {**run_metadata(), "timing": [], "errors": []}
  for name in args.shapes.split(","):
    b, t, h, d = SHAPES[name]
    q, k, v = outlier_inputs(jax.random.key(0), (b, t, h, d))
    default = A.kernel_config("int8", d)
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
    row = {"shape_name": name, "B": b, "T": t, "H": h, "D": d, "default": str(default),
           "cudnn_bf16_ms": time_fn(cudnn, (q, k, v), args.reps)[0] * 1e3, "kernel_ms": {},
           "exp2_as_fmul_ms": {}, "bits_equal_to_first_of_block_kv": {}}
    print(f"{name}: cudnn {row['cudnn_bf16_ms']:.3f} ms", flush=True)
    for bkv in (256, 128):
      operand_sets = {}  # per query padding (the kernel's q_multiple)
      first = None
      for conv in ("magic_init", "magic"):
        for steps in (2, 3):
          for pingpong in (False, True):
            if pingpong and (steps, conv) != (2, default.int8_convert):
              continue
            key = f"bkv{bkv}_{conv}_s{steps}_pp{int(pingpong)}"
            cfg = dataclasses.replace(default, block_kv=bkv, int8_convert=conv,
                                      max_concurrent_steps=steps, pingpong=pingpong)
            fn = jax.jit(lambda *o, cfg=cfg: am.flash_attention(*o, kv_len=t, config=cfg))
            try:
              if cfg.q_multiple not in operand_sets:
                ops = A.quantize_operands(q, k, v, block_kv=bkv, q_multiple=cfg.q_multiple)
                operand_sets[cfg.q_multiple] = (ops.q8, ops.k8, am.prepare_vt(ops.v8),
                                                ops.q_scale, ops.k_scale)
              operands = operand_sets[cfg.q_multiple]
              row["kernel_ms"][key] = time_fn(fn, operands, args.reps)[0] * 1e3
              out = fn(*operands)[:, :t]
              first = out if first is None else first
              row["bits_equal_to_first_of_block_kv"][key] = bool(jnp.array_equal(out, first))
              if steps == 2:
                real = am.jnp
                am.jnp = exp2_as_fmul(real)
                try:
                  fake = jax.jit(lambda *o, cfg=cfg: am.flash_attention(*o, kv_len=t, config=cfg))
                  row["exp2_as_fmul_ms"][key] = time_fn(fake, operands, args.reps)[0] * 1e3
                finally:
                  am.jnp = real
            except Exception as e:  # e.g. a config over the shared-memory budget
              result["errors"].append(f"{name} {key}: {type(e).__name__}: {str(e)[:300]}")
            print(f"  {key:28s} {row['kernel_ms'].get(key, float('nan')):8.3f} ms  "
                  f"exp2-as-fmul {row['exp2_as_fmul_ms'].get(key, float('nan')):8.3f} ms",
                  flush=True)
      del operand_sets, first
    result["timing"].append(row)
    del q, k, v
  path = atomic.write_json(os.path.join(args.out, f"attention_diag-{result['device_short']}.json"),
                           result)
  print("wrote", path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
