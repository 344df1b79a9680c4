"""Low-rank adapters: a frozen base projection W plus (alpha / r) * A @ B, trained alone.

Why written here rather than taken from a library: the projections of this model are one
function (`dot.dense`, with its mixed-precision custom VJP and 3-D head kernels), and an adapter
must run in the same precision rules as its base matmul. The adapter is two more `dense` calls
inside the projection module, so bf16 operands with float32 accumulation apply to it as to W,
and its params carry logical axes like W's (A along W's input axes, B along its output axes):
the same sharding rules place them on a mesh.

Params. An adapted projection holds its base `kernel` and, beside it, `lora_a` and `lora_b`
(the attention output, a bare param `o`, holds `o_lora_a`, `o_lora_b`). B starts at zero, so a
fresh adapter leaves the model's function unchanged. With `lora_tokens`, the top-level
`token_rows_lora_b` [n, D] (zeros) is added to those ids' rows of the tied embedding, in the
lookup and in the output projection: a chat template's special tokens are untrained rows in a
base model, and a frozen embedding cannot separate them from their near-copies. Trainers split the tree in two:

  trainable  the adapters, and a scalar model's head (an RM's or critic's head is always fully
             trained: a frozen random head would make the adapters learn to fit it)
  frozen     everything else: the base, stored once. PPO's and DPO/KTO's reference is this
             base with the adapters off (`base_config`), not a second copy of the weights.

`fold` writes W + (alpha / r) A @ B back into each kernel and drops the adapters: what export,
chat and a later stage's base read.
"""
from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import quant
from rlhf_jax.models.dot import dense

ADAPTER_SUFFIXES = ("lora_a", "lora_b")
# Every projection of a block; a config narrows it (e.g. r"attn/(q|v)$").
DEFAULT_TARGETS = r"(attn/(q|k|v|o)|mlp/(gate|up|down))$"
SCANNED = "layers"  # the scanned stack's module name: its params have a leading layer axis


def targets(config, path: str) -> bool:
  """Whether the projection at `path` ('layer_0/attn/q', 'trunk/layers/block/mlp/up') is
  adapted under `config` (a ModelConfig)."""
  return config.lora_rank > 0 and re.search(config.lora_targets, path) is not None


def adapter_delta(module: nn.Module, name: str, x: jax.Array, in_shape: tuple, in_axes: tuple,
                  out_shape: tuple, out_axes: tuple, config) -> Optional[jax.Array]:
  """(alpha / r) * x A B [N, prod(out_shape)] for the projection `name` of `module`, or None
  when the config does not adapt it. Creates `{prefix}lora_a` [*in_shape, r] and
  `{prefix}lora_b` [r, *out_shape] as params of `module` (prefix '' for a projection module's
  own kernel, 'o_' for a bare param).

  x: [N, prod(in_shape)] in the projection's input dtype. Dropout (config.lora_dropout) acts
  on the adapter's input only, and only when the caller passes a 'dropout' rng (never in RL).
  """
  path = "/".join(module.scope.path + (() if name == "kernel" else (name,)))
  if not targets(config, path):
    return None
  prefix = "" if name == "kernel" else f"{name}_"
  r = config.lora_rank
  fan_in = int(np.prod(in_shape))
  a = module.param(f"{prefix}lora_a", nn.with_logical_partitioning(
      nn.initializers.normal(fan_in ** -0.5), (*in_axes, None)), (*in_shape, r), jnp.float32)
  b = module.param(f"{prefix}lora_b", nn.with_logical_partitioning(
      nn.initializers.zeros, (None, *out_axes)), (r, *out_shape), jnp.float32)
  if config.lora_dropout > 0 and module.has_rng("dropout"):
    x = nn.Dropout(config.lora_dropout, deterministic=False)(x)
  dt = config.compute_dtype
  xa = dense(x, a.reshape(fan_in, r), dt)  # [N, r]
  delta = dense(xa, b.reshape(r, -1), dt)  # [N, F]
  return delta * jnp.asarray(config.lora_alpha / r, delta.dtype)


