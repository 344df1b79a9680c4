"""The PPO step of RLHF, top to bottom: experience from a rollout, then the update.

Four models take part. The policy (trained, initialised from SFT) and the critic (trained, a
separate scalar model initialised from the reward model) are the state; the reference (the SFT
params) and the reward model are frozen. Dropout does not exist in these models, so the policy
that sampled is exactly the policy that is scored and the first ratio is 1.

One iteration is three jitted pure functions; the host loop (rl/iteration.py) only calls them:

  1. rollout     infer/rollout.py: sample answers with the KV-cache sampler, truncated at the
                 first stop token; the sampler's log-probs are log π_old (no forward pass).
  2. experience  `make_experience`: one forward pass each of reference, critic and reward
                 model over [prompt | answer]; the reward per token is −β·KL_t, plus the RM
                 score (or the missing-EOS penalty) at the answer's last token; optional
                 scale-only reward whitening; GAE (γ, λ); advantages whitened over real tokens.
  3. update      `ppo_update`: epochs × minibatches of clipped-surrogate policy loss + clipped
                 value loss − entropy bonus (+ PPO-ptx), as two nested `lax.scan`s inside one
                 jit; each minibatch is the policy's forward/backward, then the critic's
                 (`ppo_grads`), and one optimizer update (gradient clipping in the
                 optimizer); then the optional EMA of the policy and the KL coefficient β
                 for the next iteration.

Cost: no vocabulary projection for the critic and the reward model (hidden states + scalar
head), and the policy and reference project only the N answer positions, not the prompt.
β lives in the state as a float32 array, so the adaptive controller never causes a retrace.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.models import chunked, lora, losses
from rlhf_jax.infer import rm_scores as reward
from rlhf_jax.models.heads import ScalarModel
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.rl import gae, kl
from rlhf_jax.rl.state import (  # noqa: F401  (the PPO step's names, re-exported)
    Frozen, PPOModels, PPOState, full_critic, full_params, full_policy, reward_params,
    shared_trunk)
from rlhf_jax.infer.rollout import Rollout, answer_columns
from rlhf_jax.train.state import apply_update_if

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Hyperparameters, checked before anything is compiled.


@dataclasses.dataclass(frozen=True)
class PPOHyper:
  """Everything static about the step. Frozen and hashable: bound with functools.partial."""
  epochs: int = 4
  minibatches: int = 4
  clip_eps: float = 0.2  # policy ratio clip
  value_clip: float = 0.2  # value clip, in reward units
  vf_coef: float = 0.1
  ent_coef: float = 0.0
  gamma: float = 1.0
  lam: float = 0.95
  temperature: float = 1.0  # the sampler's: log-probs come from logits / temperature
  kl_estimator: str = "k1"  # in the reward; k3 is available
  whiten_rewards: bool = False  # scale only
  missing_eos_penalty: Optional[float] = -1.0  # score of an answer with no stop token; None: off
  ptx_coef: float = 0.0  # PPO-ptx: γ · pretraining NLL; 0 = off
  ema_decay: float = 0.0  # EMA of the policy; 0 = off
  recompute_old_logprobs: bool = False  # False: the sampler's log-probs are log π_old

  def __post_init__(self):
    for name in ("clip_eps", "value_clip"):
      value = getattr(self, name)
      if not 0.0 < value < 1.0:
        raise ValueError(f"ppo.{name} must be in (0, 1), got {value}")
    if self.epochs < 1 or self.minibatches < 1:
      raise ValueError(f"ppo.epochs and ppo.minibatches must be >= 1, got {self.epochs}, "
                       f"{self.minibatches}")
    if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
      raise ValueError(f"ppo.gamma and ppo.lam must be in [0, 1], got {self.gamma}, {self.lam}")
    if not self.temperature > 0:
      raise ValueError(f"sampling temperature must be > 0, got {self.temperature}")
    if self.kl_estimator not in kl.ESTIMATORS:
      raise ValueError(f"ppo.kl_estimator must be one of {kl.ESTIMATORS}, "
                       f"got {self.kl_estimator!r}")
    if self.vf_coef < 0 or self.ent_coef < 0 or self.ptx_coef < 0:
      raise ValueError("ppo.vf_coef, ppo.ent_coef and ppo.ptx_coef must be >= 0")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"ppo.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}")

  def check_batch(self, batch_size: int, shards: int = 1) -> None:
    """The minibatches must split the batch evenly, and the batch the mesh's batch shards."""
    if batch_size % self.minibatches:
      raise ValueError(f"ppo.minibatches={self.minibatches} does not divide the batch of "
                       f"{batch_size} episodes")
    if batch_size % shards:
      raise ValueError(f"the batch of {batch_size} episodes does not split over the {shards} "
                       "batch shards of the mesh")


