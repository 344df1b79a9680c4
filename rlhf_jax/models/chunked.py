"""Token log-probs, next-token loss and entropy over vocabulary chunks, never all logits at once.

The usual route projects hidden states [B, T, D] onto the whole vocabulary and keeps the
float32 logits [B, T, V]: with Gemma 3's 262k vocabulary one 16 x 128 batch is 2.1 GB, and
autodiff keeps it (and softmax's output) for the backward pass. Every quantity the trainers
read from those logits is a reduction over V, so it can be gathered chunk by chunk:

    lse        = m + log s,   s = Σ_v exp(l_v − m)             running max m
    lse − E[l] = log s − u/s, u = Σ_v exp(l_v − m)·(l_v − m)   the entropy
    l_y        = the target's logit, picked from the chunk that holds it

`lax.scan` walks the chunks with (m, s, u, l_y) as its carry; its body is rematerialised
(`jax.checkpoint`), so the backward pass recomputes one chunk's logits at a time instead of
storing them all. The running max is held out of autodiff (stop_gradient): lse does not depend
on it mathematically, and leaving it in would only send exact-zero gradients through `max`.

A chunk size that does not divide V: the last chunk is the kernel's last C columns, and the
columns it shares with the chunk before are masked to −inf (no padded copy of the kernel).
The matmul is `dot.dense`, the projection's own: in float32 the chunked values match the
unchunked ones to rounding.

The `model_*` functions are what the trainers call: from a Transformer's params and hidden
states, chunked when the chunk size (`ModelConfig.vocab_chunk` where the config has that
field, else 0) is > 0, and otherwise the unchunked route exactly as before (`project`, then
the `losses` functions).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models import losses
from rlhf_jax.models.dot import dense
from rlhf_jax.models.transformer import ModelConfig, Transformer

Array = jax.Array


def output_projection(params: Mapping[str, Any], tie_embeddings: bool) -> tuple[Array, int]:
  """(kernel, vocab_axis) of a Transformer's output projection: lm_head's kernel [D, V] (axis
  1), or with tied embeddings the embedding matrix [V, D] (axis 0) as stored. Not transposed
  here: a whole transposed copy (1.2 GB for Gemma 3's float32 embedding) is what chunking
  avoids; each chunk transposes its own [C, D] slice."""
  if tie_embeddings:  # unbox: freshly initialised params still carry their partitioning
    return nn.unbox(params["embed"]["embedding"]), 0
  return nn.unbox(params["lm_head"]["kernel"]), 1


def token_rows(params: Mapping[str, Any], model_config) -> tuple[Array, Array] | None:
  """(ids [n], rows [n, D]) of LoRA's trained token rows (`lora_tokens`), or None.

  They enter the chunked projection as extra logit columns (h . rows added to those ids'
  logits), not as a copy of the embedding with the rows written in: the frozen embedding then
  gets no gradient, where the copy's backward formed a dense [V, D] one (+20% per Gemma SFT
  step)."""
  if not (model_config.lora_rank and model_config.lora_tokens
          and "token_rows_lora_b" in params):
    return None
  return (jnp.asarray(model_config.lora_tokens, jnp.int32),
          nn.unbox(params["token_rows_lora_b"]))


def _chunk_stats(carry, i, hidden, kernel, targets, extra, *, chunk, vocab_axis, dtype,
                 temperature, softcap, entropy_grad):
  """One vocabulary chunk's update of the running (m, s, u, target logit); see the module doc.
  extra: None, or (ids [n], logits [N, n]) added to those ids' columns (token rows)."""
  m, s, u, picked = carry  # each [N]
  vocab = kernel.shape[vocab_axis]
  start = jnp.minimum(i * chunk, vocab - chunk)  # the last chunk ends at V
  k = jax.lax.dynamic_slice_in_dim(kernel, start, chunk, axis=vocab_axis)  # [D, C] or [C, D]
  if vocab_axis == 0:
    k = k.T  # [D, C]
  logits = dense(hidden, k, dtype, out_dtype=jnp.float32)  # [N, C]
  cols = start + jnp.arange(chunk)  # [C] vocabulary ids
  if extra is not None:
    ids, extra_logits = extra
    onehot = (cols[:, None] == ids[None, :]).astype(jnp.float32)  # [C, n]
    logits = logits + extra_logits @ onehot.T  # [N, C]
  if softcap:
    logits = jnp.tanh(logits / softcap) * softcap
  logits = logits / temperature
  fresh = cols >= i * chunk  # [C] False on the columns the chunk before already counted
  masked = jnp.where(fresh, logits, -jnp.inf)  # [N, C]
  new_m = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(masked, axis=-1)))  # [N]
  scale = jnp.exp(m - new_m)  # [N]; 0 on the first chunk (m = -inf)
  e = jnp.exp(masked - new_m[:, None])  # [N, C]; 0 on masked columns
  # u = Σ e·(l − m) moves to the new max with the old Σ e: no large m to cancel at the end.
  shift = jnp.where(jnp.isfinite(m), m - new_m, 0.0)  # [N]; no gradient (both m held out)
  u = (u + s * shift) * scale
  s = s * scale + jnp.sum(e, axis=-1)
  # The finite logits, not `masked`: 0 * -inf would be NaN on the masked columns.
  ent_logits = logits if entropy_grad else jax.lax.stop_gradient(logits)
  ent_e = e if entropy_grad else jax.lax.stop_gradient(e)
  u = u + jnp.sum(ent_e * (ent_logits - new_m[:, None]), axis=-1)
  hit = fresh[None, :] & (cols[None, :] == targets[:, None])  # [N, C]
  picked = picked + jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
  return (new_m, s, u, picked), None


