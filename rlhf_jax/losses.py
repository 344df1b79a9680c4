"""Losses, each a pure function of arrays. Shapes in comments: B batch, T length, V vocab.

Token losses return (sum, count) rather than a mean so that gradient accumulation over
micro-batches, and sharded batches, give exactly the loss of one big batch.
"""
import jax
import jax.numpy as jnp


def token_logprobs(logits, targets):
  """log p(targets) under logits: [B, T, V], [B, T] -> [B, T] (float32)."""
  logits = logits.astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return target_logits - jax.nn.logsumexp(logits, axis=-1)


def next_token_loss(logits, targets, loss_mask):
  """Summed next-token cross-entropy over masked positions, and the mask's count.

  logits [B, T, V]; targets [B, T] (already shifted: the token after position t);
  loss_mask [B, T] float (1 where targets[t] is trained).
  """
  nll = -token_logprobs(logits, targets)  # [B, T]
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)