# ---------------------------------------------------------------------------------------------
# What the models say about a rollout.


def answer_token_stats(params, rollout: Rollout, *, model_config: ModelConfig,
                       temperature: float, with_entropy: bool = False,
                       entropy_grad: bool = True) -> tuple[Array, Optional[Array]]:
  """(log π(a_t | prompt, a_<t) [B, N], entropy [B, N] or None) at the sampling temperature,
  from the answer columns' hidden states only; over vocabulary chunks when
  model_config.vocab_chunk > 0 (never [B, N, V] logits at once), else from the whole logits."""
  columns = answer_columns(rollout.tokens.shape[1], rollout.answer_mask.shape[1])
  hidden, _ = Transformer(model_config).apply(
      {"params": params}, rollout.tokens, rollout.positions, rollout.segment_ids,
      columns=columns, method=Transformer.hidden_states)  # [B, N, D]
  return chunked.model_logit_stats(params, hidden, rollout.answer_tokens,
                                   model_config=model_config, temperature=temperature,
                                   with_entropy=with_entropy, entropy_grad=entropy_grad)


def answer_logprobs(params, rollout: Rollout, *, model_config: ModelConfig,
                    temperature: float) -> Array:
  """log π(a_t | prompt, a_<t) [B, N] at the sampling temperature; 0 on padding."""
  logprobs, _ = answer_token_stats(params, rollout, model_config=model_config,
                                   temperature=temperature)
  return logprobs * rollout.answer_mask


def answer_values(params, rollout: Rollout, *, model_config: ModelConfig) -> Array:
  """Critic values [B, N]: V before answer token t is read at column P-1+t. No vocab matmul."""
  columns = answer_columns(rollout.tokens.shape[1], rollout.answer_mask.shape[1])
  values = ScalarModel(model_config).apply({"params": params}, rollout.tokens,
                                           rollout.positions, rollout.segment_ids,
                                           columns=columns)  # [B, N]
  return values * rollout.answer_mask


def reward_model_scores(frozen: Frozen, rollout: Rollout, *, model_config: ModelConfig) -> Array:
  """Normalised RM scores [B]: the scalar head at each episode's last real token."""
  return reward.score_sequences(reward_params(frozen, model_config), rollout.tokens,
                                rollout.positions,
                                rollout.segment_ids, rollout.segment_ids,
                                model_config=model_config, gain=frozen.reward_gain,
                                bias=frozen.reward_bias)


# A reward function maps (frozen models, rollout) to one score per episode [B]. The default
# reads the reward model; tests plant known rewards through the same slot.
RewardFn = Callable[[Frozen, Rollout], Array]


# ---------------------------------------------------------------------------------------------
# 1. Rollout: rl/rollout.py (`sample_rollout`). 2. Experience.


class Experience(NamedTuple):
  """Everything the update needs, one row per episode (so minibatches are row slices)."""
  rollout: Rollout
  old_logprobs: Array  # [B, N]
  old_values: Array  # [B, N]
  advantages: Array  # [B, N] whitened over real tokens
  returns: Array  # [B, N]
  scores: Array  # [B] RM score, or the missing-EOS penalty
  kl: Array  # [B] the answer's KL to the reference (estimator of the reward), nats


