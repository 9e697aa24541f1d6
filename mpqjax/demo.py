"""`mpqjax demo`: quantize one random linear layer and compare the three activation modes
against a float64 reference, on Gaussian and outlier-heavy inputs."""
from __future__ import annotations

import argparse

from mpqjax.errors import UserInputError


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--tokens", type=int, default=256, help="rows of x (default 256)")
  p.add_argument("--in-features", type=int, default=1024, help="K, a multiple of 128")
  p.add_argument("--out-features", type=int, default=1024, help="N")
  p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from mpqjax.qlinear import Mode, qlinear, quantize_linear

  k, n, m = args.in_features, args.out_features, args.tokens
  if k % 128 or k <= 0 or n <= 0 or m <= 0:
    raise UserInputError(f"--in-features must be a positive multiple of 128 and --tokens, "
                         f"--out-features positive; got K={k}, N={n}, M={m}")
  rng = np.random.default_rng(args.seed)
  w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
  b = rng.standard_normal(n).astype(np.float32) * 0.1
  x = rng.standard_normal((m, k)).astype(np.float32)
  x_out = x.copy()
  x_out[:, rng.choice(k, max(1, k // 64), replace=False)] *= 20.0
  layer = quantize_linear(w, b)
  f = jax.jit(lambda x, mode: qlinear(x, layer, mode))
  print(f"device: {jax.devices()[0].device_kind}   layer {n}x{k}: "
        f"{layer.nbytes / 1e6:.2f} MB resident vs {n * k * 2 / 1e6:.2f} MB in bf16 "
        f"({n * k * 2 / layer.nbytes:.2f}x smaller)")
  print(f"{'input':<10}" + "".join(f"{mode.name:>10}" for mode in Mode) + "   (rel. error vs float64)")
  for name, xx in (("gaussian", x), ("outliers", x_out)):
    ref = xx.astype(np.float64) @ w.T.astype(np.float64) + b
    errs = [np.linalg.norm(np.asarray(f(jnp.asarray(xx), jnp.int32(mode)), np.float64) - ref)
            / np.linalg.norm(ref) for mode in Mode]
    print(f"{name:<10}" + "".join(f"{e:>10.4f}" for e in errs))
  print(f"one compilation served all modes: {f._cache_size() == 1}")
  return 0
