"""`mpqjax convert` and `load_transformer`: reports, quantized output, every bad input of
issue 3 (exit code 2, clear message, no DST left behind), and (MPQJAX_SLOW=1) a real-size
2B random-weight sharded conversion with peak RSS recorded."""
import json
import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import mpqjax
from checkpoints_convert import store
from checkpoints_convert.safetensors_stream import SafetensorsWriter, open_checkpoint
from mpqjax.cli import main
from mpqjax.errors import UserInputError
from mpqjax.qlinear import QuantizedLinear
from mpqjax.testing import rel_err as _rel

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "cogvideox")
ROPE = os.path.join(FIXTURES, "rope_nonsquare_sharded")   # sharded, f32
SINCOS = os.path.join(FIXTURES, "sincos_nonsquare")       # single file, f32


def _rewrite(src, dst, mutate):
  """Copy a fixture into one safetensors file after mutate(dict name -> array)."""
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "config.json"), dst)
  with open_checkpoint(src) as r:
    tensors = {k: r.read(k) for k in r.keys()}
  mutate(tensors)
  with SafetensorsWriter(os.path.join(dst, "diffusion_pytorch_model.safetensors"),
                         {k: (v.dtype, v.shape) for k, v in tensors.items()}) as w:
    for k, v in tensors.items():
      w.write(k, v)
  return dst


def _fails(capsys, args, *patterns):
  rc = main(["convert", *map(str, args)])
  err = capsys.readouterr().err
  assert rc == 2, err
  for p in patterns:
    assert p in err, f"{p!r} not in:\n{err}"
  return err


def _no_leftovers(parent, dst):
  assert not os.path.exists(dst)
  assert not [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


def test_cli_reports_counts_bytes_and_rss(tmp_path, capsys):
  dst = tmp_path / "out"
  assert main(["convert", ROPE, str(dst), "--dtype", "fp32"]) == 0
  cap = capsys.readouterr()
  with open_checkpoint(ROPE) as r:  # count independently of the converter's config shapes
    n = sum(int(np.prod(r.shape(k))) for k in r.keys())
  assert f"parameters:      {n:,}" in cap.out
  assert f"{2 * n:,} bytes" in cap.out and f"{4 * n:,} bytes" in cap.out
  assert "peak RSS" in cap.out
  assert "[   64/64]" in cap.err  # progress counter
  m = json.loads((dst / "manifest.json").read_text())
  assert m["format_version"] == store.FORMAT_VERSION and m["param_count"] == n
  assert sorted(os.listdir(dst)) == ["config.json", "manifest.json", "params"]


def test_cli_subprocess_exit_code(tmp_path):
  """The installed entry point: bad input exits 2 with 'mpqjax convert: error:'."""
  p = subprocess.run([sys.executable, "-m", "mpqjax", "convert", str(tmp_path / "nope"),
                      str(tmp_path / "out")], capture_output=True, text=True)
  assert p.returncode == 2 and "mpqjax convert: error:" in p.stderr and "nope" in p.stderr


def test_existing_dst_needs_overwrite(tmp_path, capsys):
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "keep.txt").write_text("precious")
  _fails(capsys, [SINCOS, dst], "exists", "--overwrite")
  assert (dst / "keep.txt").read_text() == "precious"
  assert main(["convert", SINCOS, str(dst), "--dtype", "fp32", "--overwrite"]) == 0
  assert not (dst / "keep.txt").exists() and (dst / "manifest.json").exists()
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
  # the source can never be the destination, even with --overwrite
  _fails(capsys, [SINCOS, SINCOS, "--overwrite"], "overwrite the source")


def test_key_problems_listed_together(tmp_path, capsys):
  def mutate(t):
    del t["transformer_blocks.1.attn1.to_k.weight"]
    del t["norm_final.bias"]
    t["transformer_blocks.0.extra.weight"] = np.ones(3, np.float32)
    t["proj_out.bias"] = np.ones(5, np.float32)
  src = _rewrite(SINCOS, str(tmp_path / "src"), mutate)
  _fails(capsys, [src, tmp_path / "out"], "2 missing", "transformer_blocks.1.attn1.to_k.weight",
               "norm_final.bias", "1 unexpected", "transformer_blocks.0.extra.weight",
               "1 mis-shaped", "proj_out.bias: checkpoint [5], config expects [16]")
  _no_leftovers(tmp_path, tmp_path / "out")


