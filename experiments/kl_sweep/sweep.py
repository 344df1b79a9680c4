"""KL penalty sweep: fixed beta in {0, 0.01, 0.05, 0.2} and the adaptive controller.

Each run redoes PPO (and the stages after it) from the same SFT model and reward model, so the
runs differ only in how hard the policy is held near SFT. Plotted: held-out gold score against
KL(policy || SFT) -- the frontier of what each nat of KL buys under the gold scorer.

  python -m rlhf_jax.recipe.sweep experiments/kl_sweep/sweep.py --workdir=workdirs/kl_sweep
"""
from rlhf_jax.recipe.sweep import policy_diagnostics, product

BASE = "configs/pipeline.py"
SET = {"skip": "kto,dpo"}  # no metric here reads KTO or DPO
START = "ppo"

# Means over languages ("*"); PPO's own held-out evaluation at its last iteration gives KL and
# proxy score, the evaluate stage gives gold score and win rate against SFT on its prompts.
METRICS = {
    "kl": "ppo:eval/*/kl",
    "gold_ppo_eval": "ppo:eval/*/gold",
    "proxy": "ppo:eval/*/proxy",
    "beta_last": "ppo:objective/kl_coef",
    "gold": "results:metrics.ppo.*.gold",
    "win_rate": "results:metrics.ppo.*.win_rate",
    **policy_diagnostics("ppo"),
}
PLOT = ("kl", "gold")


def get_sweep():
  fixed = product({"ppo.kl.coef": [0.0, 0.01, 0.05, 0.2], "ppo.kl.adaptive": [False]})
  # Ziegler et al.'s controller, from the same start as TRL's default beta, with the demo's
  # target and horizon (configs/pipeline.py).
  adaptive = [{"ppo.kl.coef": 0.05, "ppo.kl.adaptive": True}]
  return fixed + adaptive
