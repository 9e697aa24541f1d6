"""DMPQ calibration: run prompts x seeds, record (Γ_b(t−1), E_rel(l,t)) for every block linear
and step, fit E_rel ≈ α_l Γ_b(t−1) + β_l per linear by least squares, report Pearson r per linear
and overall, pick τ for a target average activation width, save a versioned JSON and a Γ–E_rel
scatter PNG.

  calib, samples = calibrate(model, text_embs, seeds=(0, 1), steps=20, target_bits=6.0)

The trajectories run with TDC off and stats collection on (E_rel compares each linear's NVFP4
output with its BF16 output on the input it actually sees); by default every routed linear runs
INT8 while calibrating (`precision`), the closest cheap stand-in for the full-precision path.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mpqjax import atomic
from mpqjax.errors import UserInputError
from mpqjax.method import predictor
from mpqjax.method.calibration import Calibration, model_signature
from mpqjax.method.defaults import DEFAULT_TARGET_BITS


def collect(model, text_embs, seeds: Sequence[int], *, steps: int, precision: str = "int8",
            guidance: float = 6.0, scheduler: str = "ddim", latent_shape=None,
            negative_embs=None, implementation: str | None = None) -> dict[str, np.ndarray]:
  """Run every (prompt, seed) and return the pairs.

  text_embs: [N, T, Dt]. Returns {"gamma_prev": f64[R, S-1, L], "e_rel": f64[R, S-1, L, n],
  "gamma_first_step": ...} with R = N * len(seeds) runs; step t's E_rel sits with Γ of t−1.
  """
  from mpqjax.generate import generate
  text_embs = np.asarray(text_embs, np.float32)
  if text_embs.ndim != 3:
    raise UserInputError(f"text embeddings must be [N, T, D], got shape {text_embs.shape}")
  if steps < 2:
    raise UserInputError(f"calibration needs at least 2 steps (Γ of the previous step), got {steps}")
  if not seeds:
    raise UserInputError("calibration needs at least one seed")
  gammas, erels = [], []
  for n in range(text_embs.shape[0]):
    neg = None if negative_embs is None else np.asarray(negative_embs)[n]
    for seed in seeds:
      r = generate(model, text_embs[n], negative_emb=neg, seed=int(seed), steps=steps,
                   guidance=guidance, scheduler=scheduler, precision=precision,
                   tau=None if precision != "mixed" else 0.0, tdc=False, collect_stats=True,
                   latent_shape=latent_shape, outlier_threshold=float("inf"),
                   implementation=implementation)
      gammas.append(r.stats["gamma"][:-1].astype(np.float64))
      erels.append(r.stats["e_rel"][1:].astype(np.float64))
  return {"gamma_prev": np.stack(gammas), "e_rel": np.stack(erels)}


def fit(samples: dict[str, np.ndarray], routed: Sequence[bool], *,
        target_bits: float = DEFAULT_TARGET_BITS) -> dict[str, Any]:
  """Per (block, linear) least squares + Pearson r; overall r over all pooled pairs; τ.

  Returns alpha, beta, r: float[L, n] (NaN for linears the predictor does not route),
  r_overall, r_mean (mean of the per-linear r), tau, n_pairs.
  """
  g, e = samples["gamma_prev"], samples["e_rel"]  # [R, S-1, L], [R, S-1, L, n]
  L, n = e.shape[2], e.shape[3]
  alpha = np.full((L, n), np.nan)
  beta = np.full((L, n), np.nan)
  r = np.full((L, n), np.nan)
  xs, ys, preds = [], [], []
  for b in range(L):
    x = g[:, :, b].ravel()
    for l in range(n):
      if not routed[l]:
        continue
      y = e[:, :, b, l].ravel()
      alpha[b, l], beta[b, l], r[b, l] = predictor.fit_linear(x, y)
      xs.append(x)
      ys.append(y)
      preds.append(alpha[b, l] * x + beta[b, l])
  x_all, y_all = np.concatenate(xs), np.concatenate(ys)
  _, _, r_all = predictor.fit_linear(x_all, y_all)
  runs = g.shape[0]
  forced = runs * L * int(np.sum(routed))  # first-step decisions: always INT8
  tau = predictor.tau_for_target_bits(np.concatenate(preds), target_bits, forced_int8=forced)
  return {"alpha": alpha, "beta": beta, "r": r, "r_overall": r_all,
          "r_mean": float(np.nanmean(r)) if np.isfinite(r).any() else float("nan"),
          "tau": tau, "n_pairs": int(x_all.size)}


def calibrate(model, text_embs, *, seeds: Sequence[int] = (0,), steps: int = 20,
              target_bits: float = DEFAULT_TARGET_BITS, **run_kw) -> tuple[Calibration, dict]:
  """collect + fit -> (Calibration, samples)."""
  from models.cogvideox.params import LINEAR_NAMES
  from mpqjax.generate import ROUTED
  samples = collect(model, text_embs, seeds, steps=steps, **run_kw)
  f = fit(samples, ROUTED, target_bits=target_bits)
  names = [LINEAR_NAMES[i] for i in range(len(LINEAR_NAMES)) if ROUTED[i]]
  per_name = {nm: float(np.nanmean(f["r"][:, LINEAR_NAMES.index(nm)])) for nm in names}
  calib = Calibration(
      model=model_signature(model.config, LINEAR_NAMES), alpha=f["alpha"], beta=f["beta"],
      tau=f["tau"], target_bits=target_bits, pearson_r=f["r"], pearson_r_overall=f["r_overall"],
      extra={"pearson_r_mean_per_linear": f["r_mean"], "pearson_r_by_linear_name": per_name,
             "n_pairs": f["n_pairs"], "steps": steps, "seeds": [int(s) for s in seeds],
             "num_prompts": int(np.asarray(text_embs).shape[0]),
             "trajectory_precision": run_kw.get("precision", "int8"),
             "gamma": "||Y-X||_1/||X||_1 over video+text tokens, both CFG branches pooled",
             "e_rel": "||qlinear(x,NVFP4)-qlinear(x,BF16)||_F/||qlinear(x,BF16)||_F",
             "predictor": "mode = INT8 if alpha*Gamma_b(t-1)+beta > tau else NVFP4"})
  return calib, samples


def scatter_png(samples: dict[str, np.ndarray], calib: Calibration, path: str) -> None:
  """Γ_b(t−1) vs E_rel(l, t), one colour per linear kind, written atomically."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from models.cogvideox.params import LINEAR_NAMES
  from mpqjax.generate import ROUTED
  g, e = samples["gamma_prev"], samples["e_rel"]
  fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
  for l, name in enumerate(LINEAR_NAMES):
    if not ROUTED[l]:
      continue
    x = np.broadcast_to(g[..., None], e.shape)[..., l].ravel()
    ax.scatter(x, e[..., l].ravel(), s=6, alpha=0.5, label=name)
  ax.set_xlabel("block divergence Γ_b(t−1)")
  ax.set_ylabel("E_rel(l, t)  (NVFP4 vs BF16)")
  ax.set_title(f"DMPQ calibration: Pearson r overall {calib.pearson_r_overall:.3f}, "
               f"mean per linear {calib.extra.get('pearson_r_mean_per_linear', float('nan')):.3f}",
               fontsize=9)
  ax.legend(fontsize=7, markerscale=2)
  fig.tight_layout()
  try:
    atomic.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
  finally:
    plt.close(fig)