def logit_stats(hidden: Array, kernel: Array, targets: Array, *, chunk: int, dtype=jnp.float32,
                temperature: float = 1.0, softcap: float = 0.0, entropy_grad: bool = True,
                vocab_axis: int = 1,
                rows: tuple[Array, Array] | None = None) -> tuple[Array, Array]:
  """(log p(targets), entropy), both [...] float32, of softmax(project(hidden) / temperature).

  hidden [..., D] (the positions read only); kernel [D, V], or [V, D] with vocab_axis=0
  (`output_projection`); targets [...] int; chunk: vocabulary columns per step (0 or >= V:
  one chunk); dtype: the compute dtype of the matmul; softcap: the model's final_softcap
  (applied before the temperature, as `Transformer.project` then the PPO step do).
  entropy_grad=False holds the entropy out of autodiff (PPO with no entropy bonus) without a
  second pass. rows: `token_rows` (ids [n], rows [n, D]), whose h . rows add to those ids'
  logits.
  """
  lead = hidden.shape[:-1]
  h = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
  extra = None
  if rows is not None:
    ids, table = rows
    extra = (ids, dense(h, table.T, dtype, out_dtype=jnp.float32))  # [n], [N, n]
  t = targets.reshape(-1).astype(jnp.int32)  # [N]
  vocab = kernel.shape[vocab_axis]
  chunk = vocab if chunk <= 0 or chunk >= vocab else int(chunk)
  n_chunks = -(-vocab // chunk)
  body = functools.partial(_chunk_stats, hidden=h, kernel=kernel, targets=t, extra=extra,
                           chunk=chunk,
                           vocab_axis=vocab_axis, dtype=dtype, temperature=temperature,
                           softcap=softcap, entropy_grad=entropy_grad)
  n = h.shape[0]
  init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32),
          jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
  (m, s, u, picked), _ = jax.lax.scan(jax.checkpoint(body), init, jnp.arange(n_chunks))
  log_s = jnp.log(s)  # [N]; lse = m + log_s
  logp = (picked - m) - log_s
  entropy = log_s - u / s  # lse − E[l]: two terms >= 0, nothing cancels
  if not entropy_grad:  # u already carries no gradient; log s does (it is the log-probs')
    entropy = jax.lax.stop_gradient(entropy)
  return logp.reshape(lead), entropy.reshape(lead)