def last_token_reward(scores: Array, mask: Array) -> Array:
  """[B, N]: scores [B] placed at each answer's last real token, 0 elsewhere."""
  length = jnp.sum(mask, axis=-1).astype(jnp.int32)  # [B]
  last = jax.nn.one_hot(jnp.maximum(length - 1, 0), mask.shape[1], dtype=jnp.float32)
  return last * scores[:, None] * (length > 0)[:, None]


def make_experience(params, frozen: Frozen, rollout: Rollout, kl_coef: Array, *,
                    models: PPOModels, hyper: PPOHyper, reward_fn: Optional[RewardFn] = None
                    ) -> tuple[Experience, dict]:
  """Scores, per-token rewards, values and advantages of a rollout. Pure; jit it.

  params: the state's {'policy', 'critic'}; kl_coef: β, a float32 array. Returns the
  experience and the `objective/*` and `rollout/*` metrics (scalars), plus `finite`.
  """
  mask = rollout.answer_mask  # [B, N]
  temperature = hyper.temperature
  params = full_params(params, frozen, models)
  # The reference is the policy's model with its adapters off (the same config without LoRA).
  ref_logprobs = answer_logprobs(frozen.reference, rollout,
                                 model_config=lora.base_config(models.policy),
                                 temperature=temperature)
  if hyper.recompute_old_logprobs:
    old_logprobs = answer_logprobs(params["policy"], rollout, model_config=models.policy,
                                   temperature=temperature)
  else:
    old_logprobs = rollout.logprobs * mask
  values = answer_values(params["critic"], rollout, model_config=models.critic)

  if reward_fn is None:
    reward_fn = functools.partial(reward_model_scores, model_config=models.reward)
  rm_scores = reward_fn(frozen, rollout).astype(jnp.float32)  # [B]
  scores = rm_scores
  if hyper.missing_eos_penalty is not None:
    # A cut-off answer has no defined RM score (the RM was trained on complete ones).
    scores = jnp.where(rollout.ended, rm_scores, hyper.missing_eos_penalty)

  kl_tokens = kl.kl_per_token(old_logprobs, ref_logprobs, hyper.kl_estimator) * mask  # [B, N]
  non_score = -kl_coef * kl_tokens  # [B, N]
  rewards = non_score + last_token_reward(scores, mask)
  if hyper.whiten_rewards:
    rewards = gae.whiten(rewards, mask, shift_mean=False)
  advantages, returns = gae.compute_gae(rewards, values, mask, hyper.gamma, hyper.lam)
  advantages = gae.whiten(advantages, mask)

  kl_seq = jnp.sum(kl_tokens, axis=-1)  # [B]
  non_score_seq = jnp.sum(non_score, axis=-1)
  metrics = {
      "objective/scores": jnp.mean(scores),
      "objective/rm_scores": jnp.mean(rm_scores),
      "objective/kl": jnp.mean(kl_seq),
      "objective/entropy": jnp.mean(jnp.sum(-old_logprobs * mask, axis=-1)),
      "objective/non_score_reward": jnp.mean(non_score_seq),
      "objective/rlhf_reward": jnp.mean(scores + non_score_seq),
      "objective/kl_coef": kl_coef,
      "rollout/eos_rate": jnp.mean(rollout.ended.astype(jnp.float32)),
      "rollout/answer_length": jnp.mean(rollout.lengths),
      "rollout/tokens": jnp.sum(rollout.segment_ids).astype(jnp.float32),
      "ppo/val/mean": gae.masked_mean(values, mask),
      "ppo/returns/mean": gae.masked_mean(returns, mask),
      # A NaN from the RM stops the run even where the missing-EOS penalty replaced it.
      "finite": jnp.all(jnp.isfinite(rewards)) & jnp.all(jnp.isfinite(rm_scores)),
  }
  experience = Experience(rollout=rollout, old_logprobs=old_logprobs, old_values=values,
                          advantages=advantages, returns=returns, scores=scores,
                          kl=kl_seq)
  return experience, metrics


# ---------------------------------------------------------------------------------------------
# 3. Update.