def model_fields(section) -> dict:
  """ModelConfig's lora_* fields from a config's `lora` section (None or absent: no LoRA)."""
  if not section:
    return {}
  tokens = str(section.get("tokens", "") or "")
  return {"lora_rank": int(section.rank), "lora_alpha": float(section.alpha),
          "lora_targets": str(section.targets), "lora_dropout": float(section.dropout),
          "lora_tokens": tuple(int(t) for t in tokens.split(",") if t.strip()),
          "lora_base_quant": str(section.get("base_quant", "") or "")}


def base_config(config):
  """The same model with its adapters off: the frozen base's config (the RL reference's). An
  int8 base (lora_base_quant) stays int8: the reference reads the same params."""
  return dataclasses.replace(config, lora_rank=0)


def folded_config(config):
  """The config of `fold`'s output: no adapters and a float base."""
  return dataclasses.replace(config, lora_rank=0, lora_base_quant="")


# ------------------------------------------------------------------------------ param trees


def _keys(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def is_adapter(keys: tuple) -> bool:
  return bool(keys) and str(keys[-1]).endswith(ADAPTER_SUFFIXES)


def is_trainable(keys: tuple) -> bool:
  """Adapters, and a scalar model's head (top-level 'head')."""
  return is_adapter(keys) or (bool(keys) and keys[0] == "head")


def split(params, predicate: Callable[[tuple], bool] = is_trainable) -> tuple[dict, dict]:
  """(the leaves `predicate` keeps, the others), each as nested dicts of the same keys; a
  subtree left empty is dropped. Leaves may be boxed (nn.Partitioned)."""
  def go(tree, keys):
    if not isinstance(tree, dict):
      return (tree, None) if predicate(keys) else (None, tree)
    kept, rest = {}, {}
    for k, v in tree.items():
      a, b = go(v, keys + (k,))
      if not _empty(a):
        kept[k] = a
      if not _empty(b):
        rest[k] = b
    return kept, rest
  return go(dict(params), ())


def _empty(tree) -> bool:
  return tree is None or (isinstance(tree, dict) and not tree)


def merge(a, b) -> dict:
  """The union of two nested dicts with disjoint leaves (the inverse of `split`)."""
  if not isinstance(a, dict) or not isinstance(b, dict):
    raise ValueError("lora.merge: a leaf is in both trees")
  out = dict(b)
  for k, v in a.items():
    out[k] = merge(v, out[k]) if k in out else v
  return out


def strip(params) -> dict:
  """The params without their adapters (the base's tree)."""
  return split(params, lambda keys: not is_adapter(keys))[0]


def zero_adapters(params) -> dict:
  """The params with every lora_b zeroed: the base's function, for the adapted model (B = 0
  makes each adapter's output exactly zero). Shares every other array with `params`."""
  def go(tree):
    if not isinstance(tree, dict):
      return tree
    return {k: (jnp.zeros_like(v) if str(k).endswith("lora_b") else go(v))
            for k, v in tree.items()}
  return go(dict(params))


def count_adapters(params) -> int:
  """Number of adapter arrays in a tree."""
  leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(params))
  return sum(is_adapter(_keys(p)) for p, _ in leaves)


def fold(params, config) -> dict:
  """Base-shaped params with each adapter folded into its kernel: W + (alpha / r) A @ B, in
  float32 (an int8 base dequantised first: the function the adapters trained on).
  `config`: the ModelConfig the adapters were trained under."""
  scale = config.lora_alpha / max(config.lora_rank, 1)
  params = quant.dequantize_tree(params)

  def go(tree, scanned):
    if not isinstance(tree, dict):
      return tree
    out = {k: go(v, scanned or k == SCANNED) for k, v in tree.items()
           if not str(k).endswith(ADAPTER_SUFFIXES)}
    for name in [k for k in tree if str(k).endswith("lora_a")]:
      prefix = name[:-len("lora_a")]
      kernel_name = prefix[:-1] if prefix else "kernel"
      w = jnp.asarray(tree[kernel_name], jnp.float32)
      a, b = jnp.asarray(tree[name], jnp.float32), jnp.asarray(tree[prefix + "lora_b"],
                                                               jnp.float32)
      lead = a.shape[:1] if scanned else ()
      r = a.shape[-1]
      a2 = a.reshape(*lead, -1, r)  # [(L,) K, r]
      b2 = b.reshape(*lead, r, -1)  # [(L,) r, F]
      delta = jnp.einsum("...kr,...rf->...kf", a2, b2, precision=jax.lax.Precision.HIGHEST)
      out[kernel_name] = w + scale * delta.reshape(w.shape)
    return out
  folded = go(dict(nn.unbox(params)), False)
  rows = dict(nn.unbox(params)).get("token_rows_lora_b")
  if rows is not None:  # E[ids] + rows: what the model computed with them
    embed = dict(folded["embed"])
    table = jnp.asarray(embed["embedding"], jnp.float32)
    embed["embedding"] = table.at[jnp.asarray(config.lora_tokens)].add(
        jnp.asarray(rows, jnp.float32))
    folded["embed"] = embed
  return folded


