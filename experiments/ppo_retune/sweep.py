"""Retuning the demo's PPO so that it improves answers instead of collapsing onto what the gold
scorer likes ('Haha haha', '我喜欢。').

Every run redoes PPO and the evaluation from the default demo's SFT model and reward model
(KTO and DPO are skipped: they do not read PPO). One lever at a time from the default, then
the promising ones together. Each row carries the verdict and the diagnostics behind it per
language (eval/diagnostics.py) and PPO's held-out KL.

  python -m rlhf_jax.recipe.sweep experiments/ppo_retune/sweep.py --workdir=workdirs/ppo_retune \
      [--base=workdirs/demo]
"""
from rlhf_jax.recipe.sweep import policy_diagnostics

BASE = "configs/pipeline.py"
SET = {"skip": "kto,dpo"}  # no metric here reads KTO or DPO
START = "ppo"

METRICS = {"kl_en": "ppo:eval/en/kl", "kl_zh": "ppo:eval/zh/kl",
           "beta_last": "ppo:objective/kl_coef", **policy_diagnostics("ppo")}
PLOT = ("kl_en", "check_win_en")


def get_sweep():
  return [
      {"_name": "default"},
      {"_name": "kl-target-1", "ppo.kl.target": 1.0},
      {"_name": "kl-target-2", "ppo.kl.target": 2.0},
      {"_name": "entropy-0.01", "ppo.ppo.ent_coef": 0.01},
      {"_name": "entropy-0.05", "ppo.ppo.ent_coef": 0.05},
      {"_name": "whiten", "ppo.ppo.whiten_rewards": True},
      {"_name": "lr-1e-4", "ppo.optim.learning_rate": 1e-4},
      {"_name": "kl-target-2+entropy-0.01", "ppo.kl.target": 2.0, "ppo.ppo.ent_coef": 0.01},
  ]