def test_truncated_shard_names_the_file(tmp_path, capsys):
  src = tmp_path / "src"
  shutil.copytree(ROPE, src)
  shard = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))[1]
  data = (src / shard).read_bytes()
  (src / shard).write_bytes(data[:len(data) - 100])
  _fails(capsys, [src, tmp_path / "out"], shard, "truncated")
  _no_leftovers(tmp_path, tmp_path / "out")


def test_corrupt_header_names_the_file(tmp_path, capsys):
  src = tmp_path / "src"
  shutil.copytree(SINCOS, src)
  f = src / "diffusion_pytorch_model.safetensors"
  data = bytearray(f.read_bytes())
  data[8:12] = b"\xff\xfe{["
  f.write_bytes(bytes(data))
  _fails(capsys, [src, tmp_path / "out"], "diffusion_pytorch_model.safetensors", "corrupt")
  _no_leftovers(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.bin", "model.pt"])
def test_pickles_refused(tmp_path, capsys, name):
  src = tmp_path / "src"
  src.mkdir()
  shutil.copy(os.path.join(SINCOS, "config.json"), src)
  (src / name).write_bytes(b"\x80\x04" + os.urandom(62))  # a pickle protocol header: never read
  _fails(capsys, [src, tmp_path / "out"], name, "refused")
  _no_leftovers(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("key,quantize", [
    ("patch_embed.proj.weight", None),
    ("transformer_blocks.0.attn1.to_k.bias", "nvfp4"),  # read with its quantized weight
    ("transformer_blocks.1.norm2.norm.weight", None),
])
def test_nonfinite_weights_rejected(tmp_path, capsys, key, quantize):
  rng = np.random.default_rng()

  def mutate(t):
    a = t[key].copy().reshape(-1)
    a[rng.integers(a.size)] = rng.choice([np.nan, np.inf, -np.inf])
    t[key] = a.reshape(t[key].shape)
  src = _rewrite(SINCOS, str(tmp_path / "src"), mutate)
  args = [src, tmp_path / "out"] + (["--quantize", quantize] if quantize else [])
  _fails(capsys, args, f"tensor {key}", "non-finite")
  _no_leftovers(tmp_path, tmp_path / "out")


def test_failed_write_leaves_no_dst(tmp_path, capsys, monkeypatch):
  def boom(*a, **k):
    raise UserInputError("disk full (simulated)")
  monkeypatch.setattr(store, "_orbax", boom)
  _fails(capsys, [SINCOS, tmp_path / "out"], "disk full")
  _no_leftovers(tmp_path, tmp_path / "out")


def test_config_problems_exit_2(tmp_path, capsys):
  src = tmp_path / "src"
  shutil.copytree(SINCOS, src)
  cfg = json.loads((src / "config.json").read_text())
  (src / "config.json").write_text(json.dumps(dict(cfg, patch_size_t=2)))
  _fails(capsys, [src, tmp_path / "out"], "patch_size_t")
  os.remove(src / "config.json")
  _fails(capsys, [src, tmp_path / "out"], "config.json")
  _no_leftovers(tmp_path, tmp_path / "out")


def test_load_transformer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope"):
    mpqjax.load_transformer(tmp_path / "nope")
  with pytest.raises(UserInputError, match="convert it first"):
    mpqjax.load_transformer(SINCOS)
  dst = tmp_path / "ck"
  assert main(["convert", SINCOS, str(dst), "--dtype", "fp32", "--quiet"]) == 0
  model = mpqjax.load_transformer(dst)
  io = np.load(os.path.join(SINCOS, "io.npz"))
  with pytest.raises(UserInputError, match="quantized checkpoint"):
    model(io["latents"], io["timestep"], io["text_emb"], precision="nvfp4")
  with pytest.raises(UserInputError, match="channels"):
    model(io["latents"][:, :, :2], io["timestep"], io["text_emb"])
  m = json.loads((dst / "manifest.json").read_text())
  (dst / "manifest.json").write_text(json.dumps(dict(m, format_version=999)))
  with pytest.raises(UserInputError, match="format version 999"):
    mpqjax.load_transformer(dst)


@pytest.mark.parametrize("quantize", [None, "nvfp4"])
def test_small_parts_and_layer_slices_round_trip(tmp_path, monkeypatch, quantize):
  """With tiny parts every large group is written in layer slices; loading reassembles
  exactly what build_params produces in memory."""
  import jax
  from checkpoints_convert.cogvideox import build_params
  from checkpoints_convert.cli import convert
  from models.cogvideox.config import CogVideoXConfig
  src = os.path.join(FIXTURES, "sincos_sample_sharded")  # 3 layers
  monkeypatch.setattr(store, "PART_BYTES", 6000)
  m = convert(src, str(tmp_path / "ck"), quantize=quantize, dtype="fp32")
  assert m["layer_slices"] and len(m["parts"]) > len(m["layer_slices"])
  assert {tuple(v) for v in m["layer_slices"].values()} >= {(0, 1), (2, 3)}
  loaded = mpqjax.load_transformer(tmp_path / "ck").params
  with open_checkpoint(src) as r:
    ref, _ = build_params(r, CogVideoXConfig.from_json(src), dtype="fp32", quantize=quantize)
  is_q = lambda x: isinstance(x, QuantizedLinear)
  flat_ref = jax.tree_util.tree_leaves_with_path(ref, is_leaf=None)
  flat_got = jax.tree_util.tree_leaves_with_path(loaded)
  assert [p for p, _ in flat_ref] == [p for p, _ in flat_got]
  for (path, a), (_, b) in zip(flat_ref, flat_got):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8),
                                  err_msg=jax.tree_util.keystr(path))
  assert jax.tree.structure(ref, is_leaf=is_q) == jax.tree.structure(loaded, is_leaf=is_q)


