"""The PPO step of RLHF, top to bottom: experience from a rollout, then the update.

Four models take part. The policy (trained, initialised from SFT) and the critic (trained, a
separate scalar model initialised from the reward model) are the state; the reference (the SFT
params) and the reward model are frozen. Dropout does not exist in these models, so the policy
that sampled is exactly the policy that is scored and the first ratio is 1.

One iteration is three jitted pure functions; the host loop (rl/iteration.py) only calls them:

  1. rollout     infer/rollout.py: sample answers with the KV-cache sampler, truncated at the
                 first stop token; the sampler's log-probs are log π_old (no forward pass).
  2. experience  `make_experience`: one forward pass each of reference, critic and reward
                 model over [prompt | answer] (with `critic_trunk="frozen"` the critic is a
                 value head on the RM's trunk: one pass serves both, and its features are
                 kept for the update); the reward per token is −β·KL_t, plus the RM
                 score (or the missing-EOS penalty) at the answer's last token; optional
                 scale-only reward whitening; GAE (γ, λ); advantages whitened over real tokens.
  3. update      `ppo_update`: epochs × minibatches of clipped-surrogate policy loss + clipped
                 value loss − entropy bonus (+ PPO-ptx), as two nested `lax.scan`s inside one
                 jit; each minibatch is the policy's forward/backward, then the critic's
                 (`ppo_grads`), and one optimizer update (gradient clipping in the
                 optimizer) over both (`update_jointly`), or with an optimizer per model
                 the policy's every step, then the critic's (`update_models_apart`); then
                 the optional EMA of the policy and the KL coefficient β for the next
                 iteration. Hyperparameters: rl/hyper.py.

Cost: no vocabulary projection for the critic and the reward model (hidden states + scalar
head), and the policy and reference project only the N answer positions, not the prompt.
β lives in the state as a float32 array, so the adaptive controller never causes a retrace.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.models import chunked, lora, losses
from rlhf_jax.infer import rm_scores as reward
from rlhf_jax.models.heads import ScalarModel
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.rl import gae, kl
from rlhf_jax.rl.head_critic import head_values, reward_trunk_features, scores_from_features
from rlhf_jax.rl.hyper import OPTIMIZERS, PPOHyper  # noqa: F401 (re-exported)
from rlhf_jax.rl.state import (  # noqa: F401  (the PPO step's names, re-exported)
    Frozen, PPOModels, PPOState, full_critic, full_params, full_policy, init_opt_state,
    reward_params, shared_trunk)
from rlhf_jax.infer.rollout import Rollout, answer_columns
from rlhf_jax.train.state import apply_update_if

Array = jax.Array


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
  """Normalised RM scores [B]: the scalar head at each episode's last real token (or over its
  answer, model_config.score_pool)."""
  return reward.score_sequences(reward_params(frozen, model_config), rollout.tokens,
                                rollout.positions,
                                rollout.segment_ids, rollout.segment_ids,
                                model_config=model_config, gain=frozen.reward_gain,
                                bias=frozen.reward_bias,
                                answer_mask=(rollout.row_answer_mask
                                             if model_config.score_pool == "mean" else None))


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
  # [B, N, D] the RM trunk's features a head-only critic reads (critic_trunk="frozen"); else None
  critic_features: Optional[Array] = None
  # [B] int: each row's language index, with one β per language (rl/kl.py); else None
  lang: Optional[Array] = None


def last_token_reward(scores: Array, mask: Array) -> Array:
  """[B, N]: scores [B] placed at each answer's last real token, 0 elsewhere."""
  length = jnp.sum(mask, axis=-1).astype(jnp.int32)  # [B]
  last = jax.nn.one_hot(jnp.maximum(length - 1, 0), mask.shape[1], dtype=jnp.float32)
  return last * scores[:, None] * (length > 0)[:, None]


