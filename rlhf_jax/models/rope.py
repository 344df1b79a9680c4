"""Rotary positions: the rotation of query and key pairs (i, i + Dh/2), and its cos / sin.

Why the cos and sin come from tables: XLA:CPU computes sin and cos at ~12 ns an element (exp
at ~1). Computed from the positions in every attention layer, for the queries and the keys,
in the forward pass and again in the backward, they cost more than the rotation itself: one
[16, 80, 4, 64] rotation's forward and backward took 3.5 ms with them, 0.7 ms from tables
(AVX2 CPU; benchmarks/RESULTS.md, "Rotary tables").

A position p < 2^21 is three base-128 digits, p = (a * 128 + b) * 128 + c, so its angle p * f
is a * 128^2 * f + b * 128 * f + c * f: three [128, Dh/2] tables of cos and sin per set of
frequencies, computed once on the host in float64, and two angle additions on the device.
That is exact to float32 rounding at every position, where cos(p * f) of a float32 product
loses accuracy as p grows (p * f rounded to float32 is off by up to p * f * 2^-24 radians).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_DIGIT = 128
_LEVELS = 3
MAX_POSITION = _DIGIT ** _LEVELS  # 2,097,152: past every model's context here


@functools.lru_cache(maxsize=64)
def _host_tables(inv_freq: tuple[float, ...]) -> np.ndarray:
  """[LEVELS, 2, DIGIT, Dh/2] float32: cos and sin of digit * 128^level * f."""
  f = np.asarray(inv_freq, np.float64)
  levels = []
  for level in range(_LEVELS):
    angles = (np.arange(_DIGIT, dtype=np.float64) * float(_DIGIT ** level))[:, None] * f
    levels.append(np.stack([np.cos(angles), np.sin(angles)]))
  return np.stack(levels).astype(np.float32)


def rotation(positions: Array, inv_freq) -> tuple[Array, Array]:
  """(cos, sin) of positions x inv_freq, each [B, T, Dh/2] float32.

  positions: [B, T] int in [0, MAX_POSITION); inv_freq: [Dh/2], host values (numpy, as
  model_config.rope_frequencies gives them): they pick the tables."""
  tables = jnp.asarray(_host_tables(tuple(float(f) for f in np.asarray(inv_freq).ravel())))
  p = positions.astype(jnp.int32)
  cos = sin = None
  for level in range(_LEVELS):
    digit = (p // (_DIGIT ** level)) % _DIGIT  # [B, T]
    c, s = tables[level, 0][digit], tables[level, 1][digit]  # [B, T, Dh/2]
    if cos is None:
      cos, sin = c, s
    else:  # cos(u + v), sin(u + v)
      cos, sin = cos * c - sin * s, sin * c + cos * s
  return cos, sin


def rotary(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates pairs (i, i + Dh/2) of x [B, T, H, Dh] by the angles whose cos and sin [B, T, Dh/2]
  `rotation` gave; in float32, returned in x's dtype."""
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