def token_logprobs(hidden: Array, kernel: Array, targets: Array, *, chunk: int,
                   dtype=jnp.float32, temperature: float = 1.0, softcap: float = 0.0,
                   vocab_axis: int = 1) -> Array:
  """log softmax(project(hidden) / temperature)[targets]: [..., D] -> [...] float32, chunked.

  The chunked form of `losses.token_logprobs(logits / temperature, targets)`."""
  return logit_stats(hidden, kernel, targets, chunk=chunk, dtype=dtype, temperature=temperature,
                     softcap=softcap, entropy_grad=False, vocab_axis=vocab_axis)[0]


def next_token_loss(hidden: Array, kernel: Array, targets: Array, loss_mask: Array, *,
                    chunk: int, dtype=jnp.float32, softcap: float = 0.0,
                    vocab_axis: int = 1,
                    rows: tuple[Array, Array] | None = None) -> tuple[Array, Array]:
  """(Σ masked next-token cross-entropy, mask count): `losses.next_token_loss`, chunked.

  hidden [B, T, D]; targets [B, T] (already shifted); loss_mask [B, T].
  """
  logp = logit_stats(hidden, kernel, targets, chunk=chunk, dtype=dtype, softcap=softcap,
                     entropy_grad=False, vocab_axis=vocab_axis, rows=rows)[0]
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(-logp * mask), jnp.sum(mask)


def entropy(hidden: Array, kernel: Array, *, chunk: int, dtype=jnp.float32,
            temperature: float = 1.0, softcap: float = 0.0, vocab_axis: int = 1) -> Array:
  """Entropy [...] of softmax(project(hidden) / temperature): `losses.entropy_from_logits`,
  chunked."""
  targets = jnp.zeros(hidden.shape[:-1], jnp.int32)
  return logit_stats(hidden, kernel, targets, chunk=chunk, dtype=dtype, temperature=temperature,
                     softcap=softcap, vocab_axis=vocab_axis)[1]


# ---------------------------------------------------------------------------------------------
# From a Transformer's params: chunked when asked, the whole-vocabulary route otherwise.


def chunk_of(model_config: ModelConfig, chunk: int | None = None) -> int:
  """The chunk size to use: `chunk` when given, else the config's vocab_chunk (0 without one)."""
  return int(getattr(model_config, "vocab_chunk", 0) if chunk is None else chunk)


def model_logit_stats(params, hidden: Array, targets: Array, *, model_config: ModelConfig,
                      temperature: float = 1.0, chunk: int | None = None,
                      with_entropy: bool = False,
                      entropy_grad: bool = True) -> tuple[Array, Array | None]:
  """(log p(targets) [...], entropy [...] or None) of softmax(project(hidden) / temperature).

  hidden [..., D]: `Transformer.hidden_states` at the positions read; targets [...] int.
  Chunk 0: `Transformer.project` and `losses`, as the trainers computed them before.
  """
  chunk = chunk_of(model_config, chunk)
  if chunk <= 0:
    logits = Transformer(model_config).apply({"params": params}, hidden,
                                             method=Transformer.project) / temperature
    entropy_value = None
    if with_entropy:
      ent_logits = logits if entropy_grad else jax.lax.stop_gradient(logits)
      entropy_value = losses.entropy_from_logits(ent_logits)
    return losses.token_logprobs(logits, targets), entropy_value
  kernel, vocab_axis = output_projection(params, model_config.tie_embeddings)
  logp, entropy_value = logit_stats(
      hidden, kernel, targets, chunk=chunk, dtype=model_config.compute_dtype,
      temperature=temperature, softcap=model_config.final_softcap,
      entropy_grad=entropy_grad and with_entropy, vocab_axis=vocab_axis,
      rows=token_rows(params, model_config))
  return logp, entropy_value if with_entropy else None


