"""The sections one stage alone reads: PPO's, the reward model's, KTO / DPO's.

The shared ones (tokenizer, model, optim, train, ...) are in sections.py; configs/<stage>.py
puts a stage together from both. Light on purpose, like sections.py.
"""
from __future__ import annotations

import ml_collections

# ---------------------------------------------------------------------------------------------
# PPO (rlhf_jax/rl/trainer.py).


def prompt_data_section(lang: str, batch_size: int,
                        max_prompt_len: int) -> ml_collections.ConfigDict:
  """`config.data` of PPO: the prompts it answers, {prompt, lang} records."""
  return ml_collections.ConfigDict(dict(
      name="rlhf_prompts", split="train", data_dir="",
      lang=lang,  # en | zh | both (every batch half of each)
      batch_size=batch_size,  # episodes per iteration
      max_prompt_len=max_prompt_len))  # prompts are left-padded to this


def ppo_section(tiny: bool) -> ml_collections.ConfigDict:
  """`config.ppo`: the clipped-surrogate update and the per-token reward (rlhf_jax/rl/ppo.py)."""
  return ml_collections.ConfigDict(dict(
      epochs=2 if tiny else 4, minibatches=2 if tiny else 4,
      clip_eps=0.2, value_clip=0.2, vf_coef=0.1, ent_coef=0.0,
      gamma=1.0, lam=0.95,
      kl_estimator="k1",  # per-token KL in the reward: k1 (unbiased) or k3 (non-negative)
      whiten_rewards=False,  # scale-only whitening of the per-token rewards
      missing_eos_penalty=-1.0,  # the score of an answer with no stop token in the budget
      penalize_missing_eos=True,
      ema_decay=0.0,  # > 0: keep an EMA of the policy (InstructGPT: 0.992)
      # Where log pi_old comes from: the sampler's log-probs ("sampler", no extra forward
      # pass), a policy forward pass ("recompute"), or "auto": sampler at float32 compute,
      # recompute otherwise (a bfloat16 KV-cache decode rounds differently from a full pass).
      old_logprobs="auto",
      # "joint": one optimizer and gradient clip over policy and critic (TRL's PPOTrainer);
      # "per_model": one each, the policy's every step before the critic's, so one model's
      # gradient is held at a time (rl/ppo.py `update_models_apart`).
      optimizer="joint",
      # "trained": the critic is a scalar model started from the RM, trunk (or its LoRA
      # adapters) and head; "frozen": a value head on the RM's frozen trunk, which scores the
      # rollout in the same pass, and the update never runs a critic trunk (rl/ppo.py).
      critic_trunk="trained",
      # The policy loss averaged over the batch's answer tokens ("token", TRL's), or over each
      # answer's tokens and then the answers ("answer"): every episode weighs the same, so
      # short answers (Chinese beside English) get their share of each update.
      loss_mean="token"))


def kl_section() -> ml_collections.ConfigDict:
  """`config.kl`: the KL penalty's coefficient and its adaptive controller."""
  return ml_collections.ConfigDict(dict(
      coef=0.05,  # beta; the initial one when adaptive
      # 'zh:0.1': one beta per language, these for the languages named, coef for the others;
      # each follows its own language's KL when adaptive (rl/kl.py). '' = one beta for all.
      coef_by_lang="",
      adaptive=True, target=6.0, horizon=10000.0))  # Ziegler et al.: target in nats/answer


def ptx_section(tiny: bool) -> ml_collections.ConfigDict:
  """`config.ptx`: PPO-ptx (InstructGPT), + coef * next-token loss on pretraining text, `rows`
  rows per minibatch."""
  return ml_collections.ConfigDict(dict(
      coef=0.0, data="rlhf_text", split="train", rows=4 if tiny else 16,
      seq_len=32 if tiny else 128))


