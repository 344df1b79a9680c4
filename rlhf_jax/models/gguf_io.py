"""Reading GGUF files (llama.cpp's format): metadata, tensor table, dequantised tensors.

The header is parsed here, not with `gguf.GGUFReader`: that reader builds a numpy view per
string, which takes ~10 s for a 49k-token vocabulary on a 2-core CPU; this parser takes well
under a second. The `gguf` package is still what dequantises (Q4_1, Q8_0, K-quants, ...), so
block layouts come from llama.cpp's own Python code.

Layout (little-endian): b"GGUF", version u32 (2 or 3), tensor count u64, metadata count u64,
metadata (key string, type u32, value), tensor infos (name string, n_dims u32, dims u64[n],
type u32, offset u64), padding to `general.alignment` (32), tensor data. Strings are a u64 length
and UTF-8 bytes. Dims are ggml order (fastest first): a tensor of ggml shape [in, out] is the
numpy array [out, in]; `shape()` and `get()` use numpy order.

Structural problems are a `GGUFError` naming the file and, where there is one, the key or
tensor: a truncated header, an unknown value or tensor type, tensor data past the end, and
tensor data that dequantises to NaN or infinity (garbled block scales: every quantised block
stores its scale as a float16, and a float32 tensor its values, so corrupt bytes there show up
as non-finite values, which no trained model holds).
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from typing import Any

import numpy as np

_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
  """A GGUF file that cannot be read as it claims to be."""


class _Cursor:
  """Sequential reads from a buffer; running past its end is a GGUFError saying what was read."""

  def __init__(self, buf, path: str):
    self.buf, self.pos, self.path, self.what = buf, 0, path, "the header"

  def take(self, n: int) -> int:
    start = self.pos
    if start + n > len(self.buf):
      raise GGUFError(f"{self.path}: truncated GGUF file: it ends ({len(self.buf)} bytes) "
                      f"while reading {self.what}")
    self.pos += n
    return start

  def scalar(self, fmt: str):
    return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

  def string(self) -> str:
    n = self.scalar("<Q")
    start = self.take(n)
    return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

  def value(self, vtype: int) -> Any:
    if vtype in _SCALARS:
      return self.scalar(_SCALARS[vtype])
    if vtype == _STRING:
      return self.string()
    if vtype == _ARRAY:
      etype, count = self.scalar("<I"), self.scalar("<Q")
      if etype in _NUMPY:  # numeric arrays in one read
        dtype = np.dtype(_NUMPY[etype])
        start = self.take(count * dtype.itemsize)
        return np.frombuffer(self.buf, dtype, count, start).copy()
      return [self.value(etype) for _ in range(count)]
    raise GGUFError(f"{self.path}: corrupt GGUF file: unknown value type {vtype} in {self.what}")


class GGUFFile:
  """A GGUF file: `metadata` (dict), `names()`, `shape(name)`, `type_name(name)`, `get(name)`."""

  def __init__(self, path: str):
    self.path = path
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no GGUF file at {path}")
    with open(path, "rb") as f:
      if os.path.getsize(path) == 0:
        raise GGUFError(f"{path}: empty file, not a GGUF model")
      self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(self._buf, path)
    if bytes(self._buf[:4]) != _MAGIC:
      raise GGUFError(f"{path}: not a GGUF file (magic {bytes(self._buf[:4])!r}, expected "
                      f"{_MAGIC!r})")
    cur.take(4)
    version = cur.scalar("<I")
    if version not in (2, 3):
      raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    self.metadata: dict[str, Any] = {}
    for i in range(n_kv):
      cur.what = f"metadata entry {i}"
      key = cur.string()
      cur.what = f"metadata key {key!r}"
      self.metadata[key] = cur.value(cur.scalar("<I"))
    infos = []
    for i in range(n_tensors):
      cur.what = f"tensor info {i}"
      name = cur.string()
      cur.what = f"the tensor info of {name!r}"
      dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
      infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
    align = int(self.metadata.get("general.alignment", 32))
    data_start = -(-cur.pos // align) * align
    self._tensors = {}
    for name, dims, ttype, offset in infos:
      self._tensors[name] = self._check_tensor(name, dims, ttype, data_start + offset)

  def _check_tensor(self, name, dims, ttype, start):
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    try:
      qtype = GGMLQuantizationType(ttype)
      block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
      raise GGUFError(f"{self.path}: tensor {name!r} has unknown ggml type {ttype}") from None
    if dims[0] % block:
      raise GGUFError(f"{self.path}: tensor {name!r} is corrupt: its row of {dims[0]} values is "
                      f"not a whole number of {qtype.name} blocks of {block}")
    nbytes = math.prod(dims) // block * type_size
    if start + nbytes > len(self._buf):
      raise GGUFError(f"{self.path}: tensor {name!r} is truncated: its data ends at byte "
                      f"{start + nbytes}, but the file has {len(self._buf)} bytes")
    return qtype, tuple(int(d) for d in reversed(dims)), start, nbytes

  def names(self) -> list[str]:
    return list(self._tensors)

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def shape(self, name: str) -> tuple[int, ...]:
    """numpy-order shape ([out, in] for a matrix)."""
    return self._tensor(name)[1]

  def type_name(self, name: str) -> str:
    return self._tensor(name)[0].name

  def get(self, name: str) -> np.ndarray:
    """The tensor as float32 in numpy order, dequantised if it is stored quantised."""
    from gguf.quants import dequantize
    qtype, shape, start, nbytes = self._tensor(name)
    raw = np.frombuffer(self._buf, np.uint8, nbytes, start)
    if qtype.name == "F32":
      out = raw.view(np.float32).reshape(shape)
    else:
      rows = math.prod(shape[:-1])
      try:
        out = dequantize(raw.reshape(rows, nbytes // rows), qtype)
      except NotImplementedError as e:
        raise GGUFError(f"{self.path}: tensor {name!r} is stored as {qtype.name}, which the "
                        f"installed gguf package cannot dequantise ({e})") from None
      out = np.asarray(out, np.float32).reshape(shape)
    if not np.isfinite(out).all():
      bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
      raise GGUFError(f"{self.path}: tensor {name!r} is corrupt: {bad} of its {np.size(out)} "
                      f"values ({qtype.name}) are NaN or infinite")
    return out

  def _tensor(self, name: str):
    if name not in self._tensors:
      raise GGUFError(f"{self.path}: the file has no tensor {name!r}")
    return self._tensors[name]
