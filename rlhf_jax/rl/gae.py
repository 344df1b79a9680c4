"""Generalised advantage estimation and masked whitening, over right-padded answers.

Answers in a batch have different lengths: row b is real on `mask[b, :len_b]` and padding
after. GAE runs backwards in time as a `lax.scan`; a padded step contributes nothing and cuts
the bootstrap, so the last real token of each row sees no value beyond it (the episode ends
there; its reward holds the RM score).

    delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
    R_t     = A_t + V_t                           (the critic's regression target)

Whitening statistics are taken over real tokens only: padding would otherwise pull the mean
towards 0 and shrink the std in proportion to how much of the batch is padding.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def compute_gae(rewards: Array, values: Array, mask: Array, gamma: float = 1.0,
                lam: float = 0.95) -> tuple[Array, Array]:
  """(advantages [B, N], returns [B, N]), both 0 on padding.

  rewards, values [B, N] float; mask [B, N] (1 on real answer tokens).
  """
  mask = mask.astype(jnp.float32)
  rewards = rewards.astype(jnp.float32) * mask
  values = values.astype(jnp.float32) * mask
  # Value and mask of the next step; past the last column there is nothing to bootstrap from.
  next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))  # [B, N]
  next_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))  # [B, N]
  deltas = rewards + gamma * next_mask * next_values - values  # [B, N]

  def backward(carry, xs):  # carry: A_{t+1} [B]
    delta, nmask, m = xs
    adv = (delta + gamma * lam * nmask * carry) * m
    return adv, adv

  time_major = (deltas.T, next_mask.T, mask.T)  # each [N, B]
  _, adv = jax.lax.scan(backward, jnp.zeros(rewards.shape[:1], jnp.float32), time_major,
                        reverse=True)
  advantages = adv.T  # [B, N]
  return advantages, (advantages + values) * mask


def masked_mean(x: Array, mask: Array) -> Array:
  """Mean of x over the positions where mask is 1 (0 if there are none)."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_var(x: Array, mask: Array) -> Array:
  """Unbiased variance over the positions where mask is 1."""
  mask = mask.astype(jnp.float32)
  n = jnp.sum(mask)
  centred = (x - masked_mean(x, mask)) * mask
  return jnp.sum(centred * centred) / jnp.maximum(n - 1.0, 1.0)


def whiten(x: Array, mask: Array, shift_mean: bool = True, eps: float = 1e-8) -> Array:
  """x scaled to unit std over real tokens (and shifted to mean 0 if shift_mean); 0 on padding.

  shift_mean=False is the scale-only reward whitening: shifting per-token rewards would add
  a bonus or a cost proportional to the answer's length.
  """
  mean = masked_mean(x, mask)
  scaled = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + eps)
  if not shift_mean:
    scaled = scaled + mean
  return scaled * mask.astype(x.dtype)