def ppo_eval_section(sampling, tiny: bool, steps: int) -> ml_collections.ConfigDict:
  """`config.eval` of PPO: held-out prompts answered along the run. Answers are as long as the
  training sampler's (`sampling.max_new_tokens`, followed when that is overridden)."""
  return ml_collections.ConfigDict(dict(
      every=0 if tiny else max(steps // 10, 1),  # iterations; 0 = only at the end
      split="validation", n_prompts=8 if tiny else 64,  # per language; 0 = no evaluation
      # tiny samples as in training, so evaluation reuses the compiled sampler
      temperature=1.0 if tiny else 0.7, top_p=1.0,
      max_new_tokens=sampling.get_oneway_ref("max_new_tokens")))


# ---------------------------------------------------------------------------------------------
# The reward model (rlhf_jax/train/reward.py).


def comparison_data_section(name: str, batch_size: int, seq_len: int,
                            max_answers: int) -> ml_collections.ConfigDict:
  """`config.data` of the RM: rankings or grades of K answers per prompt, or thumbs."""
  return ml_collections.ConfigDict(dict(
      name=name,  # rlhf_comparisons/<config> (grades or rankings), or rlhf_feedback thumbs
      split="train", data_dir="",
      batch_size=batch_size,  # prompts (comparisons) per step
      seq_len=seq_len,  # prompt + answer; prompts cut on the left
      max_answers=max_answers,  # K: batches are [B, K, T]; a record with more is an error
      epochs=1,  # used when train.steps = 0
      # 'answers': a row of seq_len per answer. 'shared_prompt': a row of row_len per
      # comparison, its prompt once and the K answers after it (data/rm_batches.py): the same
      # scores from fewer positions. Comparisons and independent pairs both; thumbs too.
      layout="answers", row_len=0,
  ))


def rm_loss_section(name: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name,  # kwise | grades | pairwise | binary; '' picks from the data
      margin=0.0,  # per grade step: a pair graded g apart must win by margin * g
  ))


def rm_eval_section(tiny: bool) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      split="validation",  # '' = no held-out evaluation
      every=0,  # steps between evaluations (of the current iterate); 0 = only at the end
      max_comparisons=512 if not tiny else 64,
      batch_size=0,  # 0 = data.batch_size
      scorer="gold",  # gold scorer for accuracy against the noiseless ordering; '' = none
      bins=10,  # calibration bins
  ))


def rm_normalize_section(tiny: bool) -> ml_collections.ConfigDict:
  """`config.normalize`: the gain and bias that give the SFT policy's answers mean 0, std 1."""
  return ml_collections.ConfigDict(dict(
      enabled=True,
      source="auto",  # policy: sample the SFT (init_from) | responses: the data's answers
      num_prompts=256 if not tiny else 16,  # training prompts to answer
      max_new_tokens=48 if not tiny else 8,
      temperature=1.0, top_p=1.0,  # the SFT policy as PPO samples it
      batch_size=64 if not tiny else 8,
  ))


# ---------------------------------------------------------------------------------------------
# KTO and DPO (rlhf_jax/train/preference.py).


def preference_data_section(names: str, batch_size: int,
                            seq_len: int) -> ml_collections.ConfigDict:
  """`config.data` of KTO / DPO: `seq_len` split evenly between prompt and answer."""
  return ml_collections.ConfigDict(dict(
      names=names,  # one TFDS name, or several joined by '+' and read as one stream
      split="train", data_dir="",
      batch_size=batch_size,  # KTO: answers per step; DPO: pairs per step
      # Rows are [left-padded prompt | right-padded answer]; a longer prompt loses its oldest
      # tokens, a longer answer its end (both counted in data/truncated_answers).
      max_prompt_len=seq_len // 2,
      max_answer_len=seq_len - seq_len // 2,
      epochs=1,  # used when train.steps = 0
  ))


def preference_eval_section() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      split="validation",  # '' = no held-out evaluation
      every=0,  # steps between evaluations; 0 = before training and at the end only
      max_examples=0,  # 0 = every held-out element
      batch_size=0,  # 0 = data.batch_size
  ))