def values_and_scores(critic, frozen: Frozen, rollout: Rollout, *, models: PPOModels,
                      hyper: PPOHyper, reward_fn: Optional[RewardFn] = None
                      ) -> tuple[Array, Array, Optional[Array]]:
  """(critic values [B, N], RM scores [B], the features a head-only critic reads [B, N, D] or
  None). With critic_trunk="frozen" one RM trunk pass gives all three."""
  mask, features = rollout.answer_mask, None
  if hyper.critic_trunk == "frozen":
    columns = reward_trunk_features(frozen, rollout, model_config=models.reward)  # [B, N+1, D]
    if reward_fn is None:
      reward_fn = functools.partial(scores_from_features, features=columns,
                                    model_config=models.reward)
    features = columns[:, :-1]  # [B, N, D]: the values' columns, kept for the update
    values = head_values(critic, features) * mask  # [B, N]
  else:
    values = answer_values(full_critic(critic, frozen, models), rollout,
                           model_config=models.critic)
  if reward_fn is None:
    reward_fn = functools.partial(reward_model_scores, model_config=models.reward)
  return values, reward_fn(frozen, rollout).astype(jnp.float32), features


def make_experience(params, frozen: Frozen, rollout: Rollout, kl_coef: Array,
                    lang: Optional[Array] = None, *, models: PPOModels, hyper: PPOHyper,
                    reward_fn: Optional[RewardFn] = None) -> tuple[Experience, dict]:
  """Scores, per-token rewards, values and advantages of a rollout. Pure; jit it.

  params: the state's {'policy', 'critic'}; kl_coef: β, a float32 array, [] or one per
  language [L] with lang [B] int, each row's language index. Returns the experience and the
  `objective/*` and `rollout/*` metrics (scalars), plus `finite`.
  """
  mask = rollout.answer_mask  # [B, N]
  temperature = hyper.temperature
  # The reference is the policy's model with its adapters off (the same config without LoRA).
  ref_logprobs = answer_logprobs(frozen.reference, rollout,
                                 model_config=lora.base_config(models.policy),
                                 temperature=temperature)
  if hyper.recompute_old_logprobs:
    old_logprobs = answer_logprobs(full_policy(params["policy"], frozen, models), rollout,
                                   model_config=models.policy, temperature=temperature)
  else:
    old_logprobs = rollout.logprobs * mask

  values, rm_scores, features = values_and_scores(params["critic"], frozen, rollout,
                                                  models=models, hyper=hyper,
                                                  reward_fn=reward_fn)
  scores = rm_scores
  if hyper.missing_eos_penalty is not None:
    # A cut-off answer has no defined RM score (the RM was trained on complete ones).
    scores = jnp.where(rollout.ended, rm_scores, hyper.missing_eos_penalty)

  kl_tokens = kl.kl_per_token(old_logprobs, ref_logprobs, hyper.kl_estimator) * mask  # [B, N]
  coefs = kl.row_coefs(kl_coef, lang)  # [] or [B]
  non_score = -(coefs[:, None] if coefs.ndim else coefs) * kl_tokens  # [B, N]
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
      "objective/kl_coef": jnp.mean(coefs),
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
                          kl=kl_seq, critic_features=features, lang=lang)
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
      logprobs, batch.old_logprobs, batch.advantages, mask, hyper.clip_eps, hyper.loss_mean)
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
  """The critic's part of one minibatch's loss: vf_coef · clipped value loss. critic_params:
  whole params, or a head-only critic's head (the batch then carries its features)."""
  rollout, mask = batch.rollout, batch.rollout.answer_mask
  if batch.critic_features is not None:
    values = head_values(critic_params, batch.critic_features) * mask  # [b, N]
  else:
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


def _policy_grads(policy, batch: Experience, ptx_batch: Optional[dict], *, models: PPOModels,
                  hyper: PPOHyper, frozen: Optional[Frozen]) -> tuple[tuple, Any]:
  """((policy loss, stats), gradient) of the policy's terms over the state's policy params."""
  def policy_fn(p):
    return policy_terms(full_policy(p, frozen, models), batch, ptx_batch, models=models,
                        hyper=hyper)
  return jax.value_and_grad(policy_fn, has_aux=True)(policy)


