"""Giving the C heap's freed memory back to the operating system once XLA has compiled a step.

XLA allocates and frees hundreds of MB of host memory while it compiles a step, and glibc keeps
freed blocks in its arenas for reuse: the process then carries them, resident, on top of its
device buffers for the rest of the run. At PPO's SmolLM2-135M shape (W4 in benchmarks/) that
was 0.5 GiB after the update's compile and 0.3 GiB after the rollout's and the scoring's, on a
peak of 7-8 GiB. `release_freed_memory()` (glibc's malloc_trim) returns them; callers invoke it
after a step's first call, where its compiles happen.
"""
from __future__ import annotations

import ctypes
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
  try:
    return ctypes.CDLL("libc.so.6").malloc_trim
  except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim this way
    return None


def release_freed_memory() -> bool:
  """Returns the C heap's free blocks to the OS. True when memory was released; False where
  there was none or the C library has no malloc_trim. Cheap (milliseconds): no device buffer
  or live allocation is touched."""
  trim = _malloc_trim()
  return bool(trim(0)) if trim is not None else False
