"""Where each of our parameters lives in a Hugging Face checkpoint, and in what layout.

One table serves import and export. Our attention kernels keep heads as their own axis
(q/k/v kernel [D, H, Dh], o [H, Dh, D]) so that `heads` can be sharded by name; Hugging Face
stores torch Linear weights [out, in] with heads flattened into the out (q/k/v) or in (o) axis.
Both use the "rotate_half" rotary convention (pairs i, i + Dh/2), so no permutation is needed
between them (GGUF's llama files differ: see hf_import).

Llama, Mistral, Qwen2/3 and Gemma 3 share the names. Qwen3 and Gemma 3 add q/k norms
(self_attn.q_norm / k_norm); Gemma 3's four norms per layer rename the MLP's input norm: a tree
with norms after attention and MLP (sandwich_norms) maps mlp_norm to pre_feedforward_layernorm,
since its post_attention_layernorm is then the norm of the attention output. Gemma's (1 + w)
norms store w, as our params do.

Layouts, for a target (ours) shape t and the HF array W:
  copy       W                                   norms, embedding [V, D]
  T          W.T                                 lm_head [V, D] -> [D, V]; MLP [F, D] -> [D, F]
  heads_in   W.T.reshape(t)                      q/k/v [H*Dh, D] -> [D, H, Dh]
  heads_out  W.T.reshape(t)                      o [D, H*Dh] -> [H, Dh, D]
  bias       W.reshape(t)                        q/k/v bias [H*Dh] -> [H, Dh]
All are numpy views of W (no copy), so a loader slices a device's shard before copying.
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import jax
import numpy as np

_LAYER = {
    ("attn_norm", "scale"): ("input_layernorm.weight", "copy"),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "copy"),
    ("attn", "q", "kernel"): ("self_attn.q_proj.weight", "heads_in"),
    ("attn", "k", "kernel"): ("self_attn.k_proj.weight", "heads_in"),
    ("attn", "v", "kernel"): ("self_attn.v_proj.weight", "heads_in"),
    ("attn", "q", "bias"): ("self_attn.q_proj.bias", "bias"),
    ("attn", "k", "bias"): ("self_attn.k_proj.bias", "bias"),
    ("attn", "v", "bias"): ("self_attn.v_proj.bias", "bias"),
    ("attn", "o"): ("self_attn.o_proj.weight", "heads_out"),
    ("mlp", "gate", "kernel"): ("mlp.gate_proj.weight", "T"),
    ("mlp", "up", "kernel"): ("mlp.up_proj.weight", "T"),
    ("mlp", "down", "kernel"): ("mlp.down_proj.weight", "T"),
    ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", "copy"),
    ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", "copy"),
}
# A layer with norms after attention and MLP too (Gemma 2/3).
_SANDWICH = {
    **_LAYER,
    ("attn_post_norm", "scale"): ("post_attention_layernorm.weight", "copy"),
    ("mlp_norm", "scale"): ("pre_feedforward_layernorm.weight", "copy"),
    ("mlp_post_norm", "scale"): ("post_feedforward_layernorm.weight", "copy"),
}
_GLOBAL = {
    ("embed", "embedding"): ("model.embed_tokens.weight", "copy"),
    ("final_norm", "scale"): ("model.norm.weight", "copy"),
    ("lm_head", "kernel"): ("lm_head.weight", "T"),
}


class Leaf(NamedTuple):
  """One parameter: its path in our tree, its shape, and its HF tensor names.

  `hf_names` has one name, or one per layer for a scanned (stacked [L, ...]) parameter, whose
  per-layer shape is `shape[1:]`.
  """
  path: tuple[str, ...]
  shape: tuple[int, ...]
  hf_names: tuple[str, ...]
  layout: str

  @property
  def stacked(self) -> bool:
    return self.path[0] == "layers"


def _key(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def leaves(params_like) -> Iterator[Leaf]:
  """The Leaf of every parameter of a (possibly abstract, possibly boxed) param tree.

  Accepts the tree with or without the top-level {'params': ...}. A parameter that has no HF
  counterpart is a ValueError naming it (the model grew a tensor this table does not know).
  """
  import flax.linen as nn
  tree = nn.unbox(params_like)
  if isinstance(tree, dict) and set(tree) == {"params"}:
    tree = tree["params"]
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  paths = [tuple(_key(e) for e in path) for path, _ in flat]
  table = _SANDWICH if any("attn_post_norm" in keys for keys in paths) else _LAYER
  for keys, (_, leaf) in zip(paths, flat):
    shape = tuple(leaf.shape)
    if keys in _GLOBAL:
      name, layout = _GLOBAL[keys]
      yield Leaf(keys, shape, (name,), layout)
    elif keys[0].startswith("layer_") and keys[1:] in table:
      name, layout = table[keys[1:]]
      i = int(keys[0][len("layer_"):])
      yield Leaf(keys, shape, (f"model.layers.{i}.{name}",), layout)
    elif keys[:2] == ("layers", "block") and keys[2:] in table:
      name, layout = table[keys[2:]]
      yield Leaf(keys, shape, tuple(f"model.layers.{i}.{name}" for i in range(shape[0])), layout)
    else:
      raise ValueError(f"parameter {'/'.join(keys)} has no Hugging Face counterpart")


def hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape that holds our parameter of `shape` (one layer's, if stacked)."""
  if layout == "copy":
    return shape
  if layout == "T":
    return shape[::-1]
  if layout == "heads_in":  # [D, H, Dh] <- [H*Dh, D]
    return (shape[1] * shape[2], shape[0])
  if layout == "heads_out":  # [H, Dh, D] <- [D, H*Dh]
    return (shape[2], shape[0] * shape[1])
  if layout == "bias":
    return (math.prod(shape),)
  raise ValueError(f"unknown layout {layout!r}")


def to_ours(layout: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """HF array -> our layout (a view where numpy can make one)."""
  if layout == "copy":
    return w
  if layout == "T":
    return w.T
  if layout in ("heads_in", "heads_out"):
    return w.T.reshape(shape)
  if layout == "bias":
    return w.reshape(shape)
  raise ValueError(f"unknown layout {layout!r}")


def to_hf(layout: str, a: np.ndarray) -> np.ndarray:
  """Our array -> the HF layout (contiguous, ready to write)."""
  if layout == "copy":
    out = a
  elif layout == "T":
    out = a.T
  elif layout == "heads_in":  # [D, H, Dh] -> [H*Dh, D]
    out = a.reshape(a.shape[0], -1).T
  elif layout == "heads_out":  # [H, Dh, D] -> [D, H*Dh]
    out = a.reshape(-1, a.shape[-1]).T
  elif layout == "bias":
    out = a.reshape(-1)
  else:
    raise ValueError(f"unknown layout {layout!r}")
  return np.ascontiguousarray(out)