def parse_token_starts(text: str, tokens: tuple) -> tuple[tuple[int, int], ...]:
  """`lora.tokens_start` ('106:1,105:2') as (row index in `tokens`, source id) pairs. Each
  named id must be one of lora.tokens; a source may be any id."""
  pairs = []
  for item in (t.strip() for t in str(text or "").split(",")):
    if not item:
      continue
    try:
      dst, src = (int(x) for x in item.split(":"))
    except ValueError:
      raise ValueError(f"lora.tokens_start={text!r}: {item!r} is not 'row_id:source_id'") from None
    if dst not in tokens:
      raise ValueError(f"lora.tokens_start={text!r}: {dst} is not one of lora.tokens={tokens}")
    pairs.append((tokens.index(dst), src))
  return tuple(pairs)


def start_token_rows(params, frozen, config, starts) -> dict:
  """The trainable params with each named token row set so that E[id] + row = E[source]: the
  token starts as a copy of another's base row. Why: Gemma 3 base never saw <end_of_turn>
  (an untrained row among 4,664 near-copies), but it does predict <eos> where a text ends, so
  starting <end_of_turn> from <eos> lets SFT teach the stop from a token the model already
  predicts. Rows sit at any depth (an RM's under `trunk`), beside that subtree's `embed`."""
  if not starts:
    return params

  def go(tree, base):
    if not isinstance(tree, dict):
      return tree
    out = {k: go(v, base.get(k, {}) if isinstance(base, dict) else {}) for k, v in tree.items()}
    if "token_rows_lora_b" in tree:
      table = jnp.asarray(nn.unbox(base["embed"]["embedding"]), jnp.float32)  # [V, D]
      box = tree["token_rows_lora_b"]
      rows = jnp.asarray(nn.unbox(box), jnp.float32)  # [n, D]
      for index, source in starts:
        if not 0 <= source < table.shape[0]:
          raise ValueError(f"lora.tokens_start: source id {source} is outside the vocabulary "
                           f"({table.shape[0]})")
        rows = rows.at[index].set(table[source] - table[config.lora_tokens[index]])
      like = nn.unbox(box)
      rows = jax.device_put(rows.astype(like.dtype), like.sharding)  # where the old rows were
      out["token_rows_lora_b"] = (box.replace_boxed(rows)
                                  if isinstance(box, nn.meta.AxisMetadata) else rows)
    return out
  return go(dict(params), dict(frozen))


def fingerprint(params) -> str:
  """A CRC-32 over every leaf's path, shape, dtype and bytes: the identity of a base, checked
  when a LoRA run folder is opened (a different or changed base is an error, not a silent
  mix)."""
  crc = 0
  leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(params))
  for path, leaf in sorted(leaves, key=lambda pl: "/".join(map(str, _keys(pl[0])))):
    host = np.asarray(jax.device_get(leaf))
    crc = zlib.crc32(f"{'/'.join(map(str, _keys(path)))}:{host.shape}:{host.dtype}".encode(), crc)
    crc = zlib.crc32(np.ascontiguousarray(host).tobytes(), crc)
  return f"{crc:08x}"


def describe(params) -> dict[str, Any]:
  """Counts for a log line: trainable and frozen parameters of a split tree."""
  trainable, frozen = split(nn.unbox(params))
  size = lambda t: int(sum(np.prod(x.shape) for x in jax.tree.leaves(t)))
  return {"trainable": size(trainable), "frozen": size(frozen)}
