"""Peak host and device memory (and time) of the pipeline's T5-XXL text encoding and tiled VAE
decoding at CogVideoX's real sizes, with random weights (no released weights needed).

  PYTHONPATH=. python benchmarks/pipeline_memory.py --stage vae [--frames 49 --height 480 --width 720]
  PYTHONPATH=. python benchmarks/pipeline_memory.py --stage t5

One stage per process so that each peak is that stage's own. A stage builds a synthetic
checkpoint folder on disk (the released config, random bf16 weights written tensor by tensor),
then runs it through mpqjax.pipeline exactly as `generate` does: conversion into the cache
(streaming), loading from the cache tensor by tensor, and encode_prompt (T5, freed afterwards)
or decode_latents (tiled, as with pipe.vae.enable_tiling()). Writes
pipeline_memory-<stage>-<device>.json (device, JAX version, date, command, numbers).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128,
              layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu", model_type="t5",
              architectures=["T5EncoderModel"])
VAE_2B = dict(_class_name="AutoencoderKLCogVideoX", in_channels=3, out_channels=3,
              latent_channels=16, block_out_channels=[128, 256, 256, 512], layers_per_block=3,
              norm_num_groups=32, norm_eps=1e-6, temporal_compression_ratio=4,
              sample_height=480, sample_width=720, scaling_factor=1.15258426,
              up_block_types=["CogVideoXUpBlock3D"] * 4,
              down_block_types=["CogVideoXDownBlock3D"] * 4, act_fn="silu")


def write_random_folder(folder: str, config: dict, shapes: dict, filename: str,
                        rng: np.random.Generator) -> int:
  """config.json + one safetensors file of random bf16 tensors (fan-in scaled), written one
  tensor at a time. Returns the bytes written."""
  import ml_dtypes
  from checkpoints_convert.safetensors_stream import SafetensorsWriter
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(config, f)
  bf16 = np.dtype(ml_dtypes.bfloat16)
  specs = {k: (bf16, s) for k, s in shapes.items()}
  total = 0
  with SafetensorsWriter(os.path.join(folder, filename), specs) as w:
    for k, s in shapes.items():
      fan_in = int(np.prod(s[1:])) if len(s) > 1 else 1
      if len(s) == 1:
        a = 1.0 + 0.1 * rng.standard_normal(s, np.float32)
      else:
        a = rng.standard_normal(s, np.float32) / np.sqrt(fan_in)
      w.write(k, a.astype(bf16))
      total += a.size * 2
      del a
  return total


def mib(n):
  return None if n is None else round(n / 2 ** 20, 1)


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--stage", choices=("vae", "t5"), required=True)
  ap.add_argument("--frames", type=int, default=49)
  ap.add_argument("--height", type=int, default=480)
  ap.add_argument("--width", type=int, default=720)
  ap.add_argument("--prompts", type=int, default=2, help="batch (2 = CFG's negative+positive)")
  ap.add_argument("--t5-layers", type=int, default=24, help="fewer for a smoke test")
  ap.add_argument("--workdir", default=None, help="where the synthetic folders go (tmp)")
  ap.add_argument("--out", default=os.path.join(HERE, "results"))
  args = ap.parse_args()

  sys.path.insert(0, ROOT)
  import jax

  from models.cogvideox.config import PRESETS
  from models.cogvideox_vae.model import VAEConfig
  from models.cogvideox_vae.model import param_shapes as vae_shapes
  from models.t5.model import T5Config
  from models.t5.model import param_shapes as t5_shapes
  from mpqjax import pipeline as pl
  from mpqjax.schedulers import SchedulerConfig

  work = args.workdir or tempfile.mkdtemp(prefix="pipeline_memory-")
  rng = np.random.default_rng(0)
  t5_json = dict(T5_XXL, num_layers=args.t5_layers)
  t5cfg, vaecfg = T5Config.from_dict(t5_json), VAEConfig.from_dict(VAE_2B)
  spec = pl.PipelineSpec(work, "CogVideoXPipeline", t5cfg, vaecfg, PRESETS["cogvideox-2b"],
                         SchedulerConfig.preset("cogvideox-2b"))
  pipe = pl.Pipeline(spec, dtype="bf16", cache_dir=os.path.join(work, "cache"),
                     log=lambda s: print(s, flush=True))
  result = {"stage": args.stage, "device": jax.devices()[0].device_kind,
            "backend": jax.default_backend(), "jax_version": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python"] + sys.argv), "dtype": "bf16"}
  t0 = time.time()
  if args.stage == "t5":
    nbytes = write_random_folder(os.path.join(work, "text_encoder"), t5_json, t5_shapes(t5cfg),
                                 "model.safetensors", rng)
    shutil.copytree(os.path.join(ROOT, "tests", "fixtures", "pipeline", "tiny_cogvideox",
                                 "tokenizer"), os.path.join(work, "tokenizer"))
    result.update(weights_bytes=nbytes, synth_s=round(time.time() - t0, 1))
    rss_before = pl.peak_host_rss_bytes()
    prompts = ["a panda plays guitar in a bamboo forest"] * args.prompts
    t1 = time.time()
    emb = pipe.encode_prompt(prompts)  # converts into the cache, loads, encodes, frees
    t_first = time.time() - t1
    result["rss_after_convert_and_encode_mib"] = mib(pl.peak_host_rss_bytes())
    t1 = time.time()
    emb = pipe.encode_prompt(prompts)  # from the cache (compiled already)
    t_cached = time.time() - t1
    live = sum(b.nbytes for b in jax.live_arrays())
    result.update(embeddings_shape=list(emb.shape), first_call_s=round(t_first, 1),
                  cached_call_s=round(t_cached, 1), live_device_bytes_after_free=live,
                  rss_before_mib=mib(rss_before))
  else:
    nbytes = write_random_folder(os.path.join(work, "vae"), VAE_2B, vae_shapes(vaecfg),
                                 "diffusion_pytorch_model.safetensors", rng)
    result.update(weights_bytes=nbytes, synth_s=round(time.time() - t0, 1))
    f = (args.frames - 1) // 4 + 1
    latents = rng.standard_normal((1, f, 16, args.height // 8, args.width // 8), np.float32)
    t1 = time.time()
    frames = pipe.decode_latents(latents)  # converts, loads, compiles, decodes (tiled)
    t_first = time.time() - t1
    t1 = time.time()
    frames = pipe.decode_latents(latents)
    t_second = time.time() - t1
    result.update(latents_shape=list(latents.shape), frames_shape=list(frames.shape),
                  first_call_s=round(t_first, 1), second_call_s=round(t_second, 1),
                  finite=bool(np.isfinite(frames).all()))
  mem = pipe.memory_report()
  result.update(peak_host_rss_mib=mib(mem["peak_host_rss_bytes"]),
                peak_device_mib=mib(mem["peak_device_bytes"]),
                peak_device_mib_after_stage={k: mib(v) for k, v in
                                             mem["peak_device_bytes_after_stage"].items()})
  print(json.dumps(result, indent=1))
  os.makedirs(args.out, exist_ok=True)
  dev = result["device"].replace(" ", "_")
  path = os.path.join(args.out, f"pipeline_memory-{args.stage}-{dev}.json")
  with open(path + ".tmp", "w") as fh:
    json.dump(result, fh, indent=1)
  os.replace(path + ".tmp", path)
  if not args.workdir:
    shutil.rmtree(work, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