def _critic_grads(critic, batch: Experience, *, models: PPOModels, hyper: PPOHyper,
                  frozen: Optional[Frozen]) -> tuple[tuple, Any]:
  """((value loss, stats), gradient) of the critic's terms over the state's critic params."""
  def critic_fn(c):
    whole = c if batch.critic_features is not None else full_critic(c, frozen, models)
    return value_terms(whole, batch, models=models, hyper=hyper)
  return jax.value_and_grad(critic_fn, has_aux=True)(critic)


def ppo_grads(params, batch: Experience, ptx_batch: Optional[dict], *, models: PPOModels,
              hyper: PPOHyper, frozen: Optional[Frozen] = None) -> tuple[tuple, dict]:
  """((loss, stats), grads) of `ppo_loss` over the state's params, one model after the other.

  The policy's and the critic's terms share no trained parameter, so each model's gradient is
  its own term's. Taken apart, the critic's forward pass reads tokens that depend on the
  policy's gradient (`_after`): XLA cannot start it before the policy's backward pass has
  ended, so the two models' activations are not held at once (XLA CPU's plan of one LoRA
  minibatch at the SmolLM2-135M shape: 5.0 -> 4.1 GiB of temporaries; benchmarks/RESULTS.md)."""
  kw = dict(models=models, hyper=hyper, frozen=frozen)
  (policy_loss, policy_stats), policy_grads = _policy_grads(params["policy"], batch, ptx_batch,
                                                            **kw)
  (value_loss, value_stats), critic_grads = _critic_grads(
      params["critic"], _tokens_after(batch, policy_grads), **kw)
  loss = policy_loss + value_loss
  stats = {"ppo/loss/total": loss, **policy_stats, **value_stats}
  return (loss, stats), {"policy": policy_grads, "critic": critic_grads}


def _after(tokens: Array, tree) -> Array:
  """`tokens`, unchanged, computed from `tree` too: a data dependence that orders XLA's
  schedule. (lax.optimization_barrier did not: XLA CPU's plan kept both models' activations.)
  Where `tree` is not finite the tokens change, but that minibatch is skipped anyway."""
  shift = (0.0 * optax.global_norm(tree)) != 0.0  # [] False unless `tree` holds a NaN/inf
  return tokens + shift.astype(tokens.dtype)


def _tokens_after(batch: Experience, tree) -> Experience:
  """`batch` whose tokens are read only once `tree` has been computed (`_after`)."""
  return batch._replace(rollout=batch.rollout._replace(tokens=_after(batch.rollout.tokens, tree)))


def _model_step(loss: Array, grads, params, opt_state, tx) -> tuple[Any, Any, Array, Array]:
  """(params, opt_state, gradient norm, applied) of one model's optimizer step, skipped when
  its loss or gradient is not finite (train/state.apply_update_if)."""
  grad_norm = optax.global_norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  params, opt_state, applied = apply_update_if(ok, tx, grads, params, opt_state)
  return params, opt_state, grad_norm, ok & applied


def _scan_minibatches(step, carry, experience: Experience, ptx_batches: Optional[dict],
                      keys: Array, minibatches: int):
  """(carry, stats [epochs, minibatches, ...]) of `step(carry, batch, ptx)` over every
  minibatch of every epoch (epoch e shuffles the rows by keys[e]), as two nested scans."""
  def epoch_step(carry, key):
    batches = _split_minibatches(experience, key, minibatches)
    return jax.lax.scan(lambda c, xs: step(c, *xs), carry, (batches, ptx_batches))
  return jax.lax.scan(epoch_step, carry, keys)


def _ema_of(ema, policy, decay: float):
  return None if ema is None else jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                                               ema, policy)


