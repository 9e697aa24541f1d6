"""The torch-free safetensors reader/writer against the reference `safetensors` package."""
import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from checkpoints_convert.safetensors_stream import (CheckpointError, SafetensorsWriter,
                                                    open_checkpoint)


def _random_tensors(rng):
  return {
      "a.weight": rng.standard_normal((5, 7)).astype(np.float32),
      "a.bias": rng.standard_normal(5).astype(np.float16),
      "b": rng.standard_normal((3, 2, 4)).astype(ml_dtypes.bfloat16),
      "c": rng.integers(-128, 127, (9,), dtype=np.int8),
      "d": rng.integers(0, 255, (2, 3), dtype=np.uint8),
      "e": rng.standard_normal((4, 4)).astype(ml_dtypes.float8_e4m3fn),
      "scalar": np.array(rng.standard_normal(), np.float32),
  }


def test_reads_reference_files_exactly(tmp_path):
  rng = np.random.default_rng()
  t = _random_tensors(rng)
  save_file(t, str(tmp_path / "model.safetensors"), metadata={"format": "np"})
  with open_checkpoint(tmp_path) as ck:
    assert ck.keys() == sorted(t)
    assert ck.metadata == {"format": "np"}
    for k, v in t.items():
      assert ck.shape(k) == v.shape and ck.dtype(k) == v.dtype
      got = ck.read(k)
      assert got.dtype == v.dtype and got.shape == v.shape
      np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), v.reshape(-1).view(np.uint8))


def test_writer_output_reads_back_with_reference(tmp_path):
  rng = np.random.default_rng()
  t = _random_tensors(rng)
  del t["e"]  # safetensors.numpy cannot load float8 (numpy has no such dtype)
  path = tmp_path / "w.safetensors"
  with SafetensorsWriter(path, {k: (v.dtype, v.shape) for k, v in t.items()},
                         metadata={"m": "1"}) as w:
    for k in reversed(sorted(t)):  # out of order on purpose
      w.write(k, t[k])
  ref = load_file(str(path))
  assert sorted(ref) == sorted(t)
  for k, v in t.items():
    np.testing.assert_array_equal(ref[k].reshape(-1).view(np.uint8), v.reshape(-1).view(np.uint8))


def test_writer_failure_leaves_no_file(tmp_path):
  path = tmp_path / "w.safetensors"
  with pytest.raises(RuntimeError):
    with SafetensorsWriter(path, {"x": (np.float32, (2,))}) as w:
      raise RuntimeError("boom")
  assert not os.listdir(tmp_path)
  w = SafetensorsWriter(path, {"x": (np.float32, (2,)), "y": (np.float32, (1,))})
  w.write("x", np.ones(2, np.float32))
  with pytest.raises(ValueError, match="never written: y"):
    w.close()
  assert not os.listdir(tmp_path)


def test_sharded_index(tmp_path):
  rng = np.random.default_rng()
  t = _random_tensors(rng)
  keys = sorted(t)
  shards = {"m-00001-of-00002.safetensors": keys[:3], "m-00002-of-00002.safetensors": keys[3:]}
  wm = {}
  for fname, ks in shards.items():
    save_file({k: t[k] for k in ks}, str(tmp_path / fname))
    wm.update({k: fname for k in ks})
  (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
  with open_checkpoint(tmp_path) as ck:
    assert ck.keys() == keys
    for k in keys:
      assert os.path.basename(ck.file_of(k)) == wm[k]
      np.testing.assert_array_equal(ck.read(k).reshape(-1).view(np.uint8), t[k].reshape(-1).view(np.uint8))
  # an index naming a tensor its shard lacks is an error naming that tensor
  wm2 = dict(wm, ghost="m-00001-of-00002.safetensors")
  (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": wm2}))
  with pytest.raises(CheckpointError, match="ghost"):
    open_checkpoint(tmp_path)
  # a missing shard is named
  os.remove(tmp_path / "m-00002-of-00002.safetensors")
  (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
  with pytest.raises(CheckpointError, match="m-00002-of-00002"):
    open_checkpoint(tmp_path)


def _saved(tmp_path, rng):
  path = tmp_path / "model.safetensors"
  save_file({"w": rng.standard_normal((64, 32)).astype(np.float32)}, str(path))
  return path


@pytest.mark.parametrize("cut", [4, 20, 100, -1])
def test_truncated_file_names_the_file(tmp_path, cut):
  path = _saved(tmp_path, np.random.default_rng())
  data = path.read_bytes()
  path.write_bytes(data[:cut] if cut > 0 else data[:-1])
  with pytest.raises(CheckpointError, match="model.safetensors.*(corrupt|truncated)"):
    open_checkpoint(tmp_path)


def test_corrupt_header_names_the_file(tmp_path):
  path = _saved(tmp_path, np.random.default_rng())
  data = bytearray(path.read_bytes())
  data[8] = ord("x")  # the opening brace: no longer JSON
  path.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match="model.safetensors.*not valid JSON"):
    open_checkpoint(path)
  data = bytearray(path.read_bytes())
  data[:8] = (10**12).to_bytes(8, "little")  # absurd header length
  path.write_bytes(bytes(data))
  with pytest.raises(CheckpointError, match="header length"):
    open_checkpoint(path)


def test_inconsistent_offsets_rejected(tmp_path):
  rng = np.random.default_rng()
  path = _saved(tmp_path, rng)
  data = path.read_bytes()
  n = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + n])
  header["w"]["shape"] = [64, 31]  # byte count no longer matches the shape
  text = json.dumps(header).encode()
  path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
  with pytest.raises(CheckpointError, match="'w'"):
    open_checkpoint(path)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickles_refused(tmp_path, suffix):
  # deliberately not a valid pickle: the reader must refuse before reading anything
  p = tmp_path / ("diffusion_pytorch_model" + suffix)
  p.write_bytes(os.urandom(64))
  for target in (tmp_path, p):
    with pytest.raises(CheckpointError, match="pickled.*refused"):
      open_checkpoint(target)


def test_missing_and_empty(tmp_path):
  with pytest.raises(FileNotFoundError):
    open_checkpoint(tmp_path / "nope")
  with pytest.raises(CheckpointError, match="no .safetensors"):
    open_checkpoint(tmp_path)
