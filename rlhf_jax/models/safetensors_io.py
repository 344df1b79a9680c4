"""Reading and writing the safetensors format, tensor by tensor, without a framework.

Why not the `safetensors` package: its numpy backend has no bfloat16 (the dtype most Llama-family
checkpoints ship in), and its jax/flax backends put every tensor on the default device, which is
the full copy on one device that sharded loading must avoid. The format is small: an 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
Here each tensor is a read-only numpy view of a memory map, so a loader slices out the shard a
device needs and only that shard is ever copied.

Every structural problem (a truncated file, a header that is not JSON, a tensor whose byte range
disagrees with its shape or runs past the end of the file) is a `SafetensorsError` naming the
file and the tensor.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Iterable, Mapping, Optional

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 << 20  # the format's own limit; a larger "length" means a corrupt file
INDEX_NAME = "model.safetensors.index.json"


class SafetensorsError(ValueError):
  """A safetensors file or directory that cannot be read as it claims to be."""


class SafetensorsFile:
  """One .safetensors file: `names()`, `shape(name)`, `dtype(name)`, `get(name)` (a view)."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
      (n,) = struct.unpack("<Q", head)
      if n > _MAX_HEADER or 8 + n > size:
        raise SafetensorsError(f"{path}: corrupt or truncated safetensors file (header claims "
                               f"{n} bytes, the file has {size})")
      raw = f.read(n)
    try:
      header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
      raise SafetensorsError(f"{path}: corrupt safetensors header (not a JSON object)")
    self.metadata = header.pop("__metadata__", None) or {}
    self._start = 8 + n
    self._entries = {}
    data_size = size - self._start
    for name, entry in header.items():
      self._entries[name] = self._check_entry(name, entry, data_size)
    self._mmap: Optional[np.memmap] = None

  def _check_entry(self, name, entry, data_size):
    try:
      dtype = _DTYPES[entry["dtype"]]
      shape = tuple(int(d) for d in entry["shape"])
      begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      if isinstance(e, KeyError) and entry.get("dtype") not in _DTYPES and "dtype" in entry:
        raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype "
                               f"{entry['dtype']!r}; supported: {sorted(_DTYPES)}") from None
      raise SafetensorsError(f"{self.path}: tensor {name!r} has a malformed header entry "
                             f"{entry!r:.200}") from None
    need = math.prod(shape) * dtype.itemsize
    if end - begin != need or begin < 0:
      raise SafetensorsError(f"{self.path}: tensor {name!r} is corrupt: shape {shape} of "
                             f"{entry['dtype']} needs {need} bytes, its offsets give {end - begin}")
    if end > data_size:
      raise SafetensorsError(f"{self.path}: tensor {name!r} is truncated: it ends at byte {end} "
                             f"of the data, but the file holds {data_size}")
    return dtype, shape, begin

  def names(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]

  def get(self, name: str) -> np.ndarray:
    """A read-only view (no copy) of the tensor, in its stored dtype."""
    if name not in self._entries:
      raise KeyError(f"{self.path} has no tensor {name!r}")
    dtype, shape, begin = self._entries[name]
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    start = self._start + begin
    raw = self._mmap[start:start + math.prod(shape) * dtype.itemsize]
    return raw.view(dtype).reshape(shape)


class SafetensorsDir:
  """All tensors of a checkpoint directory: one model.safetensors, or shards with an index."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, INDEX_NAME)
    if os.path.exists(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SafetensorsError(f"{index}: not a safetensors index ({e})") from None
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
      weight_map = None
    if not files:
      raise FileNotFoundError(f"no *.safetensors files in {directory}")
    self._files = {}
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.exists(path):
        raise SafetensorsError(f"{index} lists {name}, which is missing from {directory}")
      self._files[name] = SafetensorsFile(path)
    self._where = {}
    for fname, sf in self._files.items():
      for t in sf.names():
        self._where[t] = sf
    if weight_map is not None:
      missing = sorted(t for t in weight_map if t not in self._where)
      if missing:
        raise SafetensorsError(f"{directory}: tensor {missing[0]!r} is listed in the index but "
                               f"not found in {weight_map[missing[0]]}")

  def names(self) -> list[str]:
    return list(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    return self._file(name).shape(name)

  def get(self, name: str) -> np.ndarray:
    return self._file(name).get(name)

  def _file(self, name: str) -> SafetensorsFile:
    if name not in self._where:
      raise SafetensorsError(f"{self.directory}: the checkpoint has no tensor {name!r}")
    return self._where[name]


def write_safetensors(path: str, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes (name, array) pairs to `path` (under a temporary name, then renamed).

  Arrays are written as they are (their dtype decides the stored dtype, bfloat16 included).
  """
  tensors = [(name, np.ascontiguousarray(a)) for name, a in tensors]
  header, offset = {}, 0
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  for name, a in tensors:
    if a.dtype not in _NAMES:
      raise SafetensorsError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as readers expect
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for _, a in tensors:
      f.write(a.tobytes())
  os.replace(tmp, path)