def update_jointly(params, opt_state, ema, experience: Experience, ptx_batches, keys: Array, *,
                   models: PPOModels, hyper: PPOHyper, tx, frozen: Optional[Frozen] = None):
  """optimizer="joint": each minibatch takes both gradients (`ppo_grads`), one global-norm clip
  over them and one step. Returns ((params, opt_state, ema), stats)."""
  def step(carry, batch, ptx):
    params, opt_state, ema = carry
    (loss, stats), grads = ppo_grads(params, batch, ptx, models=models, hyper=hyper,
                                     frozen=frozen)
    params, opt_state, grad_norm, finite = _model_step(loss, grads, params, opt_state, tx)
    ema = _ema_of(ema, params["policy"], hyper.ema_decay)
    return (params, opt_state, ema), {**stats, "ppo/grad_norm": grad_norm, "finite": finite}
  return _scan_minibatches(step, (params, opt_state, ema), experience, ptx_batches, keys,
                           hyper.minibatches)


def update_models_apart(params, opt_state, ema, experience: Experience, ptx_batches,
                        keys: Array, *, models: PPOModels, hyper: PPOHyper, tx,
                        frozen: Optional[Frozen] = None):
  """optimizer="per_model": an optimizer state and a gradient clip per model. The two models'
  updates are then independent (neither loss reads the other model), so the policy runs every
  minibatch of every epoch first, then the critic on the same minibatches: the same steps as
  taking them in turn, but one model's gradient and activations are held at a time, and each
  scan ends in its own step, which XLA writes in place. (Interleaved in one scan, XLA held the
  policy's new params and moments as 1.6 GiB of temporaries through the critic's pass at the
  SmolLM2-135M shape.) The critic reads tokens computed from the policy's final params, so
  XLA cannot run the two scans at once. Returns ((params, opt_state, ema), stats)."""
  kw = dict(models=models, hyper=hyper, frozen=frozen)

  def policy_step(carry, batch, ptx):
    policy, opt, ema = carry
    (loss, stats), grads = _policy_grads(policy, batch, ptx, **kw)
    policy, opt, norm, finite = _model_step(loss, grads, policy, opt, tx)
    return (policy, opt, _ema_of(ema, policy, hyper.ema_decay)), (loss, norm, finite, stats)

  def critic_step(carry, batch, _):
    critic, opt = carry
    (loss, stats), grads = _critic_grads(critic, batch, **kw)
    critic, opt, norm, finite = _model_step(loss, grads, critic, opt, tx)
    return (critic, opt), (loss, norm, finite, stats)

  (policy, policy_opt, ema), p = _scan_minibatches(
      policy_step, (params["policy"], opt_state["policy"], ema), experience, ptx_batches, keys,
      hyper.minibatches)
  (critic, critic_opt), c = _scan_minibatches(
      critic_step, (params["critic"], opt_state["critic"]), _tokens_after(experience, policy),
      None, keys, hyper.minibatches)
  stats = {"ppo/loss/total": p[0] + c[0], **p[3], **c[3],
           "ppo/grad_norm": jnp.sqrt(p[1] ** 2 + c[1] ** 2), "finite": p[2] & c[2]}
  return ({"policy": policy, "critic": critic}, {"policy": policy_opt, "critic": critic_opt},
          ema), stats


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
  update = update_models_apart if hyper.optimizer == "per_model" else update_jointly
  keys = jax.random.split(jax.random.fold_in(state.key(), 1), hyper.epochs)
  (params, opt_state, ema), stats = update(
      state.params, state.opt_state, state.ema, experience, ptx_batches, keys, models=models,
      hyper=hyper, tx=tx, frozen=frozen)

  kl_coef = controller.update_from_rows(state.kl_coef, experience.kl, experience.lang)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema,
                            kl_coef=jnp.asarray(kl_coef, jnp.float32))
  return new_state, stats
