"""A Llama-style decoder-only transformer in flax.linen, and the families that vary it.

RMSNorm, rotary positions, SwiGLU, grouped-query attention, optional tied embeddings. Qwen2,
Qwen3 and Gemma 3 are configurations of this one model (see model_config.py): q/k norms, (1 + w)
norms, norms after attention and MLP, GeGLU, scaled embeddings, soft-caps, and interleaved
sliding-window layers with their own rope base. Every
parameter carries logical axis names (see `rlhf_jax.core.sharding`), so one model definition runs on
one CPU or a TPU pod: the mesh and the axis rules in the config decide where each tensor lives.

The model is a pure function of its params. One attention mask rule covers training, packing,
left-padded prompts and KV-cache decoding: a query at cache slot `q` of segment `sq` may look at
a key at slot `k` of segment `sk` iff `sk == sq`, `sk != 0` (0 marks padding) and `k <= q`;
with `prefix_ids`, also iff `sk` is the query's prefix segment (answers sharing one prompt).

Calls:
  logits, cache = model.apply(params, tokens, positions, segment_ids, cache=None)
  hidden, cache = model.apply(params, ..., method=Transformer.hidden_states)  # no vocab matmul
  hidden, _     = model.apply(params, ..., columns=(a, b),  # only columns a..b-1 are read:
                              method=Transformer.hidden_states)  # the last layer runs there
  logits        = model.apply(params, hidden, method=Transformer.project)
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models import kv_cache, lora, quant, rope
from rlhf_jax.models.dot import dense
# The configuration lives in model_config.py; other modules import ModelConfig from here too.
from rlhf_jax.models.model_config import ModelConfig, local_rope_frequencies, rope_frequencies

from rlhf_jax.models.kv_cache import Cache, init_cache  # noqa: F401  (the package's names)

Array = jax.Array
_MASK_VALUE = kv_cache.MASK_VALUE


# ModelConfig fields that change how a model computes, not which params it has: a later stage
# (PPO, KTO, DPO, the RM from an SFT trunk) takes an earlier run's shape and sets these itself.
# scan_layers stacks the same params differently; loading restacks them (models/layer_layout.py).
NUMERICS_FIELDS = ("dtype", "remat", "vocab_chunk", "scan_layers")


def _dense_init(fan_in: int):
  return nn.initializers.normal(stddev=fan_in ** -0.5)


class RMSNorm(nn.Module):
  """RMS normalisation of the last axis, in float32, times `scale` (or 1 + `scale`)."""
  eps: float = 1e-5
  dtype: Any = jnp.float32
  plus_one: bool = False  # Gemma: the parameter is an offset from 1, initialised to 0
  axes: tuple = ("embed",)

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, self.axes),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.plus_one:
      scale = 1.0 + scale
    return (y * scale).astype(self.dtype)


def norm(config: ModelConfig, name: str, axes: tuple = ("embed",)) -> RMSNorm:
  """The config's RMSNorm (its eps, compute dtype and scale rule)."""
  return RMSNorm(config.norm_eps, config.compute_dtype, config.norm_plus_one, axes, name=name)


def _flat_tokens(x: Array, feature_dims: int = 1) -> Array:
  """[B, T, *F] -> [B*T, *F]: one token axis for the matmuls of a projection.

  A matmul over [B, T, D] has two contracting axes (B and T) in its weight gradient, and XLA's
  CPU backend canonicalises such a dot by transposing an operand, fused with the elementwise
  backward ops around it: those transposes took ~20% of a small model's train step. With one
  token axis every weight gradient is a plain [D, N] x [N, F] matmul. The reshape is free.
  """
  return x.reshape(-1, *x.shape[x.ndim - feature_dims:])


