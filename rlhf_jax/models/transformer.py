"""A Llama-style decoder-only transformer in flax.linen.

RMSNorm, rotary positions, SwiGLU, grouped-query attention, optional tied embeddings. Every
parameter carries logical axis names (see `rlhf_jax.core.sharding`), so one model definition runs on
one CPU or a TPU pod: the mesh and the axis rules in the config decide where each tensor lives.

The model is a pure function of its params. One attention mask rule covers training, packing,
left-padded prompts and KV-cache decoding: a query at cache slot `q` of segment `sq` may look at
a key at slot `k` of segment `sk` iff `sk == sq`, `sk != 0` (0 marks padding) and `k <= q`.

Calls:
  logits, cache = model.apply(params, tokens, positions, segment_ids, cache=None)
  hidden, cache = model.apply(params, ..., method=Transformer.hidden_states)  # no vocab matmul
  hidden, _     = model.apply(params, ..., columns=(a, b),  # only columns a..b-1 are read:
                              method=Transformer.hidden_states)  # the last layer runs there
  logits        = model.apply(params, hidden, method=Transformer.project)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.dot import dense

Array = jax.Array
Cache = dict  # {'k': [L, B, Hkv, S, Dh], 'v': [L, B, Hkv, S, Dh], 'segment': [B, S], 'index': []}

# A large finite negative, not -inf: a fully masked row (a pad query) then gives a harmless
# uniform average instead of NaNs that would poison gradients.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


# ModelConfig fields that change how a model computes, not which params it has: a later stage
# (PPO, KTO, DPO, the RM from an SFT trunk) takes an earlier run's shape and sets these itself.
NUMERICS_FIELDS = ("dtype", "remat")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of the transformer. Built from `config.model` (a ConfigDict)."""
  vocab_size: int = 8192
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 4
  d_ff: int = 1024
  head_dim: Optional[int] = None  # None or 0: d_model // n_heads
  max_len: int = 512
  rope_theta: float = 10000.0
  # Rotary frequency scaling of long-context checkpoints: "" (none), "linear" or "llama3"
  # (Llama 3.1+); the last three fields are llama3's (low/high frequency factors, the
  # pretraining context length). See rope_frequencies.
  rope_scaling: str = ""
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2 has biases on q, k, v
  dtype: str = "float32"  # compute dtype; params are always float32
  remat: bool = False
  scan_layers: bool = False

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if not self.head_dim and self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                       "set head_dim explicitly")
    if self.dim_per_head % 2:
      raise ValueError(f"head_dim={self.dim_per_head} must be even for rotary embeddings")
    if self.rope_scaling not in ("", "linear", "llama3"):
      raise ValueError(f"rope_scaling={self.rope_scaling!r} is not supported; supported: '' "
                       "(none), 'linear', 'llama3'")

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def from_config(cls, cfg) -> "ModelConfig":
    """Accepts a ConfigDict / dict; unknown keys are an error naming them."""
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    d.pop("name", None)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"unknown model config keys {unknown}; known: {sorted(fields)}")
    return cls(**d)

  def param_count(self) -> int:
    """Number of parameters, computed from the shapes (checked against eval_shape in tests)."""
    d, dh, L = self.d_model, self.dim_per_head, self.n_layers
    attn = d * dh * (self.n_heads * 2 + self.n_kv_heads * 2)
    if self.qkv_bias:
      attn += dh * (self.n_heads + 2 * self.n_kv_heads)
    per_layer = attn + 3 * d * self.d_ff + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return L * per_layer + emb + d

  def flops_per_token(self, seq_len: int, with_logits: bool = True) -> float:
    """Forward matmul FLOPs per token at context `seq_len` (2 FLOPs per multiply-add).

    Per layer: the q, k, v, o projections (2 d Dh (2 H + 2 Hkv)), the SwiGLU MLP (2 * 3 d F),
    and attention's two matmuls, q.k and probs.v, over all `seq_len` keys (2 * 2 T H Dh): the
    causal mask is not subtracted, as in PaLM's definition of MFU (6N + 12 L H Dh T). Plus the
    vocabulary projection (2 d V) when `with_logits`. The embedding lookup is a gather, and
    norms, rotary, softmax and the optimizer are not matmuls: none is counted. A train step
    costs 3x this (the backward pass does two matmuls per forward one, for the inputs' and the
    weights' gradients); tests check the count against the matmuls of a traced forward pass.
    """
    d, dh, L = self.d_model, self.dim_per_head, self.n_layers
    proj = 2 * d * dh * (self.n_heads * 2 + self.n_kv_heads * 2)
    mlp = 2 * 3 * d * self.d_ff
    attn = 2 * 2 * seq_len * self.n_heads * dh  # QK^T and PV over the full (masked) length
    head = 2 * d * self.vocab_size if with_logits else 0
    return L * (proj + mlp + attn) + head


