"""Reward-model loss ablation: pairwise vs K-wise vs ordinal, then PPO against each RM.

The losses differ in what one batch element is and in what labels they read:
  pairwise  every (better, worse) pair is its own element, shuffled over the data set (the
            set-up InstructGPT warns overfits); run on grades and on rankings
  ordinal   one prompt's K answers graded good / average / poor, every pair of different grade
            from one forward pass per answer, averaged per prompt (loss "grades")
  kwise     one prompt's K answers fully ranked: all K(K-1)/2 pairs (loss "kwise")
Grades and rankings are two labellings of the same sampled answers by the same simulated
annotators, so the runs redo the comparisons stage (same SFT model, same prompts, same seed:
the same answers, labelled the run's way), the RM and everything after it.

  python -m rlhf_jax.recipe.sweep experiments/rm_loss_ablation/sweep.py --workdir=workdirs/rm_loss
"""
from rlhf_jax.recipe.sweep import policy_diagnostics, zipped

BASE = "configs/pipeline.py"
SET = {"skip": "kto,dpo"}  # no metric here reads KTO or DPO
START = "comparisons"

METRICS = {
    # held-out comparisons: agreement with the simulated annotators' labels, and with the
    # noiseless gold ordering (what the RM should learn)
    "rm_accuracy": "rm:eval/rm/accuracy",
    "rm_gold_accuracy": "rm:eval/rm/gold_accuracy",
    "rm_gold_accuracy_en": "rm:eval/rm/gold_accuracy/en",
    "rm_gold_accuracy_zh": "rm:eval/rm/gold_accuracy/zh",
    # the policy trained against each RM, judged by the gold scorer (means over languages)
    "gold": "results:metrics.ppo.*.gold",
    "win_rate": "results:metrics.ppo.*.win_rate",
    "kl": "ppo:eval/*/kl",
    **policy_diagnostics("ppo"),
}
PLOT = ("rm_gold_accuracy", "gold")


def get_sweep():
  return zipped({
      "_name": ["pairwise-grades", "ordinal-grades", "pairwise-ranking", "kwise-ranking"],
      "comparisons.label": ["grades", "grades", "ranking", "ranking"],
      "rm.loss.name": ["pairwise", "grades", "pairwise", "kwise"],
  })