def attention_mask(q_segment, q_slot, k_segment, window: int = 0, q_prefix=None,
                   positions=None):
  """[B, T, S] bool. q_segment [B, T], q_slot [B, T] or [T], k_segment [B, S].

  window > 0: a sliding window besides, keys at slots q - window < k <= q only. Slots and
  positions advance together inside a segment (left padding, packing, the cache), so this is
  the window in positions that the model was trained with. positions [B, T] (a whole row, no
  cache, S = T): the window is counted in them instead, which is the same inside a segment
  and also right across a shared prefix (below).

  q_prefix [B, T] (or None): a query also sees the earlier keys of segment q_prefix (0: none).
  Answers that share a prompt see it this way, the prompt written once before them
  (data/rm_batches.py's shared_prompt layout): their positions continue the prompt's while
  their slots come after the answers before them.
  """
  k_slot = jnp.arange(k_segment.shape[1])
  q_slot = jnp.broadcast_to(q_slot, q_segment.shape)
  same = q_segment[:, :, None] == k_segment[:, None, :]
  if q_prefix is not None:
    same = same | (q_prefix[:, :, None] == k_segment[:, None, :])
  causal = k_slot[None, None, :] <= q_slot[:, :, None]
  mask = same & causal & (k_segment[:, None, :] != 0)
  if window and positions is not None:
    mask = mask & (positions[:, None, :] > positions[:, :, None] - window)
  elif window:
    mask = mask & (k_slot[None, None, :] > q_slot[:, :, None] - window)
  return mask


