"""mpqjax.generate end to end against diffusers' CogVideoXPipeline with a real (tiny, random)
CogVideoX transformer in float32: same initial latents and text embeddings, the unquantized
path (precision bf16 on an fp32 checkpoint = plain float32 linears), TDC off. Covers embed,
the block scan inside the timestep scan, CFG / dynamic CFG / no CFG and the DDIM scheduler.
Fixture: tests/fixtures/make_scheduler_fixtures.py (pipeline_e2e_*)."""
import glob
import json
import os

import numpy as np
import pytest

from mpqjax import cli
from mpqjax.generate import generate
from mpqjax.loading import load_transformer

HERE = os.path.dirname(__file__)
SRC = os.path.join(HERE, "fixtures", "pipeline", "tiny_cogvideox", "transformer")
CASES = sorted(os.path.basename(p)[len("pipeline_e2e_"):-4]
               for p in glob.glob(os.path.join(HERE, "fixtures", "schedulers", "pipeline_e2e_*.npz")))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  dst = str(tmp_path_factory.mktemp("e2e") / "ckpt")
  assert cli.main(["convert", SRC, dst, "--dtype", "fp32"]) == 0
  return load_transformer(dst)


def test_cases_present():
  assert len(CASES) >= 3, CASES


@pytest.mark.parametrize("case", CASES)
def test_generate_matches_diffusers_pipeline(model, case):
  base = os.path.join(HERE, "fixtures", "schedulers", f"pipeline_e2e_{case}")
  with open(base + ".json") as f:
    meta = json.load(f)
  a = dict(np.load(base + ".npz", allow_pickle=False))
  r = generate(model, a["prompt"], negative_emb=a["negative"], latents=a["latents"],
               steps=meta["num_inference_steps"], guidance=meta["guidance_scale"],
               dynamic_cfg=meta["use_dynamic_cfg"], scheduler="ddim", precision="bf16",
               tdc=False)
  assert r.summary["quantized_weights"] is False
  err = np.linalg.norm(r.latents - a["out"]) / np.linalg.norm(a["out"])
  assert err <= 1e-5, err