def test_quantized_and_bf16_conversions(tmp_path):
  """Quantized checkpoints run at all three precisions close to diffusers' float64 output.
  Bounds are ~2x the errors measured on these fixtures (nvfp4 weights: 3.3e-2 at W4A16,
  4.4e-2 at W4A4; int8 weights: 2e-3..3.3e-3; bf16 baseline 5.5e-3)."""
  io = np.load(os.path.join(ROPE, "io.npz"))
  args = (io["latents"], io["timestep"], io["text_emb"])
  ref = io["out"]
  main(["convert", ROPE, str(tmp_path / "q4"), "--quantize", "nvfp4", "--dtype", "fp32",
        "--quiet"])
  m = mpqjax.load_transformer(tmp_path / "q4")
  blocks = m.params["transformer_blocks"]
  assert isinstance(blocks["ff"]["net"]["0"]["proj"], QuantizedLinear)
  assert blocks["attn1"]["norm_q"]["weight"].dtype == np.float32
  assert m.manifest["bytes"] < 0.7 * m.manifest["bf16_bytes"]
  errs = {p: _rel(m(*args, precision=p), ref) for p in ("bf16", "int8", "nvfp4")}
  assert errs["bf16"] < 0.07 and errs["int8"] < 0.07 and errs["nvfp4"] < 0.09, errs
  assert errs["bf16"] < errs["nvfp4"], errs
  main(["convert", ROPE, str(tmp_path / "q8"), "--quantize", "int8", "--quiet"])
  m8 = mpqjax.load_transformer(tmp_path / "q8")
  assert m8.params["patch_embed"]["proj"]["weight"].dtype == ml_dtypes.bfloat16
  e8 = _rel(m8(*args, precision="int8"), ref)
  assert e8 < 0.01 and e8 < errs["int8"], e8
  main(["convert", ROPE, str(tmp_path / "b16"), "--quiet"])
  mb = mpqjax.load_transformer(tmp_path / "b16")
  out = mb(*args)
  assert out.dtype == ml_dtypes.bfloat16
  assert 1e-4 < _rel(out, ref) < 0.02