def read_columns(x: Array, columns) -> Array:
  """x [B, T, ...] at the read columns: a static (start, stop) slice, or the gather of an int
  array [B, N] of each row's own positions (a comparison's answers end apart) -> [B, N, ...]."""
  if isinstance(columns, tuple):
    return x[:, columns[0]:columns[1]]
  x = jnp.broadcast_to(x, columns.shape[:1] + x.shape[1:])  # rope tables may have batch 1
  index = columns.reshape(columns.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def layer_choice(local, if_local, if_global):
  """A sliding-window layer's mask or rope table, or a global layer's. `local`: a Python bool
  (unscanned layers pick while tracing) or a traced bool (scanned layers select)."""
  if isinstance(local, bool):
    return if_local if local else if_global
  return jnp.where(local, if_local, if_global)


def layer_inputs(cfg: ModelConfig, positions, segment_ids, q_slot, k_segment, prefix_ids,
                 cached: bool):
  """(mask, angles), what every layer reads besides x: the attention mask [B, T, S] and the
  rotary (cos, sin) [B, T, Dh/2] (models/rope.py), each built once for all the layers (the
  rotation per layer was ~7% of a tiny model's compile time, and ran again in each layer's
  backward). A model with sliding-window layers gets the pairs (global, sliding-window) of
  both; each layer picks its own (Block)."""
  mask = attention_mask(segment_ids, q_slot, k_segment, q_prefix=prefix_ids)
  angles = rope.rotation(positions, rope_frequencies(cfg))
  if cfg.local_layers:  # the cache keeps every slot: the window is a mask
    mask = (mask, attention_mask(segment_ids, q_slot, k_segment, cfg.sliding_window,
                                 q_prefix=prefix_ids, positions=None if cached else positions))
    angles = (angles, rope.rotation(positions, local_rope_frequencies(cfg))
              if cfg.rope_local_theta else angles)
  return mask, angles


class HeadProjection(nn.Module):
  """x [B, T, D] -> [B, T, heads, head_dim], kernel [D, heads, head_dim] (optional bias).

  A plain einsum over a 3-D kernel, so the parameter has its logical axes as created (flax's
  DenseGeneral reshapes a 2-D kernel, which breaks under active logical axis rules).
  """
  heads: int
  head_dim: int
  use_bias: bool
  dtype: Any
  axes: tuple
  config: Optional[ModelConfig] = None  # its LoRA settings (None: no adapter)

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    kernel = quant.kernel(self, "kernel", _dense_init(d), (d, self.heads, self.head_dim),
                          self.axes, 1, self.config)
    tokens = _flat_tokens(x)  # [B*T, D]
    y = quant.project(tokens, kernel, d, self.dtype)  # [B*T, heads*head_dim]
    if self.config is not None:
      delta = lora.adapter_delta(self, "kernel", tokens, (d,), self.axes[:1],
                                 (self.heads, self.head_dim), self.axes[1:], self.config)
      y = y if delta is None else y + delta
    y = y.reshape(*x.shape[:-1], self.heads, self.head_dim)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                        (self.heads, self.head_dim), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class Attention(nn.Module):
  """Grouped-query attention. With a cache (models/kv_cache.py), the new keys and values are
  written in place and attended to from there."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, angles, mask, layer_cache=None, cache_index=None, columns=None,
               cache_layer=None):
    """x [B, T, D]; angles: the rotary (cos, sin) [B, T, Dh/2] of this layer's positions
    (models/rope.py; computed once a forward pass, in Transformer.hidden_states); mask
    [B, T, S]; layer_cache: this layer's (keys, values) of models/kv_cache.py, or the stacked
    ones with cache_layer (traced, scanned); None without a cache. columns: None, a static
    (start, stop) or an int array [B, N] of positions (read_columns): only those columns ask
    queries (keys and values from all T); the output is [B, N, D]."""
    cfg = self.config
    dt = cfg.compute_dtype
    h, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head

    def proj(inputs, name, heads, axis):  # q and k RMS-normed per head (qk_norm), before rope
      y = HeadProjection(heads, dh, cfg.qkv_bias, dt, ("embed", axis, "kv"), cfg,
                         name=name)(inputs)
      return norm(cfg, f"{name}_norm", ("kv",))(y) if cfg.qk_norm and name != "v" else y

    x_q, q_angles = x, angles
    if columns is not None:
      x_q, mask = read_columns(x, columns), read_columns(mask, columns)
      q_angles = tuple(read_columns(a, columns) for a in angles)
    q = rope.rotary(proj(x_q, "q", h, "heads"), *q_angles)  # [B, Tq, H, Dh]
    k = rope.rotary(proj(x, "k", hkv, "kv_heads"), *angles)  # [B, T, Hkv, Dh]
    v = proj(x, "v", hkv, "kv_heads")
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, Dh]

    b, t = x_q.shape[:2]
    q = q.reshape(b, t, hkv, h // hkv, dh).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, Dh]
    scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else dh ** -0.5
    new_cache, keys, out = None, "bksd", None
    if layer_cache is not None:  # attend to the cache with this call's slots written
      new_cache = kv_cache.write_cache(layer_cache, k, v, cache_index, cache_layer)
      (k, v), keys = kv_cache.layer_of(new_cache, cache_layer), "bkds"  # keys cached transposed
      if t == 1 and cache_layer is None:  # an unrolled decode step: see models/kv_cache.py
        out = kv_cache.attend_one(q[:, :, :, 0], k, v, mask[:, 0], scale, cfg.attn_softcap, dt)
    if out is None:
      scores = jnp.einsum(f"bkgtd,{keys}->bkgts", q, k.astype(dt)) * scale
      if cfg.attn_softcap:
        scores = jnp.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
      scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32), _MASK_VALUE)
      probs = jax.nn.softmax(scores, axis=-1).astype(dt)
      out = jnp.einsum("bkgts,bksd->bkgtd", probs, v.astype(dt))  # [B, Hkv, G, T, Dh]
      out = out.transpose(0, 3, 1, 2, 4)
    out = out.reshape(b, t, h, dh)
    kernel = quant.kernel(self, "o", _dense_init(h * dh), (h, dh, cfg.d_model),
                          ("heads", "kv", "embed"), 2, cfg)
    flat = out.reshape(b * t, h * dh)
    out = quant.project(flat, kernel, h * dh, dt)  # [B*T, D]
    delta = lora.adapter_delta(self, "o", flat, (h, dh), ("heads", "kv"), (cfg.d_model,),
                               ("embed",), cfg)
    out = out if delta is None else out + delta
    return out.reshape(b, t, cfg.d_model), new_cache


class Linear(nn.Module):
  """x [N, K] -> [N, features] without bias: params {'kernel': [K, features]}, as nn.Dense's.

  The matmul is `dot.dense`: float32, or mixed precision (operands in `dtype`, float32
  accumulation, result in `out_dtype`, default `dtype`).
  """
  features: int
  dtype: Any
  axes: tuple
  out_dtype: Any = None
  config: Optional[ModelConfig] = None  # its LoRA settings (None: no adapter)

  @nn.compact
  def __call__(self, x):
    kernel = quant.kernel(self, "kernel", _dense_init(x.shape[-1]),
                          (x.shape[-1], self.features), self.axes, 1, self.config)
    y = quant.project(x, kernel, x.shape[-1], self.dtype, self.out_dtype)
    if self.config is not None:
      delta = lora.adapter_delta(self, "kernel", x, x.shape[-1:], self.axes[:1],
                                 (self.features,), self.axes[1:], self.config)
      y = y if delta is None else y + delta.astype(y.dtype)
    return y


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dt = cfg.compute_dtype
    tokens = _flat_tokens(x)  # [B*T, D]
    gate = Linear(cfg.d_ff, dt, ("embed", "mlp"), config=cfg, name="gate")(tokens)
    up = Linear(cfg.d_ff, dt, ("embed", "mlp"), config=cfg, name="up")(tokens)
    act = (jax.nn.silu if cfg.mlp_activation == "silu"
           else functools.partial(jax.nn.gelu, approximate=True))  # GeGLU: tanh-approximated
    hidden = (act(gate) * up).reshape(*x.shape[:-1], cfg.d_ff)
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    out = Linear(cfg.d_model, dt, ("mlp", "embed"), config=cfg, name="down")(_flat_tokens(hidden))
    return out.reshape(x.shape[:-1] + out.shape[-1:])


class Block(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, angles, mask, layer_cache, cache_index, columns=None, local=None,
               cache_layer=None):
    """columns: None, a static (start, stop) or positions [B, N]: the output there (Attention).
    local: None, or whether this is a sliding-window layer; mask and angles are then the pairs
    (global, sliding-window). cache_layer: as Attention's."""
    cfg = self.config
    if local is not None:
      mask = layer_choice(local, mask[1], mask[0])
      angles = tuple(layer_choice(local, a, b) for a, b in zip(angles[1], angles[0]))
    attn_out, new_cache = Attention(cfg, name="attn")(
        norm(cfg, "attn_norm")(x), angles, mask, layer_cache, cache_index, columns, cache_layer)
    if columns is not None:
      x = read_columns(x, columns)
    if cfg.sandwich_norms:
      attn_out = norm(cfg, "attn_post_norm")(attn_out)
    x = x + attn_out
    mlp_out = MLP(cfg, name="mlp")(norm(cfg, "mlp_norm")(x))
    if cfg.sandwich_norms:
      mlp_out = norm(cfg, "mlp_post_norm")(mlp_out)
    x = x + mlp_out
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, new_cache


class _ScanBlock(nn.Module):
  """nn.scan's body: carry (x, cache, layer) -> (x, cache, layer + 1); xs: sliding-window or not
  (or None). The stacked cache rides in the carry, each layer writing its slots in place: as xs
  -> ys it was rebuilt whole every decode step (1.6x slower decoding; benchmarks/RESULTS.md)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, carry, local, angles, mask, cache_index):
    x, cache, layer = carry
    x, cache = Block(self.config, name="block")(x, angles, mask, cache, cache_index,
                                                local=local, cache_layer=layer)
    return (x, cache, layer + 1), None


class Transformer(nn.Module):
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")))
    block = Block
    if cfg.remat:
      block = nn.remat(block, prevent_cse=not cfg.scan_layers, static_argnums=())
    if cfg.scan_layers:
      scan_block = nn.remat(_ScanBlock) if cfg.remat else _ScanBlock
      self.layers = nn.scan(
          scan_block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    else:
      self.layers = [block(cfg, name=f"layer_{i}") for i in range(cfg.n_layers)]
    self.final_norm = norm(cfg, "final_norm")
    if cfg.lora_rank and cfg.lora_tokens:  # models/lora.py: E[ids] + rows, trained
      self.token_rows = self.param(
          "token_rows_lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed")),
          (len(cfg.lora_tokens), cfg.d_model), jnp.float32)  # [n, D]
    if not cfg.tie_embeddings:
      self.lm_head = Linear(cfg.vocab_size, cfg.compute_dtype, ("embed", "vocab"),
                            out_dtype=jnp.float32, name="lm_head")

  def hidden_states(self, tokens, positions, segment_ids, cache: Optional[Cache] = None,
                    columns: Optional[tuple[int, int]] = None, prefix_ids=None):
    """Final-normed hidden states [B, T, D] and the updated cache (None without one).

    tokens, positions, segment_ids: [B, T] int. segment_ids: 0 = padding, equal ids attend to
    each other (packing). With a cache, the T new tokens are written at slots
    [cache['index'], cache['index'] + T) and attend to every earlier filled slot.
    prefix_ids: [B, T] int or None (no cache): a token also attends to the earlier tokens of
    segment prefix_ids (0: none), e.g. the K answers of a comparison to their one prompt.

    columns: when only some columns' outputs are read, a static (start, stop) (a policy's
    answer positions, a prompt's last token) or an int array [B, N] of each row's positions
    (the last tokens a reward model scores): the result is then [B, N, D], and the last layer
    asks queries and runs its MLP there only (~20% of a 4-layer RM's step). Earlier layers run
    everywhere (later keys need them); scanned layers run the last one everywhere too.
    """
    cfg = self.config
    x = self.embed(tokens)  # [B, T, D]
    if cfg.lora_rank and cfg.lora_tokens:  # the trained rows of lora_tokens
      hit = (tokens[..., None] == jnp.asarray(cfg.lora_tokens)).astype(x.dtype)  # [B, T, n]
      x = x + jnp.einsum("btn,nd->btd", hit, self.token_rows.astype(x.dtype))
    if cfg.embed_scale:  # the factor in the compute dtype, as Gemma's reference rounds it
      x = x * jnp.asarray(cfg.d_model ** 0.5, x.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    t = tokens.shape[1]
    if cache is None:
      q_slot, k_segment = jnp.arange(t), segment_ids
      index = None
      kv = None
    else:
      index = cache["index"]
      k_segment = jax.lax.dynamic_update_slice_in_dim(
          cache["segment"], segment_ids.astype(cache["segment"].dtype), index, axis=1)
      q_slot = index + jnp.arange(t)
      kv = (cache["k"], cache["v"])
    if prefix_ids is not None and cache is not None:
      raise ValueError("prefix_ids is for a whole row at once, not for decoding with a cache")
    mask, angles = layer_inputs(cfg, positions, segment_ids, q_slot, k_segment, prefix_ids,
                                cached=cache is not None)
    sliced = False
    if cfg.scan_layers:
      local = (jnp.asarray([i in cfg.local_layers for i in range(cfg.n_layers)])
               if cfg.local_layers else None)
      (x, new_kv, _), _ = self.layers((x, kv, jnp.zeros((), jnp.int32)), local, angles, mask,
                                      index)
    else:
      x, new_kv, sliced = self._unrolled(x, angles, mask, kv, index, columns)
    if columns is not None and not sliced:
      x = read_columns(x, columns)

    x = self.final_norm(x)
    if cache is None:
      return x, None
    new_cache = {"k": new_kv[0], "v": new_kv[1], "segment": k_segment, "index": index + t}
    return x, new_cache

  def _unrolled(self, x, angles, mask, kv, index, columns):
    """(x, the new (keys, values) tuples or None, whether x is sliced to columns) of the layers
    one after the other, each writing and reading its own cache arrays (models/kv_cache.py)."""
    cfg = self.config
    news, sliced = [], False
    for i, layer in enumerate(self.layers):
      # The last layer runs on the read columns only; a rematerialised block takes no static
      # arguments: given a static slice, it runs everywhere and hidden_states slices after.
      static = isinstance(columns, tuple)
      cols = columns if i == cfg.n_layers - 1 and not (cfg.remat and static) else None
      local = (i in cfg.local_layers,) if cfg.local_layers else ()
      layer_kv = None if kv is None else (kv[0][i], kv[1][i])
      x, new = layer(x, angles, mask, layer_kv, index, cols, *local)
      news.append(new)
      sliced = cols is not None
    return x, (None if kv is None else tuple(map(tuple, zip(*news)))), sliced

  def project(self, hidden):
    """Logits [..., V] in float32 from hidden states [..., D]."""
    tokens = _flat_tokens(hidden)  # [N, D]: see _flat_tokens
    if self.config.tie_embeddings:
      logits = self.embed.attend(tokens)
      if self.config.lora_rank and self.config.lora_tokens:  # h . (E[ids] + rows)
        extra = dense(tokens, self.token_rows.T, self.config.compute_dtype)  # [N, n]
        logits = logits.at[:, jnp.asarray(self.config.lora_tokens)].add(extra.astype(logits.dtype))
    else:
      logits = self.lm_head(tokens)
    logits = logits.reshape(*hidden.shape[:-1], -1).astype(jnp.float32)
    if self.config.final_softcap:
      logits = jnp.tanh(logits / self.config.final_softcap) * self.config.final_softcap
    return logits

  def __call__(self, tokens, positions, segment_ids, cache: Optional[Cache] = None):
    hidden, cache = self.hidden_states(tokens, positions, segment_ids, cache)
    return self.project(hidden), cache


def positions_from_mask(mask: Array) -> Array:
  """Position ids of left-padded rows: cumsum(mask) - 1, clipped at 0 on the padding."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
