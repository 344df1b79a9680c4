"""The KV cache: its layout, its in-place writes, and attention for one decoding token.

Layout: keys [B, Hkv, Dh, S] (transposed: a decoding query's q.k then sums over a leading axis
and streams the slots in order), values [B, Hkv, S, Dh], per layer; segment [B, S] (0: an empty
or padding slot) and index [] (the next slot to write). Unrolled layers keep a tuple of L
arrays each, so every layer writes and reads its own buffer in place; scanned layers one
stacked [L, ...] array each, riding in nn.scan's carry, indexed by the traced layer number.

Why a decode step has its own attention (`attend_one`): for one query token per row, the
attention over the cache is, per (row, kv head), a [G, Dh] x [Dh, S] and a [G, S] x [S, Dh]
product. XLA's CPU batched dot runs such thin products at ~1 GB/s of cache, and a layer's slice
of a stacked cache was copied out before every dot. As multiply-and-sum fusions they are one
pass over the layer's cache, read in place. At SmolLM2-135M's shape (16 rows, 640 slots, 30
layers) a decode step went from 453 ms to ~130 ms (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Cache = dict  # {'k': keys, 'v': values (tuples of L arrays, or stacked), 'segment', 'index'}

# A large finite negative, not -inf: a fully masked row (a pad query) then gives a harmless
# uniform average instead of NaNs that would poison gradients.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def init_cache(config, batch_size: int, max_len: int, dtype=None) -> Cache:
  """An empty KV cache of `max_len` slots for `config` (a ModelConfig), laid out for its layers
  (scanned: stacked; unrolled: one array per layer); its dtype defaults to the compute dtype."""
  dtype = dtype or config.compute_dtype
  bh = (batch_size, config.n_kv_heads)
  keys, values = bh + (config.dim_per_head, max_len), bh + (max_len, config.dim_per_head)
  if config.scan_layers:
    stacked = lambda shape: jnp.zeros((config.n_layers,) + shape, dtype)
    k, v = stacked(keys), stacked(values)
  else:
    k = tuple(jnp.zeros(keys, dtype) for _ in range(config.n_layers))
    v = tuple(jnp.zeros(values, dtype) for _ in range(config.n_layers))
  return {"k": k, "v": v, "segment": jnp.zeros((batch_size, max_len), jnp.int32),
          "index": jnp.zeros((), jnp.int32)}


def layer_of(layer_cache, layer_index):
  """(keys [B, Hkv, Dh, S], values [B, Hkv, S, Dh]) of one layer: the stacked cache's layer
  `layer_index` (traced under nn.scan), or the pair itself when the index is None."""
  ck, cv = layer_cache
  return (ck, cv) if layer_index is None else (ck[layer_index], cv[layer_index])


def write_cache(layer_cache, k, v, cache_index, layer_index):
  """The cache with this step's k, v [B, Hkv, T, Dh] written at slot cache_index of layer
  `layer_index` (None: layer_cache is one layer's (keys, values))."""
  ck, cv = layer_cache
  k = k.swapaxes(-1, -2).astype(ck.dtype)  # [B, Hkv, Dh, T]
  v = v.astype(cv.dtype)
  if layer_index is None:
    return (jax.lax.dynamic_update_slice_in_dim(ck, k, cache_index, axis=3),
            jax.lax.dynamic_update_slice_in_dim(cv, v, cache_index, axis=2))
  return (jax.lax.dynamic_update_slice(ck, k[None], (layer_index, 0, 0, 0, cache_index)),
          jax.lax.dynamic_update_slice(cv, v[None], (layer_index, 0, 0, cache_index, 0)))


def attend_one(q, keys, values, mask, scale: float, softcap: float, dt):
  """Attention output [B, Hkv, G, Dh] of one query token per row: q [B, Hkv, G, Dh] over a
  layer's cache (keys [B, Hkv, Dh, S], values [B, Hkv, S, Dh]) with this token's slot written;
  mask [B, S]. The same arithmetic as the einsums of a longer query, summed in another order."""
  # Without grouping (G = 1) the size-1 axis is dropped from the products: XLA's YNNPACK
  # reductions (the samplers' choice, infer/sampling.decode_compiler_options) ran a
  # [B, Hkv, 1, S, Dh] sum ~5x slower than the [B, Hkv, S, Dh] one (W1's 64-row decode step:
  # 90 -> 19 ms, benchmarks/RESULTS.md).
  ungrouped = q.shape[2] == 1
  if ungrouped:
    s = (q[:, :, 0, :, None] * keys.astype(dt)).sum(-2)[:, :, None] * scale  # [B, Hkv, 1, S]
  else:
    s = (q[..., None] * keys[:, :, None].astype(dt)).sum(-2) * scale  # [B, Hkv, G, S]
  if softcap:
    s = jnp.tanh(s / softcap) * softcap
  s = jnp.where(mask[:, None, None], s.astype(jnp.float32), MASK_VALUE)
  probs = jax.nn.softmax(s, axis=-1).astype(dt)
  if ungrouped:
    return (probs[:, :, 0, :, None] * values.astype(dt)).sum(-2)[:, :, None]  # [B, Hkv, 1, Dh]
  return (probs[..., None] * values[:, :, None].astype(dt)).sum(-2)  # [B, Hkv, G, Dh]

