"""A diffusers CogVideoX pipeline folder, run in JAX: prompt -> T5 embeddings -> (generate) ->
latents -> VAE decode -> uint8 frames -> MP4.

  pipe = load_pipeline("CogVideoX-2b")            # model_index.json + its component folders
  emb = pipe.encode_prompt(["a panda ..."])       # [B, 226, 4096]; T5 is freed afterwards
  model = pipe.load_transformer(quantize="nvfp4") # .config, .params (for mpqjax.generate)
  frames = pipe.decode_latents(latents)           # latents [B, F, C, h, w] -> u8 [B, F', H, W, 3]
  write_video(frames[0], "out.mp4")               # mpqjax.video

Folder layout (what CogVideoXPipeline.save_pretrained writes, as released):
  model_index.json  text_encoder/ (T5EncoderModel)  tokenizer/ (T5Tokenizer: spiece.model)
  transformer/ (CogVideoXTransformer3DModel)  vae/ (AutoencoderKLCogVideoX)
  scheduler/ (CogVideoXDDIMScheduler | CogVideoXDPMScheduler)
Missing parts, parts of another type, and configs that do not fit together are UserInputErrors
(the CLI exits 2), all problems listed at once.

Cache: the text encoder and VAE are converted once (names mapped, T5 layers stacked, cast to
`dtype`) into <cache_dir>/<component>-<key>/params.safetensors, keyed by the source files'
names, sizes and mtimes and the dtype; later runs stream that file tensor by tensor straight
to the device. The transformer goes through `mpqjax convert` (checkpoints_convert.cli.convert,
its own atomic orbax format) into <cache_dir>/transformer-<key> (key also over the weight
quantization) and mpqjax.load_transformer. cache_dir: argument, else $MPQJAX_CACHE, else
~/.cache/mpqjax; cache=False converts in memory every time.

Memory: T5 lives on the device only inside encode_prompt. `memory_report()` gives the peak
host RSS and, where the backend reports it, the peak device memory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import shutil
import tempfile
from typing import Any, Callable

import numpy as np

from mpqjax.errors import UserInputError
from mpqjax.jsonio import read_json_object
from mpqjax.video import to_uint8

PIPELINE_CLASSES = ("CogVideoXPipeline",)
# component -> (library, accepted class names)
COMPONENTS = {
    "text_encoder": ("transformers", ("T5EncoderModel",)),
    "tokenizer": ("transformers", ("T5Tokenizer", "T5TokenizerFast")),
    "transformer": ("diffusers", ("CogVideoXTransformer3DModel",)),
    "vae": ("diffusers", ("AutoencoderKLCogVideoX",)),
    "scheduler": ("diffusers", ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler")),
}
CACHE_VERSION = 1


_read_json = read_json_object


@dataclasses.dataclass
class PipelineSpec:
  """A validated pipeline folder: component folders and their parsed configs."""
  folder: str
  pipeline_class: str
  t5: Any             # models.t5.T5Config
  vae: Any            # models.cogvideox_vae.VAEConfig
  transformer: Any    # models.cogvideox.CogVideoXConfig
  scheduler: Any      # mpqjax.schedulers.SchedulerConfig

  def path(self, component: str) -> str:
    return os.path.join(self.folder, component)


def inspect_pipeline(folder: str) -> PipelineSpec:
  """Validate a diffusers CogVideoX pipeline folder; one UserInputError lists every problem."""
  from models.cogvideox.config import CogVideoXConfig
  from models.cogvideox_vae.model import VAEConfig
  from models.t5.model import T5Config
  from mpqjax.schedulers import SchedulerConfig

  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"pipeline folder not found: {folder}")
  index_path = os.path.join(folder, "model_index.json")
  if not os.path.isfile(index_path):
    raise UserInputError(f"{folder}: no model_index.json; --model must be a diffusers pipeline "
                         "folder (CogVideoXPipeline.save_pretrained layout)")
  index = _read_json(index_path)
  cls = index.get("_class_name")
  if cls not in PIPELINE_CLASSES:
    raise UserInputError(f"{index_path}: _class_name {cls!r} is not a text-to-video CogVideoX "
                         f"pipeline (expected {' or '.join(PIPELINE_CLASSES)})")
  problems = []
  for name, (lib, classes) in COMPONENTS.items():
    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2):
      problems.append(f"model_index.json has no {name} entry")
      continue
    if entry[1] not in classes:
      problems.append(f"{name} is {entry[0]}.{entry[1]}, expected {lib}.{' or '.join(classes)}")
    if not os.path.isdir(os.path.join(folder, name)):
      problems.append(f"{name}/ folder is missing")
  if problems:
    raise UserInputError(f"{folder}: not a usable CogVideoX pipeline: " + "; ".join(problems))

  def cfg(component, filename, parse):
    path = os.path.join(folder, component, filename)
    if not os.path.isfile(path):
      problems.append(f"{component}/{filename} is missing")
      return None
    try:
      return parse(_read_json(path), path)
    except (UserInputError, ValueError, TypeError) as e:
      problems.append(str(e))
      return None

  t5 = cfg("text_encoder", "config.json", lambda d, p: T5Config.from_dict(d, source=p))
  vae = cfg("vae", "config.json", lambda d, p: VAEConfig.from_dict(d, source=p))
  tr = cfg("transformer", "config.json", lambda d, p: CogVideoXConfig.from_dict(d, source=p))
  sch = cfg("scheduler", "scheduler_config.json", lambda d, p: SchedulerConfig.from_diffusers(d))
  for name in ("text_encoder", "transformer", "vae"):
    files = os.listdir(os.path.join(folder, name))
    if not any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files):
      pickled = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
      problems.append(f"{name}/ has no safetensors weights" + (
          f" (only pickled {', '.join(pickled)}, which are refused: re-save with "
          "safe_serialization=True)" if pickled else ""))
  if not os.path.isfile(os.path.join(folder, "tokenizer", "spiece.model")):
    problems.append("tokenizer/spiece.model (the T5 sentencepiece model) is missing")
  if t5 is not None and tr is not None and t5.d_model != tr.text_embed_dim:
    problems.append(f"mismatched configs: text_encoder d_model={t5.d_model} but transformer "
                    f"text_embed_dim={tr.text_embed_dim}")
  if vae is not None and tr is not None:
    out_ch = tr.out_channels or tr.in_channels
    if not vae.latent_channels == tr.in_channels == out_ch:
      problems.append(f"mismatched configs: vae latent_channels={vae.latent_channels} but "
                      f"transformer in/out_channels={tr.in_channels}/{out_ch}")
    if int(vae.temporal_compression_ratio) != tr.temporal_compression_ratio:
      problems.append(f"mismatched configs: vae temporal_compression_ratio="
                      f"{vae.temporal_compression_ratio} but transformer "
                      f"{tr.temporal_compression_ratio}")
  if problems:
    raise UserInputError(f"{folder}: " + "; ".join(problems))
  return PipelineSpec(folder, cls, t5, vae, tr, sch)


# ------------------------------------------------------------------------------- cache
def _source_key(src: str, dtype: str) -> str:
  h = hashlib.sha256(f"v{CACHE_VERSION}|{os.path.abspath(src)}|{dtype}".encode())
  for name in sorted(os.listdir(src)):
    st = os.stat(os.path.join(src, name))
    h.update(f"|{name}:{st.st_size}:{st.st_mtime_ns}".encode())
  return h.hexdigest()[:16]


def default_cache_dir() -> str:
  return os.environ.get("MPQJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "mpqjax")


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _save_params(params: dict, dst: str, meta: dict) -> None:
  """Write params (nested dict of numpy) as one safetensors file + meta.json, atomically."""
  from checkpoints_convert.safetensors_stream import SafetensorsWriter
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
  try:
    flat = _flatten(params)
    specs = {k: (a.dtype, a.shape) for k, a in flat.items()}
    with SafetensorsWriter(os.path.join(tmp, "params.safetensors"), specs) as w:
      for k, a in flat.items():
        w.write(k, a)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(meta, f, indent=1)
    try:
      os.rename(tmp, dst)
    except OSError:  # another process made it first
      if not os.path.isdir(dst):
        raise
      shutil.rmtree(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _load_params_to_device(path: str, device_put: Callable) -> dict:
  """Stream a cached params.safetensors tensor by tensor onto the device."""
  from checkpoints_convert.safetensors_stream import open_checkpoint
  params: dict = {}
  with open_checkpoint(path) as ckpt:
    for key in ckpt.keys():
      *head, last = key.split("/")
      node = params
      for k in head:
        node = node.setdefault(k, {})
      node[last] = device_put(ckpt.read(key))
  return params


# --------------------------------------------------------------------------- pipeline
@dataclasses.dataclass
class LoadedTransformer:
  """What mpqjax.generate.generate needs: .config and .params."""
  config: Any
  params: dict
  stats: dict


class Pipeline:
  """A loaded pipeline folder (see module doc). Weights are loaded lazily, per stage."""

  def __init__(self, spec: PipelineSpec, *, dtype: str = "bf16", cache: bool = True,
               cache_dir: str | None = None, log: Callable[[str], None] | None = None):
    if dtype not in ("bf16", "fp32"):
      raise UserInputError(f"dtype must be 'bf16' or 'fp32', got {dtype!r}")
    self.spec = spec
    self.dtype = dtype
    self.cache = cache
    self.cache_dir = cache_dir or default_cache_dir()
    self.log = log or (lambda s: None)
    self._tokenizer = None
    self._vae_params = None
    self.peak_device_bytes: dict[str, int] = {}

  # -- weights
  def _component_params(self, component: str, convert: Callable) -> dict:
    import jax
    src = self.spec.path(component)
    if not self.cache:
      _, params = convert(src, dtype=self.dtype)
      return jax.tree.map(jax.device_put, params)
    dst = os.path.join(self.cache_dir, f"{component}-{_source_key(src, self.dtype)}")
    if not os.path.isfile(os.path.join(dst, "params.safetensors")):
      self.log(f"converting {src} -> {dst} ({self.dtype})")
      _, params = convert(src, dtype=self.dtype)
      _save_params(params, dst, {"source": os.path.abspath(src), "component": component,
                                 "dtype": self.dtype, "version": CACHE_VERSION})
      del params
    return _load_params_to_device(os.path.join(dst, "params.safetensors"), jax.device_put)

  @property
  def tokenizer(self):
    if self._tokenizer is None:
      from models.t5.tokenizer import T5Tokenizer
      self._tokenizer = T5Tokenizer.from_folder(self.spec.path("tokenizer"))
    return self._tokenizer

  # -- text
  def encode_prompt(self, texts: str | list[str], max_sequence_length: int | None = None):
    """T5 embeddings [B, max_sequence_length (226), d_model] in the pipeline dtype, as
    CogVideoXPipeline._get_t5_prompt_embeds (no attention mask). T5 is loaded for this call
    and its device buffers are deleted before returning."""
    import jax
    import jax.numpy as jnp
    from checkpoints_convert.t5 import convert_t5
    from models.t5.model import encode_jit
    n = max_sequence_length or self.spec.transformer.max_text_seq_length
    ids = self.tokenizer(texts, max_length=n)
    params = self._component_params("text_encoder", convert_t5)
    try:
      emb = encode_jit(params, jnp.asarray(ids), self.spec.t5)
      emb.block_until_ready()
    finally:
      self._note_device_peak("text_encoder")
      for leaf in jax.tree.leaves(params):
        leaf.delete()
      del params
    return emb

  # -- denoiser
  def load_transformer(self, quantize: str | None = "nvfp4"):
    """The transformer (.config, .params), its block linears quantized to `quantize` (None:
    unquantized, in the pipeline dtype). With the cache: converted once by `mpqjax convert`'s
    function into <cache_dir>/transformer-<key> and loaded with mpqjax.load_transformer;
    without: converted in memory (streaming) by checkpoints_convert.cogvideox."""
    import jax
    from checkpoints_convert.cogvideox import build_params
    from checkpoints_convert.safetensors_stream import open_checkpoint
    if quantize not in (None, "nvfp4", "int8"):
      raise UserInputError(f"quantize must be None, 'nvfp4' or 'int8', got {quantize!r}")
    src = self.spec.path("transformer")
    if self.cache:
      from checkpoints_convert.cli import convert
      from mpqjax.loading import load_transformer
      dst = os.path.join(self.cache_dir,
                         f"transformer-{_source_key(src, f'{self.dtype}-{quantize}')}")
      if not os.path.isdir(dst):
        self.log(f"converting {src} -> {dst} ({self.dtype}, quantize={quantize})")
        os.makedirs(self.cache_dir, exist_ok=True)
        convert(src, dst, quantize=quantize, dtype=self.dtype)
      return load_transformer(dst)
    with open_checkpoint(src) as reader:
      params, stats = build_params(reader, self.spec.transformer, dtype=self.dtype,
                                   quantize=quantize)
    return LoadedTransformer(self.spec.transformer, jax.device_put(params), stats)

  # -- pixels
  def decode_latents(self, latents, *, tiling: bool | Any = True, return_float: bool = False):
    """latents f32 [B, F, C, h, w] (the transformer's layout) -> uint8 frames [B, F', H, W, 3],
    as CogVideoXPipeline.decode_latents + postprocess_video: z / scaling_factor, VAE decode
    (tiled by default, as with pipe.vae.enable_tiling()), clip(x / 2 + 0.5, 0, 1).
    return_float: also return the raw decoder output [B, 3, F', H, W]."""
    from checkpoints_convert.vae import convert_vae
    from models.cogvideox_vae.model import decode
    latents = np.asarray(latents, np.float32)
    c = self.spec.vae.latent_channels
    if latents.ndim != 5 or latents.shape[2] != c:
      raise UserInputError(f"latents must be [B, F, {c}, h, w], got {list(latents.shape)}")
    if self._vae_params is None:
      self._vae_params = self._component_params("vae", convert_vae)
    z = np.transpose(latents, (0, 2, 1, 3, 4)) / np.float32(self.spec.vae.scaling_factor)
    video = decode(self._vae_params, z, self.spec.vae, tiling=tiling)
    self._note_device_peak("vae")
    frames = to_uint8(np.transpose(video / 2 + 0.5, (0, 2, 3, 4, 1)))
    return (frames, video) if return_float else frames

  def free_vae(self) -> None:
    import jax
    if self._vae_params is not None:
      for leaf in jax.tree.leaves(self._vae_params):
        leaf.delete()
      self._vae_params = None

  # -- memory
  def _note_device_peak(self, stage: str) -> None:
    peak = device_peak_bytes()
    if peak is not None:
      self.peak_device_bytes[stage] = peak

  def memory_report(self) -> dict:
    """Peak host RSS of this process and the device's peak bytes in use after each stage
    (cumulative peaks as the backend reports them; None where it reports nothing, e.g. CPU)."""
    return {"peak_host_rss_bytes": peak_host_rss_bytes(),
            "peak_device_bytes": device_peak_bytes(),
            "peak_device_bytes_after_stage": dict(self.peak_device_bytes)}


def peak_host_rss_bytes() -> int:
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def device_peak_bytes() -> int | None:
  import jax
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # backends without memory stats
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def load_pipeline(folder: str, **kwargs) -> Pipeline:
  """Validate `folder` (see inspect_pipeline) and return a Pipeline; kwargs: dtype ("bf16" or
  "fp32"), cache (bool), cache_dir, log."""
  return Pipeline(inspect_pipeline(folder), **kwargs)


def is_pipeline_folder(path: str) -> bool:
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json"))


def generate_video(pipe: Pipeline, prompt: str, *, negative_prompt: str = "",
                   quantize: str | None = "nvfp4", num_frames: int | None = None,
                   height: int | None = None, width: int | None = None,
                   **generate_kwargs):
  """Prompt -> (uint8 frames [F, H, W, 3], mpqjax.generate.GenerateResult), freeing T5 before
  the denoiser is loaded and the denoiser before decoding. generate_kwargs go to
  mpqjax.generate.generate (precision, calibration, tdc, steps, guidance, seed, ...); the
  scheduler defaults to the folder's. num_frames/height/width: pixels (default: the
  transformer config's sample size)."""
  import jax
  from mpqjax.generate import generate
  tr = pipe.spec.transformer
  texts = [negative_prompt, prompt]
  emb = np.asarray(pipe.encode_prompt(texts).astype("float32"))  # T5 freed inside
  neg, pos = emb[:1], emb[1:]
  s = pipe.spec.vae.spatial_scale
  f = ((num_frames - 1) // tr.temporal_compression_ratio + 1) if num_frames else None
  shape = None
  if f or height or width:
    shape = (f or (tr.sample_frames - 1) // tr.temporal_compression_ratio + 1,
             (height // s) if height else tr.sample_height,
             (width // s) if width else tr.sample_width)
  generate_kwargs.setdefault("scheduler", pipe.spec.scheduler)
  model = pipe.load_transformer(quantize=quantize)
  try:
    result = generate(model, pos, negative_emb=neg, latent_shape=shape, **generate_kwargs)
  finally:
    pipe._note_device_peak("transformer")
    for leaf in jax.tree.leaves(model.params):
      if hasattr(leaf, "delete"):
        leaf.delete()
    del model
  frames = pipe.decode_latents(result.latents)
  pipe.free_vae()
  return frames[0], result
