"""Scalar heads: one number per position, for the reward model and the critic.

The head reads the transformer's final hidden states; no vocabulary projection is computed,
which is most of the FLOPs saved by a critic or RM over a policy forward pass.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models.transformer import ModelConfig, Transformer


class ScalarHead(nn.Module):
  """Linear map D -> 1, initialised N(0, 1/sqrt(D + 1)) with bias 0 (lm-human-preferences)."""

  @nn.compact
  def __call__(self, hidden):  # [..., D] -> [...]
    d = hidden.shape[-1]
    out = nn.Dense(
        1, dtype=jnp.float32, name="dense",
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal((d + 1) ** -0.5),
                                                 ("embed", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(
            hidden.astype(jnp.float32))
    return out[..., 0]


class ScalarModel(nn.Module):
  """Transformer trunk + scalar head: values [B, T] at every position.

  Params are {'trunk': <Transformer params>, 'head': ...}, so a trunk is initialised from an SFT
  checkpoint by copying its params under 'trunk'.
  """
  config: ModelConfig

  def setup(self):
    self.trunk = Transformer(self.config)
    self.head = ScalarHead()

  def __call__(self, tokens, positions, segment_ids, columns=None, prefix_ids=None):
    """columns: None, a static (start, stop) or positions [B, N]: values there only, [B, N]
    (Transformer.hidden_states: the last layer runs there only).
    prefix_ids: as `Transformer.hidden_states`'s (answers that share their prompt)."""
    hidden, _ = self.trunk.hidden_states(tokens, positions, segment_ids, columns=columns,
                                         prefix_ids=prefix_ids)
    return self.head(hidden)


def trunk_of(policy_params) -> dict:
  """A scalar model's trunk from a policy's params: everything but the vocabulary projection."""
  return {k: v for k, v in policy_params.items() if k != "lm_head"}


def last_position(mask):
  """[B] int: each row's last real token (mask [B, T], its right-most nonzero; T - 1 in a row
  with none)."""
  t = mask.shape[1]
  return t - 1 - jnp.argmax((mask[:, ::-1] != 0).astype(jnp.int32), axis=1)


def last_token_value(values, mask):
  """Values [B, T] read at the last real token of each row (mask [B, T], right-most 1)."""
  return jnp.take_along_axis(values, last_position(mask)[:, None], axis=1)[:, 0]


def answer_mean_value(values, answer_mask):
  """Values [..., T] averaged over the positions answer_mask [..., T] marks; 0 where it marks
  none."""
  answer_mask = answer_mask.astype(values.dtype)
  total = jnp.sum(values * answer_mask, axis=-1)
  return total / jnp.maximum(jnp.sum(answer_mask, axis=-1), 1.0)


def pooled_score(values, mask, answer_mask, pool: str):
  """A scalar model's raw scores [B] from its values [B, T] (ModelConfig.score_pool): at each
  row's last real token (mask [B, T]), or the mean over its answer's tokens (answer_mask
  [B, T]). Why a mean: a linear head on Gemma 3 270M's frozen SFT trunk ordered Chinese
  answers as the gold scorer does 0.667 of the time from the answer's mean hidden state, 0.636
  from its last token; trained with LoRA, the two RMs read the same (0.715 / 0.716; English
  0.777 / 0.787), so "last" stays the default (experiments/real_recipe, "Where the RM
  reads")."""
  if pool == "last":
    return last_token_value(values, mask)
  if answer_mask is None:
    raise ValueError("score_pool='mean' needs the answer's positions (answer_mask)")
  return answer_mean_value(values, answer_mask)
