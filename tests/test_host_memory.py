"""core/host_memory.py: freed C-heap blocks leave the resident set when released."""
import ctypes

import pytest

from rlhf_jax.core import host_memory


def _resident_bytes() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  raise AssertionError("no VmRSS")


@pytest.mark.skipif(host_memory._malloc_trim() is None, reason="needs glibc's malloc_trim")
def test_released_heap_blocks_leave_the_resident_set():
  """200 MB in 64 KiB blocks (below glibc's mmap threshold, so they live in the heap arena),
  touched, freed in an order that leaves the arena's top in use: glibc keeps them resident
  until malloc_trim, which must give back at least half of them."""
  libc = ctypes.CDLL("libc.so.6")
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = [ctypes.c_void_p]
  block, count = 64 * 1024, 3200
  blocks = [libc.malloc(block) for _ in range(count)]
  for b in blocks:
    ctypes.memset(b, 1, block)
  keep = libc.malloc(block)  # above the freed blocks: the arena cannot simply shrink its top
  for b in blocks:
    libc.free(b)
  before = _resident_bytes()
  assert host_memory.release_freed_memory()
  released = before - _resident_bytes()
  libc.free(keep)
  assert released > 0.5 * block * count, released
