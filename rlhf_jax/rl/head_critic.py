"""PPO's critic as a value head on the reward model's frozen trunk (ppo.critic_trunk="frozen").

The RM's trunk already reads every prefix of an episode; a linear head on its final hidden
states is the cheapest critic there is. One trunk pass over a rollout then gives the RM's score
(its own head at the last real token, or over the answer) and every value (the critic's head
before each answer token), and the features are kept for the update, which trains the head on
them and runs no trunk at all. What is given up: the value function is linear in features the
RM learnt for ranking, where a trained critic also fits its trunk (rl/ppo.py, the default).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.infer.rollout import Rollout
from rlhf_jax.models.heads import ScalarHead, pooled_score
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.rl.state import Frozen, reward_params

Array = jax.Array


def reward_trunk_features(frozen: Frozen, rollout: Rollout, *, model_config: ModelConfig
                          ) -> Array:
  """The RM trunk's final hidden states [B, N + 1, D] at columns P-1 .. S-1: column P-1+t
  comes before answer token t (a value's place) and column P-1+len holds the episode's last
  real token (the RM's score's place). Frozen: nothing is differentiated through it."""
  seq_len, n = rollout.tokens.shape[1], rollout.answer_mask.shape[1]
  hidden, _ = Transformer(model_config).apply(
      {"params": reward_params(frozen, model_config)["trunk"]}, rollout.tokens,
      rollout.positions, rollout.segment_ids, columns=(seq_len - n - 1, seq_len),
      method=Transformer.hidden_states)
  return jax.lax.stop_gradient(hidden.astype(jnp.float32))  # [B, N + 1, D]


def head_values(head_params, features: Array) -> Array:
  """A scalar head [...] read over features [..., D]: a head-only critic's values."""
  return ScalarHead().apply({"params": head_params["head"]}, features)


def scores_from_features(frozen: Frozen, rollout: Rollout, features: Array, *,
                         model_config: ModelConfig) -> Array:
  """Normalised RM scores [B] from `reward_trunk_features`: its head at index len (the last
  real token; the prompt's last one for an empty answer), or its mean over indices 1 .. len
  (answer token t sits at index t + 1) under score_pool="mean", as `reward_model_scores`
  reads it."""
  raw = head_values(reward_params(frozen, model_config), features)  # [B, N + 1]
  answer = jnp.pad(rollout.answer_mask, ((0, 0), (1, 0)))  # [B, N + 1]
  real = answer.at[:, 0].set(1)  # index 0 (the prompt's last token) and the answer's
  pooled = pooled_score(raw, real, answer, model_config.score_pool)  # [B]
  return frozen.reward_gain * pooled + frozen.reward_bias