SLOW = os.environ.get("MPQJAX_SLOW") != "1"
SLOW_5B = os.environ.get("MPQJAX_SLOW_5B") != "1"


@pytest.mark.slow
@pytest.mark.parametrize("preset,quantize", [
    pytest.param("cogvideox-2b", ("nvfp4", None), marks=pytest.mark.skipif(
        SLOW, reason="real-size 2B conversion (3.4 GB of shards, ~4 min); MPQJAX_SLOW=1")),
    pytest.param("cogvideox-5b", (None,), marks=pytest.mark.skipif(
        SLOW_5B, reason="real-size 5B conversion (11 GB of shards); MPQJAX_SLOW_5B=1")),
])
def test_real_size_sharded_conversion(tmp_path, preset, quantize):
  """Writes a real-size random-weight sharded bf16 folder tensor by tensor, converts it in a
  subprocess (so its peak RSS is its own), checks the result and prints the peak RSS."""
  from models.cogvideox.config import PRESETS
  from models.cogvideox.params import checkpoint_shapes
  cfg = PRESETS[preset]
  shapes = checkpoint_shapes(cfg)
  src = tmp_path / "src"
  src.mkdir()
  (src / "config.json").write_text(json.dumps(cfg.to_dict()))
  shards, cur, size, limit = [], [], 0, 1 << 30
  for k in sorted(shapes):
    nbytes = 2 * int(np.prod(shapes[k]))
    if cur and size + nbytes > limit:
      shards.append(cur)
      cur, size = [], 0
    cur.append(k)
    size += nbytes
  shards.append(cur)
  rng = np.random.default_rng(0)
  weight_map = {}
  for i, keys in enumerate(shards):
    fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    with SafetensorsWriter(src / fname, {k: (ml_dtypes.bfloat16, shapes[k]) for k in keys}) as w:
      for k in keys:
        a = rng.standard_normal(shapes[k], dtype=np.float32) / np.sqrt(shapes[k][-1])
        w.write(k, a.astype(ml_dtypes.bfloat16))
        weight_map[k] = fname
  (src / "diffusion_pytorch_model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}))
  n = sum(int(np.prod(s)) for s in shapes.values())
  for q in quantize:
    dst = tmp_path / f"out-{q}"
    cmd = [sys.executable, "-m", "mpqjax", "convert", str(src), str(dst), "--quiet"]
    if q:
      cmd += ["--quantize", q]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert f"parameters:      {n:,}" in p.stdout
    rss = next(l for l in p.stdout.splitlines() if "peak RSS" in l)
    m = json.loads((dst / "manifest.json").read_text())
    assert m["param_count"] == n and m["bf16_bytes"] == 2 * n
    assert int(rss.split("(")[1].split()[0].replace(",", "")) < 24e9  # the machine
    print(f"{preset} convert quantize={q}: {rss.strip()}, stored {m['bytes']:,} bytes")
    if q:
      model = mpqjax.load_transformer(dst)
      assert model.config == cfg
      lin = model.params["transformer_blocks"]["attn1"]["to_q"]
      assert lin.weight.codes.shape == (cfg.num_layers, cfg.inner_dim, cfg.inner_dim // 2)
    shutil.rmtree(dst)


def test_pipeline_folder_uses_its_transformer(tmp_path, capsys):
  """A whole diffusers pipeline folder: the converter picks its transformer/ subfolder."""
  pipe = tmp_path / "pipe"
  shutil.copytree(SINCOS, pipe / "transformer")
  (pipe / "model_index.json").write_text("{}")
  assert main(["convert", str(pipe), str(tmp_path / "out"), "--dtype", "fp32", "--quiet"]) == 0
  assert "transformer" in capsys.readouterr().out
  io = np.load(os.path.join(SINCOS, "io.npz"))
  out = mpqjax.load_transformer(tmp_path / "out")(io["latents"], io["timestep"], io["text_emb"])
  assert _rel(out, io["out"]) <= 1e-5