def policy_terms(policy_params, batch: Experience, ptx_batch: Optional[dict], *,
                 models: PPOModels, hyper: PPOHyper) -> tuple[Array, dict]:
  """The policy's part of one minibatch's loss: clipped surrogate − ent_coef·entropy
  (+ ptx_coef·ptx). policy_params: whole params (LoRA merged onto its base)."""
  rollout, mask = batch.rollout, batch.rollout.answer_mask
  # Without an entropy bonus the entropy is only logged: keep it out of the backward pass.
  logprobs, token_entropy = answer_token_stats(
      policy_params, rollout, model_config=models.policy, temperature=hyper.temperature,
      with_entropy=True, entropy_grad=bool(hyper.ent_coef))  # [b, N] each
  entropy = gae.masked_mean(token_entropy, mask)
  policy_loss, policy_stats = losses.ppo_policy_loss(
      logprobs, batch.old_logprobs, batch.advantages, mask, hyper.clip_eps)
  loss = policy_loss - hyper.ent_coef * entropy
  ptx_loss = jnp.zeros((), jnp.float32)
  if ptx_batch is not None:
    hidden_ptx, _ = Transformer(models.policy).apply(
        {"params": policy_params}, ptx_batch["inputs"], ptx_batch["positions"],
        ptx_batch["segment_ids"], method=Transformer.hidden_states)  # [b', T, D]
    nll_sum, count = chunked.model_next_token_loss(
        policy_params, hidden_ptx, ptx_batch["targets"], ptx_batch["loss_mask"],
        model_config=models.policy)
    ptx_loss = nll_sum / jnp.maximum(count, 1.0)
    loss = loss + hyper.ptx_coef * ptx_loss
  return loss, {
      "ppo/loss/policy": policy_loss,
      "ppo/loss/ptx": ptx_loss,
      "ppo/policy/entropy": entropy,
      "ppo/policy/approxkl": policy_stats["approxkl"],
      "ppo/policy/clipfrac": policy_stats["clipfrac"],
      "ppo/policy/ratio": policy_stats["ratio"],
  }


def value_terms(critic_params, batch: Experience, *, models: PPOModels,
                hyper: PPOHyper) -> tuple[Array, dict]:
  """The critic's part of one minibatch's loss: vf_coef · clipped value loss."""
  rollout, mask = batch.rollout, batch.rollout.answer_mask
  values = answer_values(critic_params, rollout, model_config=models.critic)  # [b, N]
  value_loss, value_stats = losses.ppo_value_loss(values, batch.old_values, batch.returns, mask,
                                                  hyper.value_clip)
  return hyper.vf_coef * value_loss, {
      "ppo/loss/value": value_loss,
      "ppo/val/clipfrac": value_stats["clipfrac"],
      "ppo/val/error": gae.masked_mean(jnp.square(values - batch.returns), mask),
  }


def ppo_loss(params, batch: Experience, ptx_batch: Optional[dict], *, models: PPOModels,
             hyper: PPOHyper) -> tuple[Array, dict]:
  """Loss of one minibatch: policy + vf_coef·value − ent_coef·entropy + ptx_coef·ptx."""
  policy_loss, policy_stats = policy_terms(params["policy"], batch, ptx_batch, models=models,
                                           hyper=hyper)
  value_loss, value_stats = value_terms(params["critic"], batch, models=models, hyper=hyper)
  loss = policy_loss + value_loss
  return loss, {"ppo/loss/total": loss, **policy_stats, **value_stats}


