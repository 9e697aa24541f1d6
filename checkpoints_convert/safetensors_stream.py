"""Torch-free streaming reader (and writer) for safetensors checkpoints.

Reading, one tensor at a time, never the whole file:

  with open_checkpoint("path/to/model_folder") as ckpt:   # folder, .safetensors, or index.json
    for key in ckpt.keys():                                # sorted tensor names
      ckpt.shape(key), ckpt.dtype(key)                     # from the header, no data read
      a = ckpt.read(key)                                   # np.ndarray, owned copy, file's dtype

`open_checkpoint` accepts
  - a folder holding exactly one `*.safetensors.index.json` (sharded: its weight_map names
    each tensor's shard), or otherwise one safetensors file (`diffusion_pytorch_model`,
    `model` are preferred when several are present),
  - a single `.safetensors` file, or an `*.safetensors.index.json` file.
Pickled checkpoints (.bin, .pt, .pth, .ckpt, .pkl) are refused and never unpickled.

File format (https://github.com/huggingface/safetensors): 8-byte little-endian u64 header
length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {str: str}}, then the data buffer; offsets are relative to its start and the
buffer must be covered exactly. Every header is validated against the file size up front,
so a truncated or corrupt file fails at open with a CheckpointError naming the file.

Writing, one tensor at a time (for synthetic real-size checkpoints and converters):

  with SafetensorsWriter(path, {name: (dtype, shape)}, metadata={...}) as w:
    w.write(name, array)      # in any order; each name once
  # the file appears at `path` only on a clean close (temp file + os.replace)
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from mpqjax.errors import UserInputError

# safetensors dtype string -> little-endian numpy dtype
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAME_OF_DTYPE = {v: k for k, v in DTYPES.items()}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PREFERRED_STEMS = ("diffusion_pytorch_model", "model")
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


class CheckpointError(UserInputError):
  """A checkpoint that cannot be read: missing, truncated, corrupt, pickled, inconsistent."""


def _refuse_pickle(path: str) -> None:
  raise CheckpointError(
      f"{path}: pickled PyTorch checkpoints ({', '.join(PICKLE_SUFFIXES)}) are refused: loading "
      "them would execute arbitrary code. Re-save the model with safetensors "
      "(diffusers: model.save_pretrained(dst, safe_serialization=True)).")


class SafetensorsFile:
  """One .safetensors file: header parsed and validated at construction; data read lazily."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    if self.path.endswith(PICKLE_SUFFIXES):
      _refuse_pickle(self.path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"safetensors file not found: {self.path}")
    self._f = open(self.path, "rb")
    try:
      self.entries, self.metadata, self.data_start = self._parse()
    except Exception:
      self._f.close()
      raise

  def _fail(self, why: str):
    raise CheckpointError(f"{self.path}: corrupt or truncated safetensors file: {why}")

  def _parse(self):
    size = os.fstat(self._f.fileno()).st_size
    raw = self._f.read(8)
    if len(raw) < 8:
      self._fail(f"file is {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", raw)
    if n > _MAX_HEADER or 8 + n > size:
      self._fail(f"header length {n} does not fit in the file's {size} bytes")
    text = self._f.read(n)
    try:
      header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      self._fail(f"header is not valid JSON ({e})")
    if not isinstance(header, dict):
      self._fail("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_size = size - data_start
    entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    spans = []
    for name, e in header.items():
      try:
        dt = DTYPES[e["dtype"]]
        shape = tuple(int(d) for d in e["shape"])
        begin, end = (int(o) for o in e["data_offsets"])
      except KeyError as err:
        if isinstance(e, dict) and "dtype" in e and e["dtype"] not in DTYPES:
          self._fail(f"tensor {name!r} has unsupported dtype {e['dtype']!r} "
                     f"(supported: {', '.join(DTYPES)})")
        self._fail(f"tensor {name!r} has a malformed entry ({err} missing): {e!r}")
      except (TypeError, ValueError):
        self._fail(f"tensor {name!r} has a malformed entry: {e!r}")
      if any(d < 0 for d in shape) or not 0 <= begin <= end:
        self._fail(f"tensor {name!r} has invalid shape/offsets: {e!r}")
      if end - begin != math.prod(shape) * dt.itemsize:
        self._fail(f"tensor {name!r}: {end - begin} bytes for {e['dtype']}{list(shape)}")
      if end > data_size:
        self._fail(f"tensor {name!r} ends at byte {end} of the data buffer but the file holds "
                   f"only {data_size} data bytes (truncated?)")
      entries[name] = (dt, shape, begin, end)
      spans.append((begin, end))
    spans.sort()
    pos = 0
    for b, e in spans:
      if b != pos:
        self._fail(f"tensor data overlaps or leaves a hole at byte {pos}")
      pos = e
    if pos != data_size:
      self._fail(f"data buffer holds {data_size} bytes but the tensors cover {pos} "
                 "(truncated or trailing garbage)")
    return entries, metadata, data_start

  def keys(self) -> list[str]:
    return sorted(self.entries)

  def read(self, key: str) -> np.ndarray:
    """The tensor as a freshly allocated little-endian numpy array of its stored dtype."""
    dt, shape, begin, end = self.entries[key]
    out = np.empty(end - begin, np.uint8)
    self._f.seek(self.data_start + begin)
    got = self._f.readinto(memoryview(out))
    if got != end - begin:
      self._fail(f"short read for {key!r}: {got} of {end - begin} bytes (file changed?)")
    return out.view(dt).reshape(shape)

  def close(self) -> None:
    self._f.close()


class CheckpointReader:
  """Tensors of one checkpoint spread over one or more safetensors files.

  keys() -> sorted names; shape(key) -> tuple; dtype(key) -> np.dtype (float8/bf16 from
  ml_dtypes); read(key) -> np.ndarray; nbytes(key); file_of(key) -> path; files; metadata
  (merged __metadata__); close(). Usable as a context manager.
  """

  def __init__(self, files: Mapping[str, SafetensorsFile], key_to_file: Mapping[str, str],
               source: str):
    self.source = source
    self._files = dict(files)
    self._key_to_file = dict(key_to_file)
    self.metadata = {}
    for f in self._files.values():
      self.metadata.update(f.metadata)

  @property
  def files(self) -> list[str]:
    return list(self._files)

  def keys(self) -> list[str]:
    return sorted(self._key_to_file)

  def __contains__(self, key: str) -> bool:
    return key in self._key_to_file

  def __len__(self) -> int:
    return len(self._key_to_file)

  def _entry(self, key: str):
    try:
      f = self._files[self._key_to_file[key]]
    except KeyError:
      raise KeyError(f"{key!r} is not in checkpoint {self.source}") from None
    return f, f.entries[key]

  def shape(self, key: str) -> tuple[int, ...]:
    return self._entry(key)[1][1]

  def dtype(self, key: str) -> np.dtype:
    return self._entry(key)[1][0]

  def nbytes(self, key: str) -> int:
    _, (_, _, b, e) = self._entry(key)
    return e - b

  def file_of(self, key: str) -> str:
    return self._entry(key)[0].path

  def read(self, key: str) -> np.ndarray:
    return self._entry(key)[0].read(key)

  def close(self) -> None:
    for f in self._files.values():
      f.close()

  def __enter__(self) -> "CheckpointReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _open_files(paths: Iterable[str]) -> dict[str, SafetensorsFile]:
  files: dict[str, SafetensorsFile] = {}
  try:
    for p in paths:
      files[p] = SafetensorsFile(p)
  except Exception:
    for f in files.values():
      f.close()
    raise
  return files


def _from_index(index_path: str) -> CheckpointReader:
  try:
    with open(index_path, encoding="utf-8") as fh:
      index = json.load(fh)
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
      raise TypeError("weight_map must map tensor names to file names")
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from None
  folder = os.path.dirname(os.path.abspath(index_path))
  shard_names = sorted(set(weight_map.values()))
  for s in shard_names:
    if os.path.basename(s) != s:
      raise CheckpointError(f"{index_path}: shard name {s!r} must be a plain file name")
    if s.endswith(PICKLE_SUFFIXES):
      _refuse_pickle(os.path.join(folder, s))
  missing = [s for s in shard_names if not os.path.isfile(os.path.join(folder, s))]
  if missing:
    raise CheckpointError(f"{index_path}: shard file(s) listed in weight_map not found: "
                          f"{', '.join(missing)}")
  files = _open_files(os.path.join(folder, s) for s in shard_names)
  key_to_file = {k: os.path.join(folder, v) for k, v in weight_map.items()}
  absent = [f"{k} (in {os.path.basename(p)})" for k, p in key_to_file.items()
            if k not in files[p].entries]
  if absent:
    for f in files.values():
      f.close()
    raise CheckpointError(f"{index_path}: weight_map names tensors their shard does not hold: "
                          f"{'; '.join(sorted(absent))}")
  return CheckpointReader(files, key_to_file, index_path)


def _from_files(paths: list[str], source: str) -> CheckpointReader:
  files = _open_files(paths)
  key_to_file: dict[str, str] = {}
  for p, f in files.items():
    for k in f.entries:
      if k in key_to_file:
        for ff in files.values():
          ff.close()
        raise CheckpointError(f"{source}: tensor {k!r} appears in both {key_to_file[k]} and {p}")
      key_to_file[k] = p
  return CheckpointReader(files, key_to_file, source)


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
  """Open a safetensors checkpoint (folder, single file, or index JSON); see module doc."""
  path = os.fspath(path)
  if path.endswith(PICKLE_SUFFIXES):
    _refuse_pickle(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if os.path.isfile(path):
    if path.endswith(".index.json"):
      return _from_index(path)
    return _from_files([path], path)
  names = sorted(os.listdir(path))
  indexes = [n for n in names if n.endswith(".safetensors.index.json")]
  if len(indexes) > 1:
    raise CheckpointError(f"{path}: several safetensors indexes ({', '.join(indexes)}); "
                          "pass the one to use")
  if indexes:
    return _from_index(os.path.join(path, indexes[0]))
  singles = [n for n in names if n.endswith(".safetensors")]
  if not singles:
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles:
      _refuse_pickle(os.path.join(path, pickles[0]))
    raise CheckpointError(f"{path}: no .safetensors file or *.safetensors.index.json found")
  if len(singles) > 1:
    preferred = [n for stem in PREFERRED_STEMS for n in singles if n == stem + ".safetensors"]
    if not preferred:
      raise CheckpointError(f"{path}: several safetensors files ({', '.join(singles)}) and no "
                            "index JSON; pass the file to use")
    singles = preferred[:1]
  return _from_files([os.path.join(path, singles[0])], path)


class SafetensorsWriter:
  """Writes a safetensors file tensor by tensor, with the header fixed up front.

  specs: {name: (dtype, shape)} with a numpy/ml_dtypes dtype from DTYPES' values. The data
  is laid out in sorted-name order; write() may come in any order (it seeks). The file is
  written to `path + '.tmp'` and renamed on a clean close(); abort() (or an exception in a
  `with` block) deletes it.
  """

  def __init__(self, path: str | os.PathLike, specs: Mapping[str, tuple],
               metadata: Mapping[str, str] | None = None):
    self.path = os.fspath(path)
    self._tmp = self.path + ".tmp"
    header: dict = {}
    if metadata:
      header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    self._layout = {}
    pos = 0
    for name in sorted(specs):
      dt, shape = np.dtype(specs[name][0]), tuple(int(d) for d in specs[name][1])
      if dt not in _NAME_OF_DTYPE:
        raise ValueError(f"{name}: dtype {dt} has no safetensors name")
      n = math.prod(shape) * dt.itemsize
      header[name] = {"dtype": _NAME_OF_DTYPE[dt], "shape": list(shape),
                      "data_offsets": [pos, pos + n]}
      self._layout[name] = (dt, shape, pos)
      pos += n
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # align the data buffer to 8 bytes, as safetensors does
    self._data_start = 8 + len(text)
    self._written: set[str] = set()
    self._f = open(self._tmp, "wb")
    self._f.write(struct.pack("<Q", len(text)) + text)
    self._f.truncate(self._data_start + pos)

  def write(self, name: str, array) -> None:
    dt, shape, pos = self._layout[name]
    a = np.asarray(array)
    if not a.flags.c_contiguous:
      a = a.copy(order="C")
    if a.dtype != dt or a.shape != shape:
      raise ValueError(f"{name}: expected {dt}{list(shape)}, got {a.dtype}{list(a.shape)}")
    if name in self._written:
      raise ValueError(f"{name} written twice")
    self._f.seek(self._data_start + pos)
    self._f.write(memoryview(a.reshape(-1).view(np.uint8)))  # DTYPES are little-endian
    self._written.add(name)

  def close(self) -> None:
    missing = sorted(set(self._layout) - self._written)
    if missing:
      self.abort()
      raise ValueError(f"{self.path}: tensors never written: {', '.join(missing)}")
    self._f.close()
    os.replace(self._tmp, self.path)

  def abort(self) -> None:
    self._f.close()
    if os.path.exists(self._tmp):
      os.remove(self._tmp)

  def __enter__(self) -> "SafetensorsWriter":
    return self

  def __exit__(self, exc_type, *rest) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()
