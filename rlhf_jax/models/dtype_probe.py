"""`model.dtype = "auto"`: bfloat16 compute where it is faster on this machine, float32 elsewhere.

On GPUs and TPUs bfloat16 matmuls run on units float32 does not reach, so "auto" is bfloat16
there. On a CPU it depends on the chip: with AVX512-BF16 or AMX-BF16, XLA's bf16 kernels (in the
mixed form of `models.dot.dense`: bf16 operands, float32 accumulation) run at about twice the
float32 rate; without them bf16 is emulated through float32 and only adds converts. The flags
say whether bf16 can win; a short probe says whether it does, since the flags alone do not
(a busy or virtualised host, an XLA build without the kernels). Never slower than float32:
bfloat16 is chosen only when the probe measures it at least `MIN_SPEEDUP` times as fast.

The probe runs once per machine: its result is cached in ~/.cache/rlhf_jax/dtype_probe.json,
keyed by CPU model, its bf16 flags and the jax version, any of which changing asks again.
Call `resolve_dtype` before building the ModelConfig, so the run folder's record holds the
dtype that was used, never "auto". With several processes, every one takes process 0's answer:
hosts that probed differently (a timing at the threshold, another CPU) would otherwise compile
different programs for one sharded step.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax.models.dot import dense

AUTO = "auto"
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MIN_SPEEDUP = 1.1  # bf16 must be clearly faster: timing noise must not pick the slower one
# One projection of a small model on one micro-batch: tokens x d_model @ d_model x d_ff.
PROBE_SHAPE = (1024, 512, 1024)  # (M, K, F)
PROBE_REPS = 5


def cache_file() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "rlhf_jax", "dtype_probe.json")


def backend() -> str:
  return jax.default_backend()


def cpu_info(path: str = "/proc/cpuinfo") -> tuple[str, frozenset]:
  """(CPU model name, its flags) from /proc/cpuinfo; ("", {}) where there is none (macOS)."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
  except OSError:
    return "", frozenset()
  model, flags = "", frozenset()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key == "model name" and not model:
      model = value.strip()
    elif key == "flags" and not flags:
      flags = frozenset(value.split())
  return model, flags


def _step(dtype) -> Callable:
  """A jitted forward and backward of `dense` in `dtype`, as a projection's training step."""
  def loss(x, w):
    return jnp.sum(dense(x, w, dtype, out_dtype=jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def time_matmul(dtype, shape=PROBE_SHAPE, reps: int = PROBE_REPS) -> float:
  """Best-of-`reps` seconds of one `dense` forward + backward at `shape` (compile excluded)."""
  m, k, f = shape
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, f)), jnp.float32)
  step = _step(jnp.dtype(dtype))
  jax.block_until_ready(step(x, w))  # compile and warm up
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(step(x, w))
    best = min(best, time.perf_counter() - start)
  return best


def probe() -> dict:
  """{"float32_s", "bfloat16_s"}: measured step times of both compute dtypes."""
  return {"float32_s": time_matmul("float32"), "bfloat16_s": time_matmul("bfloat16")}


def cache_key(model: str, flags: frozenset) -> str:
  """What the probe's answer depends on: the chip, its bf16 flags, the jax (and XLA) build."""
  bf16 = ",".join(sorted(f for f in flags if f in BF16_FLAGS)) or "none"
  return f"{model or 'unknown cpu'} | bf16 flags: {bf16} | jax {jax.__version__}"


def _read_cache(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, ValueError):
    return {}  # absent or unreadable: probe again, the file is rewritten whole
  return data if isinstance(data, dict) else {}


def _write_cache(path: str, data: dict) -> None:
  """Written to a temporary file then renamed: a reader never sees half a file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def measured_cpu_dtype(key: str, path: str) -> str:
  """The CPU's dtype from the cached probe under `key`, probing (and caching) when absent."""
  data = _read_cache(path)
  entry = data.get(key)
  if not (isinstance(entry, dict) and entry.get("dtype") in ("float32", "bfloat16")):
    timings = probe()
    faster = timings["float32_s"] >= MIN_SPEEDUP * timings["bfloat16_s"]
    entry = {**timings, "dtype": "bfloat16" if faster else "float32"}
    data[key] = entry
    try:
      _write_cache(path, data)
    except OSError:
      pass  # a read-only home: the answer holds for this process, the next one probes again
  return entry["dtype"]


CHOICES = ("float32", "bfloat16")  # what "auto" can become, in the order broadcast as ints


def process_count() -> int:
  return jax.process_count()


def broadcast_choice(index: int) -> int:
  """Process 0's `index` on every process."""
  return int(multihost_utils.broadcast_one_to_all(np.int32(index)))


def resolve_dtype(requested: str, cache_path: str | None = None) -> str:
  """A concrete compute dtype for `model.dtype`: `requested` itself unless it is "auto".

  "auto": bfloat16 on GPU / TPU; on a CPU bfloat16 only with AVX512-BF16 or AMX-BF16 and a
  probe (cached in `cache_path`, default `cache_file()`) that measures it faster; else float32.
  """
  if requested != AUTO:
    return requested
  choice = local_choice(cache_path)
  if process_count() > 1:
    choice = CHOICES[broadcast_choice(CHOICES.index(choice))]
  return choice


def local_choice(cache_path: str | None = None) -> str:
  """What "auto" becomes on this process alone (see `resolve_dtype`)."""
  if backend() != "cpu":
    return "bfloat16"
  model, flags = cpu_info()
  if not flags.intersection(BF16_FLAGS):
    return "float32"
  return measured_cpu_dtype(cache_key(model, flags), cache_path or cache_file())