def _dense_init(fan_in: int):
  return nn.initializers.normal(stddev=fan_in ** -0.5)


class RMSNorm(nn.Module):
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


def rope_frequencies(config: ModelConfig) -> np.ndarray:
  """Rotary inverse frequencies [Dh/2] (float32), with the config's rope scaling applied.

  Computed on the host: they are constants of the model, and long-context checkpoints (linear
  position interpolation; Llama 3.1's "llama3" rule, which slows only the low frequencies and
  blends the band between) change them, not the rotation itself.
  """
  d = config.dim_per_head
  inv = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / d))
  if config.rope_scaling == "linear":
    inv = inv / config.rope_factor
  elif config.rope_scaling == "llama3":
    wavelen = 2 * np.pi / inv
    low_wavelen = config.rope_original_max_len / config.rope_low_freq_factor
    high_wavelen = config.rope_original_max_len / config.rope_high_freq_factor
    smooth = ((config.rope_original_max_len / wavelen - config.rope_low_freq_factor)
              / (config.rope_high_freq_factor - config.rope_low_freq_factor))
    blended = (1 - smooth) * inv / config.rope_factor + smooth * inv
    inv = np.where(wavelen > low_wavelen, inv / config.rope_factor,
                   np.where(wavelen < high_wavelen, inv, blended))
  return inv.astype(np.float32)


def rotary(x: Array, positions: Array, theta: float, inv_freq=None) -> Array:
  """Rotates pairs (i, i + D/2) of the last axis by angle position * theta^(-2i/D).

  x: [B, T, H, D]; positions: [B, T] int. `inv_freq` [D/2], when given, replaces
  theta^(-2i/D) (scaled rope, see rope_frequencies).
  """
  d = x.shape[-1]
  if inv_freq is None:
    inv_freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)  # [D/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _flat_tokens(x: Array, feature_dims: int = 1) -> Array:
  """[B, T, *F] -> [B*T, *F]: one token axis for the matmuls of a projection.

  A matmul over [B, T, D] has two contracting axes (B and T) in its weight gradient, and XLA's
  CPU backend canonicalises such a dot by transposing an operand, fused with the elementwise
  backward ops around it: those transposes took ~20% of a small model's train step. With one
  token axis every weight gradient is a plain [D, N] x [N, F] matmul. The reshape is free.
  """
  return x.reshape(-1, *x.shape[x.ndim - feature_dims:])


