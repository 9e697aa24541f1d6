"""The calibration file: predictor coefficients α, β per block linear and the threshold τ.

Versioned JSON, written by `mpqjax calibrate`, read by `mpqjax generate --calibration FILE`.
A file made for another model (layer count, width, linear names) or another format version is
rejected with a UserInputError naming the mismatch.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from mpqjax import atomic, jsonio
from mpqjax.errors import UserInputError

FORMAT = "mpqjax-dmpq-calibration"
VERSION = 1


def model_signature(config, linear_names) -> dict[str, Any]:
  """What a calibration must match: the model's block structure."""
  return {"num_layers": int(config.num_layers), "inner_dim": int(config.inner_dim),
          "num_attention_heads": int(config.num_attention_heads),
          "text_embed_dim": int(config.text_embed_dim), "linear_names": list(linear_names)}


@dataclasses.dataclass
class Calibration:
  """alpha, beta: float[L, n_linears] (NaN for linears the predictor does not route);
  tau: the threshold chosen for target_bits; pearson_r: float[L, n] and overall."""
  model: dict
  alpha: np.ndarray
  beta: np.ndarray
  tau: float
  target_bits: float
  pearson_r: np.ndarray
  pearson_r_overall: float
  extra: dict = dataclasses.field(default_factory=dict)

  def check_model(self, config, linear_names) -> None:
    want = model_signature(config, linear_names)
    bad = [f"{k}: file has {self.model.get(k)!r}, model has {v!r}" for k, v in want.items()
           if self.model.get(k) != v]
    if bad:
      raise UserInputError("calibration file was made for another model (" + "; ".join(bad) + ")")

  def to_json(self) -> dict:
    def arr(a):
      return [[None if not math.isfinite(v) else float(v) for v in row] for row in np.asarray(a)]
    def num(v):
      return float(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf") if not math.isnan(v) \
          else None
    return {"format": FORMAT, "version": VERSION, "model": self.model,
            "alpha": arr(self.alpha), "beta": arr(self.beta), "tau": num(self.tau),
            "target_bits": self.target_bits, "pearson_r": arr(self.pearson_r),
            "pearson_r_overall": num(self.pearson_r_overall), **self.extra}

  def save(self, path: str) -> None:
    """Atomic write (temp file in the same folder, then rename)."""
    atomic.write_json(path, self.to_json())

  @classmethod
  def load(cls, path: str) -> "Calibration":
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"calibration file not found: {path}")
    d = jsonio.read_json_object(path)
    if d.get("format") != FORMAT:
      raise UserInputError(f"{path}: not an mpqjax calibration file (format must be {FORMAT!r})")
    if d.get("version") != VERSION:
      raise UserInputError(f"{path}: calibration format version {d.get('version')!r} is not "
                           f"supported (this mpqjax reads version {VERSION}); re-run "
                           f"`mpqjax calibrate`")
    def arr(name):
      try:
        a = np.asarray([[np.nan if v is None else v for v in row] for row in d[name]], np.float64)
      except (KeyError, TypeError, ValueError):
        raise UserInputError(f"{path}: field {name!r} is missing or not a 2-D list") from None
      if a.ndim != 2:
        raise UserInputError(f"{path}: field {name!r} must be 2-D, got shape {a.shape}")
      return a
    def num(name):
      v = d.get(name)
      return float("nan") if v is None else float(v)
    alpha, beta, r = arr("alpha"), arr("beta"), arr("pearson_r")
    if not (alpha.shape == beta.shape == r.shape):
      raise UserInputError(f"{path}: alpha {alpha.shape}, beta {beta.shape} and pearson_r "
                           f"{r.shape} must have the same shape")
    model = d.get("model")
    if not isinstance(model, dict):
      raise UserInputError(f"{path}: field 'model' is missing")
    if alpha.shape != (model.get("num_layers"), len(model.get("linear_names", []))):
      raise UserInputError(f"{path}: alpha shape {alpha.shape} does not match the model "
                           f"signature in the file")
    known = {"format", "version", "model", "alpha", "beta", "tau", "target_bits", "pearson_r",
             "pearson_r_overall"}
    return cls(model=model, alpha=alpha, beta=beta, tau=num("tau"),
               target_bits=float(d.get("target_bits", float("nan"))), pearson_r=r,
               pearson_r_overall=num("pearson_r_overall"),
               extra={k: v for k, v in d.items() if k not in known})
