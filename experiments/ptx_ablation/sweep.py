"""PPO-ptx ablation: does mixing pretraining batches into PPO (InstructGPT's PPO-ptx) keep the
policy's language model intact, and what does it cost in gold score?

The loss adds ptx.coef * (next-token loss on pretraining text) to every PPO minibatch. With
coef 0 no pretraining row is drawn and the logged loss is a constant 0 that measures nothing,
so the "off" run is coef 1e-6: it draws the rows and logs their loss, and its pull is nil (its
gradient is 10^6 times smaller than coef 1's, and even on a parameter PPO leaves alone, where
Adam would rescale it, it stays far below Adam's eps = 1e-5). Each run redoes PPO (and the
stages after it) from the same SFT model and reward model.

  python -m rlhf_jax.recipe.sweep experiments/ptx_ablation/sweep.py --workdir=workdirs/ptx
"""
from rlhf_jax.recipe.sweep import policy_diagnostics, product

BASE = "configs/pipeline.py"
SET = {"skip": "kto,dpo"}  # no metric here reads KTO or DPO
START = "ppo"

METRICS = {
    # the policy's next-token loss on the pretraining rows of PPO's last iteration (mean over
    # its epochs x minibatches: from the second epoch on, a run with coef > 0 has already
    # trained on those rows once, a slight bias in its favour)
    "ptx_loss": "ppo:ppo/loss/ptx",
    "gold": "results:metrics.ppo.*.gold",
    "win_rate": "results:metrics.ppo.*.win_rate",
    "kl": "ppo:eval/*/kl",
    "proxy": "ppo:eval/*/proxy",
    **policy_diagnostics("ppo"),
}
PLOT = ("ptx_loss", "gold")


def get_sweep():
  return product({"ppo.ptx.coef": [1e-6, 0.1, 1.0]})