def attention_mask(q_segment, q_slot, k_segment):
  """[B, T, S] bool. q_segment [B, T], q_slot [B, T] or [T], k_segment [B, S]."""
  k_slot = jnp.arange(k_segment.shape[1])
  q_slot = jnp.broadcast_to(q_slot, q_segment.shape)
  same = q_segment[:, :, None] == k_segment[:, None, :]
  causal = k_slot[None, None, :] <= q_slot[:, :, None]
  return same & causal & (k_segment[:, None, :] != 0)


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

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(_dense_init(d), self.axes),
                        (d, self.heads, self.head_dim), jnp.float32)
    y = dense(_flat_tokens(x), kernel.reshape(d, -1), self.dtype)  # [B*T, heads*head_dim]
    y = y.reshape(*x.shape[:-1], self.heads, self.head_dim)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                        (self.heads, self.head_dim), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class Attention(nn.Module):
  """Grouped-query attention. With a cache, the new keys/values are written in place.

  The cache is heads-major ([.., Hkv, S, Dh]) so attention reads it without a transpose, and
  the unscanned model passes the whole stacked cache with its `layer_index`, so a decode step
  writes T new slots instead of copying every layer's cache.
  """
  config: ModelConfig
  layer_index: Optional[int] = None  # None: layer_cache holds this layer's arrays only

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache=None, cache_index=None, columns=None):
    """x [B, T, D]; mask [B, T, S]; layer_cache (k, v): [L, B, Hkv, S, Dh] stacked (with
    layer_index) or [B, Hkv, S, Dh]; None without a cache. columns: None, or a static
    (start, stop): only those columns ask queries (keys and values come from all T), and the
    output is [B, stop - start, D]."""
    cfg = self.config
    dt = cfg.compute_dtype
    h, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.dim_per_head

    def proj(inputs, name, heads, axis):
      return HeadProjection(heads, dh, cfg.qkv_bias, dt, ("embed", axis, "kv"), name=name)(inputs)

    inv_freq = rope_frequencies(cfg) if cfg.rope_scaling else None
    if columns is not None:
      x_q, q_positions = x[:, columns[0]:columns[1]], positions[:, columns[0]:columns[1]]
      mask = mask[:, columns[0]:columns[1]]
    else:
      x_q, q_positions = x, positions
    q = rotary(proj(x_q, "q", h, "heads"), q_positions, cfg.rope_theta, inv_freq)  # [B,Tq,H,Dh]
    k = rotary(proj(x, "k", hkv, "kv_heads"), positions, cfg.rope_theta, inv_freq)  # [B,T,Hkv,Dh]
    v = proj(x, "v", hkv, "kv_heads")
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, Dh]

    new_cache = None
    if layer_cache is not None:
      ck, cv = layer_cache
      if self.layer_index is None:
        k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=2)
        v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=2)
        new_cache = (k, v)
      else:
        where = (self.layer_index, 0, 0, cache_index, 0)
        ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), where)
        cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), where)
        new_cache = (ck, cv)
        k, v = ck[self.layer_index], cv[self.layer_index]  # [B, Hkv, S, Dh]

    b, t = x_q.shape[:2]
    q = q.reshape(b, t, hkv, h // hkv, dh).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, Dh]
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, k.astype(dt)) * (dh ** -0.5)
    scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32), _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v.astype(dt)).reshape(b, t, h, dh)
    kernel = self.param("o", nn.with_logical_partitioning(_dense_init(h * dh),
                                                          ("heads", "kv", "embed")),
                        (h, dh, cfg.d_model), jnp.float32)
    out = dense(out.reshape(b * t, h * dh), kernel.reshape(h * dh, -1), dt)  # [B*T, D]
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

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.with_logical_partitioning(_dense_init(x.shape[-1]), self.axes),
                        (x.shape[-1], self.features), jnp.float32)
    return dense(x, kernel, self.dtype, self.out_dtype)


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dt = cfg.compute_dtype
    tokens = _flat_tokens(x)  # [B*T, D]
    gate = Linear(cfg.d_ff, dt, ("embed", "mlp"), name="gate")(tokens)
    up = Linear(cfg.d_ff, dt, ("embed", "mlp"), name="up")(tokens)
    hidden = (jax.nn.silu(gate) * up).reshape(*x.shape[:-1], cfg.d_ff)
    hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
    out = Linear(cfg.d_model, dt, ("mlp", "embed"), name="down")(_flat_tokens(hidden))
    return out.reshape(x.shape[:-1] + out.shape[-1:])