def loss_columns(loss_mask: Array, capacity: int) -> Array:
  """Positions [G, capacity] of each row of loss_mask [G, N]: its loss positions (mask > 0) in
  order, then the others in order (a stable sort on "outside the loss"), cut to `capacity`."""
  outside = (loss_mask <= 0).astype(jnp.int32)  # [G, N]
  return jnp.argsort(outside, axis=1, stable=True)[:, :capacity]


def loss_capacity(rows: int, seq_len: int, share: float) -> int:
  """Columns gathered from a group of `rows` rows of `seq_len` at `share` (a multiple of 8),
  or 0 where that leaves nothing out."""
  n = rows * seq_len
  columns = -(-math.ceil(share * n) // 8) * 8 if share > 0 else n
  return columns if columns < n else 0


def gathered_next_token_loss(params, hidden: Array, targets: Array, loss_mask: Array, *,
                             model_config: ModelConfig, loss_share: float, groups: int = 1,
                             chunk: int | None = None) -> tuple[Array, Array, Array]:
  """(Σ masked next-token cross-entropy, count, 1.0 if gathered else 0.0): the loss of
  `model_next_token_loss` with the output projection on `loss_share` of the batch's
  positions, the loss positions gathered first, instead of on all B x T.

  SFT trains on the assistant's tokens only (28% of a SmolLM2 SFT batch, 39% of a Gemma 3
  one), and the projection onto the vocabulary is a large part of a step (about 60% of a
  Gemma 3 270M forward, its vocabulary being 262k), so most of it went to positions the loss
  masks out. The rows are gathered in `groups` groups of B / groups rows (one per shard of the
  batch axis, so the gather stays on its device). A batch with a group of more loss positions
  than the share allows takes the every-position route (`lax.cond`: one program, and exact
  either way); the third output says which route ran."""
  b, t = loss_mask.shape
  capacity = loss_capacity(b // groups, t, loss_share) if b % groups == 0 else 0

  def every_position():
    loss, count = model_next_token_loss(params, hidden, targets, loss_mask,
                                        model_config=model_config, chunk=chunk)
    return loss, count, jnp.float32(0.0)

  if not capacity:
    return every_position()
  group = lambda x: x.reshape(groups, (b // groups) * t, *x.shape[2:])  # noqa: E731

  def gathered():
    cols = loss_columns(group(loss_mask), capacity)  # [G, C]
    take = lambda x: jnp.take_along_axis(group(x), cols, axis=1)  # noqa: E731
    loss, count = model_next_token_loss(
        params, jnp.take_along_axis(group(hidden), cols[..., None], axis=1), take(targets),
        take(loss_mask), model_config=model_config, chunk=chunk)
    return loss, count, jnp.float32(1.0)

  fits = jnp.max(jnp.sum((group(loss_mask) > 0).astype(jnp.int32), axis=1)) <= capacity
  return jax.lax.cond(fits, gathered, every_position)


def model_next_token_loss(params, hidden: Array, targets: Array, loss_mask: Array, *,
                          model_config: ModelConfig,
                          chunk: int | None = None) -> tuple[Array, Array]:
  """(Σ masked next-token cross-entropy, count) from hidden states [B, T, D]; chunk 0 is
  `losses.next_token_loss` of the projected logits, as before."""
  chunk = chunk_of(model_config, chunk)
  if chunk <= 0:
    logits = Transformer(model_config).apply({"params": params}, hidden,
                                             method=Transformer.project)
    return losses.next_token_loss(logits, targets, loss_mask)
  kernel, vocab_axis = output_projection(params, model_config.tie_embeddings)
  return next_token_loss(hidden, kernel, targets, loss_mask, chunk=chunk,
                         dtype=model_config.compute_dtype, softcap=model_config.final_softcap,
                         vocab_axis=vocab_axis, rows=token_rows(params, model_config))