def ppo_grads(params, batch: Experience, ptx_batch: Optional[dict], *, models: PPOModels,
              hyper: PPOHyper, frozen: Optional[Frozen] = None) -> tuple[tuple, dict]:
  """((loss, stats), grads) of `ppo_loss` over the state's params, one model after the other.

  The policy's and the critic's terms share no trained parameter, so each model's gradient is
  its own term's. Taken apart, the critic's forward pass reads tokens that depend on the
  policy's gradient (`_after`): XLA cannot start it before the policy's backward pass has
  ended, so the two models' activations are not held at once (XLA CPU's plan of one LoRA
  minibatch at the SmolLM2-135M shape: 5.0 -> 4.1 GiB of temporaries; benchmarks/RESULTS.md)."""
  def policy_fn(p):
    return policy_terms(full_policy(p, frozen, models), batch, ptx_batch, models=models,
                        hyper=hyper)

  (policy_loss, policy_stats), policy_grads = jax.value_and_grad(policy_fn, has_aux=True)(
      params["policy"])
  rollout = batch.rollout._replace(tokens=_after(batch.rollout.tokens, policy_grads))
  critic_batch = batch._replace(rollout=rollout)

  def critic_fn(c):
    return value_terms(full_critic(c, frozen, models), critic_batch, models=models, hyper=hyper)

  (value_loss, value_stats), critic_grads = jax.value_and_grad(critic_fn, has_aux=True)(
      params["critic"])
  loss = policy_loss + value_loss
  stats = {"ppo/loss/total": loss, **policy_stats, **value_stats}
  return (loss, stats), {"policy": policy_grads, "critic": critic_grads}


def _after(tokens: Array, grads) -> Array:
  """`tokens`, unchanged, computed from `grads` too: a data dependence that orders XLA's
  schedule. (lax.optimization_barrier did not: XLA CPU's plan kept both models' activations.)
  Where the gradient is not finite the tokens change, but that minibatch is skipped anyway."""
  shift = (0.0 * optax.global_norm(grads)) != 0.0  # [] False unless the gradient is NaN/inf
  return tokens + shift.astype(tokens.dtype)


def _split_minibatches(tree, key: Array, minibatches: int):
  """Rows shuffled by `key`, then cut into [minibatches, rows / minibatches, ...]."""
  rows = jax.tree.leaves(tree)[0].shape[0]
  order = jax.random.permutation(key, rows)
  return jax.tree.map(
      lambda x: x[order].reshape(minibatches, rows // minibatches, *x.shape[1:]), tree)


def ppo_update(state: PPOState, experience: Experience, ptx_batches: Optional[dict], *,
               models: PPOModels, hyper: PPOHyper, controller: kl.KLController,
               tx: optax.GradientTransformation, frozen: Optional[Frozen] = None
               ) -> tuple[PPOState, dict]:
  """epochs × minibatches optimizer updates on one batch of experience, in one jit.

  ptx_batches: None, or LM batches [minibatches, rows, T] (minibatch i takes row block i in
  every epoch). Returns the new state and per-update stats, each [epochs, minibatches]
  (stats[..][0, 0] is the first minibatch of the first epoch, where the ratio is 1).
  A minibatch whose loss or gradient is not finite is skipped and reported in `finite`.
  frozen: the frozen models, read only with LoRA (the bases the adapters sit on).
  """
  grad_fn = functools.partial(ppo_grads, models=models, hyper=hyper, frozen=frozen)

  def minibatch_step(carry, xs):
    params, opt_state, ema = carry
    batch, ptx = xs
    (loss, stats), grads = grad_fn(params, batch, ptx)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state, applied = apply_update_if(finite, tx, grads, params, opt_state)
    finite = finite & applied
    if ema is not None:
      d = hyper.ema_decay
      ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params["policy"])
    return (params, opt_state, ema), {**stats, "ppo/grad_norm": grad_norm, "finite": finite}

  def epoch_step(carry, key):
    batches = _split_minibatches(experience, key, hyper.minibatches)
    return jax.lax.scan(minibatch_step, carry, (batches, ptx_batches))

  keys = jax.random.split(jax.random.fold_in(state.key(), 1), hyper.epochs)
  (params, opt_state, ema), stats = jax.lax.scan(
      epoch_step, (state.params, state.opt_state, state.ema), keys)

  episodes = experience.kl.shape[0]
  kl_coef = controller.update(state.kl_coef, jnp.mean(experience.kl), episodes)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
                            kl_coef=jnp.asarray(kl_coef, jnp.float32))
  return new_state, stats


def summarize_update(stats: dict) -> dict:
  """Per-iteration means of the [epochs, minibatches] stats (host side, numpy)."""
  out = {k: float(np.mean(v)) for k, v in stats.items() if k != "finite"}
  out["ppo/skipped_updates"] = float(np.size(stats["finite"]) - np.sum(stats["finite"]))
  return out
