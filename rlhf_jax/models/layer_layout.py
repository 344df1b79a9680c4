"""Params of a transformer's layers in either layout: one subtree per layer, or scanned.

`ModelConfig.scan_layers` decides how the layers run: unrolled (`layer_0`, `layer_1`, ...,
one subtree each) or under `nn.scan` (one `layers/block` subtree whose leaves are stacked
[L, ...]). The two compute the same function; which one pays depends on the work and the
machine. Scanning compiles one layer body instead of n_layers and held a Gemma 3 270M LoRA SFT
step in 0.95 GiB less at the same speed on a 2-core CPU, while a full-parameter PPO update at
SmolLM2-135M's shape ran 1.5x faster unrolled there (benchmarks/RESULTS.md). So the layout is
a numerics choice a stage makes for itself (models/transformer.NUMERICS_FIELDS), and a run
folder saved in one layout loads into a model built in the other: these functions restack
the params on the way in (core/run_folder.py, core/checkpoint.restore_params).

They walk nested dicts, so the same call serves a policy's params, a scalar model's
{'trunk', 'head'}, a LoRA run's adapters and a PPO state's {'policy', 'critic'}. Leaves may be
numpy or jax arrays, or ShapeDtypeStructs under `jax.eval_shape`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

SCANNED = "layers"  # nn.scan's module name in models/transformer.py
SCAN_BODY = "block"  # the scanned body's name inside it
_LAYER = re.compile(r"layer_(\d+)$")


def _layer_ids(tree: Mapping) -> list[int]:
  return sorted(int(m.group(1)) for m in map(_LAYER.match, map(str, tree)) if m)


def _is_scanned_node(tree: Mapping) -> bool:
  inner = tree.get(SCANNED)
  return isinstance(inner, Mapping) and set(inner) == {SCAN_BODY}


def layout_of(tree: Any) -> Optional[bool]:
  """True (scanned), False (one subtree per layer) or None (no transformer layers in it)."""
  if not isinstance(tree, Mapping):
    return None
  if _is_scanned_node(tree):
    return True
  if _layer_ids(tree):
    return False
  for value in tree.values():
    found = layout_of(value)
    if found is not None:
      return found
  return None


def _stack(leaves):
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def to_layout(tree: Any, scan: bool) -> Any:
  """`tree` with every transformer's layers in the scanned (True) or unrolled (False) layout;
  a tree already in it, or without layers, comes back as it is."""
  if not isinstance(tree, Mapping):
    return tree
  ids = _layer_ids(tree)
  if scan and ids:
    if ids != list(range(len(ids))):
      raise ValueError(f"layers {ids} are not layer_0 .. layer_{len(ids) - 1}: cannot stack them")
    rest = {k: to_layout(v, scan) for k, v in tree.items() if not _LAYER.match(str(k))}
    layers = [tree[f"layer_{i}"] for i in ids]
    return {**rest, SCANNED: {SCAN_BODY: jax.tree.map(lambda *xs: _stack(xs), *layers)}}
  if not scan and _is_scanned_node(tree):
    body = tree[SCANNED][SCAN_BODY]
    leaves = jax.tree.leaves(body)
    n = leaves[0].shape[0] if leaves else 0
    out = {k: to_layout(v, scan) for k, v in tree.items() if k != SCANNED}
    for i in range(n):  # [L, ...] -> L subtrees of [...]
      out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], body)
    return out
  return {k: to_layout(v, scan) for k, v in tree.items()}


def like(tree: Any, target: Any) -> Any:
  """`tree` in the layout of `target` (unchanged when either has no layers)."""
  want = layout_of(target)
  return tree if want is None or layout_of(tree) in (None, want) else to_layout(tree, want)
