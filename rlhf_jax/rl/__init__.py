"""Reinforcement learning from the reward model: the pieces of one PPO iteration.

  rollout.py  sample answers, lay out [prompt | answer] sequences, find missing stop tokens
  kl.py       per-token KL estimators (k1, k3) and the fixed / adaptive KL coefficient
  gae.py      generalised advantage estimation (reverse lax.scan), masked whitening
  ppo.py      the PPO step: experience (scores, KL, advantages) and the update (epochs x
              minibatches in one jit)

The host loop that drives them is rlhf_jax/rl/trainer.py.
"""