class Block(nn.Module):
  config: ModelConfig
  layer_index: Optional[int] = None

  @nn.compact
  def __call__(self, x, positions, mask, layer_cache, cache_index, columns=None):
    """columns: None, or a static (start, stop): the block's output only there (see Attention)."""
    cfg = self.config
    attn_out, new_cache = Attention(cfg, self.layer_index, name="attn")(
        RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="attn_norm")(x),
        positions, mask, layer_cache, cache_index, columns)
    if columns is not None:
      x = x[:, columns[0]:columns[1]]
    x = x + attn_out
    x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="mlp_norm")(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, new_cache


class _ScanBlock(nn.Module):
  """Block with the (carry, xs) -> (carry, ys) signature nn.scan needs."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, layer_cache, positions, mask, cache_index):
    return Block(self.config, name="block")(x, positions, mask, layer_cache, cache_index)


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
          scan_block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
    else:
      self.layers = [block(cfg, i, name=f"layer_{i}") for i in range(cfg.n_layers)]
    self.final_norm = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="final_norm")
    if not cfg.tie_embeddings:
      self.lm_head = Linear(cfg.vocab_size, cfg.compute_dtype, ("embed", "vocab"),
                            out_dtype=jnp.float32, name="lm_head")

  def hidden_states(self, tokens, positions, segment_ids, cache: Optional[Cache] = None,
                    columns: Optional[tuple[int, int]] = None):
    """Final-normed hidden states [B, T, D] and the updated cache (None without one).

    tokens, positions, segment_ids: [B, T] int. segment_ids: 0 = padding, equal ids attend to
    each other (packing). With a cache, the T new tokens are written at slots
    [cache['index'], cache['index'] + T) and attend to every earlier filled slot.

    columns: a static (start, stop) when only those columns' outputs are read (a policy's
    answer positions, a prompt's last token): the result is then [B, stop - start, D], and the
    last layer asks queries and runs its MLP on those columns only, which saves that share of
    the layer's work. Earlier layers still run everywhere (later keys need them).
    """
    cfg = self.config
    x = self.embed(tokens)  # [B, T, D]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    t = tokens.shape[1]
    if cache is None:
      mask = attention_mask(segment_ids, jnp.arange(t), segment_ids)
      index = None
      kv = None
    else:
      index = cache["index"]
      k_segment = jax.lax.dynamic_update_slice_in_dim(
          cache["segment"], segment_ids.astype(cache["segment"].dtype), index, axis=1)
      mask = attention_mask(segment_ids, index + jnp.arange(t), k_segment)
      kv = (cache["k"], cache["v"])

    sliced = False
    if cfg.scan_layers:
      x, new_kv = self.layers(x, kv, positions, mask, index)
    else:
      for i, layer in enumerate(self.layers):  # each writes its slots of the stacked cache
        # The last layer runs on the read columns only; a rematerialised block takes no
        # static arguments, so it runs on all of them and is sliced below.
        cols = columns if i == cfg.n_layers - 1 and not cfg.remat else None
        x, new = layer(x, positions, mask, kv, index, cols)
        kv = new if kv is not None else None
        sliced = cols is not None
      new_kv = kv
    if columns is not None and not sliced:
      x = x[:, columns[0]:columns[1]]

    x = self.final_norm(x)
    if cache is None:
      return x, None
    new_cache = {"k": new_kv[0], "v": new_kv[1], "segment": k_segment, "index": index + t}
    return x, new_cache

  def project(self, hidden):
    """Logits [..., V] in float32 from hidden states [..., D]."""
    tokens = _flat_tokens(hidden)  # [N, D]: see _flat_tokens
    if self.config.tie_embeddings:
      logits = self.embed.attend(tokens)
    else:
      logits = self.lm_head(tokens)
    return logits.reshape(*hidden.shape[:-1], -1).astype(jnp.float32)

  def __call__(self, tokens, positions, segment_ids, cache: Optional[Cache] = None):
    hidden, cache = self.hidden_states(tokens, positions, segment_ids, cache)
    return self.project(hidden), cache


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> Cache:
  """An empty KV cache of `max_len` slots. Its dtype defaults to the compute dtype."""
  dtype = dtype or config.compute_dtype
  shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.dim_per_head)
  return {
      "k": jnp.zeros(shape, dtype),
      "v": jnp.zeros(shape, dtype),
      "segment": jnp.zeros((batch_size, max_len), jnp.int32),
      "index": jnp.zeros((), jnp.int32),
  }


def positions_from_mask(mask: Array) -> Array:
  """Position ids of left-padded rows: cumsum(mask) - 1, clipped at 0 on the padding."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
